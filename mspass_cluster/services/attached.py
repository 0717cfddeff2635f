"""A database the cluster uses but does not own: ``MsPASSCluster(database=...)``.

The database is one started by ``mspass-cluster db start`` (named by its
id, see :mod:`mspass_cluster.standalone_db`) or any server named by a
``mongodb://`` connection string. The cluster submits no database job; it
waits for the same ``ping``, hands its workers the same connection string
(the shared database's client certificate and CA), raises a lost database
on the next call that needs it, and leaves the database running at close.

:class:`AttachedDatabase` speaks the same protocol as
:class:`~mspass_cluster.services.database.DatabaseService` (what the
cluster and the supervisor call). Its :meth:`~AttachedDatabase.tend`
follows a shared database stopped and started again on the same
``db_dir`` (same id), wherever it runs next: its ``uri`` then names the new
server's node and the new credentials, and the cluster re-points what it
published.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from pymongo.errors import InvalidURI
from pymongo.uri_parser import parse_uri

from .. import slurm, standalone_db
from ..backends.slurm import SlurmBackend
from ..commands import CommandRunner
from ..config import ClusterOptions, parse_walltime
from ..db import connection_string, ping
from ..errors import ConfigError, JobFailedError, MsPASSClusterError, StartupTimeoutError
from ..jobs import JobLauncher, TrackedJob
from ..security import CredentialFiles, db_client_uri
from ..slurm import JobState, JobStatus
from ..standalone_db import SharedDatabase

__all__ = ["AttachedDatabase", "DatabaseTarget", "find_database"]

logger = logging.getLogger("mspass_cluster")

#: Seconds a running shared database may take to answer before start-up gives up on it.
ANSWER_PATIENCE = 30.0
#: Failed pings in a row after which a database named by a connection string counts as lost.
LOST_AFTER_PINGS = 3
#: The options of a connection string the cluster can hand on to its workers (lower case, as pymongo gives them).
_TLS_OPTIONS = {
    "tls",
    "ssl",
    "tlscafile",
    "tlscertificatekeyfile",
    "tlsallowinvalidhostnames",
    "authmechanism",
    "authsource",
}


@dataclass(frozen=True)
class DatabaseTarget:
    """What ``database=`` names, checked before anything is submitted.

    Attributes
    ----------
    given : str
        The value as given.
    record : SharedDatabase or None
        The shared database's record, when ``given`` is its id (or its connection string).
    host : str
    port : int
    ca_file, client_pem : str or None
        Its CA and client certificate (TLS and x.509), or None for a server without TLS.
    runner : CommandRunner
        Asks Slurm about the shared database's job.
    """

    given: str
    record: SharedDatabase | None
    host: str
    port: int
    ca_file: str | None
    client_pem: str | None
    runner: CommandRunner

    @property
    def uri(self) -> str:
        """The clients' connection string (the one every worker gets as ``MSPASS_DB_ADDRESS``)."""
        if self.client_pem:
            return db_client_uri(self.host, self.port, self.ca_file, self.client_pem)
        return connection_string(self.host, self.port)

    @property
    def what(self) -> str:
        """``shared database 1a2b3c4d`` or ``the database at mongodb://host:port/``, for messages."""
        if self.record is not None:
            return f"shared database {self.record.id}"
        return f"the database at {connection_string(self.host, self.port)}"

    def adopted(self, options: ClusterOptions, tls: CredentialFiles | None):
        """The cluster's options and credentials, with this database's port and client files.

        The cluster's job scripts and published variables are built from
        them: ``MSPASS_DB_ADDRESS`` becomes this database's connection string.
        Dask keeps the cluster's own certificates.

        Raises
        ------
        ConfigError
            For a database that requires TLS when the cluster has no
            credentials to hand on (``security=False``).
        """
        ignored = [
            name
            for name in ("db_command", "db_port", "db_memory", "db_cores", "db_walltime", "db_partition", "db_dir")
            if options.sources.get(name) == "argument"
        ]
        if ignored:
            logger.warning(
                "%s: %s not used; this cluster uses %s and starts no database of its own.",
                ", ".join(f"{n}={getattr(options, n)!r}" for n in ignored),
                "is" if len(ignored) == 1 else "are",
                self.what,
            )
        options = options.replace(db_port=self.port)
        if tls is None:
            if self.client_pem:
                raise ConfigError(
                    f"database={self.given!r}: {self.what} requires TLS with its client certificate, which a cluster "
                    "made with security=False does not hand on to its workers. Leave security on (the default)."
                )
            return options, None
        return options, dataclasses.replace(
            tls, db_client_pem=self.client_pem, db_ca_file=self.ca_file, db_server_pem=None, db_user=None
        )


