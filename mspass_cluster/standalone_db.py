"""One database for many clusters: a database started on its own, its record, its clean stop.

``mspass-cluster db start`` submits the database as a Slurm job of its own,
with no notebook behind it: no heartbeat stops it, so it runs until
``mspass-cluster db stop`` or its walltime. Clusters then use it with
``MsPASSCluster(database="<id>")`` (see :mod:`mspass_cluster.services.attached`).

What lives where:

``<db_dir>/data``
    The server's data, as for a cluster's own database.
``<db_dir>/mspass-cluster.json``
    The claim on ``db_dir`` (:mod:`mspass_cluster.dbdir`), naming the shared
    database, so that no other server starts on the same directory.
``<db_dir>/.mspass_cluster/<job name>-<random>/``
    Its credentials (with ``security``): a CA made for it, the server's and
    the clients' certificates, in a directory only you can read (0700),
    made fresh by each ``db start`` and removed by ``db stop``.
``<log_dir>/<job name>-<job id>.out``, ``<log_dir>/<job name>.heartbeat``
    Its job's log, and a file the job touches every 10 s while it runs: a
    claim whose heartbeat stopped (a node failure) is stale.
``$XDG_STATE_HOME/mspass_cluster/databases/<id>.json`` (default ``~/.local/state/...``)
    The record an attaching cluster reads: job, node, port, connection string
    (certificate paths, no secret), directories. ``<id>.users/`` holds one
    file per cluster using it. Both removed by ``db stop``.

The id is made from ``db_dir`` (its resolved path), so a database stopped and
started again on the same directory keeps its id and its clusters: they find
it again wherever it runs next, with its new credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import stat
import time
from dataclasses import dataclass

from . import dbdir
from .config import ClusterOptions
from .errors import CommandError, ConfigError, StartupTimeoutError
from .files import create_private_dir, file_mode, remove_private_dir, touch, write_file
from .jobs import JOB_STOP_TIMEOUT, JobLauncher, server_exit_status
from .roles import ScriptContext
from .security import ClusterCredentials
from .slurm import JobStatus

__all__ = [
    "SharedDatabase",
    "database_id",
    "registry_dir",
    "read_record",
    "all_records",
    "find_record",
    "live_users",
    "register_user",
    "unregister_user",
    "start_database",
    "stop_database",
    "job_statuses",
    "describe_users",
    "HEARTBEAT_EVERY",
    "SHARED_SUFFIX",
]

logger = logging.getLogger("mspass_cluster")

#: Seconds between two touches of the heartbeat file by the database's job.
HEARTBEAT_EVERY = 10
#: The claim's ``orphan_timeout``: the claim lapses this long (plus a minute) after the job stopped touching it.
CLAIM_TIMEOUT = 60
#: The end of a shared database's job name: ``<job_name>-<id>-shared-db``.
SHARED_SUFFIX = "-shared-db"
#: Shortest prefix of an id that names a database.
MIN_PREFIX = 4
#: Seconds the server gets to exit cleanly after SIGTERM (as a cluster's database does).
STOP_TIMEOUT = 300.0
#: Seconds between two signals of ``db stop`` while the job is still listed.
RESEND_EVERY = 15.0


def database_id(db_dir: str) -> str:
    """The id of the shared database on ``db_dir``: 8 hex digits of its resolved path's hash.

    >>> database_id("/scratch/me/db") == database_id("/scratch/me/./db/")
    True
    """
    return hashlib.sha256(os.path.realpath(db_dir).encode()).hexdigest()[:8]


@dataclass
class SharedDatabase:
    """The record of a database started by ``mspass-cluster db start``.

    Attributes
    ----------
    id : str
        8 hex digits, from ``db_dir`` (:func:`database_id`).
    name : str
        Its Slurm job's name, ``<job_name>-<id>-shared-db``.
    job_id, log_path : str
        Its Slurm job and the job's log.
    db_dir, work_dir, log_dir : str
        Its directories (``<db_dir>/data`` holds the data).
    port : int
    host : str or None
        The name clients reach its node by, once it answered.
    uri : str or None
        The clients' connection string (with ``security``: TLS, the CA's and
        the client certificate's paths, x.509 authentication; no secret).
    address : str or None
        ``mongodb://host:port/`` for displays.
    private_dir : str or None
        Its credentials' directory (``security``), removed by ``db stop``.
    ca_file, client_pem : str or None
        The CA certificate and the clients' certificate and key.
    heartbeat : str
        The file its job touches while it runs.
    walltime : str
        Its job's time limit.
    started : str
        When and where ``db start`` ran.
    """

    id: str
    name: str
    db_dir: str
    work_dir: str
    log_dir: str
    port: int
    heartbeat: str
    walltime: str
    started: str
    job_id: str = ""
    log_path: str = ""
    host: str | None = None
    uri: str | None = None
    address: str | None = None
    private_dir: str | None = None
    ca_file: str | None = None
    client_pem: str | None = None

    @property
    def data_path(self) -> str:
        return os.path.join(self.db_dir, "data")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SharedDatabase":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ------------------------------------------------------------------ the registry
def registry_dir(create: bool = False) -> str:
    """``$XDG_STATE_HOME/mspass_cluster/databases`` (default ``~/.local/state/...``), yours alone.

    Raises
    ------
    ConfigError
        When it is another user's or others can write it: a record planted
        there could send your clients to someone else's database.
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    path = os.path.join(base, "mspass_cluster", "databases")
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path} (mode {stat.S_IMODE(st.st_mode):04o}) is not yours alone, so the records of your shared "
            f"databases cannot be trusted there: someone else could point your clusters at their database. "
            f"Make it yours alone (chmod 700 {shlex.quote(path)}), or set XDG_STATE_HOME to a directory of yours."
        )
    return path


