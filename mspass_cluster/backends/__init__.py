"""Where a cluster's roles run: three backends behind one async protocol.

=============== =============================================== ===================
backend         each role runs as                               class
=============== =============================================== ===================
``slurm``       a Slurm job of its own (``sbatch``)              :class:`SlurmBackend`
``allocation``  an ``srun`` step inside the notebook's own job   :class:`AllocationBackend`
``local``       a process group on this machine (the desktop)    :class:`LocalBackend`
=============== =============================================== ===================

All three run the very same job scripts (:mod:`mspass_cluster.roles`); only
where they run differs. :func:`choose_backend` resolves ``backend='auto'``,
:func:`open_backend` makes one, and :func:`finalise_options` applies, once and
re-validated, the defaults that depend on it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import Protocol

from dask.system import CPU_COUNT
from dask.utils import format_bytes, parse_bytes
from distributed.system import MEMORY_LIMIT

from ..commands import CommandRunner
from ..config import MIN_MEMORY, ClusterOptions, check_consistency
from ..errors import CommandError, ConfigError, SlurmUnavailableError
from ..network import free_local_port, scheduler_host
from ..roles import SECURE_SCHEDULER_PLACEHOLDER, ScriptContext
from ..security import CredentialFiles
from ..slurm import JobStatus
from .allocation import AllocationBackend, allocation_nodes, allocation_size, in_allocation
from .local import LOCAL_HOST, LocalBackend, share_of_this_machine
from .slurm import SlurmBackend

__all__ = [
    "Backend",
    "SlurmBackend",
    "AllocationBackend",
    "LocalBackend",
    "LOCAL_HOST",
    "auto_backend",
    "choose_backend",
    "open_backend",
    "backend_defaults",
    "finalise_options",
    "EMBEDDED_DB_COMMAND",
    "scheduler_placement",
    "preview_script",
]

logger = logging.getLogger("mspass_cluster")

#: The database server used by the local backend when there is no mongod: nx-27017 behind mongod's command line.
EMBEDDED_DB_COMMAND = (sys.executable, "-m", "mspass_cluster.embedded_db")


class Backend(Protocol):
    """What a backend does for a cluster; ``async`` methods run on the scheduler's event loop and never block it."""

    #: What runs a role, in words for messages: ``"job"``, ``"step"``, ``"process"``.
    unit: str

    async def submit(self, script_path: str, what: str, output: str = "", role: str = "") -> str:
        """Start the script; return its id. Raises SubmitError with the refusal's own words."""

    async def statuses(self, job_ids) -> dict[str, JobStatus]:
        """The status of every one of ``job_ids``, in one query."""

    async def final_statuses(self, job_ids) -> dict[str, JobStatus]:
        """Final state and exit code of ended jobs."""

    async def cancel(self, job_ids, signal: str | None = None) -> None:
        """End the jobs, or only send them ``signal``."""

    def signal_now(self, job_ids, signal: str = "TERM") -> None:
        """Synchronous, for a process about to end: send ``signal`` and return at once."""

    def cancel_now(self, job_ids) -> None:
        """Synchronous last resort (interpreter exit): end the jobs."""

    def node_addresses(self, partition: str | None) -> list[str]:
        """Addresses of the nodes the roles may run on (to choose the scheduler's address)."""


def auto_backend(has_sbatch: bool, environ=None) -> tuple[str, str]:
    """What ``backend='auto'`` means here, and why, in words for the log.

    * inside a Slurm job of two or more nodes (a batch job or ``salloc`` made
      for the cluster): ``allocation``, its nodes run the roles;
    * inside a one-node Slurm job (Jupyter through Open OnDemand, ``srun
      --pty``, an interactive session): ``slurm``, new jobs bring the
      nodes, when ``sbatch`` is there; else ``allocation`` on that node;
    * outside Slurm jobs: ``slurm`` when ``sbatch`` is on PATH, else ``local``.

    >>> auto_backend(True, {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"})[0]
    'slurm'
    """
    environ = os.environ if environ is None else environ
    if in_allocation(environ):
        job, size = environ["SLURM_JOB_ID"], allocation_size(environ)
        if size == 1 and has_sbatch:
            return "slurm", (
                f"this notebook runs in one-node Slurm job {job}, an interactive session: the database and worker "
                "nodes are new jobs. backend='allocation' would put them all on this job's node instead"
            )
        nodes = f"{size}-node" if size else "this"
        return "allocation", (
            f"this notebook runs in {nodes} Slurm job {job}: the database and worker nodes run on its nodes as "
            "srun steps. backend='slurm' would submit new jobs for them instead"
        )
    if has_sbatch:
        return "slurm", "sbatch is on PATH: the database and each worker node are Slurm jobs"
    return "local", "sbatch is not on PATH: the database and worker nodes are processes on this machine"


