"""The one place where options are resolved.

Each option's value comes from the first of these that sets it:

1. the keyword argument given to :class:`~mspass_cluster.MsPASSCluster`;
2. dask configuration, section ``mspass_cluster`` (for instance
   ``~/.config/dask/mspass_cluster.yaml``; keys use dashes, ``work-dir``);
3. dask configuration, section ``jobqueue.slurm``: dask-jobqueue's settings,
   which many sites publish, for the options whose meaning is the same
   (``queue`` is our ``partition``; ``cores``, ``memory`` and ``processes``
   are per job, which is per worker node here); not for ``backend='local'``,
   whose processes are no Slurm jobs. A value equal to dask-jobqueue's own
   packaged default (``walltime: '00:30:00'``, ``death-timeout: 60``...)
   counts as not set, so that installing dask-jobqueue changes nothing;
4. the legacy MsPASS environment that ``mspass_setup.sh`` exports
   (``MSPASS_WORK_DIR``, ``MSPASS_DB_DIR``, ``MSPASS_LOG_DIR``,
   ``MSPASS_WORKER_DIR``, ``MSPASS_CONTAINER``, ``SINGULARITY_BIND`` /
   ``APPTAINER_BIND``, ``HOSTNAME_BASE``);
5. the default in :data:`OPTIONS`.

Every option is declared once, in :data:`OPTIONS`, with its default, its
legacy environment variable, its dask-jobqueue keys and its documentation;
the README's option table and the packaged ``mspass_cluster.yaml`` follow
this list.

dask-jobqueue keys left out on purpose: ``local-directory`` (node-local
scratch such as ``$TMPDIR``, expanded on the node; our ``worker_dir`` is a
shared directory created from the notebook), ``log-directory`` (our
``log_dir`` also holds the job scripts and the heartbeat every job watches),
``name`` (a worker's name there, a prefix of every role's job here),
``job-cpu``/``job-mem`` (a Slurm request apart from the workers' own
sizes, which we do not have) and the rest, which have no counterpart.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

from .containers import RUNTIMES, check_container, container_active
from .errors import ConfigError

__all__ = ["ClusterOptions", "OPTIONS", "Option", "resolve_options", "parse_walltime"]

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
    kind: str = "str"  # str, choice, int, bool, list, path, memory, walltime, float, lifetime
    #: Keys of dask-jobqueue's ``jobqueue.slurm`` section with this meaning; a deprecated name after the
    #: current one is read only when the current one is unset, as dask-jobqueue does.
    jobqueue: tuple = ()

    @property
    def env_names(self) -> tuple:
        """Legacy environment variables read for this option, first match wins."""
        return (self.env,) if isinstance(self.env, str) else tuple(self.env or ())


def _default_python() -> str:
    return sys.executable


OPTIONS: tuple[Option, ...] = (
    # --- where the roles run
    Option("backend", "auto", "`slurm` (a job per role), `allocation` (`srun` steps inside the current Slurm job: batch notebooks), `local` (processes on this machine, the desktop mode), or `auto`: allocation inside a Slurm job of 2+ nodes, Slurm inside a one-node job (an interactive session) or wherever `sbatch` is on PATH, else local.", env="MSPASS_CLUSTER_BACKEND", kind="choice"),
    # --- the shape of the cluster
    Option("nodes", 1, "Number of worker nodes: one Slurm job each.", kind="int"),
    Option("processes", 1, "Dask worker processes per worker node; they share the node's cores and memory.", kind="int", jobqueue=("processes",)),
    Option("cores", None, "Cores per worker node (``--cpus-per-task``). Unset: the whole node, Dask picks threads; on the local backend, this machine's cores split over ``nodes``.", kind="int", jobqueue=("cores",)),
    Option("memory", None, "Memory per worker node, e.g. ``'64GiB'`` (``--mem``). Unset: all of the node's memory (``--mem=0``); on the local backend, this machine's memory split over ``nodes``.", kind="memory", jobqueue=("memory",)),
    Option("exclusive", True, "Worker jobs ask for whole nodes (``--exclusive``) so no two land on one node.", kind="bool"),
    # --- Slurm's words
    Option("partition", None, "Slurm partition (``--partition``) for every job.", jobqueue=("queue",)),
    Option("account", None, "Slurm account (``--account``) charged for every job.", jobqueue=("account", "project")),
    Option("qos", None, "Slurm quality of service (``--qos``)."),
    Option("walltime", "01:00:00", "Wall-clock limit of each job (``--time``), Slurm's formats: ``MM``, ``HH:MM:SS``, ``D-HH:MM``...", kind="walltime", jobqueue=("walltime",)),
    Option("job_extra_directives", [], "Extra ``#SBATCH`` options for every job, e.g. ``['--constraint=ib']``.", kind="list", jobqueue=("job-extra-directives", "job-extra")),
    Option("job_script_prologue", [], "Shell lines run first in every job, e.g. ``['module load mongodb']``.", kind="list", jobqueue=("job-script-prologue", "env-extra")),
    Option("job_name", "mspass", "Prefix of job names; each cluster adds a unique id: ``mspass-<id>-db``, ``mspass-<id>-worker-<n>``."),
    # --- directories (legacy MsPASS environment)
    Option("work_dir", None, "Run directory, on a file system every node sees. Default: the current directory.", env="MSPASS_WORK_DIR", kind="path"),
    Option("db_dir", None, "Database files; the server uses ``<db_dir>/data``. Default ``<work_dir>/db``.", env="MSPASS_DB_DIR", kind="path"),
    Option("log_dir", None, "Job scripts and logs. Default ``<work_dir>/logs``.", env="MSPASS_LOG_DIR", kind="path"),
    Option("worker_dir", None, "Dask workers' local directory (spill files). Default ``<work_dir>/work``.", env="MSPASS_WORKER_DIR", kind="path"),
    Option("hostname_base", None, "Domain appended to Slurm node names to reach them, as in MsPASS's ``HOSTNAME_BASE``.", env="HOSTNAME_BASE"),
    # --- containers (Apptainer / Singularity)
    Option("container", None, "Apptainer/Singularity image (`.sif` file or sandbox directory) every role runs in, e.g. the MsPASS image. Unset: programs on the host.", env="MSPASS_CONTAINER", kind="path"),
    Option("container_runtime", "auto", "`auto` (apptainer, else singularity, looked up on the node), `apptainer`, `singularity`, or `none` (ignore `container`).", kind="choice"),
    Option("binds", [], "Host paths to bind into the container, `src[:dst[:opts]]`; the work, database, log and worker directories are added when not covered.", env=("APPTAINER_BIND", "SINGULARITY_BIND"), kind="list"),
    Option("container_args", [], "Extra arguments for `<runtime> exec`, e.g. `['--contain']`.", kind="list"),
    Option("gpu", False, "Give the container the node's NVIDIA GPUs (`--nv`).", kind="bool"),
    Option("container_cleanenv", True, "Start containers with `--cleanenv`: only the cluster's variables enter, not the job's whole environment.", kind="bool"),
    # --- network
    Option("interface", None, "Network interface (e.g. ``ib0``) whose address the compute nodes use to reach the scheduler. Default: the address this machine uses to reach the partition's nodes, logged at start.", jobqueue=("interface",)),
    Option("scheduler_port", 0, "Dask scheduler port; 0 picks a free one (published as ``DASK_SCHEDULER_PORT``).", kind="int"),
    Option("dashboard_address", ":8787", "Dask dashboard address; Dask picks another port when this one is taken."),
    # --- worker role
    Option("python", None, "Python that runs ``dask worker`` on the nodes. Default: this notebook's Python.", jobqueue=("python",)),
    Option("worker_extra_args", [], "Extra arguments for ``dask worker``, e.g. ``['--resources', 'GPU=1']``.", kind="list", jobqueue=("worker-extra-args", "extra")),
    Option("worker_lifetime", "auto", "Dask workers leave gracefully (their results move to other workers) after this long, e.g. ``'55m'``, and the cluster submits a replacement job. `auto`: just before `walltime` (5% of it, 1 to 10 minutes, plus a random stagger) on the `slurm` backend, never on the others; `none`: never.", kind="lifetime"),
    Option("death_timeout", 60, "Seconds a worker keeps trying to reach a lost scheduler before it exits.", kind="int", jobqueue=("death-timeout",)),
    Option("orphan_timeout", 300, "Seconds the database and the workers keep running after this notebook stopped refreshing its heartbeat file (a crashed kernel) before they stop cleanly.", kind="int"),
    # --- database role
    Option("db_command", ["mongod"], "The database server program and leading arguments (a list); the cluster adds ``--port``, ``--dbpath``, ``--bind_ip_all``, cache size.", kind="list"),
    Option("db_port", 27017, "Database port (published as ``MONGODB_PORT``). On the local backend, when left at the default and taken, the next free port.", kind="int"),
    Option("db_cores", 1, "Cores for the database job.", kind="int"),
    Option("db_memory", "2GiB", "Memory for the database job; the WiredTiger cache is sized from it (raise it for large databases).", kind="memory"),
    Option("db_partition", None, "Partition for the database job. Default: ``partition``."),
    Option("db_walltime", None, "Wall-clock limit of the database job. Default: ``walltime``.", kind="walltime"),
    Option("db_extra_directives", [], "Extra ``#SBATCH`` options for the database job only.", kind="list"),
    # --- waiting and watching
    Option("startup_timeout", 3600, "Seconds to wait for the database and all workers (queue wait included) before giving up.", kind="float"),
    Option("poll_interval", 5.0, "Longest pause, in seconds, between two ``squeue`` calls; polls start at 0.25 s and back off to it.", kind="float"),
    Option("command_timeout", 60.0, "Seconds any one Slurm command (sbatch, squeue, scancel) may take.", kind="float"),
    Option("verbose", False, "Log every job's submission and state change, and Dask's own scheduler log, at INFO. Default: a few lines of progress (warnings and errors always).", kind="bool"),
)

_BY_NAME = {o.name: o for o in OPTIONS}
CHOICES = {"container_runtime": RUNTIMES, "backend": ("auto", "slurm", "allocation", "local")}


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
    dashboard_address: str
    python: str
    worker_extra_args: list
    worker_lifetime: str
    death_timeout: int
    orphan_timeout: int
    db_command: list
    db_port: int
    db_cores: int
    db_memory: str
    db_partition: str | None
    db_walltime: str
    db_extra_directives: list
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


_WALLTIME = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"
    r"|(?P<mm>\d+):(?P<ss>\d+)"
    r"|(?P<minutes>\d+))$"
)


def parse_walltime(value: str) -> int:
    """Seconds in a Slurm time limit.

    Accepts Slurm's formats: ``minutes``, ``minutes:seconds``,
    ``hours:minutes:seconds``, ``days-hours``, ``days-hours:minutes`` and
    ``days-hours:minutes:seconds``.

    Raises
    ------
    ConfigError
        When ``value`` is in none of these formats or is zero.

    Examples
    --------
    >>> parse_walltime("01:30:00")
    5400
    >>> parse_walltime("2-00")
    172800
    """
    match = _WALLTIME.match(str(value).strip())
    if not match:
        raise ConfigError(
            f"walltime={value!r} is not a Slurm time limit. Use one of Slurm's formats: "
            "'MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS', e.g. walltime='02:00:00'."
        )
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in g:
        seconds = g["days"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    elif "h" in g:
        seconds = g["h"] * 3600 + g["m"] * 60 + g["s"]
    elif "mm" in g:
        seconds = g["mm"] * 60 + g["ss"]
    else:
        seconds = g["minutes"] * 60
    if seconds <= 0:
        raise ConfigError(f"walltime={value!r} is zero; give a positive limit, e.g. walltime='01:00:00'.")
    return seconds


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _from_config(option: Option):
    return dask.config.get(f"{CONFIG_SECTION}.{_kebab(option.name)}", default=None)


@functools.lru_cache(maxsize=1)
def _jobqueue_packaged_defaults() -> dict:
    """dask-jobqueue's own ``jobqueue.slurm`` defaults, from the YAML file it ships ({} without dask-jobqueue).

    Read from the file, not from dask's merged config, where a site's
    values and these defaults are indistinguishable; found without importing
    dask-jobqueue.
    """
    spec = importlib.util.find_spec("dask_jobqueue")
    for folder in (spec and spec.submodule_search_locations) or ():
        try:
            with open(os.path.join(folder, "jobqueue.yaml")) as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            continue
        return dict(data.get("jobqueue", {}).get("slurm") or {})
    return {}


def _from_jobqueue(option: Option) -> tuple[Any, str | None]:
    """``(value, key)`` from ``jobqueue.slurm`` that a user or site set, or ``(None, None)``.

    Unset means absent, null, empty, or equal to dask-jobqueue's packaged default.
    """
    defaults = _jobqueue_packaged_defaults()
    for key in option.jobqueue:
        value = dask.config.get(f"{JOBQUEUE_SECTION}.{key}", default=None)
        if value in (None, "", [], {}) or (key in defaults and value == defaults[key]):
            continue
        return value, key
    return None, None


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(str(value))
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a whole number; give e.g. {name}={max(minimum, 1)}.") from None
        value = as_int
    if value < minimum:
        raise ConfigError(f"{name}={value!r} is below {minimum}; give {name}={max(minimum, 1)} or more.")
    return value


def _coerce(option: Option, value):
    name = option.name
    if option.kind == "int":
        minimum = 0 if name == "scheduler_port" else 1
        number = _check_int(name, value, minimum)
        if name.endswith("_port") and number > 65535:
            raise ConfigError(
                f"{name}={number} is not a TCP port ({minimum} to 65535); give e.g. {name}={option.default or 8786}"
                + (" or 0 for a free one." if minimum == 0 else ".")
            )
        return number
    if option.kind == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not a number of seconds; give e.g. {name}={option.default}.") from None
        if number <= 0:
            raise ConfigError(f"{name}={value!r} must be positive; give e.g. {name}={option.default}.")
        return number
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not true or false.")
    if option.kind == "list":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ConfigError(f"{name}={value!r} must be a list of strings, e.g. {name}={option.default or ['...']!r}.")
        return [_one_line(name, str(v)) for v in value]
    if option.kind == "memory":
        return _check_memory(name, value)
    if option.kind == "choice":
        if value not in CHOICES[name]:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, CHOICES[name]))}.")
        return value
    if option.kind == "walltime":
        parse_walltime(value)
        return str(value).strip()
    if option.kind == "lifetime":
        return _check_lifetime(name, value)
    if option.kind == "path":
        return os.path.abspath(os.path.expanduser(os.path.expandvars(_one_line(name, str(value)))))
    if not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be a string.")
    return _one_line(name, value)


def _one_line(name, value: str) -> str:
    """Values end up in job scripts: a line break would start a shell line of its own."""
    if any(ch in value for ch in "\n\r\0"):
        raise ConfigError(f"{name}={value!r} holds a line break or NUL; give it on one line.")
    return value


#: The least memory a Dask worker process, or the database, can run in.
MIN_MEMORY = 256 * 2**20


def _check_memory(name, value) -> str:
    """An amount of memory with its unit, at least :data:`MIN_MEMORY`."""
    text = str(value).strip()
    if re.fullmatch(r"[0-9.]+", text):
        raise ConfigError(
            f"{name}={value!r} has no unit: Slurm reads a bare number as megabytes, Dask as bytes. "
            f"Write the unit, e.g. {name}='{text}MB' or {name}='16GiB'."
        )
    try:
        number = parse_bytes(text)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{name}={value!r} is not an amount of memory; give a number with a unit, e.g. {name}='16GiB' or '4000MB'."
        ) from None
    if number < MIN_MEMORY:
        raise ConfigError(
            f"{name}={value!r} is too little: a Dask worker process or the database needs at least 256MiB. "
            f"Give e.g. {name}='16GiB'."
        )
    return text


def _check_lifetime(name, value) -> str:
    """``auto``, ``none``, or a duration normalised to ``'<seconds>s'``."""
    text = str(value).strip().lower()
    if text in ("auto", "none"):
        return text
    try:
        seconds = parse_timedelta(value if isinstance(value, (int, float)) else text)
    except (ValueError, TypeError, KeyError):
        seconds = None
    if seconds is None or seconds <= 0:
        raise ConfigError(
            f"{name}={value!r} is not a positive duration; give e.g. {name}='55m' or '3300s', "
            f"or {name}='auto' (just before walltime) or 'none'."
        )
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds}s"


def _config_origin(key: str | None, section: str = CONFIG_SECTION) -> str:
    """Where dask config set ``<section>[.key]``: the YAML file, or the DASK_ variable.

    Keys of our own section are named as the user writes them there
    (``'walltime'``), others with their section (``'jobqueue.slurm.queue'``).
    """
    parts = section.split(".")
    variable = "DASK_" + "__".join(p.upper() for p in parts) + (f"__{key.upper().replace('-', '_')}" if key else "")
    if key and variable in os.environ:
        return f"the environment variable {variable}"
    shown = key if section == CONFIG_SECTION else f"{section}.{key}"
    for path in reversed(getattr(dask.config, "paths", [])):
        files = [path] if os.path.isfile(path) else (
            [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith((".yaml", ".yml"))]
            if os.path.isdir(path) else [])
        for file in files:
            try:
                with open(file) as f:
                    data = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError):
                continue
            for part in parts:
                data = data.get(part) if isinstance(data, dict) else None
            if key is None and data is not None:
                return file
            if isinstance(data, dict) and (key in data or key.replace("-", "_") in data):
                return f"'{shown}' in {file}"
    return f"dask config key {section}.{key}" if key else "dask config"


#: ``sources`` entry of an option whose value came from dask-jobqueue's section.
JOBQUEUE_SOURCE = f"{JOBQUEUE_SECTION} config"


def _origin(option: Option, source: str, jobqueue_key: str | None = None) -> str:
    """For an error message: where a bad value came from, unless it was the argument itself."""
    if source == "dask config":
        return f"From {_config_origin(_kebab(option.name))}: "
    if source == JOBQUEUE_SOURCE:
        return f"From {_config_origin(jobqueue_key, JOBQUEUE_SECTION)} (dask-jobqueue's configuration): "
    if source in option.env_names:
        return f"From the environment variable {source}: "
    return ""


def valid_option_names() -> list[str]:
    """Names accepted by :func:`resolve_options`, in declaration order."""
    return [o.name for o in OPTIONS]


def resolve_options(environ=None, **kwargs) -> ClusterOptions:
    """Resolve every option: argument > dask config (ours, then dask-jobqueue's) > legacy environment > default.

    Parameters
    ----------
    environ : mapping, optional
        The environment to read legacy ``MSPASS_*`` variables from
        (default ``os.environ``).
    **kwargs
        Explicit options; ``None`` means "not given".

    Returns
    -------
    ClusterOptions
        Validated options. ``sources`` maps each option to where its value
        came from (``argument``, ``dask config``, ``jobqueue.slurm config``,
        the variable name, or ``default``).

    Raises
    ------
    ConfigError
        For an unknown option (the message lists the valid ones) or a bad value.
    """
    environ = os.environ if environ is None else environ
    unknown = sorted(set(kwargs) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)}. Valid options are: {', '.join(valid_option_names())}."
        )
    config_section = dask.config.get(CONFIG_SECTION, default={}) or {}
    if not isinstance(config_section, dict):
        raise ConfigError(
            f"The dask config section '{CONFIG_SECTION}' is {config_section!r}, not a mapping of option: value"
            f" (in {_config_origin(None)}). Write it as, e.g.\n{CONFIG_SECTION}:\n  backend: local\n  walltime: '02:00:00'"
        )
    unknown_config = sorted(k for k in config_section if k.replace("-", "_") not in _BY_NAME)
    if unknown_config:
        raise ConfigError(
            f"Unknown key(s) {', '.join(unknown_config)} in the dask config section '{CONFIG_SECTION}'. "
            f"Valid keys are: {', '.join(_kebab(n) for n in valid_option_names())}."
        )

    jobqueue_section = dask.config.get(JOBQUEUE_SECTION, default={}) or {}
    if not isinstance(jobqueue_section, dict):
        raise ConfigError(
            f"The dask config section '{JOBQUEUE_SECTION}' (dask-jobqueue's) is {jobqueue_section!r}, not a mapping "
            f"of key: value (in {_config_origin(None, JOBQUEUE_SECTION)}). Write it as, e.g.\n"
            "jobqueue:\n  slurm:\n    queue: normal"
        )

    values, sources = {}, {}
    for option in OPTIONS:
        jobqueue_value, jobqueue_key = (None, None) if values.get("backend") == "local" else _from_jobqueue(option)
        if kwargs.get(option.name) is not None:
            value, source = kwargs[option.name], "argument"
        elif _from_config(option) is not None:
            value, source = _from_config(option), "dask config"
        elif jobqueue_value is not None:
            value, source = jobqueue_value, JOBQUEUE_SOURCE
        elif any(environ.get(name) for name in option.env_names):
            source = next(name for name in option.env_names if environ.get(name))
            value = environ[source]
            if option.kind == "list":
                value = [v.strip() for v in value.split(",") if v.strip()]
        else:
            value, source = option.default, "default"
        if value is not None:
            try:
                value = _coerce(option, value)
            except ConfigError as exc:
                raise ConfigError(f"{_origin(option, source, jobqueue_key)}{exc}") from None
        values[option.name], sources[option.name] = value, source

    work_dir = values["work_dir"] or os.getcwd()
    values["work_dir"] = work_dir
    for name, sub in (("db_dir", "db"), ("log_dir", "logs"), ("worker_dir", "work")):
        if values[name] is None:
            values[name] = os.path.join(work_dir, sub)
    in_container = container_active(values["container"], values["container_runtime"])
    if in_container:
        check_container(values["container"], values["binds"])
    # In a container the image's Python runs the workers; on the host, this one.
    values["python"] = values["python"] or ("python" if in_container else _default_python())
    values["db_partition"] = values["db_partition"] or values["partition"]
    values["db_walltime"] = values["db_walltime"] or values["walltime"]
    options = ClusterOptions(**values, sources=sources)
    check_consistency(options)
    return options


def check_consistency(options: ClusterOptions) -> None:
    """The checks between options, run on the resolved options and again once a backend finalised them.

    Raises
    ------
    ConfigError
        Naming the values that do not fit together and the fix.
    """
    if not options.db_command:
        raise ConfigError("db_command is empty; give the server program, e.g. db_command=['mongod'].")

    if options.cores is not None and options.cores < options.processes:
        raise ConfigError(
            f"cores={options.cores} is fewer than processes={options.processes}: every Dask worker "
            f"process needs at least one core. Use processes={options.cores} or cores>={options.processes}."
        )
    if options.cores is not None and options.cores % options.processes:
        raise ConfigError(
            f"cores={options.cores} does not split evenly over processes={options.processes}; "
            "choose cores as a multiple of processes."
        )
    per_process = options.memory and parse_bytes(options.memory) // options.processes
    if per_process and per_process < MIN_MEMORY:
        raise ConfigError(
            f"memory={options.memory!r} over processes={options.processes} leaves each Dask worker process "
            f"{per_process // 2**20} MiB, below the 256 MiB one needs. Give more memory or fewer processes."
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", options.job_name):
        raise ConfigError(
            f"job_name={options.job_name!r} may only hold letters, digits, '.', '_' and '-', e.g. job_name='mspass'."
        )



def prepare_directories(options: ClusterOptions) -> None:
    """Create the work, log, database and worker directories, or say why not.

    Raises
    ------
    ConfigError
        Naming the directory, the option it came from and the OS error.
    """
    for name in ("work_dir", "log_dir", "db_dir", "worker_dir"):
        path = getattr(options, name)
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".mspass-cluster-write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                f"{name}={path!r} cannot be created or written: {exc.strerror or exc}. "
                f"Choose a writable directory on a file system all nodes share, e.g. {name}='$SCRATCH/mspass'."
            ) from exc


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


if __name__ == "__main__":
    # After editing OPTIONS: python -m mspass_cluster.config  (rewrites the YAML and the README table)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "mspass_cluster.yaml"), "w") as f:
        f.write(render_config_yaml())
    readme_path = os.path.join(os.path.dirname(here), "README.md")
    with open(readme_path) as f:
        readme = f.read()
    start, end = "<!-- options table: python -m mspass_cluster.config -->\n", "<!-- end of options table -->"
    head, rest = readme.split(start, 1)
    with open(readme_path, "w") as f:
        f.write(head + start + render_options_table() + end + rest.split(end, 1)[1])
