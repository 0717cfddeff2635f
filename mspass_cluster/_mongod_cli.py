"""The ``mongod`` command line of the embedded database.

:mod:`mspass_cluster.embedded_db` runs nx-27017 behind mongod's command line,
so that the cluster starts it exactly as it starts ``mongod``. This module is
that command line: the options :func:`mspass_cluster.roles.db_argv` emits
(``--port``, ``--dbpath``, ``--bind_ip`` or ``--bind_ip_all``,
``--nounixsocket``, ``--wiredTigerCacheSizeGB``, and with security on
``--auth``, ``--tlsMode``, ``--tlsCertificateKeyFile``, ``--tlsCAFile``, plus
for a sharded database's members ``--clusterAuthMode x509``,
``--tlsClusterFile`` and ``--tlsAllowInvalidHostnames``), the
two that place nx-27017's own files (``--logpath``, ``--pidfilepath``),
``--version`` and ``--help``. Its log lines are in
:mod:`mspass_cluster._mongod_log`; what the security options do is in
:mod:`mspass_cluster._mongod_security`.

What is faithful to ``mongod`` 7.0: the spellings ``--opt value``,
``--opt=value`` and ``-opt value``; the messages and exit status (2) of
command-line errors, an unrecognised option included; the addresses
``--bind_ip`` and ``--bind_ip_all`` mean; the TLS option checks (an
unsupported ``--tlsMode``, TLS files without ``--tlsMode``, a TLS mode without
``--tlsCertificateKeyFile``).

``--replSet``, ``--configsvr`` and ``--shardsvr`` make the server a
one-member replica set of a sharded cluster: :mod:`mspass_cluster._mongod_replset`
answers the replica-set and sharding commands.

What is not: every other mongod option is refused as unrecognised, ``--fork``
and ``--tlsMode allowTLS``/``preferTLS`` with messages of their own (the
package must never daemonise its database, and it never mixes TLS with plain
connections); no ``--config`` files, ``--ipv6`` or option abbreviations;
values are validated only for type and range; these TLS option errors exit
with status 2 (mongod reports some of them as a failed global initialisation).

The tests' fake mongod (``tests/bin/fake_mongod_cli.py``) subclasses
:class:`MongodOptions` with the options only it needs.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NoReturn, Sequence

#: mongod's exit statuses (``mongo::ExitCode``).
EXIT_CLEAN = 0
EXIT_FAILURE = 1
EXIT_BADOPTIONS = 2
EXIT_NET_ERROR = 48
EXIT_UNCAUGHT = 100

#: The MongoDB release whose command line and log the embedded database imitates.
MONGODB_VERSION = "7.0.0"

_HELP_HINT = "try 'mongod --help' for more information"

#: ``--tlsMode`` values mongod knows, and the ones the stand-ins serve.
TLS_MODES = ("disabled", "allowTLS", "preferTLS", "requireTLS")
SUPPORTED_TLS_MODES = ("disabled", "requireTLS")
_TLS_FILE_OPTIONS = ("tlsCertificateKeyFile", "tlsCAFile", "tlsClusterFile")
#: ``--clusterAuthMode`` values mongod knows; the stand-ins serve ``x509`` (membership by certificate).
CLUSTER_AUTH_MODES = ("keyFile", "sendKeyFile", "sendX509", "x509")


class CommandLineError(Exception):
    """A command line that mongod would refuse; ``str()`` is mongod's message."""


class BindError(Exception):
    """An address that cannot be listened on; ``str()`` is the socket error text."""