def find_database(options: ClusterOptions, runner: CommandRunner) -> DatabaseTarget | None:
    """The database ``database=`` names, checked before anything is submitted; None when it is unset.

    A shared database must be recorded, and its job must not have ended (a
    pending one is waited for, as a cluster's own database is).

    Raises
    ------
    ConfigError
        For an id that names none of your shared databases, an ambiguous
        prefix, or a connection string this cluster cannot use.
    JobFailedError
        When the shared database's job has ended (its walltime, `db stop`
        in progress, a node failure), with its log and how to start it again.
    """
    given = options.database
    if not given:
        return None
    if given.startswith(("mongodb://", "mongodb+srv://")):
        target = _target_of_uri(given, runner)
    elif "://" in given or ":" in given or "/" in given:
        raise ConfigError(
            f"database={given!r} is neither the id of a shared database (8 hex digits, as `mspass-cluster db start` "
            "prints it; `mspass-cluster db status` lists yours) nor a connection string starting with mongodb://."
        )
    else:
        try:
            record = standalone_db.find_record(given)
        except ConfigError as exc:
            raise ConfigError(f"database={given!r}: {exc}") from None
        target = _target_of_record(given, record, runner)
    if target.record is not None:
        job = _job_of(target.record)
        # Synchronous: the constructor may run inside an event loop (asynchronous=True).
        result = runner.run(slurm.build_squeue_argv([job.job_id]), check=False)
        job.status = slurm.parse_squeue(result.stdout).get(job.job_id)
        if job.status is None and (result.returncode == 0 or "Invalid job id" in result.stderr):
            job.status = JobStatus(job.job_id, JobState.UNKNOWN, "Slurm no longer lists it")
        if job.status is not None and job.ended:
            raise _not_running(job, target.record)
    return target


def _target_of_record(given: str, record: SharedDatabase, runner: CommandRunner) -> DatabaseTarget:
    if not record.host or not record.job_id:
        raise ConfigError(
            f"database={given!r}: shared database {record.id} never answered (`mspass-cluster db start` did not "
            f"finish). Start it again: mspass-cluster db start --db-dir {record.db_dir}"
        )
    return DatabaseTarget(given, record, record.host, record.port, record.ca_file, record.client_pem, runner)


def _target_of_uri(given: str, runner: CommandRunner) -> DatabaseTarget:
    try:
        parsed = parse_uri(given, validate=True)
    except (InvalidURI, ValueError) as exc:
        raise ConfigError(f"database={given!r} is not a valid MongoDB connection string: {exc}") from None
    except OSError as exc:  # pymongo opens the certificate files it names
        raise ConfigError(
            f"database={given!r}: {exc.strerror or exc}; the files it names must exist on this machine and on the "
            "compute nodes (a shared file system)."
        ) from None
    if len(parsed["nodelist"]) != 1:
        raise ConfigError(
            f"database={given!r} names {len(parsed['nodelist'])} servers; give one server, "
            "e.g. database='mongodb://n1:27017/'."
        )
    host, port = parsed["nodelist"][0]
    opts = {k.lower(): v for k, v in parsed["options"].items()}
    extra = sorted(set(opts) - _TLS_OPTIONS) + (["username/password"] if parsed.get("username") else [])
    tls = bool(opts.get("tls") or opts.get("ssl"))
    ca, pem = opts.get("tlscafile"), opts.get("tlscertificatekeyfile")
    if extra or (tls and not (ca and pem and str(opts.get("authmechanism", "")).upper() == "MONGODB-X509")):
        raise ConfigError(
            f"database={given!r}: the cluster hands every worker the database's address as MSPASS_DB_ADDRESS, "
            "rebuilt from its host, port and, for TLS, its CA (tlsCAFile) and client certificate "
            "(tlsCertificateKeyFile) with x.509 authentication; it cannot hand on "
            + (", ".join(extra) if extra else "TLS without a client certificate and x.509")
            + ". Use a shared database of this package (`mspass-cluster db start`, then database='<its id>'), "
            "or a plain mongodb://host:port/."
        )
    for record in standalone_db.all_records():
        if (record.host, record.port, record.client_pem) == (host, port, pem or None):
            return _target_of_record(given, record, runner)
    return DatabaseTarget(given, None, host, port, ca if tls else None, pem if tls else None, runner)