def _record_path(ident: str) -> str:
    return os.path.join(registry_dir(), f"{ident}.json")


def _users_dir(ident: str) -> str:
    return os.path.join(registry_dir(), f"{ident}.users")


def write_record(record: SharedDatabase) -> None:
    """Write the record whole (0600) in the registry."""
    registry_dir(create=True)
    write_file(_record_path(record.id), record.to_json(), 0o600)


def read_record(ident: str) -> SharedDatabase | None:
    """The record of database ``ident``, or None (never started, or stopped)."""
    try:
        with open(_record_path(ident)) as f:
            return SharedDatabase.from_json(f.read())
    except (OSError, ValueError, TypeError):
        return None


def remove_record(record: SharedDatabase) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(record.id))
    shutil.rmtree(_users_dir(record.id), ignore_errors=True)


def all_records() -> list[SharedDatabase]:
    """Every recorded shared database of yours, by id."""
    try:
        names = sorted(os.listdir(registry_dir()))
    except FileNotFoundError:
        return []
    records = (read_record(n[: -len(".json")]) for n in names if n.endswith(".json"))
    return [r for r in records if r is not None]


def _listing(records) -> str:
    if not records:
        return "you have none (start one with `mspass-cluster db start --db-dir DIR`)"
    return ", ".join(f"{r.id} ({r.db_dir})" for r in records)


def find_record(token: str) -> SharedDatabase:
    """The record named by ``token``: a whole id, or a unique prefix of at least 4 characters.

    Raises
    ------
    ConfigError
        For an id that names none of your shared databases (the message
        lists them) or more than one.
    """
    key = token.strip().lower()
    records = all_records()
    exact = [r for r in records if r.id == key]
    found = exact or [r for r in records if len(key) >= MIN_PREFIX and r.id.startswith(key)]
    if not found:
        raise ConfigError(
            f"{token!r} is not the id of a shared database of yours (ids are matched whole, or by a prefix of at "
            f"least {MIN_PREFIX} characters). Yours: {_listing(records)}. See `mspass-cluster db status`."
        )
    if len(found) > 1:
        raise ConfigError(f"{token!r} is ambiguous: it could be {_listing(found)}; give more of the id.")
    return found[0]


# ------------------------------------------------------------------ who uses it
def register_user(ident: str, cluster: str, *, heartbeat: str | None, orphan_timeout: int) -> None:
    """Note that ``cluster`` uses database ``ident`` (while its heartbeat is fresh)."""
    path = _users_dir(ident)
    with contextlib.suppress(OSError):
        os.makedirs(path, mode=0o700, exist_ok=True)
        entry = {
            "cluster": cluster,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": heartbeat,
            "orphan_timeout": orphan_timeout,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_file(os.path.join(path, f"{cluster}.json"), json.dumps(entry), 0o600)


def unregister_user(ident: str, cluster: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(_users_dir(ident), f"{cluster}.json"))


def live_users(ident: str, now: float | None = None) -> list[dict]:
    """The clusters using database ``ident`` whose notebooks are alive (fresh heartbeat)."""
    users = []
    try:
        names = sorted(os.listdir(_users_dir(ident)))
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(_users_dir(ident), name)) as f:
                entry = json.load(f)
            age = (time.time() if now is None else now) - os.stat(entry["heartbeat"]).st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if age < float(entry.get("orphan_timeout") or 300) + 60:
            users.append(entry)
    return users


