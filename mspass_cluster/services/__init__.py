"""The roles a cluster runs, one service each, and the supervisor that watches their jobs.

* :class:`DatabaseService` — the database job: readiness by ``ping``, failures explained, clean stop;
* :class:`ShardedDatabaseService` (in :mod:`.sharded`) — ``db_shards``: config server, shards and router;
* :class:`WorkerNodes` (with :class:`WorkerJob`) — the worker nodes: connected workers, sizing, replacement;
* :class:`Supervisor` — start-up wait and the watch loop, reading every job's state;
* :class:`~.attached.AttachedDatabase` (in :mod:`.attached`) — ``database=``: a database the
  cluster uses without owning it (``mspass-cluster db start``), with the database's protocol.

A new role (a ``mongos`` router, config servers, shards, a Jupyter frontend)
is a new service here with its own job, probe, failure hints and stop.
"""

from .database import DB_STOP_TIMEOUT, DatabaseService
from .sharded import ShardedDatabaseService
from .supervisor import Supervisor
from .workers import NodeAdaptive, WorkerJob, WorkerNodes, node_of_worker

__all__ = [
    "DatabaseService",
    "ShardedDatabaseService",
    "WorkerNodes",
    "WorkerJob",
    "NodeAdaptive",
    "node_of_worker",
    "Supervisor",
    "DB_STOP_TIMEOUT",
]
