"""fake_mongod: a STAND-IN for MongoDB's ``mongod``, used only by the tests.

No ``mongod`` binary exists on the test machines, so the process-handling
tests of ``mspass_cluster`` start this program exactly as they would start
``mongod`` (``python fake_mongod.py --port P --dbpath D --bind_ip_all ...``).
It is not a database: it stores nothing and answers only the handful of
administrative commands listed below. Data-path tests use ``mspass_cluster.embedded_db``.

Faithful to ``mongod`` 7.0 on what process management relies on:

* the command line, its errors and exit status 2 (``fake_mongod_cli.py``, on top of
  ``mspass_cluster/_mongod_cli.py``);
* the startup order: log, pid file, listening sockets (a busy port: exit 48),
  then the data directory (missing: ``NonExistentPath``, exit 100) and its
  ``mongod.lock``, held with ``flock`` as mongod holds it (a second instance
  on the same directory: ``DBPathInUse``, exit 100);
* the sockets are bound and listening *before* startup finishes, so a TCP
  connect succeeds while commands still go unanswered; readiness is the
  ``Waiting for connections`` log line or an answered ``ping``;
* ``mongod.lock`` holds the PID while running and is truncated to empty
  (not removed) on a clean shutdown, so a non-empty lock at startup means the
  previous run died (``Detected unclean shutdown - Lock file is not empty``);
  the ``--pidfilepath`` file is written at startup and never removed;
* the Unix domain socket ``<prefix>/mongodb-<port>.sock`` unless
  ``--nounixsocket``, replaced if stale, removed on a clean shutdown;
* SIGTERM, SIGINT and the ``shutdown`` command shut down cleanly with exit
  status 0; the ``shutdown`` command gets no reply (the connection closes);
* the wire protocol as pymongo 4.x speaks it: OP_MSG (kind 0 body, kind 1
  document sequences, checksum and moreToCome flags) and OP_QUERY for the
  legacy ``isMaster`` handshake only, as 5.1+ servers do;
* ``--tlsMode requireTLS --tlsCertificateKeyFile --tlsCAFile``: a TLS handshake
  on every connection, the Unix domain socket's included, with a client
  certificate signed by the CA (a failed handshake is logged and the
  connection closed); ``--auth``: only the handshake commands before
  authentication (code 13 for the rest, ``shutdown`` included), MONGODB-X509
  authentication (``authenticate``, ``speculativeAuthenticate``), the users
  in ``<dbpath>/mongod_users.json``, the localhost exception for the first
  user -- all in :mod:`mspass_cluster._mongod_security`, whose docstring says
  what of it is not faithful.

Not faithful:

* Commands: ``hello``/``isMaster``, ``ping``, ``buildInfo``, ``endSessions``,
  ``getLog``, ``getCmdLineOpts``, ``serverStatus`` (a few fields, ``process``
  is ``"fake_mongod"``), ``shutdown`` and the user commands of the access
  control (``authenticate``, ``logout``, ``connectionStatus``, ``createUser``,
  ``usersInfo``, ``dropUser``); every other command, CRUD included, fails
  with ``CommandNotFound`` (code 59) once authenticated (or without ``--auth``).
* ``hello`` has no ``topologyVersion``, so drivers poll instead of streaming;
  ``--replSet`` only adds ``setName`` (the server calls itself primary),
  ``--keyFile`` is not read (no internal authentication), no compression;
  ``--tlsMode allowTLS``/``preferTLS`` are refused.
* The version is ``7.0.0-fake``.
* Test hooks that mongod lacks: env ``FAKE_MONGOD_STARTUP_DELAY`` (seconds
  between binding and ``Waiting for connections``), and the file
  ``<dbpath>/fake_mongod.clean_shutdown`` (JSON: pid, signal -- ``SIGTERM``,
  ``SIGINT`` or ``shutdown-command`` -- and time) written by every clean
  shutdown and removed at every startup, standing for the data mongod flushes.
"""