# ------------------------------------------------------------------ Slurm
async def job_statuses(backend, records) -> dict[str, JobStatus]:
    """Slurm's status of each record's job, in one query (``{}`` for none)."""
    ids = [r.job_id for r in records if r.job_id]
    return await backend.statuses(ids) if ids else {}


def heartbeat_lines(heartbeat: str) -> list[str]:
    """Prologue lines: touch ``heartbeat`` every few seconds while the job script runs."""
    return [
        "# mspass_cluster: this shared database's heartbeat, touched while its job runs (its db_dir claim).",
        f"( while kill -0 $$ 2>/dev/null; do touch -- {shlex.quote(heartbeat)}; sleep {HEARTBEAT_EVERY}; done ) &",
    ]


# ------------------------------------------------------------------ start
def _refuse_a_directory_in_use(options: ClusterOptions, ident: str, live_job: bool) -> None:
    holder = dbdir.holder(options.db_dir)
    if holder is None:
        return
    if holder.get("database") == ident and not live_job:
        return  # our own claim, left by a job that ended without `db stop` (a node failure, its walltime)
    if holder.get("database") == ident:
        raise ConfigError(
            f"db_dir={options.db_dir!r} already serves {dbdir.describe_holder(holder)}. "
            f'Use it from a notebook with MsPASSCluster(database="{ident}"), see it with `mspass-cluster db status '
            f"{ident}`, or stop it with `mspass-cluster db stop {ident}` before starting it again."
        )
    raise ConfigError(
        f"db_dir={options.db_dir!r} is in use by {dbdir.describe_holder(holder)}: two database servers cannot share "
        "one directory. Close that cluster first (cluster.close() in its notebook), then start the shared database "
        "on this directory; or give it a directory of its own with --db-dir."
    )


async def start_database(options: ClusterOptions, backend, say=print) -> SharedDatabase:
    """Submit the database as a Slurm job of its own and wait until it answers ``ping``.

    Parameters
    ----------
    options : ClusterOptions
        Final options (``finalise_options`` for the Slurm backend): the
        database's directories, port, memory, walltime, partition, container.
    backend : SlurmBackend
    say : callable
        Where the waiting lines go (the command prints them).

    Returns
    -------
    SharedDatabase
        Its record, also written to the registry.

    Raises
    ------
    ConfigError
        When ``db_dir`` is in use (a cluster's database, or this shared
        database already running).
    JobFailedError, SubmitError, StartupTimeoutError
        As a cluster's database would; the job is cancelled and its
        credentials and record removed first.
    """
    from .services.database import DatabaseService

    ident = database_id(options.db_dir)
    cluster_name = f"{options.job_name}-{ident}-shared"
    old = read_record(ident)
    live = bool(
        old and old.job_id and any(s.state.kind != "ended" for s in (await job_statuses(backend, [old])).values())
    )
    _refuse_a_directory_in_use(options, ident, live)
    if old is not None:
        _clean_up(old)  # a job that ended without `db stop`: its credentials are no use to anyone now
    name = f"{cluster_name}-db"
    heartbeat = os.path.join(options.log_dir, f"{name}.heartbeat")
    mode = file_mode(options)
    touch(heartbeat, mode)
    record = SharedDatabase(
        id=ident,
        name=name,
        db_dir=options.db_dir,
        work_dir=options.work_dir,
        log_dir=options.log_dir,
        port=options.db_port,
        heartbeat=heartbeat,
        walltime=options.db_walltime,
        started=f"{time.strftime('%Y-%m-%d %H:%M:%S')} by process {os.getpid()} on {socket.gethostname()}",
    )
    dbdir.claim(options.db_dir, name, heartbeat=heartbeat, orphan_timeout=CLAIM_TIMEOUT, mode=mode, database=ident)
    tls = None
    launcher = None
    try:
        if options.security:
            # A fresh directory each start: a client made for the previous server (another CA) then names
            # files that are gone, and every cluster sees a new connection string (see AttachedDatabase.tend).
            record.private_dir = create_private_dir(options.db_dir, f"{name}-{secrets.token_hex(3)}")
            tls = ClusterCredentials.create(record.private_dir, cluster=name).files
            record.ca_file, record.client_pem = tls.db_ca_file, tls.db_client_pem
        options = options.replace(job_script_prologue=[*options.job_script_prologue, *heartbeat_lines(heartbeat)])
        # No heartbeat of a notebook: nothing but `db stop` or the walltime ends this database.
        launcher = JobLauncher(ScriptContext(options, ident, cluster_name, tls=tls), backend)
        service = DatabaseService(options, launcher, cluster_name, tls=tls)
        write_record(record)
        service.job = await launcher.submit("db", name)
        record.job_id, record.log_path = service.job.job_id, service.job.log_path
        write_record(record)
        dbdir.claim(
            options.db_dir,
            name,
            heartbeat=heartbeat,
            orphan_timeout=CLAIM_TIMEOUT,
            mode=mode,
            db_job=f"job {service.job.job_id}",
            database=ident,
        )
        await _wait_until_it_answers(service, heartbeat, mode, say)
    except BaseException:
        if launcher is not None:
            launcher.cancel_everything_now()
        _clean_up(record)
        raise
    record.host, record.uri, record.address = service.host, service.uri, service.address
    write_record(record)
    return record


