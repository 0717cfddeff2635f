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

Every option is declared once, in :data:`mspass_cluster.options.OPTIONS`,
with its default, its legacy environment variable, its dask-jobqueue keys
and its documentation; the README's option table and the packaged
``mspass_cluster.yaml`` follow this list.

dask-jobqueue keys left out on purpose: ``local-directory`` (node-local
scratch such as ``$TMPDIR``, expanded on the node; our ``worker_dir`` is a
shared directory created from the notebook), ``log-directory`` (our
``log_dir`` also holds the job scripts and the heartbeat every job watches),
``name`` (a worker's name there, a prefix of every role's job here),
``job-cpu``/``job-mem`` (a Slurm request apart from the workers' own
sizes, which we do not have) and the rest, which have no counterpart.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes

from .containers import check_container, container_active
from .errors import ConfigError
from .files import prepare_directories
from .options import (  # noqa: F401  (re-exported: declared there, resolved here)
    _BY_NAME,
    CHOICES,
    CONFIG_SECTION,
    JOBQUEUE_SECTION,
    OPTIONS,
    ClusterOptions,
    Option,
    _kebab,
    render_config_yaml,
    render_options_table,
)
from .values import MIN_MEMORY, coerce, parse_walltime

__all__ = [
    "ClusterOptions",
    "OPTIONS",
    "Option",
    "resolve_options",
    "parse_walltime",
    "check_consistency",
    "prepare_directories",
    "MIN_MEMORY",
]


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
        files = (
            [path]
            if os.path.isfile(path)
            else (
                [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith((".yaml", ".yml"))]
                if os.path.isdir(path)
                else []
            )
        )
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
                value = coerce(option, value)
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
        directories = {name: values[name] for name in ("work_dir", "db_dir", "log_dir", "worker_dir")}
        check_container(values["container"], values["binds"], directories)
    # In a container the image's Python runs the workers; on the host, this one.
    values["python"] = values["python"] or ("python" if in_container else sys.executable)
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
    local_dir = options.db_local_dir
    if local_dir and local_dir.startswith("/") and _inside(local_dir, options.db_dir):
        raise ConfigError(
            f"db_local_dir={local_dir!r} lies in db_dir={options.db_dir!r}, on the file system every node shares: "
            "the node-local copy would land beside the data it copies. Give a directory on the database node's own "
            "disk, e.g. db_local_dir='/tmp' or '$TMPDIR' (the default)."
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", options.job_name):
        raise ConfigError(
            f"job_name={options.job_name!r} may only hold letters, digits, '.', '_' and '-', e.g. job_name='mspass'."
        )


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.normpath(path), os.path.normpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


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