@dataclass
class MongodOptions:
    """A parsed mongod command line.

    Attributes mirror the option names; ``given`` lists the options that
    appeared on the command line (the startup log reports only those, as
    mongod does) and ``argv`` is the raw command line. The class attributes
    in capitals are the option table :func:`parse_command_line` reads.
    """

    #: Options that take a value: name -> (converter, may repeat).
    VALUE_OPTIONS: ClassVar[dict[str, tuple[Callable[[str], Any], bool]]] = {
        "port": (int, False),
        "dbpath": (str, False),
        "bind_ip": (str, False),
        "logpath": (str, False),
        "pidfilepath": (str, False),
        "wiredTigerCacheSizeGB": (float, False),
        "tlsMode": (str, False),
        "tlsCertificateKeyFile": (str, False),
        "tlsCAFile": (str, False),
        "tlsClusterFile": (str, False),
        "clusterAuthMode": (str, False),
        "replSet": (str, False),
    }
    #: Options without a value.
    SWITCHES: ClassVar[frozenset[str]] = frozenset(
        {
            "bind_ip_all",
            "nounixsocket",
            "auth",
            "fork",
            "version",
            "help",
            "configsvr",
            "shardsvr",
            "tlsAllowInvalidHostnames",
        }
    )
    SHORT_SWITCHES: ClassVar[dict[str, str]] = {"h": "help"}
    USAGE: ClassVar[str] = """\
Options (the subset of mongod's that the embedded nx-27017 database honours):
  --port arg                   port to listen on (default 27017)
  --bind_ip arg                comma-separated addresses or hostnames to bind
                               (default 127.0.0.1)
  --bind_ip_all                bind to every IPv4 address
  --dbpath arg                 data directory (default /data/db)
  --logpath arg                log file instead of stdout
  --pidfilepath arg            write the process id to this file
  --nounixsocket               no Unix domain socket (there never is one)
  --wiredTigerCacheSizeGB arg  accepted, no effect
  --auth                       run with access control: only MONGODB-X509
                               users (in $external); the first one through the
                               localhost exception
  --tlsMode arg                disabled (default) or requireTLS: every
                               connection must be TLS with a client
                               certificate signed by --tlsCAFile
                               (allowTLS and preferTLS are refused)
  --tlsCertificateKeyFile arg  PEM file with the server's certificate and key
  --tlsCAFile arg              PEM file of the CA that signs client
                               certificates
  --tlsClusterFile arg         PEM file this member presents to the other
                               members (x.509 membership)
  --clusterAuthMode arg        x509: members authenticate with certificates
                               whose O/OU/DC match this server's member
                               certificate (keyFile modes are refused)
  --tlsAllowInvalidHostnames   do not check other members' host names
  --replSet arg                replica set name (see _mongod_replset: the
                               replica-set and sharding commands)
  --configsvr                  a config server of a sharded cluster
  --shardsvr                   a shard of a sharded cluster
  --version                    print the version and exit
  -h [ --help ]                print this help and exit
"""

    argv: list[str]
    given: list[str] = field(default_factory=list)
    port: int | None = None
    dbpath: str = "/data/db"
    bind_ip: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    bind_ip_all: bool = False
    logpath: str | None = None
    pidfilepath: str | None = None
    nounixsocket: bool = False
    wiredTigerCacheSizeGB: float | None = None
    auth: bool = False
    tlsMode: str = "disabled"
    tlsCertificateKeyFile: str | None = None
    tlsCAFile: str | None = None
    tlsClusterFile: str | None = None
    clusterAuthMode: str | None = None
    tlsAllowInvalidHostnames: bool = False
    replSet: str | None = None
    configsvr: bool = False
    shardsvr: bool = False
    fork: bool = False
    version: bool = False
    help: bool = False

    @property
    def effective_port(self) -> int:
        """The port mongod listens on."""
        return 27017 if self.port is None else self.port

    def as_config(self) -> dict[str, Any]:
        """The options as mongod's nested configuration document (``Options set by command line``)."""
        given = set(self.given)
        config: dict[str, dict[str, Any]] = {}
        if "port" in given:
            config.setdefault("net", {})["port"] = self.port
        if "bind_ip" in given:
            config.setdefault("net", {})["bindIp"] = ",".join(self.bind_ip)
        if self.bind_ip_all:
            config.setdefault("net", {})["bindIpAll"] = True
        if self.nounixsocket:
            config.setdefault("net", {})["unixDomainSocket"] = {"enabled": False}
        if "dbpath" in given:
            config.setdefault("storage", {})["dbPath"] = self.dbpath
        if self.wiredTigerCacheSizeGB is not None:
            config.setdefault("storage", {})["wiredTiger"] = {
                "engineConfig": {"cacheSizeGB": self.wiredTigerCacheSizeGB}
            }
        if self.logpath is not None:
            config.setdefault("systemLog", {}).update(destination="file", path=self.logpath)
        if self.pidfilepath is not None:
            config.setdefault("processManagement", {})["pidFilePath"] = self.pidfilepath
        if self.auth:
            config.setdefault("security", {})["authorization"] = "enabled"
        tls = {
            key: getattr(self, name)
            for key, name in (
                ("mode", "tlsMode"),
                ("certificateKeyFile", "tlsCertificateKeyFile"),
                ("CAFile", "tlsCAFile"),
                ("clusterFile", "tlsClusterFile"),
            )
            if name in given
        }
        if self.tlsAllowInvalidHostnames:
            tls["allowInvalidHostnames"] = True
        if tls:
            config.setdefault("net", {})["tls"] = tls
        if self.clusterAuthMode is not None:
            config.setdefault("security", {})["clusterAuthMode"] = self.clusterAuthMode
        return config

    def store(self, name: str, value: Any, shown: str) -> None:
        """Validate and keep one converted option value.

        Raises
        ------
        CommandLineError
            With mongod's message for a value out of range.
        """
        if name == "port" and not 0 <= value <= 65535:
            raise CommandLineError(f"BadValue: Invalid value for net.port: {value} is not in range [0, 65535]")
        if name == "bind_ip":
            value = [part.strip() for part in value.split(",") if part.strip()]
        if name == "tlsMode" and value not in TLS_MODES:
            raise CommandLineError(f"BadValue: unsupported value for tlsMode {value}")
        if name == "clusterAuthMode" and value not in CLUSTER_AUTH_MODES:
            raise CommandLineError(f"BadValue: unsupported value for clusterAuthMode {value}")
        setattr(self, name, value)

    def check(self) -> None:
        """Check the options together, as mongod does once all are parsed.

        Raises
        ------
        CommandLineError
            With mongod's message.
        """
        if self.bind_ip_all and "bind_ip" in self.given:
            raise CommandLineError("BadValue: net.bindIp and net.bindIpAll are mutually exclusive")
        if self.tlsMode == "disabled":
            if any(name in self.given for name in _TLS_FILE_OPTIONS):
                raise CommandLineError(
                    "BadValue: need to enable TLS via the sslMode/tlsMode flag when using TLS configuration parameters"
                )
        elif self.tlsCertificateKeyFile is None:
            raise CommandLineError("BadValue: need tlsCertificateKeyFile or certificateSelector when TLS is enabled")
        if self.clusterAuthMode in ("x509", "sendX509") and self.tlsMode == "disabled":
            raise CommandLineError(
                f"BadValue: clusterAuthMode {self.clusterAuthMode} requires TLS: enable it with --tlsMode"
            )


