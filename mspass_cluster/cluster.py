"""MsPASSCluster: a database job and worker-node jobs on Slurm, the scheduler in this process.

Bring-up order: choose the scheduler's address, start the scheduler here,
submit the database job and the worker jobs together, then watch them with
one batched ``squeue`` per poll until the database answers ``ping`` and every
worker process has connected. A job that ends first, or an ``sbatch``
refusal, cancels everything and raises with Slurm's words and the log.

Teardown runs in reverse: workers retired and their jobs cancelled, the
database sent SIGTERM and given time to shut down cleanly, then anything
still listed by Slurm is cancelled. It is idempotent and also runs at
interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import math
import os
import secrets
import shutil
import sys
import weakref

from dask.system import CPU_COUNT
from dask.utils import parse_bytes
from distributed import Client, Scheduler
from distributed.core import Status
from distributed.deploy import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import ProcessInterface, SpecCluster
from distributed.protocol.pickle import dumps
from distributed.system import MEMORY_LIMIT

from .commands import CommandRunner
from .config import ClusterOptions, parse_walltime, prepare_directories, resolve_options
from .db import connection_string, get_db_client, ping
from .errors import CommandError, ConfigError, MsPASSClusterError, SlurmUnavailableError, StartupTimeoutError
from .jobs import JobLauncher, SlurmClient, TrackedJob, server_exit_status, tail
from .slurm import JobState
from .allocation import AllocationSteps, allocation_nodes, in_allocation
from .local import LOCAL_HOST, LocalProcesses, share_of_this_machine
from .network import free_local_port, scheduler_host
from .roles import ROLES, SCHEDULER_PLACEHOLDER, db_data_path, service_environment
from .mspass_clients import add_mspass_worker_plugin, close_other_clients
from .worker_env import EnvironmentPlugin

__all__ = ["MsPASSCluster"]

logger = logging.getLogger("mspass_cluster")


def _make_progress_visible():
    # Users must see what start-up waits for; a notebook has no logging set up.
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s mspass_cluster %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


_make_progress_visible()

#: The database server used by the local backend when there is no mongod: nx-27017 behind mongod's command line.
EMBEDDED_DB_COMMAND = (sys.executable, "-m", "mspass_cluster.embedded_db")
#: Seconds the database server gets to shut down cleanly after SIGTERM.
DB_STOP_TIMEOUT = 300.0
#: Seconds to wait for cancelled worker jobs to leave the queue (Slurm's KillWait is 30 s by default).
JOB_STOP_TIMEOUT = 90.0
#: Seconds of Slurm not answering (a controller restart, an overload) that start-up rides out.
SLURM_OUTAGE_TOLERANCE = 300.0


class WorkerJob(ProcessInterface):
    """One worker node: one Slurm job running ``processes`` Dask workers.

    The cluster's worker spec holds these; Dask's ``SpecCluster`` starts and
    closes them as ``scale`` and ``adapt`` change the spec.
    """

    def __init__(self, scheduler=None, name=None, *, launcher: JobLauncher):
        super().__init__(scheduler=scheduler, name=name)
        self.name = name
        self.launcher = launcher
        self.job: TrackedJob | None = None

    async def start(self):
        try:
            self.job = await self.launcher.submit("worker", self.name)
        except BaseException:
            self.status = Status.failed
            raise
        await super().start()

    async def close(self):
        if self.job is not None and not self.job.ended:
            if not await self.launcher.cancel(self.job, timeout=JOB_STOP_TIMEOUT):
                logger.warning("Worker job %s was still listed by Slurm %.0f s after scancel.", self.job.job_id, JOB_STOP_TIMEOUT)
        await super().close()

    def __repr__(self):
        job = self.job.describe() if self.job else "not submitted"
        return f"<WorkerJob {self.name}: {job}>"


def _node_of_worker(grouped: bool, worker_state) -> str:
    """The worker node (job name) of a worker: ``<job>-<i>`` when a node runs several processes."""
    name = str(worker_state.name)
    return name.rsplit("-", 1)[0] if grouped else name


class _NodeAdaptive(Adaptive):
    """Adaptive scaling whose decisions are carried out in whole worker nodes."""

    async def scale_up(self, n):
        self.cluster._set_worker_nodes(math.ceil(n / self.cluster.options.processes))


class _hybridmethod:
    """A method that works on the class (a preview) and on an instance."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        return functools.partial(self.func, cls if obj is None else obj)


