"""MsPASSCluster: the facade a notebook uses; the roles' services do the work.

Bring-up: options resolved and finalised for the backend, the scheduler
started here on the address the nodes reach, then the database job and the
worker jobs submitted together and watched by one :class:`~.services.Supervisor`
until the database answers ``ping`` and every worker connected. A job that
ends first, or a refused submission, cancels everything and raises with the
job's story (state, exit code, node, log lines, fix).

Teardown runs in reverse: workers retired and their jobs cancelled, the
database sent SIGTERM and given time to shut down cleanly, then anything
still listed is cancelled. It is idempotent and also runs at interpreter
exit and on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import secrets

import dask
from distributed import Client, Scheduler
from distributed.core import Status
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.protocol.pickle import dumps
from distributed.security import Security

from . import dashboard, dashboard_guard, exit_guard
from .backends import choose_backend, finalise_options, open_backend, preview_script, scheduler_placement
from .commands import CommandRunner
from .config import ClusterOptions, prepare_directories, resolve_options
from .db import connection_string, get_db_client, retire_client
from .errors import ClusterClosedError, CommandError, ConfigError, DatabaseMovedError, MsPASSClusterError
from .files import cluster_umask, create_private_dir, remove_private_dir
from .jobs import JOB_STOP_TIMEOUT, JobLauncher, TrackedJob
from .mspass_clients import add_mspass_worker_plugin, close_other_clients
from .progress import DaskChatter, logger, make_progress_visible
from .roles import (
    FRONTEND,
    ROLES,
    SECURE_SCHEDULER_PLACEHOLDER,
    FrontendSpec,
    ScriptContext,
    frontend_script,
    service_environment,
)
from .security import ClusterCredentials
from .services import (
    DatabaseService,
    NodeAdaptive,
    ShardedDatabaseService,
    Supervisor,
    WorkerJob,
    WorkerNodes,
    node_of_worker,
)
from .services.attached import AttachedDatabase, find_database
from .status import ClusterView, render_html, render_text, view_of
from .worker_env import EnvironmentPlugin, PublishedEnvironment, deliver_plugin

__all__ = ["MsPASSCluster"]

make_progress_visible()


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

    #: ``<work_dir>/.mspass_cluster/<name>/``, fresh and 0700, for the cluster's credentials (with ``security``);
    #: removed at close.
    private_dir: str | None = None
    _db_client_uri: str | None = None
    _published_db_uri: str | None = None
    _mspass_plugin_db_old = None

    def __init__(self, nodes=None, *, asynchronous=False, loop=None, command_runner=None, **options):
        requested = resolve_options(nodes=nodes, **options)
        self.backend: str = choose_backend(requested.backend)
        runner = command_runner or CommandRunner(requested.command_timeout)
        backend = open_backend(self.backend, runner, cluster_umask(requested))
        self.options: ClusterOptions = finalise_options(requested, self.backend, backend)
        prepare_directories(self.options)
        self.cluster_id = secrets.token_hex(4)
        name = f"{self.options.job_name}-{self.cluster_id}"
        self._credentials = None
        try:
            tls, self.security = self._secure(name)
            shared = find_database(self.options, runner)  # database=: a running database, none of this cluster's
            if shared is not None:
                self.options, tls = shared.adopted(self.options, tls)
            context = ScriptContext(
                self.options,
                self.cluster_id,
                name,
                local=self.backend == "local",
                heartbeat=os.path.join(self.options.log_dir, f"{name}.heartbeat"),
                tls=tls,
                **({"scheduler_address": SECURE_SCHEDULER_PLACEHOLDER} if tls else {}),
            )
            self._launcher = JobLauncher(context, backend)
            self.database = (
                AttachedDatabase(shared, self.options, self._launcher, name)
                if shared is not None
                else (ShardedDatabaseService if self.options.db_shards else DatabaseService)(
                    self.options, self._launcher, name, local=self.backend == "local", tls=tls
                )
            )
            self.database.refuse_a_directory_in_use()
        except BaseException:
            self._forget_credentials()
            raise
        exit_guard.guard(self)  # from here on SIGTERM (also while starting) stops what this cluster submitted

        host, partition_nodes = scheduler_placement(self.backend, backend, self.options)
        self.workers_service = WorkerNodes(
            self, capacity=getattr(backend, "worker_capacity", None), partition_nodes=partition_nodes
        )
        self.workers_service.warn_if_beyond_partition(self.options.nodes)
        self._supervisor = Supervisor(
            self._launcher, self.database, self.workers_service, on_database_moved=self._database_moved
        )
        self._tasks: list[asyncio.Task] = []
        self._client = None
        self._db_client = None
        self._mspass_plugin_db = None  # the database client MsPASS's worker plugin was given, if any
        self._environment = PublishedEnvironment()
        self._published_config = None
        #: With security, the dashboard (and every page of the scheduler's HTTP server) needs this token.
        self._dashboard_token = secrets.token_urlsafe(24) if self.options.security else None
        self._holds_dask_chatter = not self.options.verbose
        if self._holds_dask_chatter:
            DaskChatter.hold()

        worker = {"cls": WorkerJob, "options": {"launcher": self._launcher}}
        if self.options.processes > 1:
            worker["group"] = [f"-{i}" for i in range(self.options.processes)]
        scheduler = {
            "cls": Scheduler,
            "options": {
                "host": host,
                "port": self.options.scheduler_port,
                "dashboard_address": self.options.dashboard_address,
                # Its scratch space goes with the workers', not into /tmp.
                "local_directory": self.options.worker_dir,
                "security": self.security,
                "protocol": "tls" if tls else "tcp",
            },
        }
        try:
            super().__init__(
                scheduler=scheduler,
                worker=worker,
                asynchronous=asynchronous,
                loop=loop,
                name=name,
                security=self.security,
            )
        except BaseException:
            # Also reached on Ctrl-C while waiting: nothing may stay queued.
            if getattr(self, "status", Status.closed) != Status.closed:
                try:
                    self.close(timeout=JOB_STOP_TIMEOUT)
                except Exception as exc:
                    logger.error("Clean shutdown after a failed start did not finish: %s", exc)
            self._launcher.cancel_everything_now()
            self._forget_credentials()
            runner = getattr(self, "_loop_runner", None)
            if runner is not None:
                runner.stop()
            raise
        exit_guard.guard_at_exit(self)

    # -------------------------------------------------------------- security
    def _secure(self, name: str):
        """The credentials' files for job scripts and the :class:`Security` of this process (``security``)."""
        if not self.options.security:
            return None, Security()
        self.private_dir = create_private_dir(self.options.work_dir, name)
        self._credentials = ClusterCredentials.create(self.private_dir, cluster=name)
        tls = self._credentials.files
        if isinstance(self.options.security, Security):
            return tls.with_dask(self.options.security), self.options.security
        return tls, self._credentials.dask_security()

    def _forget_credentials(self) -> None:
        """Remove the credentials' directory: nothing may use this cluster's certificates after it."""
        if self.private_dir is not None:
            remove_private_dir(self.private_dir)
            self.private_dir = None

    def _warn_if_open(self) -> None:
        if self.options.security:
            return
        nodes = "this machine" if self.backend == "local" else "this machine and every node of the cluster"
        logger.warning(
            "security=False: cluster %s is open. Any user of %s can run code as you through the scheduler (%s), "
            "the workers and their nannies; read, change and drop your database (%s, no authentication); and read "
            "your logs on the dashboard (%s). Leave security on unless this machine is yours alone.",
            self._name,
            nodes,
            self.scheduler.address,
            self.database.address or f"port {self.options.db_port} of the database's node",
            self.dashboard_link,
        )

    def _publish_dask_config(self) -> None:
        """Let a plain ``Client(address)`` of this process (MsPASS's ``Client()``) reach the TLS scheduler."""
        if not self.security.require_encryption:
            return
        self._published_config = dask.config.set(
            {
                "distributed.comm.default-scheme": "tls",
                "distributed.comm.tls.ca-file": self.security.tls_ca_file,
                "distributed.comm.tls.client.cert": self.security.tls_client_cert,
                "distributed.comm.tls.client.key": self.security.tls_client_key,
            }
        )

    # ------------------------------------------------------------------ names
    def _new_worker_name(self, worker_number):
        return f"{self._name}-worker-{worker_number}"

    @property
    def db_job_name(self) -> str:
        return self.database.job_name

    @property
    def db_job(self) -> TrackedJob | None:
        """The database's job (``job_id``, ``node``, ``log_path``, ``phase``...)."""
        return self.database.job

    # --------------------------------------------------------------- bring-up
    async def _start(self):
        await super()._start()
        if self._dashboard_token is not None and getattr(self.scheduler, "http_application", None) is not None:
            dashboard_guard.guard(
                self.scheduler.http_application, self._dashboard_token, self.scheduler.http_server.port
            )
        try:
            await self._bring_up()
        except BaseException:
            await self._close()
            raise

    async def _bring_up(self):
        self._tasks.append(asyncio.ensure_future(self._supervisor.beat()))
        self._launcher.know(scheduler_address=self.scheduler.address)
        self._publish_dask_config()
        self._environment.publish(self._job_environment(), but=("MSPASS_DB_ADDRESS",))
        for _ in range(self.options.nodes):
            self.worker_spec.update(self.new_worker_spec())
        results = await asyncio.gather(self.database.submit(), self._correct_state(), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        await self._supervisor.wait_ready(lambda: self.plan, on_database=self._share_db_address)
        self._tasks.append(asyncio.ensure_future(self._supervisor.watch()))
        self._warn_if_open()
        logger.info(
            "MsPASS cluster %s ready: scheduler %s, database %s%s, %d worker node(s), %d worker process(es); "
            "dashboard %s",
            self._name,
            self.scheduler.address,
            self.database.address,
            (
                " (TLS, a client certificate of its CA required)"
                if isinstance(self.database, AttachedDatabase)
                else " (TLS, this cluster's certificate required)"
            )
            if self.database.tls
            else "",
            len(self.worker_spec),
            len(self.scheduler.workers),
            self.dashboard_link,
        )

    async def _share_db_address(self):
        self._published_db_uri = self.database.uri
        self._launcher.know(db_host=self.database.host)
        self._environment.publish(self._job_environment())
        plugin = EnvironmentPlugin(self._job_environment())
        await self._register_worker_plugin(plugin.name, dumps(plugin))

    async def _register_worker_plugin(self, name: str, plugin: bytes) -> None:
        """Give ``plugin`` to every worker process, present and future, tolerating workers too busy to answer.

        The scheduler hands it to each worker that joins later as it
        registers. Those already connected get it over a new connection
        each; a worker that does not answer in Dask's connect timeout (a
        node still starting hundreds of processes) is retried in the
        background rather than failing the cluster, see
        :func:`~mspass_cluster.worker_env.deliver_plugin`.
        """
        failed = await deliver_plugin(self.scheduler, name, plugin)
        if failed:
            self._tasks.append(asyncio.ensure_future(deliver_plugin(self.scheduler, name, plugin, workers=failed)))

    async def _database_moved(self):
        """The database came back (restart or relay): re-point everything this cluster published to it.

        ``MSPASS_DB_ADDRESS`` here and in every worker process (present and
        future), MsPASS's per-worker database client, and the client
        :meth:`get_db_client` hands out. Clients made before follow when the
        server came back on the same node (the same address); otherwise the
        log says to call :meth:`get_db_client` again, and the cluster's own
        old client is closed so that it fails at once instead of waiting for
        pymongo's 30 s timeout.
        """
        old_host, old_uri = self._launcher.context.db_host, self._published_db_uri
        await self._share_db_address()
        if self._mspass_plugin_db is not None:
            from .mspass_clients import MSPASS_PLUGIN_NAME, mspass_worker_plugin

            db = get_db_client(self.database.uri)
            plugin = mspass_worker_plugin(db)
            if plugin is not None:
                await self._register_worker_plugin(MSPASS_PLUGIN_NAME, dumps(plugin))
                self._mspass_plugin_db_old, self._mspass_plugin_db = self._mspass_plugin_db, db
        seconds = self.database.back_after() or 0.0
        job = self.database.job
        where = f"{job.unit} {job.job_id} on {job.node}" if job is not None else "its connection string"
        if self.database.uri == old_uri:  # same node, port and credentials
            logger.warning(
                "The database is back at %s after %.1f s (%s, same data); clients made before follow it.",
                self.database.address,
                seconds,
                where,
            )
            return
        moved = DatabaseMovedError(
            f"This database client points to {connection_string(old_host, self.options.db_port)} with the "
            f"credentials of then, where the database was until its job ended; it came back at "
            f"{self.database.address} ({where}, same data). Call cluster.get_db_client() again for a client of the "
            "database as it is now (and make a new mspasspy Client(), which reads the new MSPASS_DB_ADDRESS)."
        )
        for stale in {id(c): c for c in (self._db_client, self._mspass_plugin_db_old) if c is not None}.values():
            retire_client(stale, moved)
        self._db_client = self._mspass_plugin_db_old = None
        logger.warning(
            "The database is back after %.1f s at %s (%s; it was on %s, with the credentials of then). "
            "MSPASS_DB_ADDRESS and the workers now point to it. Database clients made before do not: call "
            "cluster.get_db_client() again (and make a new mspasspy Client()).",
            seconds,
            self.database.address,
            where,
            old_host,
        )

    def _job_environment(self) -> dict:
        context = self._launcher.context
        return service_environment(self.scheduler.address, context.db_host, self.options.db_port, context.tls)

    def _update_worker_status(self, op, msg):
        # SpecCluster closes a job 15 s after a worker of the same name leaves;
        # this cluster follows the jobs' own states instead (see Supervisor.watch).
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
        raises here; use :meth:`wait_for_workers` to wait for them. A running
        :meth:`adapt` is turned off.
        """
        self._require_open(f"scale({n if n is not None else ''})")
        target = self.workers_service.nodes_for(n, jobs, memory, cores)
        if self._adaptive is not None and self._adaptive.periodic_callback is not None:
            self._adaptive.stop()
            logger.warning("scale(%d) turns off adapt(); call adapt() again to scale with the load.", target)
        self.workers_service.warn_if_beyond_partition(target)
        self.workers_service.resize(target)
        if self.asynchronous:
            return self._submit_pending()
        return self.sync(self._submit_pending)

    async def _submit_pending(self):
        try:
            await self._correct_state()
        except CommandError:  # sbatch refused, or Slurm is unreachable
            self.workers_service.forget_unsubmitted()
            raise

    def adapt(self, minimum=0, maximum=math.inf, minimum_jobs=None, maximum_jobs=None, **kwargs):
        """Scale between ``minimum`` and ``maximum`` worker nodes with the load.

        ``minimum_jobs``/``maximum_jobs`` are synonyms; other keywords go to
        :class:`distributed.deploy.Adaptive`. A node's workers are retired together.
        """
        self._require_open("adapt()")
        minimum = minimum_jobs if minimum_jobs is not None else minimum
        maximum = maximum_jobs if maximum_jobs is not None else maximum
        self.workers_service.check_adapt_bounds(minimum, maximum)
        per_node = self.options.processes
        # The scheduler receives the key pickled: it must not drag this cluster (and its tasks) along.
        kwargs.setdefault("worker_key", functools.partial(node_of_worker, per_node > 1))
        return super().adapt(Adaptive=NodeAdaptive, minimum=minimum * per_node, maximum=maximum * per_node, **kwargs)

    def wait_for_workers(self, n_workers=None, timeout=None):
        """Wait until every worker process of every requested node has connected, or ``n_workers`` workers.

        Raises the failure of any worker job that ended first, with its log,
        and the database's if it was lost.
        """
        self._require_open("wait_for_workers()")

        def wanted_of(connected):
            if n_workers is None:
                return len(connected & self.plan), len(self.plan)
            return len(connected), n_workers

        return self.sync(self._supervisor.wait_for_workers, wanted_of, timeout or self.options.startup_timeout)

    # ---------------------------------------------------------------- clients
    def get_client(self) -> Client:
        """The cluster's :class:`dask.distributed.Client` (one, cached).

        When ``mspasspy`` is installed its workers carry MsPASS's database
        plugin, so every MsPASS reader (ensembles too) works with this client
        alone; a ``mspasspy.client.Client()`` made later replaces it rather
        than adding a second one.
        """
        self._require_open("get_client()")
        if self._client is None or self._client.status in ("closed", "closing"):
            self._client = Client(self)
            if not self.asynchronous and self.database.uri is not None:
                db = self.get_db_client()
                if add_mspass_worker_plugin(self._client, db):
                    self._mspass_plugin_db = db
        return self._client

    def get_db_client(self):
        """A database client: ``mspasspy.db.client.DBClient`` if MsPASS is installed, else :class:`~mspass_cluster.db.DBClient`.

        Raises the database job's failure (state, exit code, node, log, fix)
        at once if the database was lost, rather than a client that hangs.
        While the database is being brought back (``db_restarts``) it waits
        for it, up to ``startup_timeout``, saying so in the log.
        """
        self._require_open("get_db_client()")
        if self.asynchronous:
            error = self.database.lost()
            if error is not None:
                raise error
        else:
            self.sync(self._supervisor.database_back, self.options.startup_timeout)
        if self.database.uri is None:
            raise MsPASSClusterError("The database is not ready: this cluster has not finished starting.")
        if self._db_client is None or self._db_client_uri != self.database.uri:
            self._db_client = get_db_client(self.database.uri)
            self._db_client_uri = self.database.uri
        return self._db_client

    def restart_database(self) -> None:
        """Stop the database cleanly and start it again on the same data; return once it answers.

        What :attr:`db_restarts` does on its own when the database job ends,
        as one call: after a failed copy-back was put right, after the
        restarts allowed were used up, or to move the database to a fresh
        job. Everything published is re-pointed (see the log).
        """
        self._require_open("restart_database()")
        self.sync(self._restart_database)

    async def _restart_database(self):
        await self.database.restart()
        await self._supervisor.database_back(self.options.startup_timeout)

    def _require_open(self, call: str) -> None:
        """Raise :class:`ClusterClosedError` for ``call`` on a closed cluster."""
        if self.status == Status.closed:
            raise ClusterClosedError(
                f"{call}: cluster {self._name} is closed; its jobs and its scheduler are gone. Start a new "
                "one, e.g. `cluster = MsPASSCluster(...)`, or use `with MsPASSCluster(...) as cluster:` so that "
                "every call stays inside the block."
            )

    @property
    def dashboard_link(self) -> str:
        """The dashboard's URL for a browser where this notebook is (raises :class:`ClusterClosedError` once closed).

        Through Jupyter's server proxy when the notebook runs in a Jupyter
        server that has it (JupyterHub, Open OnDemand, ``mspass-cluster lab``),
        else direct; an explicit ``distributed.dashboard.link`` wins. See
        :mod:`mspass_cluster.dashboard`.
        """
        self._require_open("dashboard_link")
        try:
            port = self.scheduler_info["services"]["dashboard"]
        except KeyError:
            return ""
        # Where it listens: on loopback (the default with security), the scheduler's address would not answer.
        host = self.options.dashboard_address.rpartition(":")[0].strip("[]")
        return dashboard.link_for(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            os.environ,
            token=self._dashboard_token,
            template=dashboard.explicit_template(dask.config.get("distributed.dashboard.link", None)),
            server=dashboard.find_notebook_server(),
            reachable_host=self.scheduler_address.split("://")[-1].rpartition(":")[0].strip("[]"),
            scheme="https" if dask.config.get("distributed.scheduler.dashboard.tls.cert", None) else "http",
        )

    @property
    def db_address(self) -> str | None:
        """The database's connection string, ``mongodb://host:port/``."""
        return self.database.uri

    @property
    def job_ids(self) -> dict:
        """Every job this cluster submitted: ``{job_id: (role, name, state)}``.

        With ``worker_submission="steps"`` the worker nodes are ``<holder>.w<i>``
        and each holder job is listed too, its state ``holding`` or ``released``.
        """
        ids = {j.job_id: (j.role, j.name, j.state.value) for j in self._launcher.jobs.values()}
        steps = getattr(self._launcher.backend, "steps", None)
        for holder in steps.holders.values() if steps is not None else ():
            ids[holder.job_id] = ("worker", f"{self._name}-workers", "released" if holder.released else "holding")
        return ids

    # ------------------------------------------------------------ what is true
    def view(self) -> ClusterView:
        """A snapshot of every role and job (what ``print(cluster)`` and the notebook show)."""
        return view_of(self)

    def __str__(self):
        return render_text(self.view())

    def _repr_html_(self, cluster_status=None):
        return render_html(self.view())

    def _ipython_display_(self, **kwargs):
        from IPython.display import HTML, display

        display(HTML(self._repr_html_()))

    def __repr__(self):
        db = self.database.address or (self.db_job.describe() if self.db_job else "not started")
        return (
            f"<MsPASSCluster {self._name}: {len(self.worker_spec)} worker node(s), "
            f"{len(getattr(self.scheduler, 'workers', {}) or {})} worker(s) connected, db {db}, status {self.view().status}>"
        )

    # ------------------------------------------------------------ job scripts
    @_hybridmethod
    def job_script(self_or_cls, role: str = "worker", **options) -> str:
        """The exact job script for ``role`` (``"worker"``, ``"db"``, or ``"frontend"``: `mspass-cluster lab`'s JupyterLab).

        On a cluster it is the script the next job of that role gets. On the
        class, ``MsPASSCluster.job_script("db", partition=...)``, it is a
        preview from the options given, with a placeholder for the scheduler
        address, and nothing is started.
        """
        if role == FRONTEND:  # JupyterLab, as `mspass-cluster lab` submits it from a laptop
            opts = resolve_options(**options) if isinstance(self_or_cls, type) else self_or_cls.options
            return frontend_script(FrontendSpec.from_options(opts, f"{opts.job_name}-<id>-frontend"))
        if role not in ROLES:
            raise ConfigError(f"role={role!r} is not a role; use one of {', '.join((*ROLES, FRONTEND))}.")
        if isinstance(self_or_cls, type):
            return preview_script(role, resolve_options(**options))
        if options:
            raise ConfigError("cluster.job_script(role) takes no options; they were fixed when the cluster was made.")
        self = self_or_cls
        if role == "db" and isinstance(self.database, AttachedDatabase):
            raise ConfigError(
                f"cluster.job_script('db'): this cluster runs no database job; it uses the shared database "
                f"{self.database.address or self.options.database!r}. `mspass-cluster db status` shows that "
                "database's job, whose script is beside its log."
            )
        name = self.db_job_name if role == "db" else next(iter(self.new_worker_spec()))
        return self._launcher.script(role, name)[0]

    # -------------------------------------------------------------- teardown
    async def _close(self):
        if self.status == Status.closed:
            return
        self._supervisor.closing = True
        for task in self._tasks:
            task.cancel()
        try:
            await super()._close()
        finally:
            await self.database.stop()
            leftovers = self._launcher.active()
            if leftovers:
                await asyncio.gather(*(self._launcher.cancel(j, timeout=JOB_STOP_TIMEOUT) for j in leftovers))
            self._environment.restore()
            if self._published_config is not None:
                self._published_config.__exit__(None, None, None)
                self._published_config = None
            self.database.release()
            if self._holds_dask_chatter:
                self._holds_dask_chatter = False
                DaskChatter.release()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._launcher.context.heartbeat)
            self._forget_credentials()  # the credentials do not outlive the cluster

    def _stop_at_once(self):
        """This process is ending (SIGTERM): ask every job to stop cleanly, without waiting."""
        if self.status == Status.closed or not hasattr(self, "_supervisor"):
            return
        self._supervisor.closing = True
        ids = self._launcher.stop_everything_now()
        with contextlib.suppress(OSError):
            os.unlink(self._launcher.context.heartbeat)
        self.database.release()
        self._forget_credentials()
        logger.warning(
            "SIGTERM: asked %s %s to stop cleanly; this process ends now.",
            self._name,
            f"jobs {', '.join(ids)}" if ids else "(nothing was running)",
        )

    def close(self, timeout=None):
        """Retire the workers, stop the database cleanly, and leave no job in the queue. Idempotent."""
        if self.status == Status.running and not self.asynchronous:
            others = close_other_clients(self.scheduler_address, keep=self._client)
            if others:
                logger.warning(
                    "Closed Dask client %s of this process, still connected to this cluster (such as the one in "
                    "an mspasspy.client.Client()): it cannot be used after close(); make a new one on "
                    "the next cluster.",
                    ", ".join(others),
                )
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
