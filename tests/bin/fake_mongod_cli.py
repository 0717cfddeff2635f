"""fake_mongod's command line: the package's mongod options plus those only the tests use.

The package (:mod:`mspass_cluster._mongod_cli`) parses the options the
cluster gives ``mongod``. The fake mongod, which stands in for a real
``mongod`` in the process-handling tests, accepts more of mongod 7.0's
options, so that it can be started as other deployments would start mongod:
the role-dependent default ports of ``--configsvr`` and ``--shardsvr``, a
Unix socket directory, ``--logappend``, ``--quiet`` and the options it only
reports (``--keyFile``, replication, ``--setParameter``: ``getCmdLineOpts``,
``hello``). ``--auth`` and the TLS options are the package's, and enforced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mspass_cluster._mongod_cli import CommandLineError, MongodOptions

#: The wire protocol version of MongoDB 7.0 (``hello.maxWireVersion``).
MAX_WIRE_VERSION = 21


@dataclass
class FakeMongodOptions(MongodOptions):
    """The fake's parsed command line: :class:`MongodOptions` and the options below."""

    VALUE_OPTIONS = {
        **MongodOptions.VALUE_OPTIONS,
        "unixSocketPrefix": (str, False),
        "keyFile": (str, False),
        "replSet": (str, False),
        "setParameter": (str, True),
    }
    SWITCHES = MongodOptions.SWITCHES | {"logappend", "quiet", "configsvr", "shardsvr"}
    USAGE = """\
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
  --keyFile arg                accepted and reported, not read
  --replSet arg                replica set name (reported, no replication)
  --configsvr                  config server role (changes the default port)
  --shardsvr                   shard role (changes the default port)
  --setParameter arg           name=value (repeatable), reported only
  --version                    print the version and exit
  -h [ --help ]                print this help and exit
  --fork                       refused: the stand-ins never daemonise
"""

    logappend: bool = False
    unixSocketPrefix: str = "/tmp"
    quiet: bool = False
    keyFile: str | None = None
    replSet: str | None = None
    configsvr: bool = False
    shardsvr: bool = False
    setParameter: dict[str, str] = field(default_factory=dict)

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
        """The package's configuration document, with the fake's own options added."""
        config = super().as_config()

        def put(section: str, key: str, value: Any) -> None:
            config.setdefault(section, {})[key] = value

        if "unixSocketPrefix" in self.given:
            config.setdefault("net", {}).setdefault("unixDomainSocket", {})["pathPrefix"] = self.unixSocketPrefix
        if self.logappend:
            put("systemLog", "logAppend", True)
        if self.quiet:
            put("systemLog", "quiet", True)
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

    def store(self, name: str, value: Any, shown: str) -> None:
        """As :meth:`MongodOptions.store`; ``--setParameter name=value`` collects into a dict."""
        if name != "setParameter":
            super().store(name, value, shown)
            return
        key, sep, param = value.partition("=")
        if not sep or not key:
            raise CommandLineError(
                f"Error parsing command line: the argument ('{value}') for option '{shown}' is invalid"
            )
        self.setParameter[key] = param
