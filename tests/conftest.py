"""Shared fixtures: the Slurm test bed, the mongod stand-ins, and leftover checks.

Stand-ins used here (no mongod exists on this machine):

* ``fake_mongod.py`` - a fake mongod program for process handling
  (start, readiness, clean stop on SIGTERM, failure on bad options).
* ``mspass_cluster.embedded_db`` - the nx-27017 server (MongoDB wire protocol
  over SQLite) behind mongod's command line, for the data path (pymongo,
  GridFS); the local backend uses it too when no mongod is installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(__file__).parent / "bin"
FAKE_MONGOD = [sys.executable, str(BIN / "fake_mongod.py")]
NX_MONGOD = [sys.executable, "-m", "mspass_cluster.embedded_db"]


def _testbed_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "Slurm is not installed"
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%N %t"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    # "plnd": idle, but held by the backfill scheduler for a pending job (Slurm 22.05+); "comp": a job finishing.
    usable = [n for n, state in nodes if state.rstrip("*") in ("idle", "mix", "alloc", "plnd", "comp")]
    if out.returncode != 0 or len(usable) < 4:
        return f"the Slurm test bed is not up with 4 nodes (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


@pytest.fixture(scope="session")
def slurm_testbed():
    """The 4-node test bed of `ci/testbed up`; missing under CI=true is a failure, not a skip."""
    problem = _testbed_problem()
    if problem:
        message = f"{problem}; start it with `ci/testbed up` (as root)."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return True


@pytest.fixture
def shared_dir(tmp_path):
    """A work directory every test-bed node sees (the nodes share this machine's file system)."""
    return tmp_path


#: How long a Slurm query of the tests waits out a controller that does not answer (some tests of this suite
#: stop slurmctld for up to 25 s on purpose) before it fails the test.
SLURM_QUERY_PATIENCE = 60.0


def slurm_output(*argv: str, patience: float | None = None) -> str:
    """The stdout of a Slurm query (``squeue``, ``scontrol``...) that a test reads.

    A failing query is retried for ``patience`` seconds (default
    :data:`SLURM_QUERY_PATIENCE`), then fails the test:
    when Slurm does not answer, the tests cannot know what is queued, and
    reading that as "nothing" would let a test pass on an outage.

    Raises
    ------
    RuntimeError
        Naming the command, its exit code and its error output.
    """
    patience = SLURM_QUERY_PATIENCE if patience is None else patience
    deadline = time.monotonic() + patience
    while True:
        try:
            out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            problem = "did not answer within 20 s"
        else:
            if out.returncode == 0:
                return out.stdout
            problem = f"failed with exit code {out.returncode}: {out.stderr.strip() or out.stdout.strip()}"
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"{shlex.join(argv)} {problem} (for {patience:g} s). The test cannot tell what Slurm holds; "
                "check the test bed with `ci/testbed status` and `scontrol ping`."
            )
        time.sleep(1.0)


def queued(job_ids) -> list[str]:
    """Which of ``job_ids`` squeue still lists (pending, running or completing).

    The whole queue is read rather than ``--jobs``: squeue refuses a single
    job id it no longer knows ("Invalid job id specified", exit 1), which
    means "not queued", whereas any failure of squeue itself must fail.
    """
    wanted = {str(job_id) for job_id in job_ids}
    if not wanted:
        return []
    return [
        job_id for job_id in slurm_output("squeue", "--noheader", "--array", "--format=%i").split() if job_id in wanted
    ]


def queued_names() -> list[str]:
    """The names of every job in the queue (pending, running or completing), whoever owns it."""
    return slurm_output("squeue", "--noheader", "--format=%j").split()


def cluster_processes(cluster_id: str) -> list[int]:
    """PIDs of live processes started by a cluster's jobs (they carry MSPASS_CLUSTER_ID)."""
    needle = f"MSPASS_CLUSTER_ID={cluster_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split(") ", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def assert_nothing_left(cluster):
    """No job of ``cluster`` in squeue and no process it started still alive."""
    ids = list(cluster.job_ids)
    assert ids, "the cluster submitted no job"
    assert queued(ids) == [], f"jobs still queued: {queued(ids)}"
    assert cluster_processes(cluster.cluster_id) == []


def require_mspasspy():
    """The real mspasspy (built by ci/mspasspy-build, installed by ci/setup); missing under CI=true is a failure, not a skip."""
    try:
        import mspasspy.ccore.seismic  # noqa: F401  (the C++ part, the one that can be missing or broken)
        import mspasspy.client  # noqa: F401
    except ImportError as exc:
        message = f"mspasspy is not importable ({exc}); ci/setup builds and installs it (ci/mspasspy-build)."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
