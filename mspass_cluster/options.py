"""Every option of a cluster, declared once: its default, where else it may come from, what it means.

:data:`OPTIONS` is the one list; :class:`ClusterOptions` holds one cluster's
resolved values (see :mod:`mspass_cluster.config` for how they are
resolved). The README's option table and the packaged
``mspass_cluster.yaml`` are rendered from this list: after editing it, run
``python -m mspass_cluster.config``.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_bytes

from .containers import RUNTIMES, container_active
from .dbstorage import STORAGES

__all__ = [
    "Option",
    "OPTIONS",
    "CHOICES",
    "ClusterOptions",
    "CONFIG_SECTION",
    "JOBQUEUE_SECTION",
    "render_options_table",
    "render_config_yaml",
]

CONFIG_SECTION = "mspass_cluster"
#: dask-jobqueue's section for Slurm, read below ours (see the module docstring).
JOBQUEUE_SECTION = "jobqueue.slurm"


@dataclass(frozen=True)
class Option:
    """Declaration of one option: its name, default, legacy variable and meaning."""

    name: str
    default: Any
    doc: str
    env: str | tuple | None = None
    kind: str = "str"  # str, choice, int, bool, list, path, node_path, memory, walltime, float, lifetime, ready
    #: Keys of dask-jobqueue's ``jobqueue.slurm`` section with this meaning; a deprecated name after the
    #: current one is read only when the current one is unset, as dask-jobqueue does.
    jobqueue: tuple = ()

    @property
    def env_names(self) -> tuple:
        """Legacy environment variables read for this option, first match wins."""
        return (self.env,) if isinstance(self.env, str) else tuple(self.env or ())


OPTIONS: tuple[Option, ...] = (
    # --- where the roles run
    Option(
        "backend",
        "auto",
        "`slurm` (a job per role), `allocation` (`srun` steps inside the current Slurm job: batch notebooks), `local` (processes on this machine, the desktop mode), or `auto`: allocation inside a Slurm job of 2+ nodes, Slurm inside a one-node job (an interactive session) or wherever `sbatch` is on PATH, else local.",
        env="MSPASS_CLUSTER_BACKEND",
        kind="choice",
    ),
    # --- the shape of the cluster
    Option("nodes", 1, "Number of worker nodes: one Slurm job each.", kind="int"),
    Option(
        "processes",
        1,
        "Dask worker processes per worker node; they share the node's cores and memory.",
        kind="int",
        jobqueue=("processes",),
    ),
    Option(
        "cores",
        None,
        "Cores per worker node (``--cpus-per-task``). Unset: the whole node, Dask picks threads; on the local backend, this machine's cores split over ``nodes``.",
        kind="int",
        jobqueue=("cores",),
    ),
    Option(
        "memory",
        None,
        "Memory per worker node, e.g. ``'64GiB'`` (``--mem``). Unset: all of the node's memory (``--mem=0``); on the local backend, this machine's memory split over ``nodes``.",
        kind="memory",
        jobqueue=("memory",),
    ),
    Option(
        "exclusive", True, "Worker jobs ask for whole nodes (``--exclusive``) so no two land on one node.", kind="bool"
    ),
    # --- Slurm's words
    Option("partition", None, "Slurm partition (``--partition``) for every job.", jobqueue=("queue",)),
    Option("account", None, "Slurm account (``--account``) charged for every job.", jobqueue=("account", "project")),
    Option("qos", None, "Slurm quality of service (``--qos``)."),
    Option(
        "walltime",
        "01:00:00",
        "Wall-clock limit of each job (``--time``), Slurm's formats: ``MM``, ``HH:MM:SS``, ``D-HH:MM``...",
        kind="walltime",
        jobqueue=("walltime",),
    ),
    Option(
        "job_extra_directives",
        [],
        "Extra ``#SBATCH`` options for every job, e.g. ``['--constraint=ib']``.",
        kind="list",
        jobqueue=("job-extra-directives", "job-extra"),
    ),
    Option(
        "job_script_prologue",
        [],
        "Shell lines run first in every job, e.g. ``['module load mongodb']``.",
        kind="list",
        jobqueue=("job-script-prologue", "env-extra"),
    ),
    Option(
        "job_name",
        "mspass",
        "Prefix of job names; each cluster adds a unique id: ``mspass-<id>-db``, ``mspass-<id>-worker-<n>``.",
    ),
    # --- directories (legacy MsPASS environment)
    Option(
        "work_dir",
        None,
        "Run directory, on a file system every node sees. Default: the current directory.",
        env="MSPASS_WORK_DIR",
        kind="path",
    ),
    Option(
        "db_dir",
        None,
        "Database files; the server uses ``<db_dir>/data``. Default ``<work_dir>/db``.",
        env="MSPASS_DB_DIR",
        kind="path",
    ),
    Option("log_dir", None, "Job scripts and logs. Default ``<work_dir>/logs``.", env="MSPASS_LOG_DIR", kind="path"),
    Option(
        "worker_dir",
        None,
        "Dask workers' local directory (spill files). Default ``<work_dir>/work``.",
        env="MSPASS_WORKER_DIR",
        kind="path",
    ),
    Option(
        "hostname_base",
        None,
        "Domain appended to Slurm node names to reach them, as in MsPASS's ``HOSTNAME_BASE``.",
        env="HOSTNAME_BASE",
    ),
    # --- containers (Apptainer / Singularity)
    Option(
        "container",
        None,
        "Apptainer/Singularity image (`.sif` file or sandbox directory) every role runs in, e.g. the MsPASS image. Unset: programs on the host.",
        env="MSPASS_CONTAINER",
        kind="path",
    ),
    Option(
        "container_runtime",
        "auto",
        "`auto` (apptainer, else singularity, looked up on the node), `apptainer`, `singularity`, or `none` (ignore `container`).",
        kind="choice",
    ),
    Option(
        "binds",
        [],
        "Host paths to bind into the container, `src[:dst[:opts]]`; the work, database, log and worker directories are added when not covered.",
        env=("APPTAINER_BIND", "SINGULARITY_BIND"),
        kind="list",
    ),
    Option("container_args", [], "Extra arguments for `<runtime> exec`, e.g. `['--contain']`.", kind="list"),
    Option("gpu", False, "Give the container the node's NVIDIA GPUs (`--nv`).", kind="bool"),
    Option(
        "container_cleanenv",
        True,
        "Start containers with `--cleanenv`: only the cluster's variables enter, not the job's whole environment.",
        kind="bool",
    ),
    # --- network
    Option(
        "interface",
        None,
        "Network interface (e.g. ``ib0``) whose address the compute nodes use to reach the scheduler. Default: the address this machine uses to reach the partition's nodes, logged at start.",
        jobqueue=("interface",),
    ),
    Option(
        "scheduler_port",
        0,
        "Dask scheduler port; 0 picks a free one (published as ``DASK_SCHEDULER_PORT``).",
        kind="int",
    ),
    Option(
        "dashboard_address",
        None,
        "Dask dashboard address; Dask picks another port when this one is taken. Default: ``127.0.0.1:8787`` (loopback only) with ``security``, ``:8787`` (every interface) without.",
    ),
    Option(
        "security",
        True,
        "Secure by default: mutual TLS with a fresh per-cluster CA for the scheduler, workers and nannies; the database requires TLS with this cluster's client certificate and authenticates it (x.509); credentials, scripts, logs and data in directories only you can read (0700). `False` turns all of that off (with a warning saying who can then reach what); a `distributed.Security` is used for Dask instead of the cluster's own.",
        kind="security",
    ),
    Option(
        "group_access",
        False,
        "With `security`: open the cluster's directories and files to your group (0750 and 0640, job scripts with `umask 027`) and accept a `work_dir` (or a directory above it) your group can write without a warning; for a project directory shared with people you trust with your account. Credentials stay yours alone.",
        kind="bool",
    ),
    # --- worker role
    Option(
        "python",
        None,
        "Python that runs ``dask worker`` on the nodes. Default: this notebook's Python.",
        jobqueue=("python",),
    ),
    Option(
        "worker_extra_args",
        [],
        "Extra arguments for ``dask worker``, e.g. ``['--resources', 'GPU=1']``.",
        kind="list",
        jobqueue=("worker-extra-args", "extra"),
    ),
    Option(
        "worker_lifetime",
        "auto",
        "Dask workers leave gracefully (their results move to other workers) after this long, e.g. ``'55m'``, and the cluster submits a replacement job. `auto`: just before `walltime` (5% of it, 1 to 10 minutes, plus a random stagger) on the `slurm` backend, never on the others; `none`: never.",
        kind="lifetime",
    ),
    Option(
        "death_timeout",
        60,
        "Seconds a worker keeps trying to reach a lost scheduler before it exits.",
        kind="int",
        jobqueue=("death-timeout",),
    ),
    Option(
        "orphan_timeout",
        300,
        "Seconds the database and the workers keep running after this notebook stopped refreshing its heartbeat file (a crashed kernel) before they stop cleanly.",
        kind="int",
    ),
    Option(
        "worker_submission",
        "array",
        "How worker nodes reach Slurm on the `slurm` backend. `array`: the nodes of one start or `scale()` as one job array, one `sbatch` however many (each task is still a node of its own: watched, scaled down and replaced one by one); the cluster falls back to `jobs`, and says why, where the site's `MaxArraySize` is too small. `jobs`: one `sbatch` per node. `steps`: the nodes of one start or `scale()` as one multi-node job, each node an `srun` step in it once it runs (one queued job however many nodes: for sites that cap jobs per user below the node count, where every array task counts; a node scaled down stays held until its job's last worker leaves). Other backends submit nothing.",
        kind="choice",
    ),
    Option(
        "ready_workers",
        None,
        "Start-up is done when the database answers and this many worker nodes are ready (a whole number, e.g. `118`) or this share of them (`0.9`, or `'90%'`); the rest join as they start, and the log says what they wait for. Unset: every worker node.",
        kind="ready",
    ),
    # --- database role
    Option(
        "database",
        None,
        "Use a database that is already running instead of starting one: the id `mspass-cluster db start` printed (or a unique prefix of at least 4 characters), or a `mongodb://` connection string. The cluster then submits no database job, its `db_*` options are not used, and `close()` leaves that database running. Unset: the cluster starts its own. In YAML, quote an id: `database: '01234567'`.",
    ),
    Option(
        "db_command",
        ["mongod"],
        "The database server program and leading arguments (a list); the cluster adds ``--port``, ``--dbpath``, ``--bind_ip_all``, cache size.",
        kind="list",
    ),
    Option(
        "db_port",
        27017,
        "Database port (published as ``MONGODB_PORT``). On the local backend, when left at the default and taken, the next free port.",
        kind="int",
    ),
    Option("db_cores", 1, "Cores for the database job.", kind="int"),
    Option(
        "db_memory",
        "2GiB",
        "Memory for the database job; the WiredTiger cache is sized from it (raise it for large databases).",
        kind="memory",
    ),
    Option("db_partition", None, "Partition for the database job. Default: ``partition``."),
    Option("db_walltime", None, "Wall-clock limit of the database job. Default: ``walltime``.", kind="walltime"),
    Option("db_extra_directives", [], "Extra ``#SBATCH`` options for the database job only.", kind="list"),
    Option(
        "db_restarts",
        3,
        "Times the cluster brings its database back on the same data when its job ends while the cluster runs "
        "(walltime, node failure, ``scancel``, out of memory); with it, the database job is also relayed to a new "
        "one before ``db_walltime``. 0: a lost database stays lost.",
        kind="int",
    ),
    Option(
        "db_storage",
        "shared",
        "Where the database server keeps its files while it runs. `shared`: on ``<db_dir>/data`` itself. `node-local`: on a copy in ``db_local_dir`` on its node (faster than a parallel file system), staged in at start and copied back atomically when the server stops, before the job's walltime (Slurm's signal, sized from the data) and when the notebook dies; see Node-local database.",
        kind="choice",
    ),
    Option(
        "db_local_dir",
        None,
        "With ``db_storage='node-local'``: the directory on the database node's own disk that holds the copy, an absolute path or ``$VARIABLE[/path]`` evaluated on the node. Default: ``$TMPDIR``, else ``/tmp``.",
        kind="node_path",
    ),
    # --- sharded database (issue 12)
    Option(
        "db_shards",
        0,
        "Shards of a sharded database: 0 (default) runs one server (the ``db`` job); N >= 1 runs a config server "
        "(``db-config``), N shards (``db-shard``, one job each) and a router (``db-router``, ``mongos``, on "
        "``db_port``: the address the cluster hands out), each a replica set of one member on "
        "``<db_dir>/config`` and ``<db_dir>/shard<i>``; see Sharded database.",
        kind="int",
    ),
    Option(
        "db_shard_database",
        "mspass",
        "With ``db_shards``: the database whose collections ``db_shard_collections`` shards.",
    ),
    Option(
        "db_shard_collections",
        ["wf_TimeSeries:_id", "wf_Seismogram:_id", "wf_miniseed:_id"],
        "With ``db_shards``: the collections to shard and their shard keys, as ``collection:field`` (a hashed "
        "key) or ``collection:field1,field2`` (a ranged key), e.g. ``fs.chunks:files_id,n`` for GridFS sample data.",
        kind="list",
    ),
    Option(
        "db_router_command",
        ["mongos"],
        "With ``db_shards``: the router program and leading arguments (a list); the cluster adds ``--port``, "
        "``--configdb``, ``--bind_ip_all``.",
        kind="list",
    ),
    # --- waiting and watching
    Option(
        "startup_timeout",
        3600,
        "Seconds to wait for the database and all workers (queue wait included) before giving up.",
        kind="float",
    ),
    Option(
        "poll_interval",
        5.0,
        "Longest pause, in seconds, between two ``squeue`` calls; polls start at 0.25 s and back off to it.",
        kind="float",
    ),
    Option("command_timeout", 60.0, "Seconds any one Slurm command (sbatch, squeue, scancel) may take.", kind="float"),
    Option(
        "verbose",
        False,
        "Log every job's submission and state change, and Dask's own scheduler log, at INFO. Default: a few lines of progress (warnings and errors always).",
        kind="bool",
    ),
)

_BY_NAME = {o.name: o for o in OPTIONS}
CHOICES = {
    "container_runtime": RUNTIMES,
    "backend": ("auto", "slurm", "allocation", "local"),
    "db_storage": STORAGES,
    "worker_submission": ("array", "jobs", "steps"),
}


@dataclass(frozen=True)
class ClusterOptions:
    """Resolved, validated options of one cluster (see :data:`OPTIONS`)."""

    backend: str
    nodes: int
    processes: int
    cores: int | None
    memory: str | None
    exclusive: bool
    partition: str | None
    account: str | None
    qos: str | None
    walltime: str
    job_extra_directives: list
    job_script_prologue: list
    job_name: str
    work_dir: str
    db_dir: str
    log_dir: str
    worker_dir: str
    hostname_base: str | None
    container: str | None
    container_runtime: str
    binds: list
    container_args: list
    gpu: bool
    container_cleanenv: bool
    interface: str | None
    scheduler_port: int
    dashboard_address: str | None
    security: Any
    group_access: bool
    python: str
    worker_extra_args: list
    worker_lifetime: str
    death_timeout: int
    orphan_timeout: int
    worker_submission: str
    ready_workers: Any
    database: str | None
    db_command: list
    db_port: int
    db_cores: int
    db_memory: str
    db_partition: str | None
    db_walltime: str
    db_restarts: int
    db_extra_directives: list
    db_storage: str
    db_local_dir: str | None
    db_shards: int
    db_shard_database: str
    db_shard_collections: list
    db_router_command: list
    startup_timeout: float
    poll_interval: float
    command_timeout: float
    verbose: bool
    sources: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def memory_bytes(self) -> int | None:
        """Memory per worker node in bytes, or None for the whole node."""
        return None if self.memory is None else parse_bytes(self.memory)

    @property
    def in_container(self) -> bool:
        """True when roles run inside ``container``."""
        return container_active(self.container, self.container_runtime)

    @property
    def threads_per_process(self) -> int | None:
        """Threads of each Dask worker process, or None to let Dask decide."""
        return None if self.cores is None else self.cores // self.processes

    def replace(self, **changes) -> "ClusterOptions":
        """A copy with some fields changed (values are not re-validated)."""
        return dataclasses.replace(self, **changes)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _default_text(option: Option) -> str:
    if option.default is None:
        return "—"
    if option.default == []:
        return "[]"
    return json.dumps(option.default)


def render_options_table() -> str:
    """The README's option table (Markdown), from :data:`OPTIONS`."""
    rows = ["| option | default | `jobqueue.slurm` key | legacy variable | meaning |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        env = " / ".join(f"`{e}`" for e in o.env_names)
        jobqueue = " / ".join(f"`{k}`" for k in o.jobqueue)
        rows.append(f"| `{o.name}` | `{_default_text(o)}` | {jobqueue} | {env} | {o.doc.replace('``', '`')} |")
    return "\n".join(rows) + "\n"


def render_config_yaml() -> str:
    """The packaged ``mspass_cluster.yaml``: every key, documented, set to null."""
    lines = [
        "# mspass_cluster configuration: copy to ~/.config/dask/mspass_cluster.yaml and fill in what you need.",
        "# Each key is an option of MsPASSCluster (dashes here, underscores in Python). A value here is used",
        "# when the option is not given as an argument; null means 'not set' (then dask-jobqueue's jobqueue.slurm",
        "# key named below, except on the local backend, then the legacy MSPASS_* environment variable, then the",
        "# default in brackets, applies).",
        f"{CONFIG_SECTION}:",
    ]
    for o in OPTIONS:
        env = f" Legacy variable: {' or '.join(o.env_names)}." if o.env_names else ""
        jobqueue = f" dask-jobqueue: {JOBQUEUE_SECTION}.{' or '.join(o.jobqueue)}." if o.jobqueue else ""
        text = f"{o.doc.replace('``', '`')}{jobqueue}{env} [default: {_default_text(o)}]"
        lines += ["  # " + line for line in textwrap.wrap(text, 100)]
        lines.append(f"  {_kebab(o.name)}: null")
    return "\n".join(lines) + "\n"
