"""The database role: one job running ``mongod`` (or a stand-in), its readiness, its failures, its clean stop.

The service owns its job: it claims the database directory before
submitting, probes readiness with a real ``ping`` that must come from this
cluster's server (its ``dbPath``), explains a failure with what the log
knows (a port or a data directory held by someone else), notices when the
database is lost after start-up, brings it back on the same data when its
job ends while the cluster runs (``db_restarts``), relays it past its
walltime, and stops it with SIGTERM only, giving ``mongod`` time to flush.

Bringing it back: the service submits a new job on the same ``db_dir``
(on the same node when Slurm says it is usable, so that clients made before
reach it at the same address), waits until it answers, and the cluster then
re-points what it published (:meth:`Supervisor.watch` calls :meth:`tend`).
A relay before the walltime submits the next job first, held until the
current one ends (``--dependency=afterany``), then stops the current one
cleanly: the gap is one clean shutdown and one start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import time

from dask.utils import parse_bytes

from .. import dbdir, dbstorage
from ..config import ClusterOptions, parse_walltime
from ..db import connection_string, ping, watch_server
from ..errors import CommandError, ConfigError, JobFailedError
from ..files import directory_bytes, file_mode
from ..jobs import JOB_STOP_TIMEOUT, JobLauncher, JobPhase, TrackedJob, server_exit_status, tail
from ..roles import db_data_path
from ..security import CredentialFiles
from ..slurm import JobState
from ..standalone_db import database_id

__all__ = ["DatabaseService", "DB_STOP_TIMEOUT", "relay_lead"]

logger = logging.getLogger("mspass_cluster")

#: Seconds the database server gets to shut down cleanly after SIGTERM.
DB_STOP_TIMEOUT = 300.0
#: How servers say that their port is taken (mongod's "Address already in use", Python's errno 98, ...).
_ADDRESS_IN_USE = re.compile(r"address already in use|EADDRINUSE|errno 98\b|errno 48\b", re.IGNORECASE)


def relay_lead(options: ClusterOptions, data_bytes: int = 0) -> int:
    """Seconds before its walltime at which the database job hands over to the next one.

    A tenth of ``db_walltime``, at least one minute (a clean shutdown and
    Slurm's own time-limit check, which runs every 30 s or so), at most ten.
    A node-local database (``db_storage``) hands over a minute before Slurm's
    own notice to copy its ``data_bytes`` back (``--signal``, see
    :func:`~mspass_cluster.dbstorage.signal_seconds`), so that the relay, not
    the notice, stops it.

    >>> from mspass_cluster.config import resolve_options
    >>> relay_lead(resolve_options(db_walltime="00:02:00")), relay_lead(resolve_options(db_walltime="24:00:00"))
    (60, 600)
    >>> relay_lead(resolve_options(db_walltime="01:00:00", db_storage="node-local"), 10 * 2**30)
    530
    """
    walltime = parse_walltime(options.db_walltime)
    lead = min(600, max(60, walltime // 10))
    if options.db_storage == "node-local":
        lead = max(lead, dbstorage.signal_seconds(data_bytes, walltime) + 60)
    return lead


class DatabaseService:
    """The cluster's database: one job, its address once it answers.

    Parameters
    ----------
    options : ClusterOptions
    launcher : JobLauncher
        Submits, polls and cancels the job.
    cluster_name : str
        ``<job_name>-<id>``; the job is ``<cluster_name>-db``.
    local : bool
        The desktop backend (no ``hostname_base``).
    tls : CredentialFiles, optional
        The cluster's credentials: clients connect with TLS and the
        cluster's client certificate, and authenticate with it (x.509).
    """

    role = "db"

    def __init__(
        self,
        options: ClusterOptions,
        launcher: JobLauncher,
        cluster_name: str,
        local: bool = False,
        tls: CredentialFiles | None = None,
    ):
        self.options = options
        self.tls = tls if tls is not None and tls.db_client_pem else None
        self.launcher = launcher
        self.cluster_name = cluster_name
        self.local = local
        self.job: TrackedJob | None = None
        #: The connection string once the server answered: ``mongodb://host:port/``, with the
        #: certificates' paths and x.509 authentication when the database is secured.
        self.uri: str | None = None
        #: ``mongodb://host:port/`` alone, for displays and the log.
        self.address: str | None = None
        #: Why it does not answer yet (the last ping's error), for the waiting log line.
        self.not_answering = "not started yet"
        self._walltime_warned = False
        #: Times the database was brought back after its job ended (see ``db_restarts``).
        self.restarts = 0
        #: True from the moment the database is known gone (or relayed) until the cluster re-pointed
        #: everything to the server that replaced it; calls that need the database wait meanwhile.
        self.moving = False
        #: Why the database must be brought back, until :meth:`tend` submitted its new job.
        self._restart_cause: str | None = None
        self._moved_since: float | None = None
        #: The job handing over in a relay, and the task stopping it cleanly.
        self._retiring: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        #: Set (from pymongo's monitor thread) when a heartbeat to the server failed: the supervisor then asks
        #: Slurm at once instead of at its next poll.
        self.alarm = asyncio.Event()
        self._watcher = None
        #: True while the server's heartbeat fails: its job may still run (copying node-local data back).
        self.server_silent = False
        #: Bytes in ``<db_dir>/data`` when the last job was submitted (node-local storage sizes its notices from it).
        self._data_bytes = 0

    @property
    def job_name(self) -> str:
        return f"{self.cluster_name}-db"

    @property
    def host(self) -> str | None:
        """The name workers and clients reach the database's node by."""
        if self.job is None or not self.job.node:
            return None
        if self.options.hostname_base and not self.local:
            return f"{self.job.node}.{self.options.hostname_base}"
        return self.job.node

    # ------------------------------------------------------------ start
    def refuse_a_directory_in_use(self) -> None:
        """ConfigError, before anything is submitted, when another live cluster uses ``db_dir``."""
        record = dbdir.holder(self.options.db_dir)
        if record is not None:
            raise ConfigError(self._in_use_text(record))

    def _in_use_text(self, record: dict) -> str:
        """Who holds ``db_dir``, and both ways out: use that database (when it is shared) or another directory."""
        own_dir = (
            "give this cluster a directory of its own, e.g. work_dir='<another folder>' or db_dir='<another folder>'. "
            "(Two notebooks started in one folder share work_dir, and with it db_dir.)"
        )
        shared = record.get("database")
        if shared:
            return (
                f"db_dir={self.options.db_dir!r} is in use by {dbdir.describe_holder(record)}: two database servers "
                f'cannot share one directory. Either use that database: MsPASSCluster(..., database="{shared}") '
                f"starts no database and leaves it running when it closes (`mspass-cluster db status {shared}` "
                f"shows it); or {own_dir}"
            )
        cluster_id = str(record.get("cluster", "")).rsplit("-", 1)[-1]
        ident = database_id(self.options.db_dir)
        return (
            f"db_dir={self.options.db_dir!r} is in use by {dbdir.describe_holder(record)}: two database servers "
            "cannot share one directory. Either close that cluster first (cluster.close() in its notebook, or "
            f"`mspass-cluster down {cluster_id}`), or {own_dir} To let several notebooks use one database, start it "
            f"on its own once that cluster is closed: `mspass-cluster db start --db-dir {shlex.quote(self.options.db_dir)}`"
            f', then MsPASSCluster(..., database="{ident}") in each notebook.'
        )

    async def submit(self) -> None:
        claim = dict(
            heartbeat=self.launcher.context.heartbeat,
            orphan_timeout=self.options.orphan_timeout,
            mode=file_mode(self.options),
        )
        dbdir.claim(self.options.db_dir, self.cluster_name, **claim)
        await self._measure_data()
        self.job = await self.launcher.submit("db", self.job_name)
        dbdir.claim(self.options.db_dir, self.cluster_name, db_job=f"{self.job.unit} {self.job.job_id}", **claim)

    async def probe(self) -> bool:
        """Ping the server once if its job runs; True once it answered (and is this cluster's)."""
        if self.uri is not None:
            return True
        if self.job is None or self.job.state.kind != "running" or not self.job.node:
            return False
        uri = self.uri_for(self.host)
        self.not_answering = await asyncio.to_thread(ping, uri, 1.0, db_data_path(self.options, self.job_name))
        if self.tls and self.not_answering and "AuthenticationFailed" in self.not_answering:
            self.not_answering = "its server answers; this cluster's user is being set up"
        if self.not_answering is None:
            self.uri = uri
            self.address = connection_string(self.host, self.options.db_port)
            self.job.ready = True
            await self._watch(uri)
            if self.moving:
                return True
            logger.log(
                self.launcher.detail,
                "Database ready at %s%s (%s %s on %s).",
                self.address,
                ", TLS and x.509 authentication with this cluster's certificate" if self.tls else "",
                self.job.unit,
                self.job.job_id,
                self.job.node,
            )
        return self.uri is not None

    async def _measure_data(self) -> None:
        if self.options.db_storage == "node-local":
            self._data_bytes = await asyncio.to_thread(directory_bytes, os.path.join(self.options.db_dir, "data"))

    def stop_timeout(self) -> float:
        """Seconds a clean stop may take: ``DB_STOP_TIMEOUT``, or a node-local database's shutdown and copy-back."""
        if self.options.db_storage != "node-local":
            return DB_STOP_TIMEOUT
        return max(DB_STOP_TIMEOUT, float(dbstorage.copy_back_seconds(self._data_bytes)))

    async def _watch(self, uri: str) -> None:
        """Watch the server's heartbeat, so that its end is known within a second, not at the next poll."""
        self._unwatch()
        loop = asyncio.get_running_loop()

        def failed():
            self.server_silent = True
            try:
                loop.call_soon_threadsafe(self.alarm.set)
            except RuntimeError:  # the loop is closed: nobody left to tell
                pass

        def answered():
            self.server_silent = False

        self.server_silent = False
        self._watcher = await asyncio.to_thread(watch_server, uri, failed, answered)

    def _unwatch(self) -> None:
        self.server_silent = False
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.close()

    def uri_for(self, host: str) -> str:
        """The connection string of this cluster's clients for the server on ``host``."""
        if self.tls is None:
            return connection_string(host, self.options.db_port)
        return self.tls.db_uri(host, self.options.db_port)

    def waiting_for(self) -> str | None:
        """What start-up still waits for from the database, or None."""
        if self.uri is not None:
            return None
        text = self.job.describe()
        if self.job.state.kind == "running":
            text += f", not answering yet ({self.not_answering})"
        return text

    def startup_failure(self, coming_back: bool = False) -> JobFailedError | None:
        """The error to raise when the job ended before the database answered (at start-up, or ``coming_back``)."""
        if not self.job.ended:
            return None
        fix = "Check db_command and the log above; print(cluster.job_script('db')) shows what ran."
        log = tail(self.job.log_path, 200)
        record = dbdir.holder(self.options.db_dir)
        if any(words in log for words in dbdir.LOCKED_WORDS):
            fix = (
                self._in_use_text(record)
                if record and record.get("cluster") != self.cluster_name
                else (
                    f"Another database server holds db_dir={self.options.db_dir!r}. Stop it, or give this cluster "
                    "a directory of its own (work_dir= or db_dir=)."
                )
            )
        elif _ADDRESS_IN_USE.search(log):
            port = self.options.db_port
            fix = (
                f"Another program already listens on db_port={port} on {self.job.node or 'its node'} (often "
                "another MongoDB, perhaps another user's on a shared node). Give this cluster a port of its own, "
                f"e.g. db_port={port + 100}, or a node of its own with db_extra_directives=['--exclusive']."
            )
        if coming_back:
            self.job.error = self.job.failure(
                "ended before the database came back",
                "The cluster and its workers still run; fix the cause and call cluster.restart_database(). " + fix,
            )
        else:
            self.job.error = self.job.failure(
                "ended before the database answered", "Every job of this cluster was cancelled. " + fix
            )
        return self.job.error

    # ------------------------------------------------------------ running
    def on_change(self, job: TrackedJob) -> None:
        """After start-up: a database job that ended is brought back (``db_restarts``) or lost.

        Either way the user hears it now: a warning when it comes back, an
        error kept for the next call that needs the database otherwise.
        """
        if job is not self.job or not job.ended or job.phase is not JobPhase.FAILED:
            return  # a relayed job handing over, or one that ended as planned
        self._unwatch()
        self.uri = self.address = None
        newer = self._copy_back_failure(job)
        if not newer and self.restarts < self.options.db_restarts:
            self.restarts += 1
            self.moving = True
            self._moved_since = time.monotonic()
            self._restart_cause = job.describe() + (
                f", exit code {job.status.exit_code}" if job.status.exit_code else ""
            )
            logger.warning(
                "The database job %s ended %s (%s). Bringing the database back on the "
                "same data in %s (restart %d of db_restarts=%d); calls that need it wait until it answers.",
                job.job_id,
                "while the cluster was running" if job.ready else "before it answered, bringing the database back",
                self._restart_cause,
                self.options.db_dir,
                self.restarts,
                self.options.db_restarts,
            )
            return
        if self.moving and not job.ready and not newer:  # the last try to bring it back failed before it answered
            self.moving = False
            error = self.startup_failure(coming_back=True)
            logger.error("The database could not be brought back (db_restarts=%d used).\n%s", self.restarts, error)
            return
        fix = "The database is gone: close this cluster and start a new one (what it stored stays in db_dir)."
        if job.state is JobState.TIMEOUT:
            fix = (
                f"It reached its walltime (db_walltime={self.options.db_walltime}). What it stored is in "
                f"{self.options.db_dir}: close this cluster and start a new one with the same work_dir "
                "and a longer db_walltime to go on."
            )
        if self.options.db_restarts and not newer:
            fix = (
                f"It was brought back {self.restarts} time(s) already, the most db_restarts={self.options.db_restarts} "
                "allows. " + fix + " Raise db_restarts to keep bringing it back."
            )
        if newer:
            fix = (
                newer + " The cluster did not bring the database back: it would have started from the older copy. "
                "Copy the newer files into place (or fix what stopped the copy) and call cluster.restart_database()."
            )
        self.moving = False
        job.error = job.failure("ended while the cluster was running", fix)
        logger.error("%s", job.error)

    @staticmethod
    def _copy_back_failure(job: TrackedJob) -> str | None:
        """What the job's log says of a failed copy-back of node-local data, or None."""
        return dbstorage.copy_back_failure(tail(job.log_path, 200))

    def lost(self) -> JobFailedError | None:
        """The database job's failure, once it ended while it was needed (and is not being brought back)."""
        job = self.job
        return job.error if job is not None and job.error is not None and not self.moving else None

    async def check(self) -> None:
        """Ask the backend about the database job now and raise its failure if it is gone (one query)."""
        if self.job is not None and not self.job.ended and self.job in await self.launcher.poll([self.job.job_id]):
            self.on_change(self.job)
        error = self.lost()
        if error is not None:
            raise error

    # ------------------------------------------------------------ bringing it back
    async def tend(self) -> bool:
        """Bring the database back or relay it when due; True once a new server answers.

        Called by the supervisor every poll while the cluster runs; the
        cluster re-points what it published when this returns True, then
        clears :attr:`moving`.
        """
        async with self._lock:
            if self._restart_cause is not None:
                self._restart_cause = None
                await self._submit_again()
            elif self._relay_due():
                await self._relay()
            if not self.moving or self.job is None or self.job.error is not None:
                return False
            if self.job.ended:
                error = self.startup_failure(coming_back=True)
                self.moving = False
                logger.error("The database could not be brought back.\n%s", error)
                return False
            return await self.probe()

    async def restart(self) -> None:
        """Stop the database cleanly (if it runs) and start it again on the same data; see :meth:`tend`."""
        async with self._lock:
            job = self.job
            self._unwatch()
            self.uri = self.address = None
            self.moving = True
            self._moved_since = time.monotonic()
            if job is not None and not job.ended:
                await self._stop_cleanly(job)
            if job is not None:
                job.error = None
            await self._submit_again()

    def back_after(self) -> float | None:
        """Seconds from the moment the database was known gone (or handed over) until now."""
        return None if self._moved_since is None else time.monotonic() - self._moved_since

    def _relay_due(self) -> bool:
        job = self.job
        if self.options.db_restarts <= 0 or job is None or not job.ready or job.stopping or job.time_left is None:
            return False
        return job.time_left <= relay_lead(self.options, self._data_bytes)

    async def _relay(self) -> None:
        """Hand over to a new job on the same data before the walltime: next job queued first, then a clean stop."""
        old = self.job
        left = old.time_left
        self._unwatch()
        self.uri = self.address = None
        self.moving = True
        self._moved_since = time.monotonic()
        old.stopping = True
        await self._submit_again(after=old)
        logger.info(
            "The database job %s reaches its walltime in %d s: relaying it to job %s on the same data (%s); calls "
            "that need the database wait for the hand-over.",
            old.job_id,
            left,
            self.job.job_id if self.job is not old else "?",
            self.options.db_dir,
        )
        self._retiring = asyncio.ensure_future(self._stop_cleanly(old))

    async def _submit_again(self, after: TrackedJob | None = None) -> None:
        """Submit the next database job; on the old node when it has room (or, in a relay, is up), else anywhere."""
        old = self.job
        directives = []
        if after is not None:
            directives.append(f"--dependency=afterany:{after.job_id}")
        if old is not None and old.node and await self._room_on(old.node, relay=after is not None):
            directives.append(f"--nodelist={old.node}")
        await self._measure_data()
        try:
            self.job = await self.launcher.submit("db", self.job_name, directives=directives)
        except CommandError as exc:
            self.moving = False
            if old is not None:
                old.error = old.failure(
                    "ended, and a new database job could not be submitted",
                    f"{str(exc).splitlines()[0]} What the database stored is in {self.options.db_dir}; "
                    "call cluster.restart_database() to try again.",
                )
                logger.error("%s", old.error)
            return
        self.job.ready = False
        dbdir.claim(
            self.options.db_dir,
            self.cluster_name,
            heartbeat=self.launcher.context.heartbeat,
            orphan_timeout=self.options.orphan_timeout,
            mode=file_mode(self.options),
            db_job=f"{self.job.unit} {self.job.job_id}",
        )

    async def _room_on(self, node: str, relay: bool) -> bool:
        """Whether the next job should ask for ``node``: it is up and the job fits now (a relay: the old job's
        share comes free when it ends). False when Slurm cannot tell: asking for a node that is full or
        down would leave the database waiting while other nodes are free."""
        room_of = getattr(self.launcher.backend, "node_room", None)
        if room_of is None:
            return False
        try:
            room = await room_of(node)
        except CommandError:
            return False
        if room is None:
            return False
        if relay:
            return room.up
        return room.fits(self.options.db_cores, parse_bytes(self.options.db_memory) // 2**20)

    async def _stop_cleanly(self, job: TrackedJob) -> bool:
        """SIGTERM, up to ``DB_STOP_TIMEOUT`` for a clean shutdown, then cancel. True if it ended on SIGTERM."""
        if job.state.kind != "running":
            await self.launcher.cancel(job, timeout=JOB_STOP_TIMEOUT)
            return True
        # The server may take longer than Slurm's KillWait to flush, so it gets DB_STOP_TIMEOUT first.
        if await self.launcher.cancel(job, signal="TERM", timeout=DB_STOP_TIMEOUT):
            return True
        logger.error(
            "The database job %s did not end %.0f s after SIGTERM; cancelling it.", job.job_id, DB_STOP_TIMEOUT
        )
        await self.launcher.cancel(job, timeout=JOB_STOP_TIMEOUT)
        return False

    def warn_before_walltime(self) -> None:
        """Warn once, minutes ahead, that the database job will reach its walltime (workers are replaced; it is not)."""
        job = self.job
        if self._walltime_warned or job is None or job.time_left is None or self.options.db_restarts > 0:
            return
        left = job.time_left
        notice = min(600, max(60, parse_walltime(self.options.db_walltime) // 6))
        if left > notice:
            return
        self._walltime_warned = True
        logger.warning(
            "The database job %s reaches its walltime in %d min %02d s (db_walltime=%s). The database then stops, "
            "and the cluster with it; what it stored stays in %s. Finish or save your work and close this cluster; "
            "start the next one with a longer db_walltime.",
            job.job_id,
            left // 60,
            left % 60,
            self.options.db_walltime,
            self.options.db_dir,
        )

    # ------------------------------------------------------------ stop
    async def stop(self) -> None:
        """SIGTERM only, up to ``DB_STOP_TIMEOUT`` for a clean shutdown, then cancel; log how it ended."""
        self._unwatch()
        if self._retiring is not None:
            await self._retiring  # a relay's old job finishes its clean shutdown first
        job = self.job
        self.moving = False
        if job is None or job.ended:
            return
        if job.state.kind != "running":
            await self.launcher.cancel(job, timeout=JOB_STOP_TIMEOUT)
            return
        if not await self._stop_cleanly(job):
            return
        status = await asyncio.to_thread(server_exit_status, job.log_path)
        if status is None:
            logger.info("Database %s %s ended before its server ran (%s).", job.unit, job.job_id, job.state.value)
        elif not job.ready:
            logger.info(
                "Database %s %s stopped while its server was starting (exit status %s).", job.unit, job.job_id, status
            )
        elif self._copy_back_failure(job):
            logger.error(
                "Cluster %s closed; its database server stopped, but %s",
                self.cluster_name,
                self._copy_back_failure(job),
            )
        elif status == 0:
            logger.info(
                "Cluster %s closed; its database stopped cleanly (%s %s, server exit status 0).",
                self.cluster_name,
                job.unit,
                job.job_id,
            )
        else:
            logger.warning(
                "Database %s %s ended with server exit status %s; see %s.", job.unit, job.job_id, status, job.log_path
            )

    def release(self) -> None:
        """Give ``db_dir`` free for the next cluster."""
        self._unwatch()
        self.uri = None
        self.address = None
        dbdir.release(self.options.db_dir, self.cluster_name)
