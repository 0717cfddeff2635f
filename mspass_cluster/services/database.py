"""The database role: one job running ``mongod`` (or a stand-in), its readiness, its failures, its clean stop.

The service owns its job: it claims the database directory before
submitting, probes readiness with a real ``ping`` that must come from this
cluster's server (its ``dbPath``), explains a failure with what the log
knows (a port or a data directory held by someone else), notices when the
database is lost after start-up, warns before its walltime, and stops it
with SIGTERM only, giving ``mongod`` time to flush.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex

from .. import dbdir
from ..config import ClusterOptions, parse_walltime
from ..db import connection_string, ping
from ..errors import ConfigError, JobFailedError
from ..files import file_mode
from ..jobs import JOB_STOP_TIMEOUT, JobLauncher, JobPhase, TrackedJob, server_exit_status, tail
from ..roles import db_data_path
from ..security import CredentialFiles
from ..slurm import JobState
from ..standalone_db import database_id

__all__ = ["DatabaseService", "DB_STOP_TIMEOUT"]

logger = logging.getLogger("mspass_cluster")

#: Seconds the database server gets to shut down cleanly after SIGTERM.
DB_STOP_TIMEOUT = 300.0
#: How servers say that their port is taken (mongod's "Address already in use", Python's errno 98, ...).
_ADDRESS_IN_USE = re.compile(r"address already in use|EADDRINUSE|errno 98\b|errno 48\b", re.IGNORECASE)


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
        self.job = await self.launcher.submit("db", self.job_name)
        dbdir.claim(self.options.db_dir, self.cluster_name, db_job=f"{self.job.unit} {self.job.job_id}", **claim)

    async def probe(self) -> bool:
        """Ping the server once if its job runs; True once it answered (and is this cluster's)."""
        if self.uri is not None:
            return True
        if self.job is None or self.job.state.kind != "running" or not self.job.node:
            return False
        uri = self.uri_for(self.host)
        self.not_answering = await asyncio.to_thread(ping, uri, 1.0, db_data_path(self.options))
        if self.tls and self.not_answering and "AuthenticationFailed" in self.not_answering:
            self.not_answering = "its server answers; this cluster's user is being set up"
        if self.not_answering is None:
            self.uri = uri
            self.address = connection_string(self.host, self.options.db_port)
            self.job.ready = True
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

    def startup_failure(self) -> JobFailedError | None:
        """The error to raise when the job ended before the database answered."""
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
        self.job.error = self.job.failure(
            "ended before the database answered", "Every job of this cluster was cancelled. " + fix
        )
        return self.job.error

    # ------------------------------------------------------------ running
    def on_change(self, job: TrackedJob) -> None:
        """After start-up: a database job that ended is lost; say so now and keep the error for the next call."""
        if not job.ended or job.phase is not JobPhase.FAILED:
            return
        fix = "The database is gone: close this cluster and start a new one (what it stored stays in db_dir)."
        if job.state is JobState.TIMEOUT:
            fix = (
                f"It reached its walltime (db_walltime={self.options.db_walltime}). What it stored is in "
                f"{self.options.db_dir}: close this cluster and start a new one with the same work_dir "
                "and a longer db_walltime to go on."
            )
        job.error = job.failure("ended while the cluster was running", fix)
        logger.error("%s", job.error)

    def lost(self) -> JobFailedError | None:
        """The database job's failure, once it ended while it was needed."""
        return self.job.error if self.job is not None and self.job.phase is JobPhase.FAILED else None

    async def check(self) -> None:
        """Ask the backend about the database job now and raise its failure if it is gone (one query)."""
        if self.job is not None and not self.job.ended and self.job in await self.launcher.poll([self.job.job_id]):
            self.on_change(self.job)
        error = self.lost()
        if error is not None:
            raise error

    def warn_before_walltime(self) -> None:
        """Warn once, minutes ahead, that the database job will reach its walltime (workers are replaced; it is not)."""
        job = self.job
        if self._walltime_warned or job is None or job.time_left is None:
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
        job = self.job
        if job is None or job.ended:
            return
        if job.state.kind != "running":
            await self.launcher.cancel(job, timeout=JOB_STOP_TIMEOUT)
            return
        # The server may take longer than Slurm's KillWait to flush, so it gets DB_STOP_TIMEOUT first.
        if not await self.launcher.cancel(job, signal="TERM", timeout=DB_STOP_TIMEOUT):
            logger.error(
                "The database job %s did not end %.0f s after SIGTERM; cancelling it.", job.job_id, DB_STOP_TIMEOUT
            )
            await self.launcher.cancel(job, timeout=JOB_STOP_TIMEOUT)
            return
        status = await asyncio.to_thread(server_exit_status, job.log_path)
        if status is None:
            logger.info("Database %s %s ended before its server ran (%s).", job.unit, job.job_id, job.state.value)
        elif not job.ready:
            logger.info(
                "Database %s %s stopped while its server was starting (exit status %s).", job.unit, job.job_id, status
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
        self.uri = None
        self.address = None
        dbdir.release(self.options.db_dir, self.cluster_name)
