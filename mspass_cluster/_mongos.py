r"""A stand-in for ``mongos``, the router of a sharded cluster, over the embedded database's shards.

``python -m mspass_cluster._mongos --port P --configdb cfg/host:port
--bind_ip_all`` listens on the MongoDB wire protocol and routes to shards
that are :mod:`mspass_cluster.embedded_db` servers started with
``--shardsvr --replSet``; its configuration (``config.shards``,
``config.databases``, ``config.collections``) lives on the config server
(an embedded database with ``--configsvr``), as a real ``mongos`` keeps it.

What it answers itself, as MongoDB 7.0 documents the commands:

``hello`` / ``isMaster``
    ``msg: "isdbgrid"`` (how a client knows it reached a router).
``addShard``
    ``"<set>/<host:port>"`` (a replica-set shard; code 96 for a bare host),
    ``name`` optional. The shard must answer within two seconds and be its
    set's PRIMARY (else code 133, FailedToSatisfyReadPreference), belong to
    that set (96), run with ``--shardsvr`` (96); a name already used with
    another host is refused (96); the same shard again is ``ok``. Writes the
    shard's ``shardIdentity`` and the ``config.shards`` entry.
``listShards``
    The registered shards.
``enableSharding``
    Code 70 (ShardNotFound) while no shard exists; else the database gets a
    primary shard (``primaryShard`` or the one with the fewest databases).
``shardCollection``
    Code 73 (InvalidNamespace) for a name without a database, 72
    (InvalidOptions) for a hashed key declared unique, 70 while no shard
    exists, 23 (AlreadyInitialized) for a collection sharded with another
    key; the same key again is ``ok``.
``listDatabases``
    Merged over every shard.
``shutdown``
    On ``admin`` only (code 13); stops cleanly, exit 0.

Every other command goes, byte for byte, to one server: a command on the
``config`` database to the config server, any other to the *primary shard*
of its database (``config.databases``; a new database gets the shard with the
fewest databases, as ``mongos`` picks one). Cursors (``getMore``) and
sessions therefore stay on the shard that opened them. A shard whose
``shardIdentity`` names other config servers than ``--configdb`` (a data
directory moved without updating it, see the restore procedure) gets no
command: code 96 names both. Any failure to reach the config server or a
shard is code 133 or 6 (HostUnreachable) naming it.

Security, as a ``mongos`` 7.0 with ``--tlsMode requireTLS
--tlsCertificateKeyFile --tlsCAFile --clusterAuthMode x509 --tlsClusterFile``
has it (:mod:`mspass_cluster._mongod_security` enforces it, as for the
``mongod`` stand-ins): every client connection is TLS with a certificate the
CA signed; ``--clusterAuthMode x509`` turns access control on (a ``mongos``
has no ``--auth``), so an unauthenticated command is refused with code 13;
a certificate with the members' O/OU/DC is ``__system``. The users live on
the config server (``createUser``, ``usersInfo``, ``dropUser`` go there, and
authentication looks the user up there); the localhost exception applies on
the router's node while the config server holds no user. The router reaches
the config server and the shards over TLS presenting its member
certificate (``--tlsClusterFile``) and authenticates as a member, on its
driver connections and on every forwarded link.

Not faithful, and not verified here: **chunks, chunk migration and the
balancer do not exist**; a sharded collection lives on its database's
primary shard alone, so data is not spread across shards. No multi-shard
queries, no versioned routing, no transactions across shards; forwarded
commands run on the shard as the router's ``__system`` identity, not as the
user (a real ``mongos`` forwards the user's identity and roles; roles are
not enforced by the stand-ins anyway).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import bson
import pymongo
from pymongo.errors import OperationFailure, PyMongoError

from . import _mongod_cli as cli
from . import _mongod_security as security
from ._mongod_replset import error

logger = logging.getLogger("mspass_cluster.mongos")
logger.propagate = False

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013
MAX_WIRE_VERSION = 21
#: Seconds a shard or the config server gets to answer before the router gives up on it.
REACH_SECONDS = 2.0


@dataclass
class MongosOptions(cli.MongodOptions):
    """mongos's command line: ``--configdb`` and the network and log options."""

    VALUE_OPTIONS: ClassVar[dict] = {
        **{
            k: v
            for k, v in cli.MongodOptions.VALUE_OPTIONS.items()
            if k
            in (
                "port",
                "bind_ip",
                "logpath",
                "pidfilepath",
                "tlsMode",
                "tlsCertificateKeyFile",
                "tlsCAFile",
                "tlsClusterFile",
                "clusterAuthMode",
            )
        },
        "configdb": (str, False),
    }
    SWITCHES: ClassVar[frozenset[str]] = frozenset(
        {"bind_ip_all", "nounixsocket", "version", "help", "tlsAllowInvalidHostnames"}
    )
    USAGE: ClassVar[str] = """\
Options (a subset of mongos's; this program is a stand-in, see mspass_cluster._mongos):
  --configdb arg       <config replica set>/<host:port>[,<host:port>...]
  --port arg           port to listen on (default 27017)
  --bind_ip arg        comma-separated addresses to bind (default 127.0.0.1)
  --bind_ip_all        bind to every IPv4 address
  --logpath arg        log file instead of stdout
  --pidfilepath arg    write the process id to this file
  --tlsMode arg        disabled (default) or requireTLS (client certificate
                       signed by --tlsCAFile required)
  --tlsCertificateKeyFile arg  the router's certificate and key (PEM)
  --tlsCAFile arg      the CA that signs clients' and members' certificates
  --clusterAuthMode arg  x509: members authenticate by certificate; turns
                       access control on
  --tlsClusterFile arg the member certificate the router presents to the
                       config server and the shards
  --tlsAllowInvalidHostnames  do not check the members' host names
  --nounixsocket       no Unix domain socket (there never is one)
  --version            print the version and exit
  -h [ --help ]        print this help and exit
"""
    configdb: str | None = None


