r"""The embedded database: nx-27017 behind mongod's command line.

nx-27017 (from PyPI) serves the MongoDB wire protocol over SQLite. This
module runs it as ``python -m mspass_cluster.embedded_db --port P --dbpath D
...``, accepting mongod's options, so the cluster starts it exactly as it
starts ``mongod``. Two users:

* the local (desktop) backend, when no ``mongod`` is installed: a stand-in
  for trying MsPASS, announced with a warning;
* the tests, as the data-path stand-in for mongod (pymongo CRUD and GridFS
  really work).

Faithful to ``mongod``: the command line the cluster gives ``mongod``
(:func:`mspass_cluster.roles.db_argv`) and its errors (exit 2, see
``_mongod_cli.py``; any other mongod option is refused as unrecognised); a missing
``--dbpath`` (``NonExistentPath``, exit 100) and an unresolvable
``--bind_ip`` (exit 48); mongod's first log lines, to stdout or
``--logpath``; one process whose PID is the one the launcher started (this
module runs nx-27017's own entry point in its process), so SIGTERM reaches
the server itself; data written through pymongo (CRUD, GridFS) persists in
``--dbpath`` across restarts; and the security options
(``--auth --tlsMode requireTLS --tlsCertificateKeyFile --tlsCAFile``),
enforced in front of nx-27017, which has neither TLS nor authentication of
its own: the listening socket is TLS-only and requires a client certificate
signed by the CA, and every command of every connection passes the access
control of :mod:`mspass_cluster._mongod_security` before nx-27017 sees it
(MONGODB-X509 users in ``<dbpath>/mongod_users.json``, the localhost
exception, code 13 for the unauthenticated; what of that is not faithful is
in that module's docstring).

Not faithful -- never use it to test administrative behaviour:

* Administrative commands only pretend (nx-27017 answers ok to anything),
  except the user and authentication commands, which the access control
  answers.
* After the first lines the log is nx-27017's own text log, to stderr and to
  ``--logpath`` (default ``<dbpath>/nx-27017.log``): there is no
  ``Waiting for connections`` line; readiness is an answered ``ping``.
* nx-27017 listens on one address: ``0.0.0.0`` when ``--bind_ip_all`` is
  given or any ``--bind_ip`` address is not loopback, else ``127.0.0.1``.
  No Unix domain socket.
* No ``mongod.lock``: a second server on the same data directory is refused
  only through nx-27017's pid file (``--pidfilepath``, default
  ``<dbpath>/nx-27017.pid``), with status 1. A busy port also ends it with
  status 1 and a traceback, not 48.
* SIGTERM and SIGINT stop it with status 0; one request at a time, so no
  performance conclusions. With ``--replSet`` it is a one-member replica set
  whose commands :mod:`mspass_cluster._mongod_replset` answers (no oplog, no
  replication); ``mspass_cluster._mongos`` routes to such shards.
* ``--wiredTigerCacheSizeGB`` and ``--nounixsocket`` are accepted and ignored.
* Run in-process, nx-27017's server loop is replaced at one seam
  (``nx_27017.daemon.run_server_threaded``, nx-27017 0.8.1) by
  :func:`serve`: nx-27017's asyncio server with a TLS context and the access
  control per connection; argument parsing, logging, pid file, signals and
  the request handler stay nx-27017's own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import pkgutil
import ssl
import sys
from importlib import metadata
from typing import Any, Callable

from . import _mongod_cli as cli
from . import _mongod_log as mlog
from . import _mongod_replset as replset
from . import _mongod_security as security

NX_DISTRIBUTION = "nx-27017"
NX_CONSOLE_SCRIPT = "nx-27017"

# nx-27017's root-logger handlers (stderr and its log file) receive these lines too.
logger = logging.getLogger("mspass_cluster.embedded_db")


def nx_entry_point() -> metadata.EntryPoint:
    """nx-27017's console-script entry point (``nx_27017.nx_27017:main`` in 0.8.1).

    The package has no ``__main__`` module, so ``python -m nx_27017`` does
    not work; the entry point is the supported way in.
    """
    (entry_point,) = metadata.entry_points(group="console_scripts", name=NX_CONSOLE_SCRIPT)
    return entry_point


def listen_host(addresses: list[tuple[object, str]], bind_all: bool) -> str:
    """The single address nx-27017 can listen on for mongod's bind list.

    Parameters
    ----------
    addresses : list of (family, address)
        From :func:`mspass_cluster._mongod_cli.resolve_bind_addresses`.
    bind_all : bool
        ``--bind_ip_all`` was given.

    Returns
    -------
    str
        ``0.0.0.0`` if mongod would be reachable from other hosts, else
        ``127.0.0.1``.
    """
    # nx-27017 binds exactly one address, so "several specific addresses"
    # can only be approximated by all of them.
    if bind_all or any(not ipaddress.ip_address(address).is_loopback for _, address in addresses):
        return "0.0.0.0"
    return "127.0.0.1"


class GatedHandler:
    """nx-27017's request handler as one connection sees it: every command passes the access control first.

    Parameters
    ----------
    handler : nx_27017.NeoSQLiteHandler
        The server's one handler.
    session : mspass_cluster._mongod_security.ConnectionSession
        This connection's access state.
    member : mspass_cluster._mongod_replset.ReplicaSetMember, optional
        The server's replica-set state: past the access control, it answers the replica-set commands and
        refuses writes unless PRIMARY.
    """

    def __init__(
        self, handler: Any, session: security.ConnectionSession, member: replset.ReplicaSetMember | None = None
    ):
        self._handler = handler
        self._session = session
        self._member = member

    def _respond(self, name: str, db: str, body: dict[str, Any], execute: Callable[[], dict | None]) -> dict | None:
        if self._member is None:
            return self._session.respond(name, db, body, execute)
        member = self._member
        return self._session.respond(name, db, body, lambda: member.respond(name, db, body, execute))

    def __getattr__(self, name: str) -> Any:
        # Connection bookkeeping (increment_connections, close_streams_for_connection, ...) is the handler's.
        return getattr(self._handler, name)

    def handle_command(self, msg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """An OP_MSG command, through the gate."""
        return self._gated(msg, self._handler.handle_command)

    def handle_insert(self, msg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """An OP_MSG insert (or a command with document sequences), through the gate."""
        return self._gated(msg, self._handler.handle_insert)

    def handle_query(self, msg: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        """A legacy OP_QUERY: a command on ``$cmd`` (the handshake) or a find, through the gate."""
        db = msg.get("db", "admin")
        collection = msg.get("collection")
        query = msg["query"]
        if not collection or collection == "$cmd" or collection.endswith(".$cmd"):
            command = query["$query"] if isinstance(query.get("$query"), dict) else query

            def execute() -> dict[str, Any] | None:
                _, docs = self._handler.handle_query(msg)
                return docs[0] if docs else None

            reply = self._respond(next(iter(command), ""), db, command, execute)
            return msg["request_id"], [] if reply is None else [reply]
        refusal = self._session.check("find", db, {"find": collection, "filter": query})
        if refusal is not None:
            return msg["request_id"], [refusal]
        return self._handler.handle_query(msg)

    def _gated(
        self, msg: dict[str, Any], run: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]
    ) -> tuple[int, dict[str, Any]]:
        body = next((doc for kind, doc in msg["sections"] if kind == "body"), None)
        if not isinstance(body, dict) or not body:
            return run(msg)  # nx-27017's own answer to a message without a command
        name = next(iter(body))
        db = body.get("$db", "test")
        # A write's documents may travel beside its body (OP_MSG document sequence); the gates see them in it.
        sequences = {
            field: docs
            for kind, payload in msg["sections"]
            if kind == "payload" and isinstance(payload, dict)
            for field, docs in payload.items()
            if field not in body
        }
        if sequences:
            body = {**body, **sequences}
        reply = self._respond(name, db, body, lambda: run(msg)[1])
        return msg["request_id"], reply


def _log_access(severity: str, log_id: int, message: str, attr: dict[str, Any]) -> None:
    logger.log(logging.WARNING if severity == "W" else logging.INFO, "%s %s", message, attr)


async def serve(
    host: str,
    port: int,
    handler: Any,
    ssl_context: ssl.SSLContext | None,
    access: security.AccessControl,
    member: replset.ReplicaSetMember | None = None,
) -> None:
    """nx-27017's ``run_server``, with TLS and the access control on every connection.

    Parameters
    ----------
    host, port
        Where to listen.
    handler : nx_27017.NeoSQLiteHandler
        The request handler nx-27017 made.
    ssl_context : ssl.SSLContext or None
        Every connection completes this TLS handshake (client certificate
        required) before it is served; None for plain TCP.
    access : mspass_cluster._mongod_security.AccessControl
        The server's access control; one session per connection.
    member : mspass_cluster._mongod_replset.ReplicaSetMember, optional
        The server's replica-set state (``--replSet``).
    """
    from nx_27017 import server as nx_server

    open_writers: set[asyncio.StreamWriter] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        session = access.session(writer.get_extra_info("peername"), certificate, _log_access)
        open_writers.add(writer)
        try:
            # Looked up at call time, as nx-27017's own run_server does.
            await nx_server.handle_client(reader, writer, GatedHandler(handler, session, member))
        finally:
            open_writers.discard(writer)

    server = await asyncio.start_server(on_connection, host, port, ssl=ssl_context)
    address = server.sockets[0].getsockname()
    nx_server.logger.info(
        f"Listening on {address[0]}:{address[1]} (TLS {'off' if ssl_context is None else 'required'}, "
        f"access control {'on' if access.auth else 'off'})"
    )
    try:
        async with server:
            await server.serve_forever()
    finally:
        # Shutting down (SIGTERM): drop the clients' connections at once. A TLS close waits for the
        # peer's reply, which an idle driver connection (pymongo's monitor) sends only when its own
        # wait ends, seconds later; mongod also just closes them.
        for writer in list(open_writers):
            writer.transport.abort()


def _run_nx(
    entry_point: metadata.EntryPoint,
    nx_args: list[str],
    ssl_context: ssl.SSLContext | None,
    access: security.AccessControl,
    member: replset.ReplicaSetMember | None = None,
) -> int:
    """Run nx-27017's console entry point in this process, its server loop replaced by :func:`serve`."""
    from nx_27017 import daemon
    from nx_27017 import server as nx_server

    if not hasattr(daemon, "run_server_threaded"):
        raise RuntimeError(
            f"nx-27017 {metadata.version(NX_DISTRIBUTION)} has no daemon.run_server_threaded to serve TLS through"
        )

    def run_server_threaded(host: str, port: int, handler: Any, use_threading: bool = False) -> None:
        # nx-27017's default asyncio path; nx_args never ask for --threaded.
        if nx_server.uvloop is not None:
            nx_server.uvloop.install()
        asyncio.run(serve(host, port, handler, ssl_context, access, member))

    daemon.run_server_threaded = run_server_threaded
    nx_main = pkgutil.resolve_name(entry_point.value)
    sys.argv = [NX_CONSOLE_SCRIPT, *nx_args]
    return nx_main() or cli.EXIT_CLEAN


