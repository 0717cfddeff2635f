"""Database clients and the readiness probe.

:class:`DBClient` is a :class:`pymongo.MongoClient` that pickles to its
connection string, as MsPASS's own ``mspasspy.db.client.DBClient`` does, so
it can travel to Dask workers and reconnect there. :func:`get_db_client`
prefers MsPASS's class when ``mspasspy`` is installed.
"""

from __future__ import annotations

import fnmatch
import os

import pymongo
from pymongo.errors import PyMongoError
from pymongo.monitoring import ServerHeartbeatListener

from .dbstorage import DbPathPattern

__all__ = ["DBClient", "get_db_client", "ping", "connection_string", "retire_client", "watch_server"]


def connection_string(host: str, port: int) -> str:
    """``mongodb://host:port/``; credentials will live here too, since MsPASS rebuilds clients from this string alone."""
    return f"mongodb://{host}:{port}/"


class DBClient(pymongo.MongoClient):
    """A MongoClient that pickles to its connection string.

    Parameters
    ----------
    host : str
        A ``mongodb://`` connection string.
    *args, **kwargs
        Passed to :class:`pymongo.MongoClient` and kept for unpickling.
    """

    def __init__(self, host: str, *args, **kwargs):
        self._mspass_host = host
        self._mspass_args = args
        self._mspass_kwargs = kwargs
        super().__init__(host, *args, **kwargs)

    def __reduce__(self):
        return (_rebuild, (type(self), self._mspass_host, self._mspass_args, self._mspass_kwargs))

    def __repr__(self):
        return f"DBClient({self._mspass_host!r})"


def _rebuild(cls, host, args, kwargs):
    return cls(host, *args, **kwargs)


def get_db_client(uri: str):
    """A client for ``uri``: ``mspasspy.db.client.DBClient`` if MsPASS is installed, else :class:`DBClient`."""
    try:
        from mspasspy.db.client import DBClient as MsPASSDBClient
    except ImportError:
        return DBClient(uri)
    return MsPASSDBClient(uri)


def retire_client(client, error: Exception) -> None:
    """Close ``client`` so that its next operation raises ``error`` at once (not pymongo's timeout, nor its
    "Cannot use MongoClient after close").

    For a client whose server moved: pymongo would wait ``serverSelectionTimeoutMS`` (30 s) for the old
    address and then say nothing of where the server went. Every operation of a pymongo 4 client first
    asks for its topology (``MongoClient._get_topology``); the closed client answers ``error`` there. A
    pymongo without that seam only closes it.
    """
    client.close()
    if hasattr(client, "_get_topology"):

        def refuse(*args, **kwargs):
            raise error

        client._get_topology = refuse


class _Alarm(ServerHeartbeatListener):
    def __init__(self, on_failure, on_success=None):
        self.on_failure = on_failure
        self.on_success = on_success

    def started(self, event):
        pass

    def succeeded(self, event):
        if self.on_success is not None:
            self.on_success()

    def failed(self, event):
        self.on_failure()


def watch_server(uri: str, on_failure, on_success=None, every: float = 0.5) -> pymongo.MongoClient:
    """pymongo's own server monitor as an alarm: ``on_failure()`` runs (in pymongo's thread) at each failed heartbeat,
    ``on_success()`` at each answered one.

    A server that dies closes the monitor's connection, so the first
    failure comes within milliseconds, then every ``every`` seconds (0.5 s
    is pymongo's minimum) while it stays away. The heartbeat (``hello``)
    needs no authentication. Close the returned client to stop watching.
    """
    ms = int(every * 1000)
    return pymongo.MongoClient(
        uri,
        directConnection=True,
        heartbeatFrequencyMS=ms,
        connectTimeoutMS=max(ms, 2000),
        event_listeners=[_Alarm(on_failure, on_success)],
    )


def _same_dbpath(theirs: str, ours: str) -> bool:
    if isinstance(ours, DbPathPattern):
        return fnmatch.fnmatchcase(os.path.normpath(theirs), ours)
    return os.path.normpath(theirs) == os.path.normpath(ours)


def ping(uri: str, timeout: float = 1.0, dbpath: str | None = None) -> str | None:
    """Ask the server at ``uri`` for ``ping``, and whether it is the one started on ``dbpath``.

    On a shared node another server (another user's MongoDB, another
    cluster's) may already listen on the port; the cluster's own server then
    fails to start, and an answered ping alone would hand the user someone
    else's database. With ``dbpath``, the server's ``getCmdLineOpts`` must
    report that data directory; a server that does not tell (no such
    command, or not allowed) is taken at its word. A node-local server's
    ``dbpath`` is a :class:`~mspass_cluster.dbstorage.DbPathPattern`, matched
    with :func:`fnmatch.fnmatchcase` (its directory is the node's own).

    Returns
    -------
    str or None
        None when it answered (and is the expected server); otherwise why not, in one line.
    """
    ms = max(int(timeout * 1000), 1)
    client = pymongo.MongoClient(
        uri, directConnection=True, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms * 5
    )
    try:
        client.admin.command("ping")
        if dbpath is None:
            return None
        try:
            parsed = client.admin.command("getCmdLineOpts").get("parsed") or {}
        except PyMongoError:
            return None
        theirs = (parsed.get("storage") or {}).get("dbPath")
        if theirs and not _same_dbpath(str(theirs), dbpath):
            return f"a server that is not this cluster's answers there (its dbPath is {theirs}, not {dbpath})"
        return None
    except PyMongoError as exc:
        # pymongo appends its timeouts and topology to the message; the first clause says why.
        return f"{type(exc).__name__}: {str(exc).splitlines()[0].split(' (configured timeouts')[0][:160]}"
    finally:
        client.close()
