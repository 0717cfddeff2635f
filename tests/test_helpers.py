"""The tests' own Slurm helpers are honest: a Slurm that does not answer fails a test, never passes it."""

from __future__ import annotations

import os

import conftest
import pytest
from conftest import queued, queued_names


def _failing_squeue(tmp_path, monkeypatch):
    """``squeue`` on PATH answers as it does while slurmctld is down."""
    (tmp_path / "squeue").write_text(
        "#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller (connect failure)' >&2\nexit 1\n"
    )
    (tmp_path / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(conftest, "SLURM_QUERY_PATIENCE", 0.0)


def test_queued_fails_when_squeue_fails(tmp_path, monkeypatch):
    _failing_squeue(tmp_path, monkeypatch)
    with pytest.raises(
        RuntimeError,
        match=r"squeue --noheader (--array )?--format=%i failed with exit code 1: squeue: error: "
        r"Unable to contact slurm controller.*ci/testbed status",
    ):
        queued(["12345"])
    with pytest.raises(RuntimeError, match="Unable to contact slurm controller"):
        queued_names()


@pytest.mark.slurm
def test_a_job_slurm_has_forgotten_is_not_queued(slurm_testbed):
    # squeue --jobs=<one unknown id> exits 1 ("Invalid job id specified"); for the helper that is "not queued".
    assert queued(["999999999"]) == []
    assert queued([]) == []