def _split(token: str) -> tuple[str, str | None]:
    """``--name=value`` / ``-name value`` token -> (name, inline value or None)."""
    body = token[2:] if token.startswith("--") else token[1:]
    name, sep, value = body.partition("=")
    return name, (value if sep else None)


def parse_command_line(argv: Sequence[str], options: type[MongodOptions] = MongodOptions) -> MongodOptions:
    """Parse mongod options the way mongod's option parser does.

    Parameters
    ----------
    argv : sequence of str
        The arguments after the program name.
    options : type, optional
        :class:`MongodOptions` or a subclass; its option table decides what is known.

    Returns
    -------
    MongodOptions
        An instance of ``options``.

    Raises
    ------
    CommandLineError
        With mongod's message, for anything mongod would refuse at parse time.

    Examples
    --------
    >>> opts = parse_command_line(["--port=27018", "--bind_ip_all", "--nounixsocket"])
    >>> opts.effective_port, opts.bind_ip_all, opts.given
    (27018, True, ['port', 'bind_ip_all', 'nounixsocket'])
    >>> parse_command_line(["--master"])
    Traceback (most recent call last):
    ...
    mspass_cluster._mongod_cli.CommandLineError: Error parsing command line: unrecognised option '--master'
    """
    opts = options(argv=list(argv))
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-") or token in ("-", "--"):
            raise CommandLineError(
                "Error parsing command line: too many positional options have been specified on the command line"
            )
        if not token.startswith("--") and token[1:] in opts.SHORT_SWITCHES:
            name, inline = opts.SHORT_SWITCHES[token[1:]], None
        else:
            name, inline = _split(token)
        shown = f"--{name}"
        if name in opts.SWITCHES:
            if inline is not None:
                raise CommandLineError(f"Error parsing command line: option '{shown}' does not take any arguments")
            setattr(opts, name, True)
        elif name in opts.VALUE_OPTIONS:
            convert, repeatable = opts.VALUE_OPTIONS[name]
            if inline is None:
                if i >= len(tokens):
                    raise CommandLineError(
                        f"Error parsing command line: the required argument for option '{shown}' is missing"
                    )
                inline = tokens[i]
                i += 1
            if name in opts.given and not repeatable:
                raise CommandLineError(
                    f"Error parsing command line: option '{shown}' cannot be specified more than once"
                )
            try:
                value = convert(inline)
            except ValueError:
                raise CommandLineError(
                    f"Error parsing command line: the argument ('{inline}') for option '{shown}' is invalid"
                ) from None
            opts.store(name, value, shown)
        else:
            raise CommandLineError(f"Error parsing command line: unrecognised option '{token.partition('=')[0]}'")
        if name not in opts.given:
            opts.given.append(name)
    opts.check()
    return opts


