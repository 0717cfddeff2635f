"""The two tools under test, behind one small interface.

Both get the same worker nodes: one Dask worker process per node with 4 cores
and 3 GiB (test-bed nodes have CPUs=4, RealMemory=4000 MB), a 10 minute
walltime, this interpreter as the workers' Python, the default partition.
``MsPASSCluster`` also runs its database job (the nx-27017 stand-in, as no
``mongod`` exists here); dask-jobqueue runs workers only.

Every cluster gets a unique ``tag`` as its Slurm job name (MsPASSCluster adds
``-<id>-db``/``-<id>-worker-<n>`` to it), so its jobs can be found in
``squeue`` even when its constructor raised.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client

from . import probes

__all__ = ["WORKER_CORES", "WORKER_MEMORY", "WALLTIME_MINUTES", "Running", "MsPASSTool", "JobqueueTool", "TOOLS"]

WORKER_CORES = 4
WORKER_MEMORY = "3GiB"
WALLTIME_MINUTES = 10
#: The nx-27017 server behind mongod's command line (see the project README).
NX_MONGOD = [sys.executable, "-m", "mspass_cluster.embedded_db"]
#: The address the test-bed nodes reach this machine on (ci/testbed's bridge).
TESTBED_INTERFACE = "br-hpc"
#: Longest wait for workers outside the failure measurement.
READY_TIMEOUT = 600


@dataclass
class Running:
    """A cluster the harness started, with what is needed to measure and clean it up."""

    tool: str
    tag: str
    cluster: object
    client: Client | None = None
    seen_job_ids: set = field(default_factory=set)
    #: MsPASSCluster: its cluster id; dask-jobqueue: its scheduler address
    #: (kept here because it is still needed to find processes after close()).
    marker: str = ""

    def workers(self) -> int:
        """Workers the scheduler (in this process for both tools) has now."""
        return len(self.cluster.scheduler.workers)


class MsPASSTool:
    """``mspass_cluster.MsPASSCluster`` with ``backend="slurm"``.

    Parameters
    ----------
    scratch : Path
        Each cluster's ``work_dir`` is ``scratch/<tag>``.
    """

    name = "mspass"
    label = "MsPASSCluster"
    #: Jobs besides the worker nodes': the database.
    extra_jobs = 1

    def __init__(self, scratch: Path):
        self.scratch = scratch

    def start(self, nodes: int, tag: str, *, python: str | None = None, command_runner=None, **options) -> Running:
        """Create the cluster; returns once the database answers and every worker connected.

        ``options`` (e.g. ``backend``, ``security``) go to ``MsPASSCluster`` over the defaults here.
        """
        from mspass_cluster import MsPASSCluster

        work_dir = self.scratch / tag
        work_dir.mkdir(parents=True, exist_ok=True)
        settings = dict(
            nodes=nodes,
            backend="slurm",
            processes=1,
            cores=WORKER_CORES,
            memory=WORKER_MEMORY,
            walltime=str(WALLTIME_MINUTES),
            python=python or sys.executable,
            db_command=NX_MONGOD,
            work_dir=str(work_dir),
            job_name=tag,
            command_runner=command_runner,
        )
        cluster = MsPASSCluster(**{**settings, **options})
        running = Running(self.name, tag, cluster, marker=cluster.cluster_id)
        self.job_ids(running)
        return running

    def scale_up(self, running: Running, nodes: int) -> None:
        """Scale to ``nodes`` worker nodes and wait until all their workers connected."""
        running.cluster.scale(nodes)
        running.cluster.wait_for_workers()
        self.job_ids(running)

    def scale_down(self, running: Running, nodes: int) -> None:
        """Ask for ``nodes`` worker nodes (the caller watches the scheduler and squeue)."""
        running.cluster.scale(nodes)

    def job_ids(self, running: Running) -> set:
        """Every job this cluster submitted so far (database included)."""
        running.seen_job_ids |= set(running.cluster.job_ids)
        return running.seen_job_ids

    def pids(self, running: Running) -> list[int]:
        """Live processes its jobs started (they carry ``MSPASS_CLUSTER_ID``)."""
        return probes.cluster_pids(env_markers=[f"MSPASS_CLUSTER_ID={running.marker}"], job_ids=running.seen_job_ids)

    def close(self, running: Running) -> str | None:
        """``close()``; returns the error it raised, if any, as text."""
        try:
            running.cluster.close()
        except Exception as exc:  # recorded, and the leftovers are cancelled by the caller
            return f"{type(exc).__name__}: {exc}"
        return None


class JobqueueTool:
    """Bare ``dask_jobqueue.SLURMCluster``: constructor, ``scale(jobs=n)``, ``client.wait_for_workers(n)``.

    Parameters
    ----------
    scratch : Path
        Each cluster's ``log_directory`` is ``scratch/<tag>/logs``.
    """

    name = "jobqueue"
    label = "dask-jobqueue SLURMCluster"
    extra_jobs = 0

    def __init__(self, scratch: Path):
        self.scratch = scratch

    def create(self, tag: str, *, python: str | None = None) -> Running:
        """The cluster object and a client, no job yet."""
        from dask_jobqueue import SLURMCluster

        log_dir = self.scratch / tag / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        cluster = SLURMCluster(
            cores=WORKER_CORES,
            memory=WORKER_MEMORY,
            processes=1,
            walltime=f"00:{WALLTIME_MINUTES:02d}:00",
            python=python or sys.executable,
            log_directory=str(log_dir),
            job_name=tag,
            scheduler_options={"interface": TESTBED_INTERFACE},
        )
        return Running(self.name, tag, cluster, client=Client(cluster), marker=cluster.scheduler_address)

    def start(self, nodes: int, tag: str, *, python: str | None = None, timeout: float = READY_TIMEOUT) -> Running:
        """Constructor + ``scale(jobs=nodes)`` + ``client.wait_for_workers(nodes)``; closes the cluster if that fails."""
        running = self.create(tag, python=python)
        try:
            running.cluster.scale(jobs=nodes)
            running.client.wait_for_workers(nodes, timeout=timeout)
        except BaseException:
            self.close(running)
            raise
        self.job_ids(running)
        return running

    def scale_up(self, running: Running, nodes: int) -> None:
        running.cluster.scale(jobs=nodes)
        running.client.wait_for_workers(nodes, timeout=READY_TIMEOUT)
        self.job_ids(running)

    def scale_down(self, running: Running, nodes: int) -> None:
        running.cluster.scale(jobs=nodes)

    def job_ids(self, running: Running) -> set:
        """Job ids of its worker objects so far (they leave ``cluster.workers`` when scaled away)."""
        ids = {getattr(w, "job_id", None) for w in list(running.cluster.workers.values())}
        running.seen_job_ids |= {i for i in ids if i}
        return running.seen_job_ids

    def pids(self, running: Running) -> list[int]:
        """Live processes naming its scheduler address, or in one of its jobs."""
        return probes.cluster_pids(cmdline_marker=running.marker, job_ids=running.seen_job_ids)

    def close(self, running: Running) -> str | None:
        """Client and cluster ``close()``; returns the error raised, if any, as text.

        dask-jobqueue's close may raise (e.g. ``AssertionError``, or ``scancel``
        failing on a job that already ended); the caller then cancels what is left.
        """
        self.job_ids(running)
        errors = []
        for closable in (running.client, running.cluster):
            if closable is None:
                continue
            try:
                closable.close()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        return "; ".join(errors) or None


TOOLS = (MsPASSTool, JobqueueTool)