# ------------------------------------------------------------ wire protocol (pure)
def parse_message(opcode: int, data: bytes) -> tuple[str, str, dict[str, Any]]:
    """(command name, database, command document) of an OP_MSG or OP_QUERY ``data`` (header included)."""
    if opcode == OP_MSG:
        flags = struct.unpack_from("<I", data, 16)[0]
        end = len(data) - (4 if flags & 1 else 0)
        position = 20
        body: dict[str, Any] = {}
        while position < end:
            kind = data[position]
            position += 1
            size = struct.unpack_from("<i", data, position)[0]
            if kind == 0:
                body = bson.decode(data[position : position + size])
            position += size
        name = next(iter(body), "")
        return name, body.get("$db", "admin"), body
    if opcode == OP_QUERY:
        end = data.index(b"\0", 20)
        collection = data[20:end].decode()
        position = end + 1 + 8
        size = struct.unpack_from("<i", data, position)[0]
        query = bson.decode(data[position : position + size])
        if isinstance(query.get("$query"), dict):
            query = query["$query"]
        return next(iter(query), ""), collection.split(".", 1)[0], query
    raise ValueError(f"opcode {opcode} is not served")


def build_reply(opcode: int, request_id: int, document: dict[str, Any]) -> bytes:
    """The reply to request ``request_id`` in the form its ``opcode`` expects (OP_MSG, or OP_REPLY to OP_QUERY)."""
    encoded = bson.encode(document)
    if opcode == OP_MSG:
        body = struct.pack("<I", 0) + b"\0" + encoded
        code = OP_MSG
    else:
        body = struct.pack("<iqii", 0, 0, 0, 1) + encoded
        code = OP_REPLY
    return struct.pack("<iiii", 16 + len(body), 0, request_id, code) + body


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One whole message, header included; None when the peer closed."""
    try:
        header = await reader.readexactly(16)
        length = struct.unpack_from("<i", header)[0]
        return header + await reader.readexactly(length - 16)
    except asyncio.IncompleteReadError:
        return None


def shard_address(host: str) -> str:
    """``host:port`` of a shard's first member, from ``config.shards``' ``<set>/<host:port>,...``."""
    return host.split("/", 1)[-1].split(",")[0]


# ------------------------------------------------------------ the router
class Router:
    """The sharding commands, the configuration on the config server, and where each database lives."""

    def __init__(self, configdb: str, opts: MongosOptions | None = None):
        self.configdb = configdb
        self.config_set, _, hosts = configdb.partition("/")
        self.config_address = hosts.split(",")[0]
        self._clients: dict[str, pymongo.MongoClient] = {}
        self.opts = opts
        self.secure = opts is not None and opts.tlsMode != "disabled"
        self.member_auth = opts is not None and opts.clusterAuthMode == "x509"
        #: The TLS context of the router's own links to members (its member certificate), or None.
        self.link_ssl = self._link_context() if self.secure else None

    def _member_file(self) -> str:
        return self.opts.tlsClusterFile or self.opts.tlsCertificateKeyFile

    def _link_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.opts.tlsCAFile)
        context.check_hostname = not self.opts.tlsAllowInvalidHostnames
        context.load_cert_chain(self._member_file())
        return context

    def client(self, address: str) -> pymongo.MongoClient:
        if address not in self._clients:
            secure = {}
            if self.secure:
                secure = {
                    "tls": True,
                    "tlsCAFile": self.opts.tlsCAFile,
                    "tlsCertificateKeyFile": self._member_file(),
                    "tlsAllowInvalidHostnames": self.opts.tlsAllowInvalidHostnames,
                }
            if self.member_auth:
                secure.update(authMechanism="MONGODB-X509", authSource="$external")
            self._clients[address] = pymongo.MongoClient(
                f"mongodb://{address}/?directConnection=true",
                serverSelectionTimeoutMS=int(REACH_SECONDS * 1000),
                connectTimeoutMS=int(REACH_SECONDS * 1000),
                **secure,
            )
        return self._clients[address]

    @property
    def config(self):
        return self.client(self.config_address).config

    def _config_failure(self, exc: PyMongoError) -> dict[str, Any]:
        return error(
            133,
            "FailedToSatisfyReadPreference",
            f'Could not find host matching read preference {{ mode: "primary" }} for set {self.config_set} '
            f"(config server {self.config_address}: {exc})",
        )

    def shards(self) -> list[dict[str, Any]]:
        return list(self.config.shards.find({}))

    def primary_shard(self, db: str) -> dict[str, Any] | None:
        """The shard holding ``db``; a new database gets the shard with the fewest databases. None: no shard."""
        entry = self.config.databases.find_one({"_id": db})
        shards = {s["_id"]: s for s in self.shards()}
        if entry is not None and entry["primary"] in shards:
            return shards[entry["primary"]]
        if not shards:
            return None
        counts = {name: self.config.databases.count_documents({"primary": name}) for name in shards}
        chosen = min(sorted(shards), key=lambda name: counts[name])
        self.config.databases.update_one({"_id": db}, {"$set": {"primary": chosen}}, upsert=True)
        return shards[chosen]

    def identity_problem(self, shard: dict[str, Any]) -> dict[str, Any] | None:
        """Code 96 when the shard's ``shardIdentity`` names other config servers than this router's."""
        identity = self.client(shard_address(shard["host"])).admin["system.version"].find_one({"_id": "shardIdentity"})
        found = (identity or {}).get("configsvrConnectionString")
        if found == self.configdb:
            return None
        return error(
            96,
            "OperationFailed",
            f"shard {shard['_id']} ({shard['host']}) has shardIdentity configsvrConnectionString {found!r}, not "
            f"this cluster's config servers {self.configdb!r}: update it on the shard (restore procedure)",
        )

    # ------------------------------------------------------------ commands
    def command(self, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The reply to a sharding command, or None when ``name`` is not one."""
        handler = {
            "addshard": self.add_shard,
            "listshards": self.list_shards,
            "enablesharding": self.enable_sharding,
            "shardcollection": self.shard_collection,
            "listdatabases": self.list_databases,
        }.get(name.lower())
        if handler is None:
            return None
        try:
            return handler(body)
        except OperationFailure as exc:
            return error(exc.code or 8, "UnknownError", f"from the config server: {exc}")
        except PyMongoError as exc:
            return self._config_failure(exc)

    def add_shard(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = body.get("addShard")
        if not isinstance(spec, str) or not spec:
            return error(9, "FailedToParse", f"addShard takes a connection string, not {spec!r}")
        set_name, slash, hosts = spec.partition("/")
        if not slash or not hosts:
            return error(
                96, "OperationFailed", f"Cannot add {spec} as a shard: shards must be replica sets (<set>/<host:port>)"
            )
        name = body.get("name") or set_name
        address = hosts.split(",")[0]
        unreachable = error(
            133,
            "FailedToSatisfyReadPreference",
            f'Could not find host matching read preference {{ mode: "primary" }} for set {set_name}',
        )
        try:
            shard = self.client(address)
            hello = shard.admin.command("hello")
            options = shard.admin.command("getCmdLineOpts")
        except PyMongoError as exc:
            unreachable["errmsg"] += f" ({address}: {exc})"
            return unreachable
        if hello.get("setName") != set_name:
            return error(
                96,
                "OperationFailed",
                f"in seed list {spec}, host {address} does not belong to replica set {set_name}; found "
                f"setName {hello.get('setName')!r}",
            )
        if not hello.get("isWritablePrimary"):
            unreachable["errmsg"] += f" ({address} is not PRIMARY yet)"
            return unreachable
        if options.get("parsed", {}).get("sharding", {}).get("clusterRole") != "shardsvr":
            return error(
                96, "OperationFailed", f"Cannot add {spec} as a shard since it was not started with --shardsvr"
            )
        existing = self.config.shards.find_one({"_id": name})
        if existing is not None:
            if existing["host"] != spec:
                return error(
                    96,
                    "OperationFailed",
                    f"A shard named {name} already exists in the cluster with host {existing['host']}",
                )
            return {"shardAdded": name, "ok": 1.0}
        other = self.config.shards.find_one({"host": spec})
        if other is not None:
            return error(96, "OperationFailed", f"{spec} is already a member of the cluster as shard {other['_id']}")
        shard.admin["system.version"].replace_one(
            {"_id": "shardIdentity"},
            {"shardName": name, "configsvrConnectionString": self.configdb},
            upsert=True,
        )
        self.config.shards.insert_one({"_id": name, "host": spec, "state": 1})
        return {"shardAdded": name, "ok": 1.0}

    def list_shards(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"shards": self.shards(), "ok": 1.0}

    def enable_sharding(self, body: dict[str, Any]) -> dict[str, Any]:
        db = body.get("enableSharding")
        if not isinstance(db, str) or not db or "." in db:
            return error(73, "InvalidNamespace", f"Invalid db name specified: {db}")
        shards = {s["_id"] for s in self.shards()}
        if not shards:
            return error(70, "ShardNotFound", f"Database {db} could not be created :: caused by :: No shards found")
        wanted = body.get("primaryShard")
        if wanted is not None:
            if wanted not in shards:
                return error(70, "ShardNotFound", f"Shard {wanted} not found")
            self.config.databases.update_one({"_id": db}, {"$set": {"primary": wanted}}, upsert=True)
        else:
            self.primary_shard(db)
        return {"ok": 1.0}

    def shard_collection(self, body: dict[str, Any]) -> dict[str, Any]:
        ns = body.get("shardCollection")
        if not isinstance(ns, str) or "." not in ns.strip(".") or ns.startswith("."):
            return error(73, "InvalidNamespace", f"Invalid namespace specified '{ns}'")
        key = body.get("key")
        if not isinstance(key, dict) or not key:
            return error(9, "FailedToParse", "shardCollection needs a shard key: key: {<field>: 1 | 'hashed'}")
        unique = bool(body.get("unique", False))
        if unique and "hashed" in key.values():
            return error(
                72,
                "InvalidOptions",
                "hashed shard keys cannot be declared unique. It's possible to ensure uniqueness on the hashed "
                "field by declaring an additional (non-hashed) unique index on the field.",
            )
        db = ns.split(".", 1)[0]
        if self.primary_shard(db) is None:
            return error(70, "ShardNotFound", f"Database {db} could not be created :: caused by :: No shards found")
        existing = self.config.collections.find_one({"_id": ns})
        wanted = {"key": dict(key), "unique": unique}
        if existing is not None:
            if {"key": existing["key"], "unique": existing["unique"]} != wanted:
                return error(
                    23,
                    "AlreadyInitialized",
                    f"sharding already enabled for collection {ns} with options {{ key: {existing['key']}, unique: "
                    f"{existing['unique']} }}",
                )
            return {"collectionsharded": ns, "ok": 1.0}
        self.config.collections.insert_one({"_id": ns, **wanted})
        return {"collectionsharded": ns, "ok": 1.0}

    def list_databases(self, body: dict[str, Any]) -> dict[str, Any]:
        sizes: dict[str, float] = {}
        for shard in self.shards():
            found = self.client(shard_address(shard["host"])).admin.command("listDatabases")
            for entry in found.get("databases", []):
                sizes[entry["name"]] = sizes.get(entry["name"], 0) + entry.get("sizeOnDisk", 0)
        databases = [{"name": n, "sizeOnDisk": s, "empty": s == 0} for n, s in sorted(sizes.items())]
        if body.get("nameOnly"):
            databases = [{"name": d["name"]} for d in databases]
        return {"databases": databases, "totalSize": sum(sizes.values()), "ok": 1.0}

    def route(self, db: str) -> tuple[str | None, dict[str, Any] | None]:
        """(``host:port`` to forward a command on ``db`` to, or None and the error reply)."""
        try:
            if db == "config":
                return self.config_address, None
            shard = self.primary_shard(db)
            if shard is None:
                return None, error(
                    70, "ShardNotFound", f"Database {db} could not be created :: caused by :: No shards found"
                )
            try:
                problem = self.identity_problem(shard)
            except PyMongoError as exc:
                return None, error(
                    6, "HostUnreachable", f"shard {shard['_id']} ({shard['host']}) does not answer: {exc}"
                )
            return (None, problem) if problem else (shard_address(shard["host"]), None)
        except PyMongoError as exc:
            return None, self._config_failure(exc)


class ConfigUsers:
    """The cluster's users, kept on the config server (the interface of :class:`_mongod_security.UserStore`).

    Authentication on the router looks a user up here; ``createUser``,
    ``usersInfo`` and ``dropUser`` on the router change or read them here.
    A user found is remembered for a second (the gate asks on every command).
    """

    REMEMBER_SECONDS = 1.0

    def __init__(self, router: Router):
        self.router = router
        self._found: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}

    def _db(self, name: str):
        return self.router.client(self.router.config_address)[name]

    @staticmethod
    def _record(user: dict[str, Any]) -> dict[str, Any]:
        record = dict(user)
        uid = record.get("userId")
        record["userId"] = str(uid.as_uuid() if isinstance(uid, bson.Binary) else uid)
        return record

    def _all(self) -> list[dict[str, Any]]:
        return [self._record(u) for u in self._db("admin").command({"usersInfo": {"forAllDBs": True}})["users"]]

    def empty(self) -> bool:
        return not self._all()

    def find(self, db: str, user: str) -> dict[str, Any] | None:
        remembered = self._found.get((db, user))
        if remembered is not None and time.monotonic() - remembered[0] < self.REMEMBER_SECONDS:
            return remembered[1]
        users = self._db(db).command({"usersInfo": {"user": user, "db": db}})["users"]
        found = self._record(users[0]) if users else None
        self._found[(db, user)] = (time.monotonic(), found)
        return found

    def select(self, predicate) -> list[dict[str, Any]]:
        return [u for u in self._all() if predicate(u)]

    def add(self, record: dict[str, Any], *, only_if_empty: bool = False) -> str:
        if only_if_empty and not self.empty():
            return "not-empty"
        try:
            self._db(record["db"]).command({"createUser": record["user"], "roles": record["roles"]})
        except OperationFailure as exc:
            if exc.code == 51003:
                return "exists"
            raise
        self._found.pop((record["db"], record["user"]), None)
        return "created"

    def remove(self, db: str, user: str) -> bool:
        self._found.pop((db, user), None)
        try:
            self._db(db).command({"dropUser": user})
        except OperationFailure as exc:
            if exc.code == 11:
                return False
            raise
        return True