def _ping(uri: str, timeout: float, dbpath: str | None = None) -> str | None:
    """:func:`~mspass_cluster.db.ping`, where certificate files that are gone are one more reason not to answer."""
    try:
        return ping(uri, timeout, dbpath)
    except OSError as exc:  # pymongo opens the files a connection string names when it makes a client
        return f"{exc.strerror or exc} (its certificate files are gone: was it stopped?)"


def _job_of(record: SharedDatabase) -> TrackedJob:
    return TrackedJob("db", record.name, record.job_id, record.log_path, "", unit="job")


def _not_running(job: TrackedJob, record: SharedDatabase) -> JobFailedError:
    return job.failure(
        f"of shared database {record.id} is not running",
        f"Start it again on the same data: mspass-cluster db start --db-dir {record.db_dir} (it keeps id "
        f'{record.id}, so database="{record.id}" finds it), or start this cluster without database= to give it '
        "a database of its own.",
    )


class AttachedDatabase:
    """A database the cluster uses without owning it (see the module docstring).

    Parameters
    ----------
    target : DatabaseTarget
        What ``database=`` named (:func:`find_database`).
    options : ClusterOptions
        The cluster's options (:meth:`DatabaseTarget.adopted`).
    launcher : JobLauncher
        The cluster's launcher; its context holds the heartbeat this cluster
        is known by as a user of the database.
    cluster_name : str
    """

    role = "db"

    def __init__(self, target: DatabaseTarget, options: ClusterOptions, launcher: JobLauncher, cluster_name: str):
        self.target = target
        self.options = options
        self.launcher = launcher
        self.cluster_name = cluster_name
        self.record = target.record
        #: The shared database's job (not this cluster's: it is never cancelled), or None for a connection string.
        self.job: TrackedJob | None = _job_of(self.record) if self.record else None
        #: The credentials clients use (the shared database's client certificate and CA), or None without TLS.
        self.tls: CredentialFiles | None = launcher.context.tls if target.client_pem else None
        self.uri: str | None = None
        self.address: str | None = None
        self.not_answering = "not asked yet"
        #: True from the moment the database answers again from a new server until the cluster re-pointed
        #: what it published (the supervisor clears it). A lost database is not waited for: calls raise at once.
        self.moving = False
        self.restarts = 0
        self._error: MsPASSClusterError | None = None
        self._failed_pings = 0
        self._running_since: float | None = None
        self._next_poll = 0.0
        self._walltime_warned = False
        self._slurm = SlurmBackend(target.runner) if self.record else None

    @property
    def job_name(self) -> str:
        return self.record.name if self.record else ""

    @property
    def host(self) -> str | None:
        return self.target.host

    # ------------------------------------------------------------ start
    def refuse_a_directory_in_use(self) -> None:
        """Nothing to refuse: this cluster starts no server on its ``db_dir``."""

    async def submit(self) -> None:
        """Submit nothing; note this cluster as a user of the shared database."""
        if self.record is not None:
            standalone_db.register_user(
                self.record.id,
                self.cluster_name,
                heartbeat=self.launcher.context.heartbeat,
                orphan_timeout=self.options.orphan_timeout,
            )
            await self._poll()

    async def probe(self) -> bool:
        """Ping the database once (its job must run); True once it answered."""
        if self.uri is not None:
            return True
        loop = asyncio.get_running_loop()
        if self.job is not None and loop.time() >= self._next_poll:
            await self._poll()
            self._next_poll = loop.time() + self.options.poll_interval
        if self.job is not None and (self.job.status is None or self.job.state.kind != "running"):
            return False
        if self._running_since is None:
            self._running_since = loop.time()
        dbpath = self.record.data_path if self.record else None
        self.not_answering = await asyncio.to_thread(_ping, self.target.uri, 1.0, dbpath)
        if self.not_answering is not None:
            return False
        self._answered()
        logger.info(
            "Using %s at %s%s; this cluster starts no database and leaves it running when it closes.",
            self.target.what,
            self.address,
            f" ({self.job.unit} {self.job.job_id} on {self.job.node})" if self.job else "",
        )
        return True

    def _answered(self) -> None:
        self.uri = self.target.uri
        self.address = connection_string(self.target.host, self.target.port)
        self._failed_pings = 0
        self._error = None
        if self.job is not None:
            self.job.ready = True

    def waiting_for(self) -> str | None:
        if self.uri is not None:
            return None
        if self.job is not None and (self.job.status is None or self.job.state.kind != "running"):
            return f"{self.target.what}: {self.job.describe()}"
        return f"{self.target.what} at {connection_string(self.target.host, self.target.port)}, not answering yet ({self.not_answering})"

    def startup_failure(self) -> MsPASSClusterError | None:
        """Its job ended, or it runs but did not answer within ``ANSWER_PATIENCE`` seconds."""
        if self.job is not None and self.job.ended:
            return _not_running(self.job, self.record)
        if self._running_since is None or self.uri is not None:
            return None
        if asyncio.get_running_loop().time() - self._running_since < ANSWER_PATIENCE:
            return None
        where = f" ({self.job.unit} {self.job.job_id} on {self.job.node}, log {self.job.log_path})" if self.job else ""
        return StartupTimeoutError(
            f"{self.target.what}{where} runs but did not answer within {ANSWER_PATIENCE:g} s: {self.not_answering}. "
            "Every job of this cluster was cancelled. "
            + (
                f"See `mspass-cluster db status {self.record.id}` and its log; stop and start it again "
                f"(`mspass-cluster db stop {self.record.id}`, then `mspass-cluster db start --db-dir "
                f"{self.record.db_dir}`) if it hangs."
                if self.record
                else "Check that the server runs and that this machine and the compute nodes can reach it."
            )
        )

    # ------------------------------------------------------------ running
    def on_change(self, job: TrackedJob) -> None:
        """The supervisor's jobs are the cluster's own; the shared database's job is watched by :meth:`tend`."""

    def lost(self) -> MsPASSClusterError | None:
        """Why the database is gone, once it is."""
        return self._error

    async def check(self) -> None:
        """Ask Slurm about the shared database's job (or ping a connection string) now; raise its loss."""
        if self._error is None and self.uri is not None:
            if self.job is not None:
                await self._poll()
            else:
                await self._ping_or_count()
        if self._error is not None:
            raise self._error

    async def _poll(self) -> None:
        """Slurm's word on the shared database's job (one query); a job that ended is a loss."""
        try:
            status = (await self._slurm.statuses([self.job.job_id])).get(self.job.job_id)
        except MsPASSClusterError as exc:  # Slurm not answering: the database itself may be fine
            logger.debug("Could not ask Slurm about %s: %s", self.target.what, exc)
            return
        if status is not None:
            self.job.status = status
        if self.job.ended and self.uri is not None:
            self._lose(
                self.job.failure(
                    f"of shared database {self.record.id} ended while this cluster was using it",
                    f"It was stopped (`mspass-cluster db stop`), or reached its walltime ({self.record.walltime}), "
                    f"or its node failed; its data stay in {self.record.db_dir}. Start it again with "
                    f"`mspass-cluster db start --db-dir {self.record.db_dir}`: this cluster finds it again "
                    f"(same id, {self.record.id}); or close this cluster and start one without database=.",
                )
            )

    async def _ping_or_count(self) -> None:
        answer = await asyncio.to_thread(_ping, self.target.uri, 2.0)
        if answer is None:
            self._failed_pings = 0
            return
        self._failed_pings += 1
        if self._failed_pings >= LOST_AFTER_PINGS:
            self._lose(
                MsPASSClusterError(
                    f"{self.target.what} stopped answering ({answer}; {self._failed_pings} pings in a row). This "
                    "cluster does not own it and cannot bring it back: start it again at the same address and this "
                    "cluster uses it again, or close this cluster."
                )
            )

    def _lose(self, error: MsPASSClusterError) -> None:
        self.uri = self.address = None
        self._error = error
        logger.error("%s", error)

    def warn_before_walltime(self) -> None:
        """Warn once, minutes ahead, that the shared database's job reaches its walltime."""
        job = self.job
        if self._walltime_warned or job is None or job.time_left is None:
            return
        notice = min(600, max(60, parse_walltime(self.record.walltime) // 6))
        if job.time_left > notice:
            return
        self._walltime_warned = True
        logger.warning(
            "Shared database %s (job %s) reaches its walltime in %d min %02d s; every cluster using it then loses it. "
            "Its data stay in %s: start it again with `mspass-cluster db start --db-dir %s` (a longer --walltime) "
            "and this cluster finds it again.",
            self.record.id,
            job.job_id,
            job.time_left // 60,
            job.time_left % 60,
            self.record.db_dir,
            self.record.db_dir,
        )

    async def tend(self) -> bool:
        """Follow the database: notice its loss, and find it again; True when it answers from a new job.

        True is returned again until the cluster re-pointed (and cleared
        :attr:`moving`).

        For a shared database: Slurm is asked about its job (one query per
        call); once it ended, its record is re-read, and a new job on the same
        ``db_dir`` (same id) that answers is used from then on. For a
        connection string: a ping; a database that answers again is used again.
        """
        if self.moving:
            return True  # found again; the cluster has not re-pointed yet (it clears ``moving`` when it has)
        if self.job is None:
            was_lost = self._error is not None
            await self._ping_or_count()
            if was_lost and self._failed_pings == 0:
                self._answered()
                self.moving = True
                logger.warning("%s answers again.", self.target.what)
                return True
            return False
        if self._error is None:
            await self._poll()
            return False
        record = standalone_db.read_record(self.record.id)
        if record is None or record.job_id == self.job.job_id or not record.host:
            return False
        job = _job_of(record)
        try:
            job.status = (await self._slurm.statuses([job.job_id])).get(job.job_id)
        except MsPASSClusterError:
            return False
        if job.status is None or job.state.kind != "running":
            return False
        if record.port != self.target.port or bool(record.client_pem) != bool(self.target.client_pem):
            self._error = MsPASSClusterError(
                f"Shared database {record.id} is back (job {job.job_id} on {record.host}) but "
                f"{'on another port' if record.port != self.target.port else 'with security turned on or off'} "
                "than this cluster's workers were told (they keep the port; Dask's TLS settings are fixed). Close "
                f'this cluster and start a new one with database="{record.id}".'
            )
            return False
        target = dataclasses.replace(
            self.target, record=record, host=record.host, ca_file=record.ca_file, client_pem=record.client_pem
        )
        if await asyncio.to_thread(_ping, target.uri, 1.0, record.data_path) is not None:
            return False
        self.target, self.record, self.job = target, record, job
        if self.tls is not None:
            # Its new credentials, for the scripts of workers started from now on and for MSPASS_DB_ADDRESS.
            self.tls = dataclasses.replace(self.tls, db_client_pem=record.client_pem, db_ca_file=record.ca_file)
            self.launcher.know(tls=self.tls)
        self._answered()
        self.moving = True
        standalone_db.register_user(
            record.id,
            self.cluster_name,
            heartbeat=self.launcher.context.heartbeat,
            orphan_timeout=self.options.orphan_timeout,
        )
        logger.warning(
            "Shared database %s is back: job %s on %s (%s). Make new database clients; those made before it was "
            "lost do not reach it.",
            record.id,
            job.job_id,
            record.host,
            self.address,
        )
        return True

    async def restart(self) -> None:
        """Refused: a shared database is stopped and started with ``mspass-cluster db stop``/``db start``."""
        ident = self.record.id if self.record else None
        raise ConfigError(
            f"This cluster uses {self.target.what}, which it does not own, so it cannot restart it. "
            + (
                f"Run `mspass-cluster db stop {ident}` and `mspass-cluster db start --db-dir {self.record.db_dir}`; "
                "this cluster finds it again."
                if ident
                else "Restart that server where it runs."
            )
        )

    def back_after(self) -> float | None:
        return None

    # ------------------------------------------------------------ stop
    async def stop(self) -> None:
        """Leave the shared database running: only this cluster's note as a user goes."""
        self._forget_use()

    def release(self) -> None:
        self.uri = self.address = None
        self._forget_use()

    def _forget_use(self) -> None:
        if self.record is not None:
            standalone_db.unregister_user(self.record.id, self.cluster_name)