class MsPASSCluster(SpecCluster):
    """A MsPASS virtual cluster: MongoDB and Dask worker nodes as Slurm jobs.

    The Dask scheduler runs in this process; the database runs in one Slurm
    job and each worker node in another. The constructor returns once the
    database answers and every worker has connected, or raises with the
    reason (Slurm state, exit code, log lines) after cancelling every job
    it submitted.

    Parameters
    ----------
    nodes : int, optional
        Worker nodes to start with (default 1).
    asynchronous : bool
        Use from ``async`` code (``async with MsPASSCluster(...)``).
    command_runner : CommandRunner, optional
        Runs Slurm's commands; pass one to count or redirect them.
    **options
        Any option of :data:`mspass_cluster.config.OPTIONS`: ``processes``,
        ``cores``, ``memory``, ``partition``, ``account``, ``qos``,
        ``walltime``, ``job_extra_directives``, ``job_script_prologue``,
        ``work_dir``, ``interface``, ``db_command``, ``db_memory``, ...
        Unset options come from dask config (section ``mspass_cluster``),
        then the legacy ``MSPASS_*`` environment, then defaults.

    Examples
    --------
    >>> with MsPASSCluster(nodes=4, partition="normal", walltime="02:00:00") as cluster:  # doctest: +SKIP
    ...     client = cluster.get_client()
    ...     db = cluster.get_db_client()
    ...     cluster.scale(8)
    """

    def __init__(self, nodes=None, *, asynchronous=False, loop=None, command_runner=None, **options):
        self.options: ClusterOptions = resolve_options(nodes=nodes, **options)
        self.backend = self._choose_backend()
        self.options = _options_for_backend(self.options, self.backend)
        if self.backend == "local":
            self._use_embedded_db_if_needed()
            self._use_a_free_db_port()
            logger.info(
                "Local backend: each worker node gets %d core(s) and %s of this machine (set cores= and memory= "
                "to change).", self.options.cores, self.options.memory,
            )
        prepare_directories(self.options)
        self.cluster_id = secrets.token_hex(4)
        name = f"{self.options.job_name}-{self.cluster_id}"
        runner = command_runner or CommandRunner(self.options.command_timeout)
        if self.backend == "local":
            self._slurm = LocalProcesses()
        elif self.backend == "allocation":
            self._slurm = AllocationSteps(allocation_nodes(runner), runner)
            self._fit_allocation(nodes)
        else:
            self._slurm = SlurmClient(runner)
        self._launcher = JobLauncher(self.options, name, self._slurm, local=self.backend == "local")
        self._launcher.heartbeat = os.path.join(self.options.log_dir, f"{name}.heartbeat")
        self._heartbeat_task: asyncio.Task | None = None
        self.db_job: TrackedJob | None = None
        self._db_uri: str | None = None
        self._client = None
        self._db_client = None
        self._saved_environ: dict[str, str | None] = {}
        self._watcher: asyncio.Task | None = None
        self._failures: list[MsPASSClusterError] = []
        self._closing = False
        self._slurm_silent_since: float | None = None
        self._slurm_warned = 0.0
        self._db_walltime_warned = False
        self._partition_nodes: int | None = None  # nodes in `partition`, when it was named

        if self.backend == "local":
            host, reason = LOCAL_HOST, "the local backend (loopback only)"
        else:
            try:
                nodes_seen = self._slurm.node_addresses(self.options.partition)
            except SlurmUnavailableError:
                raise
            except CommandError as exc:
                raise ConfigError(f"Could not list the nodes of partition {self.options.partition!r}: {exc}") from exc
            host, reason = scheduler_host(self.options.interface, nodes_seen)
            if self.backend == "slurm" and self.options.partition:
                self._partition_nodes = len(set(nodes_seen))
                self._warn_if_beyond_partition(self.options.nodes)
        logger.info("The Dask scheduler listens on %s, chosen from %s (set interface= to change it).", host, reason)

        worker = {"cls": WorkerJob, "options": {"launcher": self._launcher}}
        if self.options.processes > 1:
            worker["group"] = [f"-{i}" for i in range(self.options.processes)]
        scheduler = {
            "cls": Scheduler,
            "options": {
                "host": host, "port": self.options.scheduler_port, "dashboard_address": self.options.dashboard_address,
                # Its scratch space goes with the workers', not into /tmp.
                "local_directory": self.options.worker_dir,
            },
        }
        try:
            super().__init__(
                scheduler=scheduler, worker=worker, asynchronous=asynchronous, loop=loop, name=name,
            )
        except BaseException:
            # Also reached on Ctrl-C while waiting: nothing may stay queued.
            if getattr(self, "status", Status.closed) != Status.closed:
                try:
                    self.close(timeout=JOB_STOP_TIMEOUT)
                except Exception as exc:
                    logger.error("Clean shutdown after a failed start did not finish: %s", exc)
            self._launcher.cancel_everything_now()
            runner = getattr(self, "_loop_runner", None)
            if runner is not None:
                runner.stop()
            raise
        atexit.register(_close_at_exit, weakref.ref(self))

    def _choose_backend(self) -> str:
        backend, has_sbatch = self.options.backend, shutil.which("sbatch") is not None
        if backend == "auto":
            if in_allocation():
                backend, why = "allocation", f"inside Slurm job {os.environ['SLURM_JOB_ID']}"
            else:
                backend, why = ("slurm", "sbatch is on PATH") if has_sbatch else ("local", "sbatch is not on PATH")
            logger.info("backend='auto': %s (%s).", backend, why)
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

    def _fit_allocation(self, nodes_given):
        capacity = self._slurm.worker_capacity
        if nodes_given is None and self.options.sources["nodes"] == "default":
            self.options = self.options.replace(nodes=capacity)
        elif self.options.nodes > capacity:
            raise ConfigError(
                f"nodes={self.options.nodes} but this allocation ({', '.join(self._slurm.nodes)}) holds at most "
                f"{capacity} worker node(s) beside the database's; ask sbatch for --nodes={self.options.nodes + 1}."
            )
        logger.info("Allocation %s: database on %s, worker nodes on %s.", os.environ["SLURM_JOB_ID"],
                    self._slurm.nodes[0], ", ".join(self._slurm.nodes[1:]) or self._slurm.nodes[0])

    def _use_embedded_db_if_needed(self):
        if self.options.sources["db_command"] != "default" or self.options.in_container or shutil.which("mongod"):
            return
        self.options = self.options.replace(db_command=list(EMBEDDED_DB_COMMAND))
        logger.warning(
            "No mongod on PATH: the database is the embedded nx-27017 server, a stand-in for trying MsPASS on a "
            "desktop. It stores documents and GridFS files, but has no authentication, replication or sharding, "
            "serves one request at a time, and only pretends to run admin commands. Install MongoDB (mongod on "
            "PATH), or set container= or db_command=, for real work."
        )

    def _use_a_free_db_port(self):
        """Desktop: a second notebook's database must not find the first one's port taken (or answer for it)."""
        if self.options.sources["db_port"] != "default":
            return
        port = free_local_port(self.options.db_port)
        if port != self.options.db_port:
            logger.info("Port %d is taken on this machine; this cluster's database uses port %d.", self.options.db_port, port)
            self.options = self.options.replace(db_port=port)

    # ------------------------------------------------------------------ names
    def _new_worker_name(self, worker_number):
        return f"{self._name}-worker-{worker_number}"

    @property
    def db_job_name(self) -> str:
        return f"{self._name}-db"

    # --------------------------------------------------------------- bring-up
    async def _start(self):
        await super()._start()
        try:
            await self._bring_up()
        except BaseException:
            await self._close()
            raise

    async def _beat(self):
        """Refresh the heartbeat file the database job watches (see ``orphan_timeout``)."""
        path = self._launcher.heartbeat
        while True:
            with open(path, "a"):
                os.utime(path)
            await asyncio.sleep(max(1.0, min(10.0, self.options.orphan_timeout / 10)))

    async def _bring_up(self):
        self._heartbeat_task = asyncio.ensure_future(self._beat())
        self._launcher.scheduler_address = self.scheduler.address
        self._publish_environment(with_db=False)
        for _ in range(self.options.nodes):
            self.worker_spec.update(self.new_worker_spec())
        results = await asyncio.gather(self._submit_db(), self._correct_state(), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        await self._wait_ready()
        await self._share_db_address()
        self._watcher = asyncio.ensure_future(self._watch())
        logger.info(
            "MsPASS cluster %s ready: database %s, %d worker node(s), %d worker process(es); dashboard %s",
            self._name, self._db_uri, len(self.worker_spec), len(self.scheduler.workers), self.dashboard_link,
        )

    async def _submit_db(self):
        self.db_job = await self._launcher.submit("db", self.db_job_name)

    def _connected_names(self) -> set:
        return {ws.name for ws in self.scheduler.workers.values()}

    def _job_worker_names(self, job_name: str) -> set:
        spec = self.worker_spec.get(job_name) or self.new_spec
        return {f"{job_name}{suffix}" for suffix in spec.get("group", [""])}

    async def _wait_ready(self):
        """Wait until the database answers and every requested worker connected; fail fast otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.startup_timeout
        interval, next_poll, last_summary, last_logged = 0.25, 0.0, None, 0.0
        db_error = "not started yet"
        while True:
            if self._closing:
                raise MsPASSClusterError("The cluster was closed while it was starting.")
            now = loop.time()
            if now >= next_poll:
                await self._poll_slurm(give_up=True)
                self._raise_startup_failure()
                next_poll, interval = now + interval, min(interval * 1.5, self.options.poll_interval)
            if self._db_uri is None and self.db_job.state.kind == "running" and self.db_job.node:
                uri = connection_string(self._db_host(self.db_job.node), self.options.db_port)
                db_error = await asyncio.to_thread(ping, uri, 1.0, db_data_path(self.options))
                if db_error is None:
                    self._db_uri = uri
                    self.db_job.ready = True
                    logger.info("Database ready at %s (job %s on %s).", uri, self.db_job.job_id, self.db_job.node)
            connected = self._mark_ready_workers()
            if self._db_uri and self.plan <= connected:
                return
            summary = self._pending_summary(connected, db_error)
            if summary != last_summary or now - last_logged > 60:
                logger.info("Waiting for %s", summary)
                last_summary, last_logged = summary, now
            if now >= deadline:
                raise StartupTimeoutError(
                    f"The cluster was not ready after startup_timeout={self.options.startup_timeout:g} s. Still waiting for "
                    f"{summary}. Every job was cancelled. If the queue is busy, raise startup_timeout; "
                    "if jobs ran but never connected, check the logs in " + self.options.log_dir + "."
                )
            await asyncio.sleep(0.1)

    def _mark_ready_workers(self) -> set:
        """Mark worker jobs whose every process has connected; return the connected worker names."""
        connected = self._connected_names()
        for job in self._worker_jobs():
            if self._job_worker_names(job.name) <= connected:
                job.ready = True
        return connected

    def _worker_jobs(self) -> list[TrackedJob]:
        return [w.job for w in self.workers.values() if isinstance(w, WorkerJob) and w.job is not None]

    def _db_host(self, node: str) -> str:
        if self.options.hostname_base and self.backend != "local":
            return f"{node}.{self.options.hostname_base}"
        return node

    def _pending_summary(self, connected: set, db_error: str | None) -> str:
        parts = []
        if self._db_uri is None:
            text = self.db_job.describe()
            if self.db_job.state.kind == "running":
                text += f", not answering yet ({db_error})"
            parts.append(text)
        for job in self._worker_jobs():
            if not job.ready:
                names = self._job_worker_names(job.name)
                parts.append(f"{job.describe()}, {len(names & connected)}/{len(names)} workers connected")
        return "; ".join(parts) or "nothing"

    def _raise_startup_failure(self):
        if self.db_job.ended:
            fix = "Check db_command and the log above; print(cluster.job_script('db')) shows what ran."
            if "Address already in use" in tail(self.db_job.log_path, 200):
                port = self.options.db_port
                fix = (
                    f"Another program already listens on db_port={port} on {self.db_job.node or 'its node'} (often "
                    "another MongoDB, perhaps another user's on a shared node). Give this cluster a port of its own, "
                    f"e.g. db_port={port + 100}, or a node of its own with db_extra_directives=['--exclusive']."
                )
            raise self.db_job.failure("ended before the database answered", "Every job of this cluster was cancelled. " + fix)
        for job in self._worker_jobs():
            if job.ended and not job.ready:
                fix = ("Check python=, worker_extra_args and the log above; "
                       "print(cluster.job_script('worker')) shows what ran.")
                if "Timed out starting worker" in tail(job.log_path, 200):
                    fix = (
                        f"The workers on {job.node or 'the node'} could not reach the scheduler at "
                        f"{self.scheduler.address} within death_timeout={self.options.death_timeout} s: that "
                        "address is not reachable from the compute nodes. Set interface= to a network they share "
                        "with this machine (e.g. interface='ib0'; `ip -brief addr` lists them)."
                    )
                raise job.failure("ended before its Dask workers connected", "Every job of this cluster was cancelled. " + fix)

    async def _share_db_address(self):
        self._launcher.db_host = self._db_host(self.db_job.node)
        self._publish_environment(with_db=True)
        plugin = EnvironmentPlugin(self._job_environment())
        await self.scheduler.register_worker_plugin(None, dumps(plugin), name=plugin.name, idempotent=False)

    def _job_environment(self) -> dict:
        return service_environment(self.scheduler.address, self._launcher.db_host, self.options.db_port)

    def _publish_environment(self, with_db: bool):
        for key, value in self._job_environment().items():
            if key == "MSPASS_DB_ADDRESS" and not with_db:
                continue
            self._saved_environ.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _restore_environment(self):
        for key, value in self._saved_environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_environ.clear()

    # ------------------------------------------------------------- watching
    async def _watch(self):
        """After start-up: keep watching the jobs, replace worker jobs lost after they had run."""
        interval = self.options.poll_interval
        while not self._closing:
            await asyncio.sleep(interval)
            if self._closing:
                return
            changed = await self._poll_slurm(give_up=False)
            if changed is None:
                continue
            self._mark_ready_workers()
            self._warn_before_db_walltime()
            for job in changed:
                self._on_job_change(job)

    async def _poll_slurm(self, give_up: bool) -> list[TrackedJob] | None:
        """Poll the jobs, riding out a Slurm controller outage (a restart, an overload).

        Returns the jobs that changed, or None while Slurm does not answer.
        With ``give_up`` (during start-up), an outage longer than
        ``SLURM_OUTAGE_TOLERANCE`` raises; afterwards the running cluster
        does not need Slurm and only warns (once a minute).
        """
        loop = asyncio.get_running_loop()
        try:
            changed = await self._launcher.poll()
        except CommandError as exc:
            now = loop.time()
            first_line = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else str(exc).splitlines()[0]
            if self._slurm_silent_since is None:
                self._slurm_silent_since = self._slurm_warned = now
                logger.warning("Slurm did not answer (%s): %s Retrying.", exc.argv[0], first_line)
            elif give_up and now - self._slurm_silent_since > SLURM_OUTAGE_TOLERANCE:
                raise SlurmUnavailableError.explaining(
                    exc,
                    (
                        f"Slurm did not answer for {now - self._slurm_silent_since:.0f} s while the cluster was "
                        "starting. Its jobs were cancelled as far as Slurm could be reached; if any is still "
                        "listed once `scontrol ping` says the controller is back, `mspass-cluster down` "
                        "cancels it. Start the cluster again then."
                    ),
                ) from exc
            elif now - self._slurm_warned >= 60:
                self._slurm_warned = now
                logger.warning("Slurm has not answered for %.0f s: %s", now - self._slurm_silent_since, first_line)
            return None
        if self._slurm_silent_since is not None:
            logger.info("Slurm answers again, after %.0f s.", loop.time() - self._slurm_silent_since)
            self._slurm_silent_since = None
        return changed

    def _warn_before_db_walltime(self):
        """Warn once, minutes ahead, that the database job will reach its walltime (workers are replaced; it is not)."""
        job = self.db_job
        if self._db_walltime_warned or job is None or job.status is None or job.state.kind != "running":
            return
        left = job.status.time_left
        notice = min(600, max(60, parse_walltime(self.options.db_walltime) // 6))
        if left is None or left > notice:
            return
        self._db_walltime_warned = True
        logger.warning(
            "The database job %s reaches its walltime in %d min %02d s (db_walltime=%s). The database then stops, "
            "and the cluster with it; what it stored stays in %s. Finish or save your work and close this cluster; "
            "start the next one with a longer db_walltime.",
            job.job_id, left // 60, left % 60, self.options.db_walltime, self.options.db_dir,
        )

    def _on_job_change(self, job: TrackedJob):
        logger.info("%s", job.describe())
        if not job.ended or self._closing:
            return
        if job.role == "db":
            fix = "The database is gone: close this cluster and start a new one."
            if job.state is JobState.TIMEOUT:
                fix = (
                    f"It reached its walltime (db_walltime={self.options.db_walltime}). What it stored is in "
                    f"{self.options.db_dir}: close this cluster and start a new one with the same work_dir "
                    "and a longer db_walltime to go on."
                )
            error = job.failure("ended while the cluster was running", fix)
            self._failures.append(error)
            logger.error("%s", error)
            return
        worker = self.workers.get(job.name)
        if not isinstance(worker, WorkerJob) or worker.job is not job or job.name not in self.worker_spec:
            return
        del self.workers[job.name]
        worker.status = Status.closed
        if job.ready:
            # COMPLETED: its workers reached worker_lifetime and left gracefully, as planned.
            level = logging.INFO if job.state is JobState.COMPLETED else logging.WARNING
            logger.log(level, "%s; submitting a replacement to keep %d worker node(s).", job.describe(), len(self.worker_spec))
            self._correct_state()
        else:
            del self.worker_spec[job.name]
            error = job.failure("ended before its Dask workers connected", "It was not replaced; check the log above.")
            self._failures.append(error)
            logger.error("%s", error)

    def _update_worker_status(self, op, msg):
        # SpecCluster closes a job 15 s after a worker of the same name leaves;
        # this cluster follows Slurm's job states instead (see _watch).
        Cluster._update_worker_status(self, op, msg)

    # --------------------------------------------------------------- scaling
    def scale(self, n=None, jobs=None, memory=None, cores=None):
        """Set the number of worker nodes.

        Parameters
        ----------
        n, jobs : int
            Worker nodes (one Slurm job each); ``jobs`` is a synonym.
        memory : str
            Enough worker nodes for this much memory in total (needs ``memory=``).
        cores : int
            Enough worker nodes for this many cores in total (needs ``cores=``).

        New jobs are submitted before this returns, so an ``sbatch`` refusal
        raises here; use :meth:`wait_for_workers` to wait for them.
        """
        target = self._nodes_for(n, jobs, memory, cores)
        self._warn_if_beyond_partition(target)
        self._set_worker_nodes(target)
        if self.asynchronous:
            return self._submit_pending()
        return self.sync(self._submit_pending)

    def _nodes_for(self, n, jobs, memory, cores) -> int:
        target = n if n is not None else (jobs or 0)
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ConfigError(f"scale({target!r}): give a whole number of worker nodes, 0 or more.")
        if memory is not None:
            if self.options.memory_bytes is None:
                raise ConfigError("scale(memory=...) needs memory= per worker node, e.g. MsPASSCluster(memory='64GiB').")
            target = max(target, math.ceil(parse_bytes(memory) / self.options.memory_bytes))
        if cores is not None:
            if self.options.cores is None:
                raise ConfigError("scale(cores=...) needs cores= per worker node, e.g. MsPASSCluster(cores=32).")
            target = max(target, math.ceil(cores / self.options.cores))
        if self.backend == "allocation" and target > self._slurm.worker_capacity:
            raise ConfigError(
                f"scale({target}) is beyond this allocation: it holds {self._slurm.worker_capacity} worker node(s) "
                f"({', '.join(self._slurm.nodes[1:]) or self._slurm.nodes[0]}). Submit with more nodes, or use "
                "backend='slurm' to get worker nodes as separate jobs."
            )
        return target

    def _warn_if_beyond_partition(self, target: int):
        """Say so when ``target`` whole-node worker jobs can never all run at once in the partition."""
        if not (self._partition_nodes and self.options.exclusive):
            return
        room = self._partition_nodes - (1 if self.options.db_partition == self.options.partition else 0)
        if target > room:
            logger.warning(
                "%d worker node(s) asked for, but partition %s has %d node(s)%s, and each worker job takes a whole "
                "node: at most %d can run at once; the other %d will wait in the queue (Resources) until some end.",
                target, self.options.partition, self._partition_nodes,
                ", one of them for the database" if room < self._partition_nodes else "", max(room, 0),
                target - max(room, 0),
            )

    def _set_worker_nodes(self, target: int):
        """Edit the worker spec to ``target`` nodes; jobs are submitted or cancelled by ``_correct_state``.

        Shrinking drops nodes whose workers have not connected first, then the newest.
        """
        if self.status in (Status.closing, Status.closed):
            target = 0
        if len(self.worker_spec) > target:
            connected = self._connected_names()
            newest_first = list(self.worker_spec)[::-1]
            idle_first = sorted(newest_first, key=lambda name: bool(self._job_worker_names(name) & connected))
            for name in idle_first[: len(self.worker_spec) - target]:
                del self.worker_spec[name]
        while len(self.worker_spec) < target:
            self.worker_spec.update(self.new_worker_spec())
        self.loop.add_callback(self._correct_state)

    async def _submit_pending(self):
        try:
            await self._correct_state()
        except CommandError:  # sbatch refused, or Slurm is unreachable
            for name, worker in list(self.workers.items()):
                if isinstance(worker, WorkerJob) and worker.job is None:
                    del self.workers[name]
                    self.worker_spec.pop(name, None)
            raise

    def adapt(self, minimum=0, maximum=math.inf, minimum_jobs=None, maximum_jobs=None, **kwargs):
        """Scale between ``minimum`` and ``maximum`` worker nodes with the load.

        ``minimum_jobs``/``maximum_jobs`` are synonyms; other keywords go to
        :class:`distributed.deploy.Adaptive`. A node's workers are retired together.
        """
        minimum = minimum_jobs if minimum_jobs is not None else minimum
        maximum = maximum_jobs if maximum_jobs is not None else maximum
        per_node = self.options.processes
        # The scheduler receives the key pickled: it must not drag this cluster (and its tasks) along.
        kwargs.setdefault("worker_key", functools.partial(_node_of_worker, per_node > 1))
        return super().adapt(Adaptive=_NodeAdaptive, minimum=minimum * per_node, maximum=maximum * per_node, **kwargs)

    def wait_for_workers(self, n_workers=None, timeout=None):
        """Wait until every worker process of every requested node has connected, or ``n_workers`` workers.

        Raises the failure of any worker job that ended first, with its log.
        """
        async def _wait():
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (timeout or self.options.startup_timeout)
            while True:
                if self._failures:
                    raise self._failures.pop(0)
                connected = self._connected_names()
                if n_workers is None:
                    have, wanted = len(connected & self.plan), len(self.plan)
                else:
                    have, wanted = len(connected), n_workers
                if have >= wanted:
                    return
                if loop.time() >= deadline:
                    raise StartupTimeoutError(
                        f"Only {have} of {wanted} workers connected within the timeout; "
                        f"Slurm says: {self._pending_summary(connected, None)}."
                    )
                await asyncio.sleep(0.1)

        return self.sync(_wait)

    # ---------------------------------------------------------------- clients
    def get_client(self) -> Client:
        """The cluster's :class:`dask.distributed.Client` (one, cached).

        When ``mspasspy`` is installed its workers carry MsPASS's database
        plugin, so every MsPASS reader (ensembles too) works with this client
        alone; a ``mspasspy.client.Client()`` made later replaces it rather
        than adding a second one.
        """
        if self._client is None or self._client.status in ("closed", "closing"):
            self._client = Client(self)
            if not self.asynchronous and self._db_uri is not None:
                add_mspass_worker_plugin(self._client, self.get_db_client())
        return self._client

    def get_db_client(self):
        """A database client: ``mspasspy.db.client.DBClient`` if MsPASS is installed, else :class:`~mspass_cluster.db.DBClient`."""
        if self._db_uri is None:
            raise MsPASSClusterError("The database is not ready: this cluster is not started or is closed.")
        if self._db_client is None:
            self._db_client = get_db_client(self._db_uri)
        return self._db_client

    @property
    def db_address(self) -> str | None:
        """The database's connection string, ``mongodb://host:port/``."""
        return self._db_uri

    @property
    def job_ids(self) -> dict:
        """Every job this cluster submitted: ``{job_id: (role, name, state)}``."""
        return {j.job_id: (j.role, j.name, j.state.value) for j in self._launcher.jobs.values()}

    # ------------------------------------------------------------ job scripts
    @_hybridmethod
    def job_script(self_or_cls, role: str = "worker", **options) -> str:
        """The exact job script for ``role`` (``"worker"`` or ``"db"``).

        On a cluster it is the script the next job of that role gets. On the
        class, ``MsPASSCluster.job_script("db", partition=...)``, it is a
        preview from the options given, with a placeholder for the scheduler
        address, and nothing is started.
        """
        if role not in ROLES:
            raise ConfigError(f"role={role!r} is not a role; use one of {', '.join(ROLES)}.")
        if isinstance(self_or_cls, type):
            opts = resolve_options(**options)
            local = opts.backend == "local" or (opts.backend == "auto" and shutil.which("sbatch") is None)
            backend = "local" if local else ("allocation" if opts.backend == "auto" and in_allocation() else opts.backend)
            opts = _options_for_backend(opts, backend)
            launcher = JobLauncher(opts, f"{opts.job_name}-preview", SlurmClient(CommandRunner()), local=local)
            name = launcher.cluster_name + ("-db" if role == "db" else "-worker-0")
            return launcher.script(role, name, scheduler_address=SCHEDULER_PLACEHOLDER)[0]
        if options:
            raise ConfigError("cluster.job_script(role) takes no options; they were fixed when the cluster was made.")
        self = self_or_cls
        name = self.db_job_name if role == "db" else next(iter(self.new_worker_spec()))
        return self._launcher.script(role, name)[0]

    # -------------------------------------------------------------- teardown
    async def _close(self):
        if self.status == Status.closed:
            return
        self._closing = True
        for task in (self._watcher, self._heartbeat_task):
            if task is not None:
                task.cancel()
        try:
            await super()._close()
        finally:
            await self._stop_db()
            leftovers = self._launcher.active()
            if leftovers:
                await asyncio.gather(*(self._launcher.cancel(j, timeout=JOB_STOP_TIMEOUT) for j in leftovers))
            self._restore_environment()
            self._db_uri = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._launcher.heartbeat)

    async def _stop_db(self):
        job = self.db_job
        if job is None or job.ended:
            return
        if job.state.kind != "running":
            await self._launcher.cancel(job, timeout=JOB_STOP_TIMEOUT)
            return
        # SIGTERM only: the server may take longer than Slurm's KillWait to
        # flush, so it is given DB_STOP_TIMEOUT before a plain scancel.
        stopped = await self._launcher.cancel(job, signal="TERM", timeout=DB_STOP_TIMEOUT)
        if not stopped:
            logger.error("The database job %s did not end %.0f s after SIGTERM; cancelling it.", job.job_id, DB_STOP_TIMEOUT)
            await self._launcher.cancel(job, timeout=JOB_STOP_TIMEOUT)
            return
        status = server_exit_status(job.log_path)
        if status is None:
            logger.info("Database job %s ended before its server ran (%s).", job.job_id, job.state.value)
        elif not job.ready:
            logger.info("Database job %s stopped while its server was starting (exit status %s).", job.job_id, status)
        elif status == 0:
            logger.info("Database stopped cleanly (job %s, server exit status 0).", job.job_id)
        else:
            logger.warning("Database job %s ended with server exit status %s; see %s.", job.job_id, status, job.log_path)

    def close(self, timeout=None):
        """Retire the workers, stop the database cleanly, and leave no job in the queue. Idempotent."""
        if self.status == Status.running and not self.asynchronous:
            others = close_other_clients(self.scheduler_address, keep=self._client)
            if others:
                logger.warning("Closed Dask client %s of this process, still connected to this cluster (such as the one in "
                               "an mspasspy.client.Client()): it cannot be used after close(); make a new one on "
                               "the next cluster.", ", ".join(others))
        for attr in ("_client", "_db_client"):
            client = getattr(self, attr, None)
            if client is not None:
                client.close()
                setattr(self, attr, None)
        if self.status == Status.closed:
            return None
        try:
            return super().close(timeout)
        finally:
            if not self.asynchronous:
                left = self._launcher.cancel_everything_now()
                if left:
                    logger.warning("Cancelled jobs %s that were still listed after close().", ", ".join(left))

    def __repr__(self):
        db = self._db_uri or (self.db_job.describe() if self.db_job else "not started")
        return (
            f"<MsPASSCluster {self._name}: {len(self.worker_spec)} worker node(s), "
            f"{len(getattr(self.scheduler, 'workers', {}) or {})} worker(s) connected, db {db}, status {self.status.name}>"
        )


def _options_for_backend(options: ClusterOptions, backend: str) -> ClusterOptions:
    """The defaults that depend on where the roles run (for clusters and for script previews alike).

    ``worker_lifetime='auto'`` means "before walltime", and only Slurm worker
    jobs have a walltime of their own; local "nodes" share this machine.
    """
    if options.worker_lifetime == "auto" and backend in ("local", "allocation"):
        options = options.replace(worker_lifetime="none")
    if backend == "local":
        options = share_of_this_machine(options, CPU_COUNT, MEMORY_LIMIT)
    return options


def _close_at_exit(ref):
    cluster = ref()
    if cluster is not None and cluster.status != Status.closed:
        cluster.close()