def choose_backend(requested: str) -> str:
    """The backend to use for ``requested`` (``auto`` resolved and logged), or ConfigError when it cannot run here."""
    backend, has_sbatch = requested, shutil.which("sbatch") is not None
    if backend == "auto":
        backend, why = auto_backend(has_sbatch)
        logger.info("backend='auto' chose %r: %s (set backend= to choose).", backend, why)
    if backend == "allocation" and not in_allocation():
        raise ConfigError(
            "backend='allocation' needs a Slurm allocation (SLURM_JOB_ID and SLURM_JOB_NODELIST are not set): "
            "run inside sbatch or salloc, or use backend='slurm'."
        )
    if backend == "slurm" and not has_sbatch:
        raise ConfigError(
            "backend='slurm' but Slurm's sbatch is not on PATH, so no job can be submitted from here. Run on a "
            "Slurm login node (perhaps after `module load slurm`), start the test bed with `ci/testbed up`, "
            "or use backend='local' to run everything on this machine."
        )
    return backend


def open_backend(name: str, runner: CommandRunner, umask: int | None = None) -> Backend:
    """A backend of kind ``name`` (``slurm``, ``allocation`` or ``local``).

    ``umask`` (077 with ``security``, see :func:`~mspass_cluster.files.cluster_umask`)
    applies to the jobs' logs; None leaves them to the user's umask.
    """
    file_mode = None if umask is None else 0o666 & ~umask
    if name == "local":
        return LocalBackend(file_mode)
    if name == "allocation":
        return AllocationBackend(allocation_nodes(runner), runner, file_mode)
    return SlurmBackend(runner, umask)


def backend_defaults(options: ClusterOptions, backend: str) -> ClusterOptions:
    """The defaults that depend on where the roles run (for clusters and for script previews alike).

    ``worker_lifetime='auto'`` means "before walltime", and only Slurm worker
    jobs have a walltime of their own; local "nodes" share this machine.
    """
    if options.worker_lifetime == "auto" and backend in ("local", "allocation"):
        options = options.replace(worker_lifetime="none")
    if backend == "local":
        options = share_of_this_machine(options, CPU_COUNT, MEMORY_LIMIT)
    return options


def finalise_options(options: ClusterOptions, backend_name: str, backend: Backend) -> ClusterOptions:
    """Every option made final for this backend, in one place, and checked again.

    On the desktop: the embedded database when there is no ``mongod``, a free
    database port when the default one is taken, each node's share of this
    machine. In an allocation: as many worker nodes as it holds, unless
    ``nodes`` was given.
    """
    options = backend_defaults(options, backend_name)
    if options.dashboard_address is None:
        # Dask's dashboard has no login: on loopback, only this machine's users can reach it.
        options = options.replace(dashboard_address="127.0.0.1:8787" if options.security else ":8787")
    if backend_name == "local":
        options = _local_database(options)
        _check_the_share_of_this_machine(options)
        logger.info(
            "Local backend: each worker node gets %d core(s) and %s of this machine (set cores= and memory= "
            "to change).",
            options.cores,
            options.memory,
        )
    elif backend_name == "allocation":
        options = _fit_allocation(options, backend)
    elif "\\" in options.log_dir:
        raise ConfigError(
            f"log_dir={options.log_dir!r} holds a backslash: Slurm takes it as an escape in the jobs' --output path "
            "and their logs are lost. Choose a log_dir without one."
        )
    check_consistency(options)
    return options