from __future__ import annotations

import collections
import datetime
import fcntl
import json
import os
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from itertools import count
from typing import Any, Callable

import bson
from bson.errors import BSONError
from bson.int64 import Int64
from fake_mongod_cli import MAX_WIRE_VERSION, FakeMongodOptions

from mspass_cluster import _mongod_cli as cli
from mspass_cluster import _mongod_log as mlog
from mspass_cluster import _mongod_security as security

VERSION = f"{cli.MONGODB_VERSION}-fake"
BUILD_INFO = {"version": VERSION, "gitVersion": "fake", "modules": []}
STARTUP_DELAY_ENV = "FAKE_MONGOD_STARTUP_DELAY"
CLEAN_SHUTDOWN_MARKER = "fake_mongod.clean_shutdown"

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
_MSG_CHECKSUM_PRESENT = 1 << 0
_MSG_MORE_TO_COME = 1 << 1

MAX_BSON_SIZE = 16 * 1024 * 1024
MAX_MESSAGE_SIZE = 48_000_000
MAX_WRITE_BATCH_SIZE = 100_000
_RAMLOG_LINES = 1024  # mongod keeps the last 1024 lines for getLog

_HEADER = struct.Struct("<iiii")
_ADMIN_ONLY = frozenset({"shutdown", "getCmdLineOpts", "getLog"})
_SIGNAL_TEXT = {signal.SIGTERM: "Terminated", signal.SIGINT: "Interrupt"}
_request_ids = count(1)


