"""What a notebook user sees of a cluster, rendered by a real browser (Debian's chromium, headless).

The cluster's HTML repr is what Jupyter shows under a cell. A database lost
after start-up must be visible there at a glance: the status line says so,
and its job's row reads "failed" in red while the workers read "ready" in
green.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from conftest import FAKE_MONGOD

from mspass_cluster import JobFailedError, MsPASSCluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _screenshot(html: str, directory) -> "numpy.ndarray":  # noqa: F821
    import matplotlib.image

    page, picture = directory / "cluster.html", directory / "cluster.png"
    page.write_text(f"<!doctype html><html><body style='font-family:sans-serif'>{html}</body></html>")
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={picture}",
            "--window-size=1400,400",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return matplotlib.image.imread(str(picture))


def _has_colour(image, rgb, tolerance=0.12) -> bool:
    import numpy as np

    target = np.array(rgb) / 255.0
    return bool((np.abs(image[..., :3] - target) < tolerance).all(axis=-1).sum() > 20)


def test_a_lost_database_shows_in_red_in_the_notebook_display(tmp_path):
    if CHROMIUM is None:
        message = "chromium is not installed (ci/setup installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    with MsPASSCluster(
        backend="local",
        nodes=1,
        work_dir=str(tmp_path / "run"),
        db_command=FAKE_MONGOD,
        dashboard_address=":0",
        db_restarts=0,  # a database that stays lost (one brought back is tests/test_db_restart.py's)
    ) as cluster:
        healthy = _screenshot(cluster._repr_html_(), tmp_path)
        assert _has_colour(healthy, (0x1A, 0x7F, 0x37)) and not _has_colour(healthy, (0xCF, 0x22, 0x2E))
        os.killpg(int(cluster.db_job.job_id), signal.SIGKILL)  # the job and its server, as a node failure would
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                cluster.get_db_client()
            except JobFailedError:
                break
            time.sleep(0.2)
        html = cluster._repr_html_()
        assert "running, but its database is lost" in html and f"<td>{cluster.db_job.job_id}</td>" in html
        lost = _screenshot(html, tmp_path)
        assert _has_colour(lost, (0xCF, 0x22, 0x2E)), "the failed database is not shown in red"
