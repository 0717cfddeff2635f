"""mongod's log, as the embedded database writes its first lines.

The JSON-lines format of mongod 4.4+ (one document a line, to stdout or
``--logpath``), and the lines and exit statuses of the startup and failure
events the package recognises: startup, listener setup (exit 48), a missing
data directory (exit 100), exit. Used by :mod:`mspass_cluster.embedded_db`
before it hands over to nx-27017, and by the tests' fake mongod.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import sys
from typing import Any, TextIO

from ._mongod_cli import EXIT_FAILURE, MongodOptions


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


class MongodLog:
    """mongod's structured log: one JSON document a line, to stdout or a file.

    Parameters
    ----------
    path : str or None
        ``--logpath``; None for stdout.
    append : bool, optional
        Append to an existing file (``--logappend``) rather than rename it aside.

    Raises
    ------
    OSError
        When the log file cannot be opened (mongod then exits with status 1).
    """

    def __init__(self, path: str | None, *, append: bool = False):
        self._stream: TextIO
        if path is None:
            self._stream = sys.stdout
            self._owned = False
            return
        if not append and os.path.exists(path):
            # mongod's default logRotate=rename: the previous run's log is
            # kept beside the new one rather than overwritten.
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
            os.replace(path, f"{path}.{stamp}")
        self._stream = open(path, "a", encoding="utf-8")
        self._owned = True

    def write(
        self, severity: str, component: str, log_id: int, ctx: str, msg: str, attr: dict[str, Any] | None = None
    ) -> str:
        """Write and flush one line; returns it (without newline).

        Parameters
        ----------
        severity : str
            ``I``, ``W``, ``E`` or ``F``.
        component : str
            ``CONTROL``, ``NETWORK``, ``STORAGE``, ...
        log_id : int
            mongod's numeric id of this message, where known.
        ctx : str
            Thread name (``initandlisten``, ``listener``, ``conn12``, ...).
        msg : str
            The constant message text.
        attr : dict, optional
            The message's attributes.
        """
        record: dict[str, Any] = {
            "t": {"$date": _now()},
            "s": severity,
            "c": component,
            "id": log_id,
            "ctx": ctx,
            "msg": msg,
        }
        if attr:
            record["attr"] = attr
        line = json.dumps(record, separators=(",", ":"), default=str)
        self._stream.write(line + "\n")
        self._stream.flush()
        return line

    def close(self) -> None:
        """Flush, and close the log file if one was opened."""
        self._stream.flush()
        if self._owned:
            self._stream.close()


def open_log_or_exit(path: str | None, *, append: bool = False) -> MongodLog:
    """Open the log as mongod does at global initialisation, or exit with status 1.

    Parameters are those of :class:`MongodLog`.
    """
    try:
        return MongodLog(path, append=append)
    except OSError as exc:
        print(f"Failed global initialization: FileNotOpen: Failed to open {path}: {exc.strerror}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)


def log_starting(log: MongodLog, opts: MongodOptions, *, build_info: dict[str, Any]) -> None:
    """mongod's first startup lines: who, where, which build, which options.

    Parameters
    ----------
    log : MongodLog
        Or anything with its ``write`` method.
    opts : MongodOptions
        The parsed command line.
    build_info : dict
        The ``Build Info`` line's document; it names the server behind the command line.
    """
    log.write(
        "I",
        "CONTROL",
        4615611,
        "initandlisten",
        "MongoDB starting",
        {
            "pid": os.getpid(),
            "port": opts.effective_port,
            "dbPath": opts.dbpath,
            "architecture": "64-bit",
            "host": socket.gethostname(),
        },
    )
    log.write("I", "CONTROL", 23403, "initandlisten", "Build Info", {"buildInfo": build_info})
    log.write(
        "I",
        "CONTROL",
        51765,
        "initandlisten",
        "Operating System",
        {"os": {"name": platform.system(), "version": platform.release()}},
    )
    log.write("I", "CONTROL", 21951, "initandlisten", "Options set by command line", {"options": opts.as_config()})


def log_listener_error(log: MongodLog, errmsg: str) -> None:
    """What mongod logs when it cannot listen (it then exits with status 48)."""
    error = {"code": 9001, "codeName": "SocketException", "errmsg": errmsg}
    log.write("E", "NETWORK", 23024, "initandlisten", "Failed to set up listener", {"error": error})
    log.write("E", "CONTROL", 20568, "initandlisten", "Error setting up listener", {"error": error})


def log_initandlisten_failure(log: MongodLog, error: str) -> None:
    """What mongod logs for an exception during startup (it then exits with status 100).

    Parameters
    ----------
    error : str
        ``<CodeName>: <reason>``, e.g. ``NonExistentPath: Data directory ...``.
    """
    log.write("E", "CONTROL", 20557, "initandlisten", "DBException in initAndListen, terminating", {"error": error})


def nonexistent_path_error(dbpath: str) -> str:
    """mongod's error for a missing ``--dbpath``."""
    return (
        f"NonExistentPath: Data directory {dbpath} not found. Create the missing directory or specify "
        "another path using (1) the --dbpath command line option, or (2) by adding the 'storage.dbPath' "
        "option in the configuration file."
    )


def log_exit(log: MongodLog, code: int, ctx: str = "initandlisten") -> None:
    """mongod's last two lines before it exits with ``code``."""
    log.write("I", "CONTROL", 20565, ctx, "Now exiting")
    log.write("I", "CONTROL", 23138, ctx, "Shutting down", {"exitCode": code})