def main() -> int:
    """Check the command line and run nx-27017 behind it; returns the exit status."""
    nx_version = metadata.version(NX_DISTRIBUTION)
    build_info = {
        "version": cli.MONGODB_VERSION,
        "standIn": f"nx-27017 {nx_version}, MongoDB wire protocol over SQLite",
    }
    opts = cli.parse_or_exit(
        sys.argv[1:],
        version_banner=f"db version v{cli.MONGODB_VERSION}\nstand-in: nx-27017 {nx_version} (MongoDB wire protocol over SQLite)",
    )
    ssl_context = security.server_ssl_context_or_exit(opts)
    log = mlog.open_log_or_exit(opts.logpath)
    mlog.log_starting(log, opts, build_info=build_info)
    try:
        addresses = cli.resolve_bind_addresses(opts)
    except cli.BindError as exc:
        mlog.log_listener_error(log, str(exc))
        mlog.log_exit(log, cli.EXIT_NET_ERROR)
        return cli.EXIT_NET_ERROR
    if not os.path.exists(opts.dbpath):
        mlog.log_initandlisten_failure(log, mlog.nonexistent_path_error(opts.dbpath))
        mlog.log_exit(log, cli.EXIT_UNCAUGHT)
        return cli.EXIT_UNCAUGHT
    try:
        users = security.UserStore(opts.dbpath)
    except (OSError, ValueError) as exc:
        mlog.log_initandlisten_failure(log, f"FailedToParse: cannot read the users: {exc}")
        mlog.log_exit(log, cli.EXIT_UNCAUGHT)
        return cli.EXIT_UNCAUGHT
    nx_args = [
        "--host",
        listen_host(addresses, opts.bind_ip_all),
        "--port",
        str(opts.effective_port),
        "--data-dir",
        opts.dbpath,
        "--log-file",
        opts.logpath or os.path.join(opts.dbpath, "nx-27017.log"),
        "--pid-file",
        opts.pidfilepath or os.path.join(opts.dbpath, "nx-27017.pid"),
    ]
    entry_point = nx_entry_point()
    log.write(
        "I",
        "CONTROL",
        0,
        "initandlisten",
        "Handing over to the nx-27017 stand-in",
        {"entryPoint": entry_point.value, "args": nx_args, "tlsMode": opts.tlsMode, "auth": opts.auth},
    )
    log.close()
    member = replset.ReplicaSetMember(opts) if opts.replSet or opts.configsvr or opts.shardsvr else None
    return _run_nx(entry_point, nx_args, ssl_context, security.access_control(opts, users), member)


if __name__ == "__main__":
    sys.exit(main())
