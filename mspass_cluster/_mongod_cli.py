"""The ``mongod`` command line and startup log, shared by the stand-ins for mongod.

Used by :mod:`mspass_cluster.embedded_db` (nx-27017 behind mongod's command
line: the local backend's database when no mongod is installed, and the
tests' data-path stand-in) and by the tests' ``tests/bin/fake_mongod.py``
(process handling). Neither is a MongoDB server.

What is faithful to ``mongod`` 7.0: the option names the package and its
users pass (both ``--opt value`` and ``--opt=value``, and the single-dash
``-opt value`` that mongod's option parser also accepts), its messages and
exit statuses for command-line errors (exit 2), the JSON-lines log format of
mongod 4.4+ written to stdout or ``--logpath`` (an existing log file is
renamed aside unless ``--logappend``), the log lines and exit statuses of the
startup failures the package must recognise (listener setup, exit 48;
missing data directory, exit 100) and the default ports of ``--configsvr``
and ``--shardsvr``.

What is not: most mongod options are unknown here and are rejected as
unrecognised; ``--fork`` is refused (mongod would daemonise; the package must
never ask for that); ``--config`` files, ``--ipv6`` and option abbreviations
do not exist; values are validated only for type.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Sequence, TextIO

#: mongod's exit statuses (``mongo::ExitCode``) that the stand-ins use.
EXIT_CLEAN = 0
EXIT_FAILURE = 1
EXIT_BADOPTIONS = 2
EXIT_NET_ERROR = 48
EXIT_UNCAUGHT = 100

#: The MongoDB release whose behaviour the stand-ins imitate.
MONGODB_VERSION = "7.0.0"
MAX_WIRE_VERSION = 21

_HELP_HINT = "try 'mongod --help' for more information"

# Options that take a value: name -> (converter, may repeat).
_VALUE_OPTIONS: dict[str, tuple[Callable[[str], Any], bool]] = {
    "port": (int, False),
    "dbpath": (str, False),
    "bind_ip": (str, False),
    "logpath": (str, False),
    "pidfilepath": (str, False),
    "unixSocketPrefix": (str, False),
    "wiredTigerCacheSizeGB": (float, False),
    "keyFile": (str, False),
    "replSet": (str, False),
    "setParameter": (str, True),
}
_SWITCHES = frozenset({
    "bind_ip_all", "logappend", "nounixsocket", "quiet", "auth",
    "configsvr", "shardsvr", "fork", "version", "help",
})
_SHORT_SWITCHES = {"h": "help"}

_USAGE = """\
Options (a subset of mongod's; this program is a test stand-in):
  --port arg                   port to listen on (27017; 27018 with --shardsvr,
                               27019 with --configsvr)
  --bind_ip arg                comma-separated addresses or hostnames to bind
                               (default 127.0.0.1)
  --bind_ip_all                bind to every IPv4 address
  --dbpath arg                 data directory (default /data/db)
  --logpath arg                log file instead of stdout
  --logappend                  append to --logpath instead of renaming it aside
  --pidfilepath arg            write the process id to this file
  --nounixsocket               no Unix domain socket
  --unixSocketPrefix arg       directory of the Unix domain socket (/tmp)
  --wiredTigerCacheSizeGB arg  accepted and reported, no effect
  --quiet                      fewer log lines (no connection events)
  --auth                       accepted and reported, not enforced
  --keyFile arg                accepted and reported, not read
  --replSet arg                replica set name (reported, no replication)
  --configsvr                  config server role (changes the default port)
  --shardsvr                   shard role (changes the default port)
  --setParameter arg           name=value (repeatable), reported only
  --version                    print the version and exit
  -h [ --help ]                print this help and exit
  --fork                       refused: the stand-ins never daemonise
"""


class CommandLineError(Exception):
    """A command line that mongod would refuse; ``str()`` is mongod's message."""


class BindError(Exception):
    """An address that cannot be listened on; ``str()`` is the socket error text."""


@dataclass
class MongodOptions:
    """Parsed mongod command line.

    Attributes mirror the option names; ``given`` lists the options that
    appeared on the command line (``getCmdLineOpts`` and the startup log
    report only those, as mongod does) and ``argv`` is the raw command line.
    """

    argv: list[str]
    given: list[str] = field(default_factory=list)
    port: int | None = None
    dbpath: str = "/data/db"
    bind_ip: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    bind_ip_all: bool = False
    logpath: str | None = None
    logappend: bool = False
    pidfilepath: str | None = None
    nounixsocket: bool = False
    unixSocketPrefix: str = "/tmp"
    wiredTigerCacheSizeGB: float | None = None
    quiet: bool = False
    auth: bool = False
    keyFile: str | None = None
    replSet: str | None = None
    configsvr: bool = False
    shardsvr: bool = False
    setParameter: dict[str, str] = field(default_factory=dict)
    fork: bool = False
    version: bool = False
    help: bool = False

    @property
    def effective_port(self) -> int:
        """The port mongod listens on, with the role-dependent default."""
        if self.port is not None:
            return self.port
        if self.configsvr:
            return 27019
        if self.shardsvr:
            return 27018
        return 27017

    def as_config(self) -> dict[str, Any]:
        """The options as mongod's nested configuration document (``parsed`` in ``getCmdLineOpts``)."""
        given = set(self.given)
        config: dict[str, dict[str, Any]] = {}

        def put(section: str, key: str, value: Any) -> None:
            config.setdefault(section, {})[key] = value

        if "port" in given:
            put("net", "port", self.port)
        if "bind_ip" in given:
            put("net", "bindIp", ",".join(self.bind_ip))
        if self.bind_ip_all:
            put("net", "bindIpAll", True)
        if self.nounixsocket:
            config.setdefault("net", {})["unixDomainSocket"] = {"enabled": False}
        if "unixSocketPrefix" in given:
            config.setdefault("net", {}).setdefault("unixDomainSocket", {})["pathPrefix"] = self.unixSocketPrefix
        if "dbpath" in given:
            put("storage", "dbPath", self.dbpath)
        if self.wiredTigerCacheSizeGB is not None:
            config.setdefault("storage", {})["wiredTiger"] = {
                "engineConfig": {"cacheSizeGB": self.wiredTigerCacheSizeGB}}
        if self.logpath is not None:
            put("systemLog", "destination", "file")
            put("systemLog", "path", self.logpath)
        if self.logappend:
            put("systemLog", "logAppend", True)
        if self.quiet:
            put("systemLog", "quiet", True)
        if self.pidfilepath is not None:
            put("processManagement", "pidFilePath", self.pidfilepath)
        if self.auth:
            put("security", "authorization", "enabled")
        if self.keyFile is not None:
            put("security", "keyFile", self.keyFile)
        if self.replSet is not None:
            put("replication", "replSet", self.replSet)
        if self.configsvr:
            put("sharding", "clusterRole", "configsvr")
        if self.shardsvr:
            put("sharding", "clusterRole", "shardsvr")
        if self.setParameter:
            config["setParameter"] = dict(self.setParameter)
        return config


def _split(token: str) -> tuple[str, str | None]:
    """``--name=value`` / ``-name value`` token -> (name, inline value or None)."""
    body = token[2:] if token.startswith("--") else token[1:]
    name, sep, value = body.partition("=")
    return name, (value if sep else None)


def parse_command_line(argv: Sequence[str]) -> MongodOptions:
    """Parse mongod options the way mongod's option parser does.

    Parameters
    ----------
    argv : sequence of str
        The arguments after the program name.

    Returns
    -------
    MongodOptions

    Raises
    ------
    CommandLineError
        With mongod's message, for anything mongod would refuse at parse time.
    """
    opts = MongodOptions(argv=list(argv))
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-") or token in ("-", "--"):
            raise CommandLineError(
                "Error parsing command line: too many positional options have been specified on the command line")
        if not token.startswith("--") and token[1:] in _SHORT_SWITCHES:
            name, inline = _SHORT_SWITCHES[token[1:]], None
        else:
            name, inline = _split(token)
        shown = f"--{name}"
        if name in _SWITCHES:
            if inline is not None:
                raise CommandLineError(f"Error parsing command line: option '{shown}' does not take any arguments")
            setattr(opts, name, True)
        elif name in _VALUE_OPTIONS:
            convert, repeatable = _VALUE_OPTIONS[name]
            if inline is None:
                if i >= len(tokens):
                    raise CommandLineError(
                        f"Error parsing command line: the required argument for option '{shown}' is missing")
                inline = tokens[i]
                i += 1
            if name in opts.given and not repeatable:
                raise CommandLineError(
                    f"Error parsing command line: option '{shown}' cannot be specified more than once")
            try:
                value = convert(inline)
            except ValueError:
                raise CommandLineError(
                    f"Error parsing command line: the argument ('{inline}') for option '{shown}' is invalid"
                ) from None
            _store(opts, name, value, shown)
        else:
            raise CommandLineError(f"Error parsing command line: unrecognised option '{token.partition('=')[0]}'")
        if name not in opts.given:
            opts.given.append(name)
    if opts.bind_ip_all and "bind_ip" in opts.given:
        raise CommandLineError("BadValue: net.bindIp and net.bindIpAll are mutually exclusive")
    return opts


def _store(opts: MongodOptions, name: str, value: Any, shown: str) -> None:
    """Validate and keep one option value."""
    if name == "port" and not 0 <= value <= 65535:
        raise CommandLineError(f"BadValue: Invalid value for net.port: {value} is not in range [0, 65535]")
    if name == "bind_ip":
        value = [part.strip() for part in value.split(",") if part.strip()]
    if name == "setParameter":
        key, sep, param = value.partition("=")
        if not sep or not key:
            raise CommandLineError(
                f"Error parsing command line: the argument ('{value}') for option '{shown}' is invalid")
        opts.setParameter[key] = param
        return
    setattr(opts, name, value)


def parse_or_exit(argv: Sequence[str], *, version_banner: str) -> MongodOptions:
    """Parse the command line, or print and exit as mongod does.

    Parameters
    ----------
    argv : sequence of str
        The arguments after the program name.
    version_banner : str
        Printed for ``--version`` (mongod prints ``db version vX.Y.Z`` first).

    Returns
    -------
    MongodOptions
        Only for a command line that asks the program to run.
    """
    try:
        opts = parse_command_line(argv)
    except CommandLineError as exc:
        _fail(str(exc))
    if opts.help:
        print(_USAGE, end="")
        sys.exit(EXIT_CLEAN)
    if opts.version:
        print(version_banner)
        sys.exit(EXIT_CLEAN)
    if opts.fork:
        # mongod would daemonise; a stand-in that did so would hide the very
        # process the package has to supervise, so it refuses loudly instead.
        _fail("--fork is not supported by this mongod stand-in: it must run in the foreground")
    return opts


def _fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    print(_HELP_HINT, file=sys.stderr)
    sys.exit(EXIT_BADOPTIONS)


def resolve_bind_addresses(opts: MongodOptions) -> list[tuple[socket.AddressFamily, str]]:
    """The addresses mongod would listen on, deduplicated, in command-line order.

    Hostnames resolve to their IPv4 addresses (mongod uses IPv6 only with
    ``--ipv6``); IPv6 literals are kept as given.

    Raises
    ------
    BindError
        For a name that does not resolve.
    """
    if opts.bind_ip_all:
        return [(socket.AF_INET, "0.0.0.0")]
    resolved: list[tuple[socket.AddressFamily, str]] = []
    for entry in opts.bind_ip:
        try:
            literal = ipaddress.ip_address(entry)
        except ValueError:
            try:
                infos = socket.getaddrinfo(entry, None, socket.AF_INET, socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise BindError(f"getaddrinfo(\"{entry}\") failed: {exc.strerror}") from None
            candidates = [(socket.AF_INET, info[4][0]) for info in infos]
        else:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            candidates = [(family, str(literal))]
        resolved.extend(c for c in candidates if c not in resolved)
    return resolved


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


class MongodLog:
    """mongod's structured log: one JSON document a line, to stdout or ``--logpath``.

    Parameters
    ----------
    opts : MongodOptions
        ``logpath`` and ``logappend`` choose the destination.

    Raises
    ------
    OSError
        When the log file cannot be opened (mongod then exits with status 1).
    """

    def __init__(self, opts: MongodOptions):
        self._stream: TextIO
        if opts.logpath is None:
            self._stream = sys.stdout
            self._owned = False
            return
        if not opts.logappend and os.path.exists(opts.logpath):
            # mongod's default logRotate=rename: the previous run's log is
            # kept beside the new one rather than overwritten.
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
            os.replace(opts.logpath, f"{opts.logpath}.{stamp}")
        self._stream = open(opts.logpath, "a", encoding="utf-8")
        self._owned = True

    def write(self, severity: str, component: str, log_id: int, ctx: str, msg: str,
              attr: dict[str, Any] | None = None) -> str:
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
        record: dict[str, Any] = {"t": {"$date": _now()}, "s": severity, "c": component,
                                  "id": log_id, "ctx": ctx, "msg": msg}
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


def open_log_or_exit(opts: MongodOptions) -> MongodLog:
    """Open the log as mongod does at global initialisation, or exit with status 1."""
    try:
        return MongodLog(opts)
    except OSError as exc:
        print(f"Failed global initialization: FileNotOpen: Failed to open {opts.logpath}: {exc.strerror}",
              file=sys.stderr)
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
        The ``Build Info`` line's document; it names the stand-in.
    """
    log.write("I", "CONTROL", 4615611, "initandlisten", "MongoDB starting", {
        "pid": os.getpid(), "port": opts.effective_port, "dbPath": opts.dbpath,
        "architecture": "64-bit", "host": socket.gethostname()})
    log.write("I", "CONTROL", 23403, "initandlisten", "Build Info", {"buildInfo": build_info})
    log.write("I", "CONTROL", 51765, "initandlisten", "Operating System",
              {"os": {"name": platform.system(), "version": platform.release()}})
    log.write("I", "CONTROL", 21951, "initandlisten", "Options set by command line",
              {"options": opts.as_config()})


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
    log.write("E", "CONTROL", 20557, "initandlisten", "DBException in initAndListen, terminating",
              {"error": error})


def nonexistent_path_error(dbpath: str) -> str:
    """mongod's error for a missing ``--dbpath``."""
    return (f"NonExistentPath: Data directory {dbpath} not found. Create the missing directory or specify "
            "another path using (1) the --dbpath command line option, or (2) by adding the 'storage.dbPath' "
            "option in the configuration file.")


def log_exit(log: MongodLog, code: int, ctx: str = "initandlisten") -> None:
    """mongod's last two lines before it exits with ``code``."""
    log.write("I", "CONTROL", 20565, ctx, "Now exiting")
    log.write("I", "CONTROL", 23138, ctx, "Shutting down", {"exitCode": code})
