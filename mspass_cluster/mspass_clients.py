"""MsPASS's side of the Dask clients a cluster hands out.

MsPASS 2.4 reads ensembles on the workers through a database client each
worker keeps in ``worker.data["dbclient"]``. A worker plugin,
``mspasspy.util.db_utils.MongoDBWorker``, puts it there, and only
``mspasspy.client.Client`` registers that plugin. So that
``cluster.get_client()`` alone is enough for every MsPASS read path,
:func:`add_mspass_worker_plugin` registers the same plugin on it, under the
name MsPASS uses (``"mongodb_worker"``): an ``mspasspy.client.Client()``
created afterwards replaces it with its own equivalent one instead of adding
a second, and workers that join later (``scale``, ``adapt``, replacements)
get it too.

A ``mspasspy.client.Client()`` holds a Dask client of its own on the
cluster's scheduler. When the cluster closes, that client would keep trying
to reconnect to a scheduler that is gone, and the next computation would hang
until Dask's timeout; :func:`close_other_clients` closes it first and the
cluster says so.

Nothing here imports ``mspasspy`` unless it is installed.
"""

from __future__ import annotations

import logging

from distributed import client as dask_client_module

__all__ = ["MSPASS_PLUGIN_NAME", "add_mspass_worker_plugin", "mspass_worker_plugin", "close_other_clients"]

logger = logging.getLogger("mspass_cluster")

#: The name ``mspasspy.client.Client`` registers its worker plugin under.
MSPASS_PLUGIN_NAME = "mongodb_worker"
#: The ``worker.data`` key MsPASS's readers look the worker's database client up by.
MSPASS_DBCLIENT_KEY = "dbclient"


class _ClusterDatabase:
    """What ``MongoDBWorker`` asks of a MsPASS client: its database client."""

    def __init__(self, db_client):
        self._db_client = db_client

    def get_database_client(self):
        return self._db_client


def mspass_worker_plugin(db_client):
    """MsPASS's worker plugin giving every worker a client of ``db_client``'s database, or None without mspasspy."""
    try:
        from mspasspy.util.db_utils import MongoDBWorker
    except ImportError:
        return None
    return MongoDBWorker(_ClusterDatabase(db_client), dbclient_key=MSPASS_DBCLIENT_KEY)


def add_mspass_worker_plugin(client, db_client) -> bool:
    """Give every worker of ``client`` MsPASS's per-worker database client.

    Parameters
    ----------
    client : distributed.Client
        A synchronous client of the cluster's scheduler.
    db_client : mspasspy.db.client.DBClient
        The cluster's database client; the workers connect to the same
        connection string.

    Returns
    -------
    bool
        True if the plugin was registered; False when ``mspasspy`` is not
        installed here (then there is nothing to register) or the workers
        could not set it up (logged as a warning: MsPASS's ensemble reads
        will fail on this client).
    """
    plugin = mspass_worker_plugin(db_client)
    if plugin is None:
        return False
    try:
        client.register_plugin(plugin, name=MSPASS_PLUGIN_NAME)
    except Exception as exc:  # a worker's own error (no mspasspy there, unreachable database), re-raised by Dask
        logger.warning(
            "The Dask workers could not set up MsPASS's database plugin (%s: %s); MsPASS's ensemble reads "
            "(read_distributed_data with a list of queries) will fail on get_client(). Check that the workers' "
            "Python has the same mspasspy as this one.",
            type(exc).__name__,
            exc,
        )
        return False
    return True


def close_other_clients(scheduler_address: str, keep=None) -> list[str]:
    """Close this process's Dask clients of ``scheduler_address`` other than ``keep``.

    Such clients, typically the one inside an ``mspasspy.client.Client()``,
    cannot outlive the scheduler: left open they try to reconnect and the
    next computation waits for Dask's timeout.

    Parameters
    ----------
    scheduler_address : str
        The cluster's scheduler address (``tcp://host:port``).
    keep : distributed.Client, optional
        The cluster's own client, closed by the cluster itself.

    Returns
    -------
    list of str
        The ids of the clients it closed.
    """
    # distributed keeps every live Client of the process in this registry
    # (default_client() reads it); there is no public way to list them.
    registry = getattr(dask_client_module, "_global_clients", {})
    closed = []
    for client in list(registry.values()):
        if client is keep or client.status in ("closed", "closing", "newly-created"):
            continue
        if getattr(client.scheduler, "address", None) != scheduler_address:
            continue
        try:
            client.close()
        except Exception as exc:  # a client that cannot close cleanly is closed enough for this purpose
            logger.debug("Closing %r failed: %s", client, exc)
        closed.append(str(client.id))
    return closed
