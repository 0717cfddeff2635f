"""Running a role inside an Apptainer or Singularity image (pure builders).

Each role ``exec``s its own program in the image (``mongod``, the image's
``python -m distributed.cli.dask_worker``); the image's entrypoint
(``start-mspass.sh``) is never used, so real exit codes and signals reach the
job script, and this package need not be installed in the image.

The runtime is looked up on the compute node when the job starts
(``container_runtime="auto"``: apptainer, then singularity). Variables reach
the container through the runtime's own prefix (``APPTAINERENV_NAME`` or
``SINGULARITYENV_NAME``), which also overrides values the image sets; with
``container_cleanenv`` (the default) nothing else of the host environment
leaks in. The work, database, log and worker directories are bound at the
same path unless an existing bind already covers them.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["RUNTIMES", "Bind", "parse_bind", "container_active", "check_container", "wrap"]

RUNTIMES = ("auto", "apptainer", "singularity", "none")
_CANDIDATES = {"auto": ("apptainer", "singularity"), "apptainer": ("apptainer",), "singularity": ("singularity",)}
_PREFIX = {"apptainer": "APPTAINERENV_", "singularity": "SINGULARITYENV_"}


class RawShell(str):
    """An argv word written into the script unquoted (a shell variable reference)."""


@dataclass(frozen=True)
class Bind:
    """One bind mount, ``src[:dst[:opts]]``."""

    src: str
    dst: str
    opts: str = ""

    def spec(self) -> str:
        text = self.src if self.dst == self.src and not self.opts else f"{self.src}:{self.dst}"
        return f"{text}:{self.opts}" if self.opts else text


def parse_bind(spec: str) -> Bind:
    """Parse ``src[:dst[:opts]]`` as Apptainer does (``opts`` is ``ro`` or ``rw``).

    Raises
    ------
    ConfigError
        For an empty source, unknown options, or a comma (the runtimes split binds on commas).
    """
    if "," in spec:
        raise ConfigError(
            f"binds entry {spec!r} contains a comma; give one bind per list item, e.g. binds=['/a', '/b:/data']."
        )
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise ConfigError(f"binds entry {spec!r} is not 'src[:dst[:opts]]', e.g. '/scratch/me:/data:ro'.")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    opts = parts[2] if len(parts) > 2 else ""
    if opts not in ("", "ro", "rw"):
        raise ConfigError(f"binds entry {spec!r}: option {opts!r} is not 'ro' or 'rw'.")
    return Bind(src, dst, opts)


def container_active(container: str | None, runtime: str) -> bool:
    """True when roles run inside an image."""
    return bool(container) and runtime != "none"


def check_container(container: str, binds: list[str], directories: dict | None = None) -> None:
    """Before anything is submitted: the image and every bind source must exist.

    ``directories`` (option name: path) are bound too unless a bind covers
    them; the runtimes split ``--bind`` on ``,`` and ``:`` and have no escape,
    so such a path may hold neither.

    Raises
    ------
    ConfigError
        Naming the missing or unreadable path and what to do.
    """
    if not os.path.exists(container):
        raise ConfigError(
            f"container={container!r} does not exist. Build it first, e.g. "
            "`apptainer build mspass_latest.sif docker://mspass/mspass`, and give its full path."
        )
    if not os.access(container, os.R_OK):
        raise ConfigError(f"container={container!r} is not readable by you; fix its permissions or copy it.")
    for spec in binds:
        bind = parse_bind(spec)
        if not os.path.exists(bind.src):
            raise ConfigError(f"binds entry {spec!r}: the source {bind.src!r} does not exist on this machine.")
    parsed = [parse_bind(spec) for spec in binds]
    for name, path in (directories or {}).items():
        if not _covered(path, parsed) and ("," in path or ":" in path):
            raise ConfigError(
                f"{name}={path!r} holds a ',' or ':', which the container runtime reads as the end of a bind "
                f"(--bind src:dst,...) and cannot escape. Choose a {name} without them, or bind a directory above it "
                "yourself, e.g. binds=['/scratch/me'], so that it needs no bind of its own."
            )


def _covered(path: str, binds: list[Bind]) -> bool:
    return any(b.src == b.dst and (path == b.src or path.startswith(b.src.rstrip("/") + "/")) for b in binds)


def all_binds(user_binds: list[str], directories: list[str]) -> list[Bind]:
    """The user's binds plus each directory not already visible at the same path."""
    binds = [parse_bind(s) for s in user_binds]
    for path in directories:
        if not _covered(path, binds):
            binds.append(Bind(path, path))
    return binds


def wrap(
    argv: list[str],
    *,
    container: str,
    runtime: str,
    user_binds: list[str],
    directories: list[str],
    env_names: list[str],
    extra_args: list[str] = (),
    gpu: bool = False,
    cleanenv: bool = True,
    node_binds: list[str] = (),
) -> tuple[list[str], list[str]]:
    """Turn a role's argv into a container command.

    ``node_binds`` are shell words evaluated by the job on its node (e.g.
    ``'"$db_job_dir"'``), each bound at the same path with a ``--bind`` of
    its own.

    Returns
    -------
    setup : list of str
        Shell lines that find the runtime on the node (exiting 127 with a
        message if there is none), hand ``env_names`` to the container with
        the runtime's prefix, and drop ``APPTAINER_BIND``/``SINGULARITY_BIND``
        (their binds are already explicit).
    argv : list of str
        ``"$container_runtime" exec ... IMAGE argv...``.
    """
    candidates = _CANDIDATES[runtime]
    setup = [
        f"# Container runtime: the first of {' '.join(candidates)} on this node's PATH.",
        "container_runtime=''",
        f"for candidate in {' '.join(candidates)}; do",
        '    if command -v "$candidate" >/dev/null 2>&1; then container_runtime=$candidate; break; fi',
        "done",
        'if [ -z "$container_runtime" ]; then',
        f'    echo "mspass_cluster: {" or ".join(candidates)} is not on PATH on $(hostname);'
        " load it in job_script_prologue, e.g. 'module load apptainer'\" >&2",
        "    exit 127",
        "fi",
        'case "$container_runtime" in',
        *(f"    {name}) env_prefix={prefix} ;;" for name, prefix in _PREFIX.items()),
        "esac",
        f"for name in {' '.join(env_names)}; do",
        '    export "$env_prefix$name=${!name}"',
        "done",
        "unset APPTAINER_BIND SINGULARITY_BIND",
    ]
    binds = all_binds(user_binds, directories)
    command = [RawShell('"$container_runtime"'), "exec"]
    if cleanenv:
        command.append("--cleanenv")
    if gpu:
        command.append("--nv")
    if binds:
        command += ["--bind", ",".join(b.spec() for b in binds)]
    for word in node_binds:
        command += ["--bind", RawShell(word)]
    command += [*extra_args, container, *argv]
    return setup, command


def join(argv: list[str]) -> str:
    """Like :func:`shlex.join`, leaving :class:`RawShell` words as written."""
    return " ".join(a if isinstance(a, RawShell) else shlex.quote(a) for a in argv)
