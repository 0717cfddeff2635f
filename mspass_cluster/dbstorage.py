"""Where the database's files live while it runs: ``<db_dir>/data`` itself, or a node-local copy (pure).

``db_storage="shared"`` (the default): the server runs on ``<db_dir>/data``,
on the file system every node shares.

``db_storage="node-local"``: the database job copies ``<db_dir>/data`` into a
fresh private directory under ``db_local_dir`` on its node (``$TMPDIR``, else
``/tmp``, evaluated there), runs the server on that copy, and once the server
exited, however it ended, copies it back atomically. The work is done on the
node by ``templates/db_storage.py`` (its docstring says how); this module
holds what the notebook side needs: the shell words of the local directory,
the ``--signal`` that starts the copy-back before the walltime, the
server's data directory as the readiness probe checks it, and the reading
of a job log whose copy-back failed.
"""

from __future__ import annotations

import math
import re
import shlex

__all__ = [
    "STORAGES",
    "DEFAULT_LOCAL_DIR",
    "COPY_RATE",
    "SHUTDOWN_SECONDS",
    "MIN_SIGNAL_SECONDS",
    "DbPathPattern",
    "check_local_dir",
    "local_dir_variable",
    "local_dir_word",
    "job_dir_template",
    "copy_back_seconds",
    "signal_seconds",
    "signal_directive",
    "server_dbpath",
    "copy_back_failure",
]

STORAGES = ("shared", "node-local")
#: ``db_local_dir`` when unset, as the job's shell evaluates it on the node.
DEFAULT_LOCAL_DIR = "${TMPDIR:-/tmp}"

#: Bytes per second assumed for the copy-back, its read-back check included: one node writing to a busy
#: parallel file system. Conservative on purpose; a copy-back cut by the walltime keeps the old copy.
COPY_RATE = 50 * 2**20
#: Seconds assumed for the server's clean shutdown (mongod's last checkpoint) before the copy starts.
SHUTDOWN_SECONDS = 60
#: Least notice: Slurm may signal up to a minute late or early, and a small database still needs its copy.
MIN_SIGNAL_SECONDS = 120
#: Slurm's limit for ``--signal=...@<seconds>``.
MAX_SIGNAL_SECONDS = 65535

_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))(?P<rest>(/.*)?)$"
)


class DbPathPattern(str):
    """A server data directory known only as an :mod:`fnmatch` pattern (the node-local directory is the node's)."""


def check_local_dir(name: str, value: str) -> str:
    """``value`` if it is an absolute path or ``$VAR``/``${VAR}`` (evaluated on the node) with an optional ``/rest``.

    Raises
    ------
    ValueError
        Saying what is wrong and what to write (the caller makes it a ConfigError).

    >>> check_local_dir("db_local_dir", "$LOCAL_SCRATCH/mspass")
    '$LOCAL_SCRATCH/mspass'
    """
    text = str(value).strip()
    if "," in text or ":" in text:
        raise ValueError(
            f"{name}={value!r} holds a ',' or ':', which a container runtime reads as the end of a bind "
            f"(--bind src:dst,...); choose a directory without them, e.g. {name}='/tmp'."
        )
    if text.startswith("$"):
        if not _VARIABLE.match(text):
            raise ValueError(
                f"{name}={value!r} is not '$NAME' or '${{NAME}}' followed by an optional '/path'; write e.g. "
                f"{name}='$LOCAL_SCRATCH' (evaluated on the database's node) or an absolute path."
            )
        return text
    if not text.startswith("/"):
        raise ValueError(
            f"{name}={value!r} is not an absolute path; give a directory on the database node's own disk, e.g. "
            f"{name}='/tmp' or {name}='$TMPDIR' (evaluated on the node)."
        )
    return text


def local_dir_variable(value: str | None) -> str | None:
    """The variable a ``db_local_dir`` of ``$NAME/...`` needs set on the node, or None.

    >>> local_dir_variable("${LOCAL}/db"), local_dir_variable("/tmp"), local_dir_variable(None)
    ('LOCAL', None, None)
    """
    match = _VARIABLE.match(value) if value else None
    return match and (match.group("braced") or match.group("plain"))


def local_dir_word(value: str | None) -> str:
    """The shell word for ``db_local_dir`` (``None``: ``$TMPDIR``, else ``/tmp``), quoted as needed.

    >>> local_dir_word(None)
    '"${TMPDIR:-/tmp}"'
    >>> local_dir_word("${SCRATCH}/my db")
    '"${SCRATCH}"\\'/my db\\''
    """
    if value is None:
        return f'"{DEFAULT_LOCAL_DIR}"'
    match = _VARIABLE.match(value)
    if match is None:
        return shlex.quote(value)
    name = match.group("braced") or match.group("plain")
    rest = match.group("rest")
    return f'"${{{name}}}"' + (shlex.quote(rest) if rest else "")


