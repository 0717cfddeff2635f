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
module ``exec``\ s nx-27017), so SIGTERM reaches the server itself; data
written through pymongo (CRUD, GridFS) persists in ``--dbpath`` across
restarts.

Not faithful -- never use it to test administrative behaviour:

* Administrative commands only pretend (nx-27017 answers ok to anything).
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
* SIGTERM and SIGINT stop it with status 0; no authentication, replication
  or sharding; one request at a time, so no performance conclusions.
* ``--wiredTigerCacheSizeGB`` and ``--nounixsocket`` are accepted and ignored.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from importlib import metadata

from . import _mongod_cli as cli
from . import _mongod_log as mlog

NX_DISTRIBUTION = "nx-27017"
NX_CONSOLE_SCRIPT = "nx-27017"

# Run in the exec'd interpreter: resolve "module:function" (argv[1]) and call
# it with nx-27017's own arguments, as its console script would.
_BOOTSTRAP = (
    "import pkgutil, sys; main = pkgutil.resolve_name(sys.argv.pop(1)); "
    f"sys.argv[0] = {NX_CONSOLE_SCRIPT!r}; sys.exit(main())"
)


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


def main() -> int:
    """Check the command line and ``exec`` nx-27017; returns only on failure."""
    nx_version = metadata.version(NX_DISTRIBUTION)
    build_info = {
        "version": cli.MONGODB_VERSION,
        "standIn": f"nx-27017 {nx_version}, MongoDB wire protocol over SQLite",
    }
    opts = cli.parse_or_exit(
        sys.argv[1:],
        version_banner=f"db version v{cli.MONGODB_VERSION}\nstand-in: nx-27017 {nx_version} (MongoDB wire protocol over SQLite)",
    )
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
        {"entryPoint": entry_point.value, "args": nx_args},
    )
    # exec does not flush Python's buffers: whatever is not written now is lost.
    log.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", _BOOTSTRAP, entry_point.value, *nx_args])


if __name__ == "__main__":
    sys.exit(main())
