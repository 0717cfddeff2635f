"""What is left of a cluster: its jobs in ``squeue`` and its processes in ``/proc``.

The harness runs Slurm's programs by absolute path, so that the ``PATH`` shims
that count dask-jobqueue's status calls (see :func:`make_status_shims`) never
count the harness's own polling.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

__all__ = [
    "SLURM_PROGRAMS",
    "STATUS_PROGRAMS",
    "slurm_path",
    "queued_jobs",
    "testbed_nodes",
    "scancel",
    "cluster_pids",
    "wait_until",
    "make_status_shims",
    "read_shim_counts",
]

#: Programs whose calls load the Slurm controller with status queries.
STATUS_PROGRAMS = ("squeue", "sacct", "scontrol")
#: Every Slurm program the harness or a shim needs, resolved once.
SLURM_PROGRAMS = STATUS_PROGRAMS + ("sbatch", "scancel", "sinfo")
_RESOLVED: dict[str, str] = {}


def slurm_path(program: str) -> str:
    """Absolute path of a Slurm program, found once before any ``PATH`` change.

    Raises
    ------
    RuntimeError
        When the program is not installed.
    """
    if program not in _RESOLVED:
        found = shutil.which(program, path=os.environ.get("PATH", "") + os.pathsep + "/usr/bin")
        if found is None:
            raise RuntimeError(f"{program} is not installed; run `ci/testbed up 17` as root first.")
        _RESOLVED[program] = os.path.realpath(found)
    return _RESOLVED[program]


def _run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def queued_jobs(tag: str | None = None) -> dict[str, str]:
    """Jobs squeue lists (pending, running, completing), ``{job_id: name}``.

    Raises ``RuntimeError`` when squeue fails.

    Parameters
    ----------
    tag : str, optional
        Keep only the jobs of one benchmark cluster: named ``tag`` exactly
        (dask-jobqueue) or ``tag-...`` (MsPASSCluster adds ``-<id>-worker-<n>``).
    """
    argv = [slurm_path("squeue"), "--noheader", "--format=%i|%j"]
    out = _run(argv)
    if out.returncode != 0:
        # An outage must not read as "nothing queued": the harness would take leftovers for gone.
        raise RuntimeError(
            f"{shlex.join(argv)} failed with exit code {out.returncode}: {out.stderr.strip()}; "
            "the harness cannot tell which jobs are left. Check `scontrol ping`."
        )
    jobs = {}
    for line in out.stdout.splitlines():
        job_id, _, name = line.strip().partition("|")
        if job_id and (tag is None or name == tag or name.startswith(tag + "-")):
            jobs[job_id] = name
    return jobs


def testbed_nodes() -> int:
    """How many test-bed nodes Slurm can use now (idle, mixed or allocated)."""
    out = _run([slurm_path("sinfo"), "--noheader", "--Node", "--format=%N %t"])
    states = [line.split() for line in out.stdout.splitlines() if line.strip()]
    return len({name for name, state in states if state.rstrip("*") in ("idle", "mix", "alloc")})


def scancel(job_ids) -> None:
    """Cancel jobs by id (never by name pattern)."""
    if job_ids:
        _run([slurm_path("scancel"), *sorted(job_ids)])


def _proc_field(pid: str, name: str) -> bytes:
    return (Path("/proc") / pid / name).read_bytes()


def _alive(pid: str) -> bool:
    stat = _proc_field(pid, "stat").decode(errors="replace")
    return stat.rsplit(") ", 1)[1].split()[0] != "Z"


def cluster_pids(*, env_markers=(), job_ids=(), cmdline_marker: str | None = None) -> list[int]:
    """PIDs of live processes that belong to a cluster.

    A process belongs to it when its environment holds one of
    ``env_markers`` (e.g. ``MSPASS_CLUSTER_ID=<id>``) or
    ``SLURM_JOB_ID=<one of job_ids>``, or its command line contains
    ``cmdline_marker`` (dask-jobqueue's scheduler address: only the nanny's
    command line names it, its worker child is found by ``SLURM_JOB_ID``).
    """
    wanted_env = {m.encode() for m in env_markers} | {f"SLURM_JOB_ID={j}".encode() for j in job_ids}
    marker = cmdline_marker.encode() if cmdline_marker else None
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            environ = set(_proc_field(pid, "environ").split(b"\0"))
            cmdline = _proc_field(pid, "cmdline")
            mine = bool(environ & wanted_env) or (marker is not None and marker in cmdline)
            if mine and _alive(pid):
                pids.append(int(pid))
        except (OSError, IndexError):
            continue  # the process ended while being read
    return pids


def wait_until(condition, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition()`` every ``interval`` s until it is true; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


_SHIM = """#!/bin/bash
# Counts one call, then runs the real program (benchmarks/probes.py).
echo {name} >> {counter}
exec {real} "$@"
"""


def make_status_shims(directory: Path, programs=STATUS_PROGRAMS + ("sbatch",)) -> Path:
    """Write counting shims for ``programs`` into ``directory``; return the counter file.

    Put ``directory`` first on ``PATH`` and every call by name of one of the
    programs appends the program's name to the counter file. ``sbatch`` is
    shimmed too so that a run can show the shims really are on the path it uses.
    """
    directory.mkdir(parents=True, exist_ok=True)
    counter = directory / "calls.txt"
    counter.write_text("")
    for name in programs:
        shim = directory / name
        shim.write_text(_SHIM.format(name=name, counter=shlex.quote(str(counter)), real=shlex.quote(slurm_path(name))))
        shim.chmod(0o755)
    return counter


def read_shim_counts(counter: Path) -> dict[str, int]:
    """Calls per program recorded in a shim counter file."""
    counts: dict[str, int] = {}
    for line in counter.read_text().split():
        counts[line] = counts.get(line, 0) + 1
    return counts