def _error(errmsg: str, code: int, code_name: str) -> dict[str, Any]:
    return {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": code_name}


class _StartupFailure(Exception):
    """A failure that ends startup with an exit status, logged by whoever raises it."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


class RecordingLog:
    """The mongod log, plus the in-memory copy that ``getLog`` serves.

    Parameters
    ----------
    log : mlog.MongodLog
        Where the lines go.
    """

    def __init__(self, log: mlog.MongodLog):
        self._log = log
        self._lock = threading.Lock()
        self._closed = False
        self._recent: collections.deque[str] = collections.deque(maxlen=_RAMLOG_LINES)
        self._startup_warnings: list[str] = []
        self._lines_written = 0

    def write(
        self, severity: str, component: str, log_id: int, ctx: str, msg: str, attr: dict[str, Any] | None = None
    ) -> None:
        """Log one line (see :meth:`mlog.MongodLog.write`); silently dropped once closed."""
        with self._lock:
            if self._closed:
                return
            line = self._log.write(severity, component, log_id, ctx, msg, attr)
            self._recent.append(line)
            self._lines_written += 1
            if severity == "W" and ctx == "initandlisten":
                self._startup_warnings.append(line)

    def snapshot(self, which: str) -> tuple[int, list[str]]:
        """(total lines, lines kept) of the ``global`` or ``startupWarnings`` log."""
        with self._lock:
            if which == "startupWarnings":
                return len(self._startup_warnings), list(self._startup_warnings)
            return self._lines_written, list(self._recent)

    def close(self) -> None:
        """Close the underlying log; later lines (from closing connections) are dropped."""
        with self._lock:
            self._closed = True
            self._log.close()


class _Connection:
    """One client connection, its mongod-style id and (once its TLS handshake is done) its access state."""

    def __init__(self, sock: socket.socket, conn_id: int, remote: str, peer: Any):
        self.sock = sock
        self.id = conn_id
        self.remote = remote
        self.peer = peer
        self.access: security.ConnectionSession | None = None


class FakeMongod:
    """The fake server's whole life: startup, serving, shutdown.

    Parameters
    ----------
    opts : FakeMongodOptions
        The parsed command line.
    ssl_context : ssl.SSLContext or None
        From :func:`mspass_cluster._mongod_security.server_ssl_context`: every
        connection must complete a TLS handshake with it; None without TLS.
    """

    def __init__(self, opts: FakeMongodOptions, ssl_context: ssl.SSLContext | None = None):
        self.opts = opts
        self.ssl_context = ssl_context
        self.access_control: security.AccessControl | None = None
        self.port = opts.effective_port
        self.started = time.monotonic()
        self.log = RecordingLog(mlog.open_log_or_exit(opts.logpath, append=opts.logappend))
        self._listeners: list[socket.socket] = []
        self._unix_socket_path: str | None = None
        self._lock_fd: int | None = None
        self._connections: dict[int, _Connection] = {}
        self._connections_lock = threading.Lock()
        self._connection_ids = count(1)
        self._total_connections = 0
        self._shutdown_reason: str | None = None
        self._shutdown_ctx = "SignalHandler"
        self._shutdown_attr: dict[str, Any] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._commands: dict[str, Callable[[str, dict[str, Any], _Connection], dict[str, Any] | None]] = {
            "hello": lambda db, body, conn: self._hello(body, conn, legacy=False),
            "isMaster": lambda db, body, conn: self._hello(body, conn, legacy=True),
            "ismaster": lambda db, body, conn: self._hello(body, conn, legacy=True),
            "ping": lambda db, body, conn: {"ok": 1.0},
            "buildInfo": self._build_info,
            "buildinfo": self._build_info,
            "endSessions": lambda db, body, conn: {"ok": 1.0},
            "getLog": self._get_log,
            "getCmdLineOpts": lambda db, body, conn: {"argv": sys.argv, "parsed": self.opts.as_config(), "ok": 1.0},
            "serverStatus": self._server_status,
            "shutdown": self._shutdown_command,
        }

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Start, serve until asked to stop, shut down.

        Returns
        -------
        int
            The exit status, mongod's for the same outcome.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        mlog.log_starting(self.log, self.opts, build_info=BUILD_INFO)
        try:
            self._write_pid_file()
            self._listen()
            self._acquire_dbpath()
            self._open_user_store()
        except _StartupFailure as failure:
            return self._exit_after_failure(failure.exit_code)
        delay = float(os.environ.get(STARTUP_DELAY_ENV, "0"))
        # Stands for storage-engine recovery: sockets are already bound, but
        # nothing is accepted yet, exactly the window a readiness check must
        # not mistake for "up".
        if not self._shutdown_requested_within(delay):
            self._serve()
        return self._clean_shutdown()

    def _write_pid_file(self) -> None:
        path = self.opts.pidfilepath
        if path is None:
            return
        try:
            with open(path, "w", encoding="ascii") as handle:
                handle.write(f"{os.getpid()}\n")
        except OSError as exc:
            self.log.write(
                "E",
                "CONTROL",
                23312,
                "initandlisten",
                "ERROR: Cannot write pid file to {path_string}: {errAndStr_second}",
                {"path_string": path, "errAndStr_second": exc.strerror},
            )
            raise _StartupFailure(cli.EXIT_FAILURE) from None

    def _listen(self) -> None:
        try:
            addresses = cli.resolve_bind_addresses(self.opts)
            for family, address in addresses:
                self._listeners.append(self._tcp_listener(family, address))
            if not self.opts.nounixsocket:
                self._listeners.append(self._unix_listener())
        except (cli.BindError, OSError) as exc:
            errmsg = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
            mlog.log_listener_error(self.log, errmsg)
            raise _StartupFailure(cli.EXIT_NET_ERROR) from None

    def _tcp_listener(self, family: socket.AddressFamily, address: str) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # mongod sets SO_REUSEADDR: a restart must not wait out TIME_WAIT,
            # while a port with a live listener still fails with EADDRINUSE.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _unix_listener(self) -> socket.socket:
        path = os.path.join(self.opts.unixSocketPrefix, f"mongodb-{self.port}.sock")
        # As mongod: a socket file left by a killed server is simply replaced.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o700)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._unix_socket_path = path
        return sock

    def _acquire_dbpath(self) -> None:
        dbpath = self.opts.dbpath
        if not os.path.exists(dbpath):
            mlog.log_initandlisten_failure(self.log, mlog.nonexistent_path_error(dbpath))
            raise _StartupFailure(cli.EXIT_UNCAUGHT)
        lock_path = os.path.join(dbpath, "mongod.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            mlog.log_initandlisten_failure(
                self.log, f"IllegalOperation: Unable to create/open the lock file: {lock_path} ({exc.strerror})."
            )
            raise _StartupFailure(cli.EXIT_UNCAUGHT) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            mlog.log_initandlisten_failure(
                self.log,
                f"DBPathInUse: Unable to lock the lock file: {lock_path} (Resource temporarily unavailable). "
                f"Another mongod instance is already running on the {dbpath} directory",
            )
            raise _StartupFailure(cli.EXIT_UNCAUGHT) from None
        self._lock_fd = fd
        if os.fstat(fd).st_size > 0:
            self.log.write(
                "W",
                "STORAGE",
                22271,
                "initandlisten",
                "Detected unclean shutdown - Lock file is not empty",
                {"lockFile": lock_path},
            )
        try:
            os.unlink(os.path.join(dbpath, CLEAN_SHUTDOWN_MARKER))
        except FileNotFoundError:
            pass
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)

    def _open_user_store(self) -> None:
        try:
            store = security.UserStore(self.opts.dbpath)
        except (OSError, ValueError) as exc:
            mlog.log_initandlisten_failure(self.log, f"FailedToParse: cannot read the users: {exc}")
            raise _StartupFailure(cli.EXIT_UNCAUGHT) from None
        self.access_control = security.AccessControl(store, auth=self.opts.auth)

    def _shutdown_requested_within(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as shutdown is requested."""
        deadline = time.monotonic() + seconds
        while self._shutdown_reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([self._wake_r], [], [], remaining)
        return True

    def _serve(self) -> None:
        for sock in self._listeners:
            address = sock.getsockname()
            shown = address if isinstance(address, str) else address[0]
            self.log.write("I", "NETWORK", 23015, "listener", "Listening on", {"address": shown})
        ssl_state = "off" if self.ssl_context is None else "on"
        self.log.write(
            "I", "NETWORK", 23016, "listener", "Waiting for connections", {"port": self.port, "ssl": ssl_state}
        )
        while self._shutdown_reason is None:
            readable, _, _ = select.select([*self._listeners, self._wake_r], [], [])
            for sock in readable:
                if sock is not self._wake_r:
                    self._accept(sock)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            remote = f"{address[0]}:{address[1]}"
        else:
            remote = "anonymous unix socket"
        conn = _Connection(sock, next(self._connection_ids), remote, address)
        with self._connections_lock:
            self._connections[conn.id] = conn
            self._total_connections += 1
            current = len(self._connections)
        if not self.opts.quiet:
            self.log.write(
                "I",
                "NETWORK",
                22943,
                "listener",
                "Connection accepted",
                {"remote": remote, "connectionId": conn.id, "connectionCount": current},
            )
        threading.Thread(target=self._session, args=(conn,), name=f"conn{conn.id}", daemon=True).start()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # mongod handles SIGTERM/SIGINT on a thread of its own with every other
        # thread blocking them, and that thread ends once shutdown begins: a
        # second signal (Slurm's, and the job script's forwarded copy) stays
        # pending and harmless. Ignoring them from here on gives the same
        # outcome; Python would otherwise restore SIG_DFL while finalising and
        # a late copy would end a clean shutdown as "killed by SIGTERM" (143).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Only record and wake the main loop: logging here could deadlock on
        # a lock the interrupted main thread already holds.
        self._request_shutdown(
            signal.Signals(signum).name, "SignalHandler", {"signal": signum, "error": _SIGNAL_TEXT[signum]}
        )

    def _request_shutdown(self, reason: str, ctx: str, attr: dict[str, Any]) -> None:
        if self._shutdown_reason is None:
            self._shutdown_ctx = ctx
            self._shutdown_attr = attr
            self._shutdown_reason = reason
            os.write(self._wake_w, b"!")

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        if self._unix_socket_path is not None:
            try:
                os.unlink(self._unix_socket_path)
            except FileNotFoundError:
                pass
            self._unix_socket_path = None

    def _exit_after_failure(self, code: int) -> int:
        self._close_listeners()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        mlog.log_exit(self.log, code)
        self.log.close()
        return code

    def _clean_shutdown(self) -> int:
        reason = self._shutdown_reason
        ctx = self._shutdown_ctx
        if reason == "shutdown-command":
            self.log.write("I", "COMMAND", 4695400, ctx, "Terminating via shutdown command", self._shutdown_attr)
        else:
            self.log.write("I", "CONTROL", 23377, ctx, "Received signal", self._shutdown_attr)
        self.log.write("I", "NETWORK", 20562, ctx, "Shutdown: going to close listening sockets")
        self._close_listeners()
        with self._connections_lock:
            connections = list(self._connections.values())
        for conn in connections:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        marker = os.path.join(self.opts.dbpath, CLEAN_SHUTDOWN_MARKER)
        with open(marker + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "pid": os.getpid(),
                    "signal": reason,
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                },
                handle,
            )
        os.replace(marker + ".tmp", marker)
        self.log.write("I", "STORAGE", 22279, ctx, "shutdown: removing fs lock...")
        # mongod empties the lock file rather than deleting it; "empty" is
        # what tells the next start that this shutdown was clean.
        os.ftruncate(self._lock_fd, 0)
        os.fsync(self._lock_fd)
        os.close(self._lock_fd)
        self._lock_fd = None
        self.log.write("I", "-", 4784931, ctx, "mongod shutdown complete")
        mlog.log_exit(self.log, cli.EXIT_CLEAN, ctx)
        self.log.close()
        return cli.EXIT_CLEAN

    # ------------------------------------------------------------------ wire protocol

    def _session(self, conn: _Connection) -> None:
        """Serve one connection until the client or the server closes it."""
        try:
            if self._secure(conn):
                while self._serve_one_message(conn):
                    pass
        except (OSError, BSONError, struct.error, ValueError):
            # A broken client or message: mongod ends such a connection too.
            pass
        finally:
            conn.sock.close()
            with self._connections_lock:
                self._connections.pop(conn.id, None)
                current = len(self._connections)
            if not self.opts.quiet and self._shutdown_reason is None:
                self.log.write(
                    "I",
                    "NETWORK",
                    22944,
                    f"conn{conn.id}",
                    "Connection ended",
                    {"remote": conn.remote, "connectionId": conn.id, "connectionCount": current},
                )

    def _secure(self, conn: _Connection) -> bool:
        """The connection's TLS handshake (with TLS on) and access state; False if it must close."""
        certificate = None
        if self.ssl_context is not None:
            try:
                # On this connection's own thread: a slow or silent client holds up no one else.
                conn.sock = self.ssl_context.wrap_socket(conn.sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                error = {
                    "code": 141,
                    "codeName": "SSLHandshakeFailed",
                    "errmsg": getattr(exc, "reason", None) or str(exc),
                }
                self.log.write(
                    "I",
                    "NETWORK",
                    22988,
                    f"conn{conn.id}",
                    "Error receiving request from client. Ending connection from remote",
                    {"error": error, "remote": conn.remote, "connectionId": conn.id},
                )
                return False
            certificate = conn.sock.getpeercert()

        def log(severity: str, log_id: int, msg: str, attr: dict[str, Any]) -> None:
            self.log.write(severity, "ACCESS", log_id, f"conn{conn.id}", msg, attr)

        conn.access = self.access_control.session(conn.peer, certificate, log)
        return True

    def _serve_one_message(self, conn: _Connection) -> bool:
        """Read, answer one message; False when the connection should close."""
        header = _recv_exact(conn.sock, _HEADER.size)
        if header is None:
            return False
        length, request_id, _, opcode = _HEADER.unpack(header)
        if not _HEADER.size <= length <= MAX_MESSAGE_SIZE:
            return False
        payload = _recv_exact(conn.sock, length - _HEADER.size)
        if payload is None:
            return False
        if opcode == OP_MSG:
            return self._handle_msg(conn, request_id, payload)
        if opcode == OP_QUERY:
            return self._handle_query(conn, request_id, payload)
        # OP_COMPRESSED is never negotiated (no "compression" in hello) and
        # the legacy opcodes were removed in 6.0: mongod drops the connection.
        return False

    def _handle_msg(self, conn: _Connection, request_id: int, payload: bytes) -> bool:
        flags = struct.unpack_from("<I", payload)[0]
        end = len(payload) - (4 if flags & _MSG_CHECKSUM_PRESENT else 0)
        pos = 4
        body: dict[str, Any] | None = None
        sequences: dict[str, list[dict[str, Any]]] = {}
        while pos < end:
            kind = payload[pos]
            pos += 1
            if kind == 0:
                size = struct.unpack_from("<i", payload, pos)[0]
                body = bson.decode(payload[pos : pos + size])
                pos += size
            elif kind == 1:
                size = struct.unpack_from("<i", payload, pos)[0]
                section_end = pos + size
                name_end = payload.index(b"\0", pos + 4)
                identifier = payload[pos + 4 : name_end].decode()
                sequences[identifier] = bson.decode_all(payload[name_end + 1 : section_end])
                pos = section_end
            else:
                return False
        if body is None:
            return False
        # Document sequences are fields of the command, as mongod reads them.
        body.update(sequences)
        db = body.get("$db")
        if not isinstance(db, str):
            reply = _error("OP_MSG requests require a $db argument", 40571, "Location40571")
        else:
            reply = self._run_command(db, body, conn)
        if reply is None:
            return False
        if not flags & _MSG_MORE_TO_COME:
            encoded = struct.pack("<IB", 0, 0) + bson.encode(reply)
            conn.sock.sendall(
                _HEADER.pack(_HEADER.size + len(encoded), next(_request_ids), request_id, OP_MSG) + encoded
            )
        return True

    def _handle_query(self, conn: _Connection, request_id: int, payload: bytes) -> bool:
        name_end = payload.index(b"\0", 4)
        namespace = payload[4:name_end].decode()
        query_start = name_end + 1 + 8  # skip numberToSkip, numberToReturn
        size = struct.unpack_from("<i", payload, query_start)[0]
        query = bson.decode(payload[query_start : query_start + size])
        if "$query" in query:
            query = query["$query"]
        db, _, collection = namespace.partition(".")
        command = next(iter(query), "")
        if collection == "$cmd" and command in ("isMaster", "ismaster", "hello"):
            reply = self._run_command(db, query, conn)
        else:
            # 5.1+ servers answer OP_QUERY only for the legacy handshake.
            reply = _error(
                f"Unsupported OP_QUERY command: {command}. The client driver may require an upgrade. "
                "For more details see https://dochub.mongodb.org/core/legacy-opcode-removal",
                352,
                "UnsupportedOpQueryCommand",
            )
        document = bson.encode(reply)
        body = struct.pack("<iqii", 8, 0, 0, 1) + document  # flags: AwaitCapable, as mongod
        conn.sock.sendall(_HEADER.pack(_HEADER.size + len(body), next(_request_ids), request_id, OP_REPLY) + body)
        return True

    # ------------------------------------------------------------------ commands

    def _run_command(self, db: str, body: dict[str, Any], conn: _Connection) -> dict[str, Any] | None:
        """The reply to one command (through the access control), or None to close the connection without one."""
        name = next(iter(body), "")

        def execute() -> dict[str, Any] | None:
            handler = self._commands.get(name)
            if handler is None:
                return _error(f"no such command: '{name}'", 59, "CommandNotFound")
            if name in _ADMIN_ONLY and db != "admin":
                return _error(f"{name} may only be run against the admin database.", 13, "Unauthorized")
            return handler(db, body, conn)

        return conn.access.respond(name, db, body, execute)

    def _hello(self, body: dict[str, Any], conn: _Connection, *, legacy: bool) -> dict[str, Any]:
        reply: dict[str, Any] = {}
        if body.get("helloOk"):
            reply["helloOk"] = True
        reply["ismaster" if legacy else "isWritablePrimary"] = True
        if self.opts.replSet is not None:
            reply["setName"] = self.opts.replSet
        # No topologyVersion: drivers then poll instead of streaming, and a
        # server whose state never changes gains nothing from streaming.
        reply.update(
            {
                "maxBsonObjectSize": MAX_BSON_SIZE,
                "maxMessageSizeBytes": MAX_MESSAGE_SIZE,
                "maxWriteBatchSize": MAX_WRITE_BATCH_SIZE,
                "localTime": datetime.datetime.now(datetime.timezone.utc),
                "logicalSessionTimeoutMinutes": 30,
                "connectionId": conn.id,
                "minWireVersion": 0,
                "maxWireVersion": MAX_WIRE_VERSION,
                "readOnly": False,
                "ok": 1.0,
            }
        )
        return reply

    def _build_info(self, db: str, body: dict[str, Any], conn: _Connection) -> dict[str, Any]:
        major, minor, patch = (int(part) for part in cli.MONGODB_VERSION.split("."))
        return {
            "version": VERSION,
            "gitVersion": "fake",
            "modules": [],
            "allocator": "system",
            "versionArray": [major, minor, patch, 0],
            "bits": 64,
            "debug": False,
            "maxBsonObjectSize": MAX_BSON_SIZE,
            "storageEngines": [],
            "ok": 1.0,
        }

    def _get_log(self, db: str, body: dict[str, Any], conn: _Connection) -> dict[str, Any]:
        which = body["getLog"]
        if which == "*":
            return {"names": ["global", "startupWarnings"], "ok": 1.0}
        if which not in ("global", "startupWarnings"):
            return _error(f"No log named '{which}'", 96, "OperationFailed")
        total, lines = self.log.snapshot(which)
        return {"totalLinesWritten": total, "log": lines, "ok": 1.0}

    def _server_status(self, db: str, body: dict[str, Any], conn: _Connection) -> dict[str, Any]:
        uptime = time.monotonic() - self.started
        host = socket.gethostname() if self.port == 27017 else f"{socket.gethostname()}:{self.port}"
        with self._connections_lock:
            connections = {"current": len(self._connections), "totalCreated": self._total_connections}
        return {
            "host": host,
            "version": VERSION,
            "process": "fake_mongod",
            "pid": Int64(os.getpid()),
            "uptime": float(int(uptime)),
            "uptimeMillis": Int64(int(uptime * 1000)),
            "uptimeEstimate": Int64(int(uptime)),
            "localTime": datetime.datetime.now(datetime.timezone.utc),
            "connections": connections,
            "ok": 1.0,
        }

    def _shutdown_command(self, db: str, body: dict[str, Any], conn: _Connection) -> None:
        self._request_shutdown(
            "shutdown-command",
            f"conn{conn.id}",
            {"force": bool(body.get("force", False)), "timeoutSecs": body.get("timeoutSecs", 15)},
        )


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """Exactly ``size`` bytes, or None if the peer closes first."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def main() -> int:
    """Run the fake server with ``sys.argv``; returns the exit status."""
    banner = f"db version v{VERSION}\nBuild Info: {json.dumps(BUILD_INFO, indent=4)}"
    opts = cli.parse_or_exit(sys.argv[1:], version_banner=banner, options=FakeMongodOptions)
    ssl_context = security.server_ssl_context_or_exit(opts)
    return FakeMongod(opts, ssl_context).run()


if __name__ == "__main__":
    sys.exit(main())
