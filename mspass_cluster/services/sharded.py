"""The sharded database (``db_shards``): config server, shards and router, each a job, started in order.

The service has the database protocol of :class:`DatabaseService` (what the
cluster and the supervisor call); its ``job`` and ``uri`` are the router's.
Start-up is a sequence of steps, each polled for its real completion and
never slept (:meth:`ShardedDatabaseService.probe` advances every part one
step per call):

1. the config server's and every shard's job run: ``replSetGetStatus``
   answers. Code 94 (not initiated): ``replSetInitiate`` with this node;
   code 93 (its stored configuration names another node: a cluster on the
   same ``db_dir`` on other nodes): ``replSetReconfig`` with ``force``;
2. each is PRIMARY (``myState == 1``; a replica set is not writable before);
3. a restart on other nodes: ``config.shards`` on the config server and each
   shard's ``shardIdentity`` are pointed at the new hosts (MongoDB's restore
   procedure);
4. the router's job (submitted with the others) is given the config
   server's address in ``--configdb``;
5. the router answers as a router (``hello.msg == "isdbgrid"``); every shard
   missing from ``listShards`` is added (``addShard``), then ``listShards``
   must hold them all;
6. ``enableSharding`` of ``db_shard_database`` and ``shardCollection`` of
   each of ``db_shard_collections``;
7. with ``security``: the cluster's client user, which the router's job
   creates through the router on its own node (MongoDB's localhost
   exception; the users live on the config server), authenticates through
   the router. Steps 1 to 6 run as a member (the member certificate, x.509
   membership: MongoDB's ``__system``), since a replica set must be
   initiated before it can hold a user; each shard also gets the client
   user as a shard-local user once PRIMARY, which closes its own localhost
   exception.

A command that fails (other than the states a starting server passes
through) fails the start at once with the part's role, job and the
server's reply; a job that ends fails it with its log. Stopping is router,
shards, config server, each with SIGTERM (a clean shutdown) and time to
finish, in that order.

Once running, every part's server is watched (pymongo's heartbeat), so a
part whose job ends is known within seconds: the database is then lost
(:meth:`lost`, naming the part, its job and its log) until
``restart_database()`` (:meth:`restart`) stops the other parts and starts
them all again on the same data.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

import pymongo
from pymongo.errors import ConnectionFailure, OperationFailure

from .. import dbdir, sharding
from ..config import parse_walltime
from ..db import connection_string, ping, watch_server
from ..errors import JobFailedError
from ..files import file_mode, write_file
from ..jobs import JOB_STOP_TIMEOUT, JobPhase, TrackedJob, server_exit_status, tail
from ..security import db_client_uri
from .database import DatabaseService

__all__ = ["ShardedDatabaseService"]

logger = logging.getLogger("mspass_cluster")

#: Seconds a part's server gets to answer one step's command.
STEP_TIMEOUT = 1.0
#: Codes of a replica set still electing or a router that cannot reach its config server yet: poll again.
_NOT_YET = {10107, 11600, 11602, 13435, 13436, 189, 91}


@dataclass
class Part:
    """One part of the sharded database: its role, its job, and how far its start got."""

    role: str
    index: int = 0
    name: str = ""
    job: TrackedJob | None = None
    #: PRIMARY (config server, shard) or configured (router).
    ready: bool = False
    #: Its job was seen running (the timeline has it).
    seen_running: bool = False
    #: What the part waits for now, in words.
    waiting: str = "not submitted yet"
    client: pymongo.MongoClient | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return (
            f"shard {self.index}"
            if self.role == sharding.SHARD_ROLE
            else {
                sharding.CONFIG_ROLE: "config server",
                sharding.ROUTER_ROLE: "router",
            }[self.role]
        )


class StepFailed(Exception):
    """A step's command failed: ``step`` (the command) and ``reply`` (the server's answer)."""

    def __init__(self, step: str, reply):
        self.step = step
        self.reply = reply
        super().__init__(f"{step}: {reply}")


class ShardedDatabaseService(DatabaseService):
    """A sharded database: a config server, ``db_shards`` shards and a router, each a job.

    Parameters are those of :class:`DatabaseService`. Raises ConfigError for
    options a sharded database cannot honour (node-local storage), before
    anything is submitted. With ``tls`` (``security``) the cluster reaches
    the config server and the shards as a member (the member certificate,
    MONGODB-X509: MongoDB's ``__system``), and is ready once this cluster's
    client user, which the router's job creates on its node, authenticates
    through the router.
    """

    role = sharding.ROUTER_ROLE

    def __init__(self, options, launcher, cluster_name, local=False, tls=None):
        sharding.check_options(options)
        super().__init__(options, launcher, cluster_name, local=local, tls=tls)
        self.config = Part(sharding.CONFIG_ROLE, name=sharding.job_name(cluster_name, sharding.CONFIG_ROLE))
        self.shards = [
            Part(sharding.SHARD_ROLE, i, sharding.job_name(cluster_name, sharding.SHARD_ROLE, i))
            for i in range(options.db_shards)
        ]
        self.router = Part(sharding.ROUTER_ROLE, name=sharding.job_name(cluster_name, sharding.ROUTER_ROLE))
        self._failure: JobFailedError | None = None
        #: The router's job has its --configdb (written once the config server and every shard are PRIMARY).
        self._router_told = False
        #: With security: the client user (made by the router's job) authenticated through the router.
        self._user_ready = False
        self._lost: JobFailedError | None = None
        self._member_watchers: list = []
        self._started: float | None = None
        #: (what, seconds since submit) of each step done, in order (the benchmark reads it).
        self.timeline: list[tuple[str, float]] = []
        #: Parts reconfigured to new hosts on this start (a restart on other nodes).
        self.moved: list[str] = []

    @property
    def job_name(self) -> str:
        return self.router.name

    @property
    def parts(self) -> list[Part]:
        return [self.config, *self.shards, self.router]

    @property
    def jobs(self) -> list[TrackedJob]:
        return [p.job for p in self.parts if p.job is not None]

    def host_of(self, job: TrackedJob | None) -> str | None:
        if job is None or not job.node:
            return None
        if self.options.hostname_base and not self.local:
            return f"{job.node}.{self.options.hostname_base}"
        return job.node

    def _mark(self, what: str) -> None:
        seconds = time.monotonic() - self._started
        self.timeline.append((what, seconds))
        logger.log(self.launcher.detail, "Sharded database: %s (%.1f s)", what, seconds)

    # ------------------------------------------------------------ start
    def _claim(self, db_job: str | None = None) -> None:
        """Mark ``db_dir`` as this cluster's (and, once known, which job holds it), see :func:`dbdir.claim`."""
        dbdir.claim(
            self.options.db_dir,
            self.cluster_name,
            heartbeat=self.launcher.context.heartbeat,
            orphan_timeout=self.options.orphan_timeout,
            mode=file_mode(self.options),
            db_job=db_job,
        )

    async def submit(self) -> None:
        self._claim()
        self._started = time.monotonic()
        # All at once, the router too: it waits in the queue with the others, then for its configdb file.
        configdb = sharding.configdb_file(self.options, self.router.name)
        if os.path.exists(configdb):
            os.remove(configdb)
        jobs = await asyncio.gather(*(self.launcher.submit(p.role, p.name) for p in self.parts))
        for part, job in zip(self.parts, jobs):
            part.job, part.waiting = job, "its job to run"
        self.job = self.router.job
        self._claim(f"{self.config.job.unit} {self.config.job.job_id}")

    async def probe(self) -> bool:
        """Advance every part one step; True once the router is configured and answers."""
        if self.uri is not None:
            return True
        if self._failure is not None:
            return False
        for part in self.parts:
            if not part.seen_running and self._running(part):
                part.seen_running = True
                self._mark(f"{part.label} job running on {part.job.node}")
        members = [self.config, *self.shards]
        await asyncio.gather(
            *(self._step(p, self._advance_member) for p in members if not p.ready and self._running(p))
        )
        if self._failure is None and all(p.ready for p in members) and not self._router_told:
            if not await self._step(self.config, self._point_registry):
                return False
            configdb = sharding.config_string(self.host_of(self.config.job), self.options)
            write_file(sharding.configdb_file(self.options, self.router.name), configdb + "\n", file_mode(self.options))
            self._router_told = True
            self.router.waiting = f"starting with --configdb {configdb}"
            self._mark("router told the config servers")
        if self._failure is None and self._router_told and self._running(self.router) and not self.router.ready:
            await self._step(self.router, self._advance_router)
        if self.router.ready and self.uri is None and self.tls is not None and not self._user_ready:
            uri = self.uri_for(self.host_of(self.router.job))
            refused = await asyncio.to_thread(ping, uri, STEP_TIMEOUT)
            if refused is not None:
                self.router.waiting = (
                    "this cluster's user is being set up on the router's node"
                    if "AuthenticationFailed" in refused
                    else f"the cluster's client is refused: {refused}"
                )
                return False
            self._user_ready = True
            self._mark("the cluster's user authenticates through the router")
        if self.router.ready and self.uri is None:
            host = self.host_of(self.router.job)
            self.uri = self.uri_for(host)
            self.address = connection_string(host, self.options.db_port)
            self.router.job.ready = True
            for part in (self.config, *self.shards):
                part.job.ready = True
            await self._watch(self.uri)
            self._mark("ready")
            logger.log(
                self.launcher.detail,
                "Sharded database ready at %s: %d shard(s), config server %s, router %s %s on %s.",
                self.address,
                len(self.shards),
                self.host_of(self.config.job),
                self.router.job.unit,
                self.router.job.job_id,
                self.router.job.node,
            )
        return self.uri is not None

    @staticmethod
    def _running(part: Part) -> bool:
        return part.job is not None and part.job.state.kind == "running" and bool(part.job.node)

    def _client(self, part: Part) -> pymongo.MongoClient:
        if part.client is None:
            host = self.host_of(part.job)
            port = sharding.member_port(self.options, part.role, part.index)
            member = {}
            if self.tls is not None:
                # As a member (x.509 membership, MongoDB's __system): replSetInitiate, addShard and the
                # restore steps need a member's privileges before any user exists.
                member = {
                    "tls": True,
                    "tlsCAFile": self.tls.db_ca_file,
                    "tlsCertificateKeyFile": self.tls.db_member_pem,
                    "tlsAllowInvalidHostnames": True,
                    "authMechanism": "MONGODB-X509",
                    "authSource": "$external",
                }
            part.client = pymongo.MongoClient(
                f"mongodb://{host}:{port}/",
                **member,
                directConnection=part.role != sharding.ROUTER_ROLE,
                serverSelectionTimeoutMS=int(STEP_TIMEOUT * 1000),
                connectTimeoutMS=int(STEP_TIMEOUT * 1000),
                socketTimeoutMS=int(10 * STEP_TIMEOUT * 1000),
            )
        return part.client

    async def _step(self, part: Part, advance) -> bool:
        """Run one step of ``part`` in a thread; True when it ran through. A failed command fails the start."""
        try:
            await asyncio.to_thread(advance, part)
            return True
        except ConnectionFailure as exc:
            part.waiting = f"not answering yet ({str(exc).split(',')[0]})"
        except StepFailed as exc:
            self._failure = self._step_failure(part, exc)
        except OperationFailure as exc:  # a read or write of the step itself (config.shards, shardIdentity, hello)
            step = advance.__name__.strip("_").replace("_", " ")
            self._failure = self._step_failure(part, StepFailed(step, exc.details))
        return False

    def _command(self, part: Part, step: str, command: dict, not_yet=()) -> dict | None:
        """``command`` on ``part``'s admin database; None for a reply in ``not_yet`` (poll again), else StepFailed."""
        try:
            return self._client(part).admin.command(command)
        except OperationFailure as exc:
            if exc.code in not_yet:
                part.waiting = f"{step}: {exc.details.get('errmsg', exc)} (code {exc.code}); asking again"
                return None
            raise StepFailed(step, exc.details) from exc

    def _advance_member(self, part: Part) -> None:
        """Config server or shard: initiate (or reconfigure to this node), then poll until PRIMARY."""
        host = self.host_of(part.job)
        port = sharding.member_port(self.options, part.role, part.index)
        set_name = sharding.CONFIG_SET if part.role == sharding.CONFIG_ROLE else sharding.shard_set(part.index)
        configsvr = part.role == sharding.CONFIG_ROLE
        try:
            status = self._client(part).admin.command("replSetGetStatus")
        except OperationFailure as exc:
            document = sharding.replica_set_document(set_name, host, port, configsvr)
            if exc.code == 94:  # NotYetInitialized: a new replica set
                self._command(part, "replSetInitiate", {"replSetInitiate": document})
                part.waiting = "initiated; waiting for it to become PRIMARY"
                self._mark(f"{part.label} initiated")
            elif exc.code == 93:  # its configuration names other hosts: the data moved to this node
                self._command(part, "replSetReconfig", {"replSetReconfig": document, "force": True})
                part.waiting = f"reconfigured to {host}:{port}; waiting for it to become PRIMARY"
                self.moved.append(part.label)
                self._mark(f"{part.label} reconfigured to {host}:{port}")
            else:
                raise StepFailed("replSetGetStatus", exc.details) from exc
            return
        if status.get("myState") == 1:
            if self.tls is not None and part.role == sharding.SHARD_ROLE:
                self._shard_local_user(part)
            part.ready = True
            part.waiting = "PRIMARY"
            self._mark(f"{part.label} PRIMARY")
        else:
            state = next((m.get("stateStr") for m in status.get("members", []) if m.get("self")), status.get("myState"))
            part.waiting = f"{state}, not PRIMARY yet"

    def _shard_local_user(self, part: Part) -> None:
        """This cluster's user on a shard too, which closes the shard's own localhost exception.

        MongoDB applies the localhost exception to each shard separately (its
        users are not the cluster's, which live on the config server) and
        recommends a shard-local user for that reason.
        """
        external = self._client(part)["$external"]
        if external.command("usersInfo", self.tls.db_user)["users"]:
            return
        try:
            external.command("createUser", self.tls.db_user, roles=[{"role": "root", "db": "admin"}])
        except OperationFailure as exc:
            if exc.code != 51003:  # made meanwhile: fine
                raise StepFailed(f"createUser {self.tls.db_user} (shard-local)", exc.details) from exc
        self._mark(f"{part.label}: shard-local user")

    def _point_registry(self, part: Part) -> None:
        """After a move to other nodes: ``config.shards`` and each shard's ``shardIdentity`` name the new hosts."""
        config = self._client(self.config).config
        configdb = sharding.config_string(self.host_of(self.config.job), self.options)
        registered = {doc["_id"]: doc["host"] for doc in config.shards.find({})}
        extra = sorted(set(registered) - {sharding.shard_set(p.index) for p in self.shards})
        if extra:
            raise StepFailed(
                "config.shards",
                f"{self.options.db_dir} holds {len(registered)} shard(s) ({', '.join(sorted(registered))}), but "
                f"db_shards={len(self.shards)}: start it with db_shards={len(registered)}",
            )
        for shard in self.shards:
            name = sharding.shard_set(shard.index)
            wanted = sharding.shard_string(shard.index, self.host_of(shard.job), self.options)
            if name in registered and registered[name] != wanted:
                config.shards.update_one({"_id": name}, {"$set": {"host": wanted}})
                self._mark(f"config.shards: {name} {registered[name]} -> {wanted}")
            versions = self._client(shard).admin["system.version"]
            identity = versions.find_one({"_id": "shardIdentity"})
            if identity is not None and identity.get("configsvrConnectionString") != configdb:
                versions.update_one({"_id": "shardIdentity"}, {"$set": {"configsvrConnectionString": configdb}})
                self._mark(f"{shard.label}: shardIdentity -> {configdb}")

    def _advance_router(self, part: Part) -> None:
        """The router answers as one, holds every shard, and the collections are sharded."""
        hello = self._client(part).admin.command("hello")
        if hello.get("msg") != "isdbgrid":
            raise StepFailed(
                "hello",
                f"{hello} has no msg: 'isdbgrid': the program on db_port={self.options.db_port} is not a router "
                f"(db_router_command={self.options.db_router_command})",
            )
        listed = self._command(part, "listShards", {"listShards": 1}, not_yet=_NOT_YET | {133})
        if listed is None:
            return
        present = {doc["_id"] for doc in listed.get("shards", [])}
        for shard in self.shards:
            if sharding.shard_set(shard.index) not in present:
                command = sharding.add_shard_command(shard.index, self.host_of(shard.job), self.options)
                try:
                    self._command(part, "addShard", command)
                except StepFailed as exc:
                    raise StepFailed(f"addShard {command['addShard']}", exc.reply) from exc
                self._mark(f"{shard.label} added")
        listed = self._command(part, "listShards", {"listShards": 1}, not_yet=_NOT_YET | {133})
        present = {doc["_id"] for doc in (listed or {}).get("shards", [])}
        missing = [sharding.shard_set(s.index) for s in self.shards if sharding.shard_set(s.index) not in present]
        if missing:
            part.waiting = f"listShards does not list {', '.join(missing)} yet"
            return
        self._command(part, "enableSharding", {"enableSharding": self.options.db_shard_database})
        for command in sharding.shard_collection_commands(self.options):
            try:
                self._command(part, "shardCollection", command)
            except StepFailed as exc:
                raise StepFailed(
                    f"shardCollection {command['shardCollection']} key {command['key']}", exc.reply
                ) from exc
        self._mark(f"{len(self.shards)} shard(s) listed, {self.options.db_shard_database} sharded")
        part.ready = True

    def _step_failure(self, part: Part, exc: StepFailed) -> JobFailedError:
        job = part.job
        return JobFailedError(
            f"The sharded database could not start: {exc.step} on the {part.label} ({job.role} {job.unit} "
            f"{job.job_id}, {job.name}, on {job.node}) failed.\n"
            f"  The server replied: {exc.reply}\n"
            f"  Log: {job.log_path}\n"
            "  Every job of this cluster was cancelled. Fix the cause the reply names (db_shards, "
            "db_shard_database, db_shard_collections, or the data in db_dir) and start again; "
            f"print(MsPASSCluster.job_script({job.role!r}, ...)) shows what ran.",
            role=job.role,
            job_id=job.job_id,
            state=job.state.value,
            log_path=job.log_path,
            log_tail=tail(job.log_path),
        )

    def waiting_for(self) -> str | None:
        if self.uri is not None:
            return None
        parts = []
        for part in self.parts:
            if part.ready:
                continue
            if part.job is None:
                continue
            if part.job.state.kind != "running":
                parts.append(part.job.describe())
            elif part is self.router and not self._router_told:
                parts.append(f"{part.job.describe()}, waiting for the config server and every shard to be PRIMARY")
            else:
                parts.append(f"{part.job.describe()}, {part.waiting}")
        if not parts and self.router.ready:  # security: the user the router's job makes
            parts.append(f"{self.router.job.describe()}, {self.router.waiting}")
        return "; ".join(parts)

    def startup_failure(self, coming_back: bool = False) -> JobFailedError | None:
        if self._failure is not None:
            return self._failure
        for part in self.parts:
            job = part.job
            if job is not None and job.ended:
                role = job.role
                command = "db_router_command" if role == sharding.ROUTER_ROLE else "db_command"
                job.error = job.failure(
                    f"ended before the sharded database was ready (the {part.label})",
                    f"Every job of this cluster was cancelled. Check {command} and the log above; "
                    f"print(MsPASSCluster.job_script({role!r}, db_shards={len(self.shards)}, ...)) shows what ran.",
                )
                self._failure = job.error
                return job.error
        return None

    # ------------------------------------------------------------ running
    def on_change(self, job: TrackedJob) -> None:
        """After start-up: a part whose job ended leaves the sharded database unusable; kept for the next call."""
        if job not in self.jobs or not job.ended or job.phase is not JobPhase.FAILED or self._lost is not None:
            return
        self._unwatch()
        part = next(p for p in self.parts if p.job is job)
        job.error = job.failure(
            f"ended while the cluster was running (the {part.label} of the sharded database)",
            f"A sharded database needs every part, and the {part.label} is not brought back on its own: call "
            "cluster.restart_database(), which stops the other parts cleanly and starts them all again on the same "
            f"db_dir ({self.options.db_dir}), data kept.",
        )
        self._lost = job.error
        logger.error("%s", job.error)

    def lost(self) -> JobFailedError | None:
        return self._lost

    @property
    def lost_job(self) -> TrackedJob | None:
        """The job of the part whose end lost the sharded database, or None."""
        return next((p.job for p in self.parts if self._lost is not None and p.job.error is self._lost), None)

    async def _watch(self, uri: str) -> None:
        """The router's heartbeat, and each config server's and shard's: a part that goes away rings the alarm."""
        await super()._watch(uri)
        loop = asyncio.get_running_loop()

        def failed():
            try:
                loop.call_soon_threadsafe(self.alarm.set)
            except RuntimeError:  # the loop is closed: nobody left to tell
                pass

        for part in (self.config, *self.shards):
            host, port = self.host_of(part.job), sharding.member_port(self.options, part.role, part.index)
            member_uri = (
                connection_string(host, port)
                if self.tls is None
                else db_client_uri(host, port, self.tls.db_ca_file, self.tls.db_member_pem)
            )
            self._member_watchers.append(await asyncio.to_thread(watch_server, member_uri, failed))

    def _unwatch(self) -> None:
        super()._unwatch()
        watchers, self._member_watchers = self._member_watchers, []
        for watcher in watchers:
            watcher.close()

    async def check(self) -> None:
        ids = [j.job_id for j in self.jobs if not j.ended]
        if ids:
            for job in await self.launcher.poll(ids):
                self.on_change(job)
        if self._lost is not None:
            raise self._lost

    async def tend(self) -> bool:
        """One step of a start again (:meth:`restart`); True once the router answers again.

        A lost part is not brought back on its own (``db_restarts`` applies
        to the one-job database); ``restart_database()`` does it.
        """
        async with self._lock:
            if not self.moving:
                return False
            error = self.startup_failure(coming_back=True)
            if error is not None:
                self.moving = False
                self._lost = error
                logger.error("The sharded database could not be brought back.\n%s", error)
                return False
            return await self.probe()

    async def restart(self) -> None:
        """Stop every part still running (router, shards, config server) cleanly, then start them all again.

        The same start as the first (:meth:`probe`): on the same ``db_dir``,
        each replica set reconfigured to its node if it moved and the shard
        registry pointed at the new hosts, so that a lost part comes back with
        its data; the cluster re-points what it published to the router once
        it answers (:meth:`tend`).
        """
        async with self._lock:
            await self.stop()
            self.uri = self.address = None
            self.moving = True
            self._moved_since = time.monotonic()
            for part in self.parts:
                if part.job is not None:
                    part.job.error = None
                part.job, part.ready, part.seen_running, part.waiting = None, False, False, "not submitted yet"
            self._failure = self._lost = None
            self._router_told = self._user_ready = False
            self.moved = []
            self.timeline = []
            try:
                await self.submit()
            except BaseException:
                self.moving = False  # nothing is coming back: calls must not wait for it
                raise

    def warn_before_walltime(self) -> None:
        """Warn once, minutes ahead, that the parts reach ``db_walltime`` (the sharded database then stops)."""
        left = min((j.time_left for j in self.jobs if j.time_left is not None), default=None)
        if self._walltime_warned or left is None:
            return
        if left > min(600, max(60, parse_walltime(self.options.db_walltime) // 6)):
            return
        self._walltime_warned = True
        logger.warning(
            "The sharded database's jobs reach their walltime in %d min %02d s (db_walltime=%s); the database then "
            "stops. What it stored stays in %s: close this cluster and start the next one with the same db_dir.",
            left // 60,
            left % 60,
            self.options.db_walltime,
            self.options.db_dir,
        )

    # ------------------------------------------------------------ stop
    async def stop(self) -> None:
        """Router, then the shards, then the config server: each SIGTERM and time for a clean shutdown."""
        self._unwatch()
        self.moving = False
        for group in ([self.router], self.shards, [self.config]):
            await asyncio.gather(*(self._stop_part(p) for p in group if p.job is not None and not p.job.ended))
        self._close_clients()

    async def _stop_part(self, part: Part) -> None:
        job = part.job
        if job.state.kind != "running":
            await self.launcher.cancel(job, timeout=JOB_STOP_TIMEOUT)
            return
        if not await self._stop_cleanly(job):
            return
        status = await asyncio.to_thread(server_exit_status, job.log_path)
        level = logging.INFO if status == 0 else logging.WARNING
        logger.log(
            level if job.ready else self.launcher.detail,
            "Sharded database: the %s (%s %s) stopped, server exit status %s.",
            part.label,
            job.unit,
            job.job_id,
            status,
        )

    def _close_clients(self) -> None:
        for part in self.parts:
            client, part.client = part.client, None
            if client is not None:
                client.close()

    def release(self) -> None:
        self._close_clients()
        super().release()