def copy_back_seconds(data_bytes: int) -> int:
    """Seconds a node-local database may need to stop and copy ``data_bytes`` back (twice them: room to grow).

    ``SHUTDOWN_SECONDS + 2 * data_bytes / COPY_RATE``; what a clean stop
    should wait for before cancelling the job.

    >>> copy_back_seconds(10 * 2**30)
    470
    """
    return SHUTDOWN_SECONDS + math.ceil(2 * data_bytes / COPY_RATE)


def signal_seconds(data_bytes: int, walltime_seconds: int) -> int:
    """Seconds before the walltime at which the database job is told to stop and copy back.

    ``SHUTDOWN_SECONDS + 2 * data_bytes / COPY_RATE`` (the data measured when
    the job is submitted, counted twice so it may double while the job runs),
    at least ``MIN_SIGNAL_SECONDS``; never more than half the walltime (the
    server must get to run) nor Slurm's 65535.

    >>> signal_seconds(0, 3600)
    120
    >>> signal_seconds(10 * 2**30, 86400)  # 10 GiB: 60 s + 20 GiB at 50 MiB/s
    470
    >>> signal_seconds(10 * 2**30, 600)
    300
    """
    lead = max(copy_back_seconds(data_bytes), MIN_SIGNAL_SECONDS)
    return max(1, min(lead, walltime_seconds // 2, MAX_SIGNAL_SECONDS))


def signal_directive(data_bytes: int, walltime_seconds: int) -> str:
    """``--signal=B:USR1@<seconds>``: Slurm signals the job's shell, which stops the server; the copy-back follows.

    >>> signal_directive(0, 3600)
    '--signal=B:USR1@120'
    """
    return f"--signal=B:USR1@{signal_seconds(data_bytes, walltime_seconds)}"


def job_dir_template(job_name: str) -> str:
    """The ``mktemp -d`` template of the job's node-local directory, under the local directory.

    >>> job_dir_template("mspass-1a2b-db")
    'mspass_cluster-mspass-1a2b-db-${SLURM_JOB_ID:-$$}.XXXXXXXX'
    """
    return f"mspass_cluster-{job_name}-${{SLURM_JOB_ID:-$$}}.XXXXXXXX"


def server_dbpath(job_name: str | None = None) -> DbPathPattern:
    """The node-local server's ``dbPath`` as the notebook can know it: a pattern (the directory is the node's).

    >>> server_dbpath("mspass-1a2b-db")
    '*/mspass_cluster-mspass-1a2b-db-*/data'
    """
    return DbPathPattern(f"*/mspass_cluster-{job_name or '*'}-*/data")


_STAGED = re.compile(r"^mspass_cluster: stage-in done: (?P<where>.+) is the server's copy of (?P<data>.+) \(", re.M)
_STARTED = re.compile(r"^mspass_cluster: copy-back started: (?P<where>.+) to (?P<data>.+) \(", re.M)
_FAILED = re.compile(r"^mspass_cluster: (?P<sentence>copy-back failed: .*)$", re.M)
_FINISHED = re.compile(r"^mspass_cluster: copy-back (done|verified): ", re.M)


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    found = None
    for found in pattern.finditer(text):
        pass
    return found


def copy_back_failure(log_text: str) -> str | None:
    """Why ``<db_dir>/data`` lacks the database's newest files, from the log of an ENDED database job, or None.

    None when the job did not run on a node-local copy, or when its copy-back
    finished: swapped in, or checked complete (a swap cut short by the end of
    the job is completed by the next start on ``db_dir``). Otherwise one
    sentence: the copy-back's own failure line (what failed, that
    ``<db_dir>/data`` is the previous complete copy, ``<node>:<path>`` of the
    newer files, and the command that copies them back), or, when the job
    ended before its copy-back did (SIGKILL at Slurm's ``KillWait``), the same
    facts from the copy-back's first line or the stage-in's. The end of the
    log is enough (the copy-back's lines are its last) except for a job
    killed before its copy-back began, which only the stage-in line, at the
    start, tells. A database restarted on ``db_dir`` then would refuse to
    start anyway (``<db_dir>/node-local.json``, see ``templates/db_storage.py``).

    >>> copy_back_failure("mspass_cluster: db starting on n1\\n")
    >>> log = ("mspass_cluster: stage-in done: n2:/tmp/j/data is the server's copy of /w/db/data (3 files)\\n"
    ...        "mspass_cluster: copy-back started: n2:/tmp/j/data to /w/db/data (3 files, 1 MiB)\\n")
    >>> copy_back_failure(log)
    'copy-back did not finish (the job ended first): /w/db/data is the previous complete copy; the newer files are on n2:/tmp/j/data.'
    """
    last = None
    for match in (_last(_STAGED, log_text), _last(_STARTED, log_text), _last(_FAILED, log_text)):
        if match is not None and (last is None or match.start() > last.start()):
            last = match
    if last is None:
        return None
    after = log_text[last.end() :]
    if last.re is _FAILED:
        return last.group("sentence")
    if _FINISHED.search(after):
        return None
    return (
        f"copy-back did not finish (the job ended first): {last.group('data')} is the previous complete copy; "
        f"the newer files are on {last.group('where')}."
    )