def _local_database(options: ClusterOptions) -> ClusterOptions:
    if options.sources["db_command"] == "default" and not options.in_container and not shutil.which("mongod"):
        options = options.replace(db_command=list(EMBEDDED_DB_COMMAND))
        logger.warning(
            "No mongod on PATH: the database is the embedded nx-27017 server, a stand-in for trying MsPASS on a "
            "desktop. It stores documents and GridFS files, behind this package's TLS and x.509 gate, but has no "
            "replication or sharding, "
            "serves one request at a time, and only pretends to run admin commands. Install MongoDB (mongod on "
            "PATH), or set container= or db_command=, for real work."
        )
    # A second notebook's database must not find the first one's port taken (or answer for it).
    if options.sources["db_port"] == "default":
        port = free_local_port(options.db_port)
        if port != options.db_port:
            logger.info(
                "Port %d is taken on this machine; this cluster's database uses port %d.", options.db_port, port
            )
            options = options.replace(db_port=port)
    return options


def _check_the_share_of_this_machine(options: ClusterOptions) -> None:
    """Desktop: ``nodes`` split this machine; too many leave each worker too little memory to run."""
    per_process = parse_bytes(options.memory) // options.processes
    if per_process < MIN_MEMORY and options.sources["memory"] == "default":
        most = max(1, MEMORY_LIMIT // (MIN_MEMORY * options.processes))
        raise ConfigError(
            f"nodes={options.nodes} on this machine ({format_bytes(MEMORY_LIMIT)}) leaves each worker process "
            f"{format_bytes(per_process)}, below the 256 MiB one needs. Start with nodes={most} or fewer, "
            "or set memory= per node."
        )
    if options.interface:
        logger.warning("interface=%r is ignored on the local backend: everything runs on loopback.", options.interface)


def _fit_allocation(options: ClusterOptions, backend: AllocationBackend) -> ClusterOptions:
    capacity = backend.worker_capacity
    if options.sources["nodes"] == "default":
        options = options.replace(nodes=capacity)
    elif options.nodes > capacity:
        raise ConfigError(
            f"nodes={options.nodes} but this allocation ({', '.join(backend.nodes)}) holds at most "
            f"{capacity} worker node(s) beside the database's. Ask sbatch for --nodes={options.nodes + 1}, "
            "or use backend='slurm' to get the worker nodes as new jobs of their own."
        )
    logger.info(
        "Allocation %s: database on %s, worker nodes on %s.",
        os.environ["SLURM_JOB_ID"],
        backend.nodes[0],
        ", ".join(backend.nodes[1:]) or backend.nodes[0],
    )
    return options


def scheduler_placement(backend_name: str, backend: Backend, options: ClusterOptions) -> tuple[str, int | None]:
    """The address the nodes reach the scheduler on (logged), and the partition's node count when it was named."""
    if backend_name == "local":
        logger.debug("The Dask scheduler listens on %s (the local backend: loopback only).", LOCAL_HOST)
        return LOCAL_HOST, None
    try:
        nodes_seen = backend.node_addresses(options.partition)
    except SlurmUnavailableError:
        raise
    except CommandError as exc:
        raise ConfigError(f"Could not list the nodes of partition {options.partition!r}: {exc}") from exc
    host, reason = scheduler_host(options.interface, nodes_seen)
    logger.info("The Dask scheduler listens on %s, chosen from %s (set interface= to change it).", host, reason)
    partition_nodes = len(set(nodes_seen)) if backend_name == "slurm" and options.partition else None
    return host, partition_nodes


def preview_script(role: str, options: ClusterOptions) -> str:
    """The job script ``role`` would get from ``options``, the scheduler's address a placeholder; nothing runs."""
    backend = auto_backend(shutil.which("sbatch") is not None)[0] if options.backend == "auto" else options.backend
    options = backend_defaults(options, backend)
    name = f"{options.job_name}-preview"
    secure = {"tls": CredentialFiles.placeholder(), "scheduler_address": SECURE_SCHEDULER_PLACEHOLDER}
    context = ScriptContext(options, "preview", name, local=backend == "local", **(secure if options.security else {}))
    return context.render(role, name + ("-worker-0" if role == "worker" else f"-{role}"))[0]
