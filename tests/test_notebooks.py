"""The example notebooks, MsPASS workflows, run unchanged on the desktop backend and on the Slurm test bed.

Only configuration differs between the two runs (environment variables the
kernel inherits), never the notebooks. They need the real mspasspy (built by
ci/mspasspy-build): without it they skip, except under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import require_mspasspy
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EMBEDDED_DB = repr([sys.executable, "-m", "mspass_cluster.embedded_db"])
#: What each notebook checks and prints last: its records, each compared with the same processing done locally.
RECORDS = {"desktop_prototype.ipynb": 12, "slurm_interactive.ipynb": 12, "batch_workflow.ipynb": 12}


@pytest.fixture(scope="module", autouse=True)
def mspasspy():
    require_mspasspy()


def assert_all_records_intact(name, text):
    counts = re.findall(r"^(\d+)/(\d+) records intact", text, re.MULTILINE)
    assert counts == [(str(RECORDS[name]), str(RECORDS[name]))], text


def run_notebook(name, tmp_path, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["desktop_prototype.ipynb", "slurm_interactive.ipynb", "batch_workflow.ipynb"])
def test_notebook_on_the_desktop_backend(name, tmp_path, monkeypatch):
    text = run_notebook(
        name,
        tmp_path,
        monkeypatch,
        {"MSPASS_CLUSTER_BACKEND": "local", "MSPASS_WORK_DIR": str(tmp_path), "DASK_MSPASS_CLUSTER__DB_PORT": "27394"},
    )
    assert_all_records_intact(name, text)


@pytest.mark.slurm
@pytest.mark.parametrize("name", ["desktop_prototype.ipynb", "slurm_interactive.ipynb", "batch_workflow.ipynb"])
def test_same_notebook_on_the_slurm_test_bed(name, slurm_testbed, tmp_path, monkeypatch):
    from conftest import queued

    text = run_notebook(
        name,
        tmp_path,
        monkeypatch,
        {
            "MSPASS_CLUSTER_BACKEND": "slurm",
            "MSPASS_WORK_DIR": str(tmp_path),
            "DASK_MSPASS_CLUSTER__DB_COMMAND": EMBEDDED_DB,
            "DASK_MSPASS_CLUSTER__WALLTIME": "10",
        },
    )
    assert_all_records_intact(name, text)
    ids = [line.split(".out")[0].rsplit("-", 1)[1] for line in os.listdir(tmp_path / "logs") if line.endswith(".out")]
    assert ids and queued(ids) == []