def parse_or_exit(
    argv: Sequence[str], *, version_banner: str, options: type[MongodOptions] = MongodOptions
) -> MongodOptions:
    """Parse the command line, or print and exit as mongod does.

    Parameters
    ----------
    argv : sequence of str
        The arguments after the program name.
    version_banner : str
        Printed for ``--version`` (mongod prints ``db version vX.Y.Z`` first).
    options : type, optional
        As for :func:`parse_command_line`; its ``USAGE`` is the ``--help`` text.

    Returns
    -------
    MongodOptions
        Only for a command line that asks the program to run.
    """
    try:
        opts = parse_command_line(argv, options)
    except CommandLineError as exc:
        _fail(str(exc))
    if opts.help:
        print(opts.USAGE, end="")
        sys.exit(EXIT_CLEAN)
    if opts.version:
        print(version_banner)
        sys.exit(EXIT_CLEAN)
    if opts.fork:
        # mongod would daemonise; a server that did so would hide the very
        # process the package has to supervise, so it refuses loudly instead.
        _fail("--fork is not supported by this mongod stand-in: it must run in the foreground")
    if opts.tlsMode not in SUPPORTED_TLS_MODES:
        # Both would accept plain connections next to TLS ones on the same
        # port; the package never asks for that, so the stand-ins do not
        # pretend to serve it.
        _fail(
            f"--tlsMode {opts.tlsMode} is not supported by this mongod stand-in: use --tlsMode requireTLS (or disabled)"
        )
    if opts.clusterAuthMode not in (None, "x509"):
        # keyFile membership needs SCRAM, which the stand-ins do not serve.
        _fail(
            f"--clusterAuthMode {opts.clusterAuthMode} is not supported by this mongod stand-in: use "
            "--clusterAuthMode x509"
        )
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
                raise BindError(f'getaddrinfo("{entry}") failed: {exc.strerror}') from None
            candidates = [(socket.AF_INET, info[4][0]) for info in infos]
        else:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            candidates = [(family, str(literal))]
        resolved.extend(c for c in candidates if c not in resolved)
    return resolved