async def _wait_until_it_answers(service, heartbeat: str, mode, say) -> None:
    """Poll the job and ping the server until it answers; raise its failure, or at ``startup_timeout``."""
    options, launcher = service.options, service.launcher
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + options.startup_timeout
    interval, next_poll, last_said, said = 0.25, 0.0, 0.0, None
    while True:
        now = loop.time()
        if now >= next_poll:
            await launcher.poll_riding_outages(give_up=True)
            error = service.startup_failure()
            if error is not None:
                raise error
            await asyncio.to_thread(touch, heartbeat, mode)  # until the job touches it itself
            next_poll, interval = now + interval, min(interval * 1.5, options.poll_interval)
        if await service.probe():
            return
        waiting = service.waiting_for()
        if now - started > 2 and (waiting != said or now - last_said > 60) and now - last_said > 10:
            say(f"Waiting for {waiting}")
            said, last_said = waiting, now
        if now >= deadline:
            raise StartupTimeoutError(
                f"The shared database was not ready after startup_timeout={options.startup_timeout:g} s. Still "
                f"waiting for {waiting}. Its job was cancelled. If the queue is busy, raise startup_timeout."
            )
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------ stop
def _clean_up(record: SharedDatabase) -> None:
    """Remove what the database left besides its data: credentials, claim, heartbeat, record."""
    remove_private_dir(record.private_dir)
    dbdir.release(record.db_dir, record.name)
    with contextlib.suppress(OSError):
        os.unlink(record.heartbeat)
    remove_record(record)


async def stop_database(record: SharedDatabase, backend, say=print) -> int | None:
    """Stop the database with SIGTERM only and wait for its server's clean exit; then remove its files.

    The server gets up to five minutes to flush (as a cluster's database
    does), then the job is cancelled. Its data stay in ``<db_dir>/data``.

    Returns
    -------
    int or None
        The server's exit status as its job logged it (0: a clean exit), or
        None when it was not running.
    """
    status = (await job_statuses(backend, [record])).get(record.job_id)
    running = status is not None and status.state.kind == "running"
    if status is not None and status.state.kind != "ended":
        signal = "TERM" if running else None
        if not await _ended(backend, record, STOP_TIMEOUT if running else JOB_STOP_TIMEOUT, signal):
            say(f"The database job {record.job_id} did not end {STOP_TIMEOUT:.0f} s after SIGTERM; cancelling it.")
            await _ended(backend, record, JOB_STOP_TIMEOUT, None)
    exit_status = await asyncio.to_thread(server_exit_status, record.log_path) if running else None
    _clean_up(record)
    return exit_status


async def _ended(backend, record: SharedDatabase, timeout: float, signal: str | None) -> bool:
    """Send ``signal`` (None: cancel) and wait until the job ended; False at ``timeout``.

    The signal is sent again every ``RESEND_EVERY`` seconds (a server stops
    once; a signal lost while Slurm's controller did not answer is not), and a
    controller that does not answer is waited out until ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline, interval, sent = loop.time() + timeout, 0.2, None
    while loop.time() < deadline:
        try:
            if sent is None or loop.time() - sent >= RESEND_EVERY:
                sent = loop.time()
                await backend.cancel([record.job_id], signal=signal)
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 2.0)
            status = (await job_statuses(backend, [record])).get(record.job_id)
        except CommandError as exc:  # Slurm's controller restarting: the job goes on either way
            logger.debug("Slurm did not answer about job %s: %s", record.job_id, exc)
            await asyncio.sleep(1.0)
            continue
        if status is None or status.state.kind == "ended":
            return True
    return False


def describe_users(ident: str) -> str:
    """``cluster mspass-1a2b (process 12 on login1, since ...)``, ... or ``none that this machine can tell``."""
    users = live_users(ident)
    if not users:
        return "no cluster that is running now"
    return "; ".join(f"cluster {u['cluster']} (process {u['pid']} on {u['host']}, since {u['since']})" for u in users)
