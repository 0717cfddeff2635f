"""The embedded database as a one-member replica set of a sharded cluster (a stand-in for ``mongod``).

Started with ``--replSet NAME`` (and ``--configsvr`` or ``--shardsvr``),
:mod:`mspass_cluster.embedded_db` answers the replica-set commands itself,
in front of nx-27017, as MongoDB 7.0 documents them:

``replSetInitiate``
    Code 76 (NoReplicationEnabled) without ``--replSet``; 23
    (AlreadyInitialized) once initiated; 93 (InvalidReplicaSetConfig) for a
    set name other than ``--replSet``, a ``configsvr`` flag that does not
    match ``--configsvr``, or no members; 74 (NodeNotFound) when no member's
    ``host:port`` is this server. Accepted: the member is not PRIMARY at
    once; it passes STARTUP2 and SECONDARY and is PRIMARY
    :data:`ELECTION_SECONDS` later (a real single-member set takes about as
    long to elect itself).
``replSetGetStatus``
    Code 94 (NotYetInitialized) before initiation; 93 when this server is
    not a member of its stored configuration (a data directory moved to
    another node: state REMOVED until a forced reconfiguration); else
    ``set``, ``myState`` (1 PRIMARY, 2 SECONDARY, 5 STARTUP2) and
    ``members``.
``replSetReconfig``
    Code 94 before initiation; 10107 (NotWritablePrimary) without ``force``
    unless PRIMARY; 103 (NewReplicaSetConfigurationIncompatible) for a set
    name change or a ``version`` not above the current one without
    ``force``; 74 when this server is not in the new members. With
    ``force`` the version jumps (as MongoDB's does) and the member holds a
    new election (PRIMARY :data:`ELECTION_SECONDS` later).
``hello`` / ``isMaster``
    nx-27017's answer with ``setName``, ``hosts``, ``me``,
    ``isWritablePrimary``, ``secondary`` and ``setVersion`` of the current
    state (before initiation ``isreplicaset: true`` and no ``setName``).
``getCmdLineOpts``
    ``argv`` and ``parsed``, with ``sharding.clusterRole`` (what ``addShard``
    checks).
writes
    ``insert``, ``update``, ``delete``, ``findAndModify``, ``create``,
    ``createIndexes``, ``drop``, ``dropDatabase`` and ``dropIndexes`` fail
    with 10107 (NotWritablePrimary, "not primary") unless PRIMARY.
``admin.system.version``
    ``find`` and ``update`` of the ``shardIdentity`` document that
    ``addShard`` writes (kept in ``<dbpath>/shard_identity.json``; nx-27017
    cannot store ``system.*`` collections). A real shard refuses to change
    it while running with ``--shardsvr`` (the restore procedure restarts it
    standalone); this one allows it on its PRIMARY.
``shutdown``
    Only on ``admin`` (code 13 otherwise); the server stops cleanly (as on
    SIGTERM) and exits 0. A real one closes the connection without a reply;
    this one may send ``ok`` first.

The configuration is kept in ``<dbpath>/replset.json`` (MongoDB keeps it in
``local.system.replset``), so a server restarted on the same data comes back
with its set, PRIMARY again after an election, or REMOVED when its host name
changed. This is our reading of MongoDB's documentation, a regression harness
for the orchestration in :mod:`mspass_cluster.services.sharded`, not proof
about MongoDB: no oplog, no replication between members, no elections
among several members.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any, Callable

#: Seconds from an accepted ``replSetInitiate`` (or a restart, or a forced reconfiguration) to PRIMARY;
#: ``MSPASS_STANDIN_ELECTION_SECONDS`` changes it (a test that checks the states before PRIMARY on a busy machine).
ELECTION_SECONDS = float(os.environ.get("MSPASS_STANDIN_ELECTION_SECONDS", "1.5"))

STATE_PRIMARY, STATE_SECONDARY, STATE_STARTUP2, STATE_REMOVED = 1, 2, 5, 10
_STATE_NAMES = {1: "PRIMARY", 2: "SECONDARY", 5: "STARTUP2", 10: "REMOVED", 0: "STARTUP"}
_WRITES = frozenset(
    {
        "insert",
        "update",
        "delete",
        "findandmodify",
        "create",
        "createindexes",
        "drop",
        "dropdatabase",
        "dropindexes",
    }
)
_HELLO = frozenset({"hello", "ismaster"})


def error(code: int, name: str, message: str) -> dict[str, Any]:
    """A MongoDB command error reply."""
    return {"ok": 0.0, "errmsg": message, "code": code, "codeName": name}


def is_this_server(host: str, port: int) -> bool:
    """Whether ``host:port`` names this server: the port is ours and the name resolves to an address of this host."""
    name, _, member_port = host.rpartition(":")
    if not name or not member_port.isdigit() or int(member_port) != port:
        return False
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))  # only an address of this host can be bound
        except OSError:
            return False
    return True


class ReplicaSetMember:
    """The replica-set state of one server, and its answers to the replica-set commands.

    Parameters
    ----------
    opts : mspass_cluster._mongod_cli.MongodOptions
        The server's command line (``--replSet``, ``--configsvr``, ``--shardsvr``, ``--port``, ``--dbpath``).
    """

    def __init__(self, opts: Any):
        self.opts = opts
        self.set_name: str | None = opts.replSet
        self.port = opts.effective_port
        self.path = os.path.join(opts.dbpath, "replset.json")
        self.config: dict[str, Any] | None = None
        self.elected_at: float | None = None
        if self.set_name and os.path.exists(self.path):
            with open(self.path) as handle:
                self.config = json.load(handle)
            self._hold_election()

    # ------------------------------------------------------------ state
    def _hold_election(self) -> None:
        self.elected_at = time.monotonic() + ELECTION_SECONDS if self._in_config(self.config) else None

    def _in_config(self, config: dict[str, Any] | None) -> bool:
        return bool(config) and any(is_this_server(m.get("host", ""), self.port) for m in config.get("members", []))

    def state(self) -> int:
        """``myState``: 0 before initiation, 10 when not in the configuration, 5/2 while electing, 1 PRIMARY."""
        if self.config is None:
            return 0
        if self.elected_at is None:
            return STATE_REMOVED
        left = self.elected_at - time.monotonic()
        if left > ELECTION_SECONDS / 2:
            return STATE_STARTUP2
        return STATE_SECONDARY if left > 0 else STATE_PRIMARY

    def _save(self) -> None:
        temporary = self.path + ".new"
        with open(temporary, "w") as handle:
            json.dump(self.config, handle)
        os.replace(temporary, self.path)

    # ------------------------------------------------------------ commands
    def respond(self, name: str, db: str, body: dict[str, Any], execute: Callable[[], dict | None]) -> dict | None:
        """The reply to one command: this module's, or ``execute()``'s (nx-27017 behind the access control)."""
        lowered = name.lower()
        if lowered in _HELLO:
            reply = execute()
            return self._hello(reply) if isinstance(reply, dict) else reply
        if lowered == "shutdown":
            return self._shutdown(db)
        if lowered == "getcmdlineopts":
            return self._cmdline()
        if self.set_name is None:
            if lowered.startswith("replset"):
                return error(76, "NoReplicationEnabled", "This node was not started with replication enabled.")
            return execute()
        if db == "admin" and body.get(name) == "system.version" and lowered in ("find", "update"):
            return self._identity(lowered, body)
        handler = {
            "replsetinitiate": self._initiate,
            "replsetgetstatus": self._status,
            "replsetreconfig": self._reconfig,
        }.get(lowered)
        if handler is not None:
            return handler(body)
        if lowered in _WRITES and self.state() != STATE_PRIMARY:
            return error(10107, "NotWritablePrimary", "not primary")
        return execute()

    def _hello(self, reply: dict[str, Any]) -> dict[str, Any]:
        reply = dict(reply)
        if self.set_name is None:
            return reply
        state = self.state()
        reply["isWritablePrimary"] = reply["ismaster"] = state == STATE_PRIMARY
        reply["secondary"] = state == STATE_SECONDARY
        if self.config is None or state == STATE_REMOVED:
            reply["isreplicaset"] = True
            reply["info"] = "Does not have a valid replica set config"
            reply.pop("setName", None)
            return reply
        hosts = [m["host"] for m in self.config["members"]]
        reply.update(setName=self.set_name, setVersion=self.config.get("version", 1), hosts=hosts, me=hosts[0])
        if state == STATE_PRIMARY:
            reply["primary"] = hosts[0]
        if self.opts.configsvr:
            reply["configsvr"] = 2
        return reply

    def _cmdline(self) -> dict[str, Any]:
        parsed = self.opts.as_config()
        if self.set_name:
            parsed.setdefault("replication", {})["replSet"] = self.set_name
        role = "configsvr" if self.opts.configsvr else "shardsvr" if self.opts.shardsvr else None
        if role:
            parsed.setdefault("sharding", {})["clusterRole"] = role
        return {"argv": ["mongod", *self.opts.argv], "parsed": parsed, "ok": 1.0}

    def _check_config(self, config: Any) -> dict[str, Any] | None:
        if not isinstance(config, dict) or not config.get("members"):
            return error(93, "InvalidReplicaSetConfig", "replica set configuration must have at least one member")
        if config.get("_id") != self.set_name:
            return error(
                93,
                "InvalidReplicaSetConfig",
                f"Attempting to initiate a replica set with name {config.get('_id')}, but command line reports "
                f"{self.set_name}; rejecting",
            )
        if bool(config.get("configsvr", False)) != bool(self.opts.configsvr):
            return error(
                93,
                "InvalidReplicaSetConfig",
                "Nodes being used for config servers must be started with the --configsvr flag"
                if config.get("configsvr")
                else "Nodes started with the --configsvr flag must have configsvr:true in their config",
            )
        if not self._in_config(config):
            hosts = ", ".join(str(m.get("host")) for m in config["members"])
            return error(
                74,
                "NodeNotFound",
                f"No host described in new configuration with version 1 for replica set "
                f"{self.set_name} maps to this node (members: {hosts}; this node listens on port {self.port})",
            )
        return None

    def _initiate(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.config is not None:
            return error(23, "AlreadyInitialized", "already initialized")
        config = body.get("replSetInitiate")
        problem = self._check_config(config)
        if problem is not None:
            return problem
        self.config = {**config, "version": int(config.get("version", 1))}
        self._save()
        self._hold_election()
        return {"ok": 1.0}

    def _status(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.config is None:
            return error(94, "NotYetInitialized", "no replset config has been received")
        state = self.state()
        if state == STATE_REMOVED:
            return error(
                93, "InvalidReplicaSetConfig", "Our replica set config is invalid or we are not a member of it"
            )
        members = [
            {
                "_id": m.get("_id", i),
                "name": m["host"],
                "health": 1.0,
                "state": state,
                "stateStr": _STATE_NAMES[state],
                "self": i == 0,
            }
            for i, m in enumerate(self.config["members"])
        ]
        return {"set": self.set_name, "myState": state, "members": members, "ok": 1.0}

    def _reconfig(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.config is None:
            return error(94, "NotYetInitialized", "no replset config has been received")
        force = bool(body.get("force"))
        if not force and self.state() != STATE_PRIMARY:
            return error(10107, "NotWritablePrimary", "replSetReconfig should only be run on a writable PRIMARY")
        config = body.get("replSetReconfig")
        if not isinstance(config, dict) or config.get("_id") != self.set_name:
            return error(
                103,
                "NewReplicaSetConfigurationIncompatible",
                f"New and old configurations differ in replica set name; old was {self.set_name}, and new is "
                f"{config.get('_id') if isinstance(config, dict) else config}",
            )
        version = int(config.get("version", 0))
        current = int(self.config.get("version", 1))
        if not force and version <= current:
            return error(
                103,
                "NewReplicaSetConfigurationIncompatible",
                f"New replica set configuration version must be greater than old, but {version} is not greater "
                f"than {current} for replica set {self.set_name}",
            )
        problem = self._check_config({**config, "configsvr": config.get("configsvr", self.opts.configsvr)})
        if problem is not None:
            return problem
        self.config = {**config, "version": current + 10000 if force else version}
        self._save()
        self._hold_election()
        return {"ok": 1.0}

    def _identity(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        """``admin.system.version``'s ``shardIdentity`` document (kept in ``<dbpath>/shard_identity.json``)."""
        path = os.path.join(self.opts.dbpath, "shard_identity.json")
        document = None
        if os.path.exists(path):
            with open(path) as handle:
                document = json.load(handle)
        if command == "find":
            batch = [document] if document is not None else []
            return {"cursor": {"firstBatch": batch, "id": 0, "ns": "admin.system.version"}, "ok": 1.0}
        if self.state() != STATE_PRIMARY:
            return error(10107, "NotWritablePrimary", "not primary")
        modified = 0
        for update in body.get("updates", []):
            change = update.get("u", {})
            if update.get("q", {}).get("_id") != "shardIdentity" or not isinstance(change, dict):
                continue
            if "$set" in change:
                if document is None:
                    continue
                document.update(change["$set"])
            else:
                document = {"_id": "shardIdentity", **change}
            modified += 1
        if modified:
            with open(path + ".new", "w") as handle:
                json.dump(document, handle)
            os.replace(path + ".new", path)
        return {"n": modified, "nModified": modified, "ok": 1.0}

    def _shutdown(self, db: str) -> dict[str, Any]:
        if db != "admin":
            return error(13, "Unauthorized", "shutdown may only be run against the admin database.")
        os.kill(os.getpid(), signal.SIGTERM)  # the server's own clean stop
        return {"ok": 1.0}