def build_command(request_id: int, document: dict[str, Any]) -> bytes:
    """An OP_MSG request carrying ``document``."""
    body = struct.pack("<I", 0) + b"\0" + bson.encode(document)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG) + body


_OWN = frozenset({"hello", "ismaster", "ping", "buildinfo", "endsessions", "getcmdlineopts", "shutdown"})
_HELLO = frozenset({"hello", "ismaster"})


class Connection:
    """One client's connection: answered here, or forwarded on this connection's own link to each server."""

    def __init__(
        self,
        router: Router,
        opts: MongosOptions,
        stop: asyncio.Event,
        connection_id: int,
        session: security.ConnectionSession,
    ):
        self.router = router
        self.opts = opts
        self.stop = stop
        self.connection_id = connection_id
        self.session = session
        self.links: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    def own(self, name: str, db: str, body: dict[str, Any]) -> dict[str, Any]:
        lowered = name.lower()
        if lowered in ("hello", "ismaster"):
            import datetime

            return {
                "isWritablePrimary" if lowered == "hello" else "ismaster": True,
                "msg": "isdbgrid",
                "maxBsonObjectSize": 16 * 1024 * 1024,
                "maxMessageSizeBytes": 48_000_000,
                "maxWriteBatchSize": 100_000,
                "localTime": datetime.datetime.now(datetime.timezone.utc),
                "logicalSessionTimeoutMinutes": 30,
                "connectionId": self.connection_id,
                "minWireVersion": 0,
                "maxWireVersion": MAX_WIRE_VERSION,
                "ok": 1.0,
            }
        if lowered == "buildinfo":
            return {"version": cli.MONGODB_VERSION, "standIn": "mspass_cluster._mongos", "ok": 1.0}
        if lowered == "getcmdlineopts":
            return {
                "argv": ["mongos", *self.opts.argv],
                "parsed": {"sharding": {"configDB": self.opts.configdb}},
                "ok": 1.0,
            }
        if lowered == "shutdown":
            if db != "admin":
                return error(13, "Unauthorized", "shutdown may only be run against the admin database.")
            self.stop.set()
            raise ConnectionAbortedError("shutdown: the connection closes without a reply, as mongos's does")
        return {"ok": 1.0}

    async def answer(self, opcode: int, data: bytes) -> bytes:
        request_id = struct.unpack_from("<i", data, 4)[0]
        name, db, body = parse_message(opcode, data)
        lowered = name.lower()
        try:
            if lowered in _HELLO:  # answered here; a speculativeAuthenticate in it is the gate's
                reply = await asyncio.to_thread(self.session.respond, name, db, body, lambda: self.own(name, db, body))
                return build_reply(opcode, request_id, reply)
            # Refusals (code 13), authentication, and the users' commands (on the config server).
            reply = await asyncio.to_thread(self.session.check, name, db, body)
        except PyMongoError as exc:
            return build_reply(opcode, request_id, self.router._config_failure(exc))
        if reply is not None:
            return build_reply(opcode, request_id, reply)
        if lowered in _OWN:
            return build_reply(opcode, request_id, self.own(name, db, body))
        if db == "admin":
            reply = await asyncio.to_thread(self.router.command, name, body)
            if reply is not None:
                return build_reply(opcode, request_id, reply)
            shards = await asyncio.to_thread(self._shards_or_none)
            if not shards:
                return build_reply(opcode, request_id, error(70, "ShardNotFound", "No shards found"))
            address = shard_address(shards[0]["host"])
        else:
            address, problem = await asyncio.to_thread(self.router.route, db)
            if problem is not None:
                return build_reply(opcode, request_id, problem)
        try:
            return await self.forward(address, data)
        except OSError as exc:
            self.links.pop(address, None)
            return build_reply(opcode, request_id, error(6, "HostUnreachable", f"{address}: {exc}"))

    def _shards_or_none(self):
        try:
            return self.router.shards()
        except PyMongoError:
            return None

    async def forward(self, address: str, data: bytes) -> bytes:
        if address not in self.links:
            self.links[address] = await asyncio.wait_for(self._open_link(address), REACH_SECONDS)
        reader, writer = self.links[address]
        writer.write(data)
        await writer.drain()
        reply = await read_message(reader)
        if reply is None:
            self.links.pop(address, None)
            raise ConnectionResetError(f"{address} closed the connection")
        return reply

    async def _open_link(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A link to a member: over TLS with the member certificate, authenticated as a member, when secured."""
        host, _, port = address.rpartition(":")
        context = self.router.link_ssl
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=context, server_hostname=host if context is not None else None
        )
        if self.router.member_auth:
            command = {"authenticate": 1, "mechanism": "MONGODB-X509", "$db": "$external"}
            writer.write(build_command(0, command))
            await writer.drain()
            answer = await read_message(reader)
            reply = bson.decode(answer[21:]) if answer is not None else {}
            if not reply.get("ok"):
                writer.close()
                raise ConnectionRefusedError(f"{address} refused the router's member authentication: {reply}")
        return reader, writer

    def close(self) -> None:
        for _, writer in self.links.values():
            writer.close()


def _log_access(severity: str, log_id: int, message: str, attr: dict[str, Any]) -> None:
    logger.log(logging.WARNING if severity == "W" else logging.INFO, "%s %s", message, attr)


async def serve(opts: MongosOptions, ssl_context: ssl.SSLContext | None = None) -> int:
    router = Router(opts.configdb, opts)
    access = security.access_control(opts, ConfigUsers(router))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    counter = iter(range(1, 1 << 62))
    writers: set[asyncio.StreamWriter] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        session = access.session(writer.get_extra_info("peername"), certificate, _log_access)
        connection = Connection(router, opts, stop, next(counter), session)
        writers.add(writer)
        try:
            while not stop.is_set():
                data = await read_message(reader)
                if data is None:
                    return
                opcode = struct.unpack_from("<i", data, 12)[0]
                writer.write(await connection.answer(opcode, data))
                await writer.drain()
        except (ConnectionError, ValueError) as exc:
            logger.info("connection %d ended: %s", connection.connection_id, exc)
        except asyncio.CancelledError:
            pass  # shutting down
        finally:
            connection.close()
            writers.discard(writer)
            writer.close()

    host = (
        "0.0.0.0" if opts.bind_ip_all or any(a not in ("127.0.0.1", "localhost") for a in opts.bind_ip) else "127.0.0.1"
    )
    server = await asyncio.start_server(on_connection, host, opts.effective_port, ssl=ssl_context)
    logger.info(
        "Waiting for connections on %s:%d (config servers %s; TLS %s, access control %s)",
        host,
        opts.effective_port,
        opts.configdb,
        "off" if ssl_context is None else "required",
        "on" if access.auth else "off",
    )
    async with server:
        await stop.wait()
    for writer in list(writers):
        writer.transport.abort()
    logger.info("Shutting down: clean exit (status 0)")
    return cli.EXIT_CLEAN


def main() -> int:
    opts = cli.parse_or_exit(
        sys.argv[1:],
        version_banner=f"mongos version v{cli.MONGODB_VERSION}\nstand-in: mspass_cluster._mongos",
        options=MongosOptions,
    )
    if not opts.configdb or "/" not in opts.configdb:
        print("BadValue: configdb supports only replica set connection string (<set>/<host:port>)", file=sys.stderr)
        return cli.EXIT_BADOPTIONS
    ssl_context = security.server_ssl_context_or_exit(opts)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if opts.logpath:
        handlers = [logging.FileHandler(opts.logpath)]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s mongos %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if opts.pidfilepath:
        with open(opts.pidfilepath, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    try:
        return asyncio.run(serve(opts, ssl_context))
    except OSError as exc:
        logger.error("Failed to set up listener: %s", exc)
        return cli.EXIT_NET_ERROR
    finally:
        if opts.pidfilepath and os.path.exists(opts.pidfilepath):
            os.remove(opts.pidfilepath)


if __name__ == "__main__":
    sys.exit(main())
