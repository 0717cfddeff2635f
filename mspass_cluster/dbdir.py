"""One cluster per database directory: a marker file that names the cluster using it.

Two servers cannot share one data directory (``mongod`` refuses the second
with ``DBPathInUse``). Two notebooks started in one folder would share
``work_dir`` and so ``db_dir``; the second one learns, before it submits
anything, which cluster holds the directory and how to get out of the way.

The marker ``<db_dir>/mspass-cluster.json`` names the cluster, the process
and host that started it, its heartbeat file and its database job. It holds
the directory while that heartbeat is fresh (the notebook is alive, or its
database may still be running, see ``orphan_timeout``). A database started on
its own (``mspass-cluster db start``) claims its directory the same way, with
its id as ``database``; its job touches the heartbeat while it runs.
"""

from __future__ import annotations

import json
import os
import socket
import time

from .files import write_file

__all__ = ["MARKER", "claim", "holder", "release", "describe_holder", "LOCKED_WORDS"]

MARKER = "mspass-cluster.json"

#: How database servers say that another one holds the data directory.
LOCKED_WORDS = ("DBPathInUse", "Unable to lock the lock file", "is already running")


def _path(db_dir: str) -> str:
    return os.path.join(db_dir, MARKER)


def claim(
    db_dir: str,
    cluster: str,
    *,
    heartbeat: str,
    orphan_timeout: int,
    db_job: str | None = None,
    mode: int | None = None,
    database: str | None = None,
) -> None:
    """Write (atomically, with ``mode``: 0600 with ``security``) that ``cluster`` uses ``db_dir``.

    ``database`` is the id of a shared database (``mspass-cluster db start``),
    which clusters can use instead of starting their own.
    """
    record = {
        "cluster": cluster,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "heartbeat": heartbeat,
        "orphan_timeout": orphan_timeout,
        "db_job": db_job,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if database:
        record["database"] = database
    write_file(_path(db_dir), json.dumps(record), mode)


def holder(db_dir: str, now: float | None = None) -> dict | None:
    """The record of the cluster that holds ``db_dir``, or None when it is free.

    A record whose heartbeat is older than its ``orphan_timeout`` (plus a
    minute) is stale: its notebook and database are gone.
    """
    try:
        with open(_path(db_dir)) as f:
            record = json.load(f)
        age = (time.time() if now is None else now) - os.stat(record["heartbeat"]).st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if age < float(record.get("orphan_timeout") or 300) + 60 else None


def release(db_dir: str, cluster: str) -> None:
    """Remove the marker if ``cluster`` wrote it."""
    try:
        with open(_path(db_dir)) as f:
            if json.load(f).get("cluster") != cluster:
                return
        os.unlink(_path(db_dir))
    except (OSError, ValueError, AttributeError):
        pass


def describe_holder(record: dict) -> str:
    """``cluster mspass-1a2b3c4d (started 2026-11-30 11:02:03 by process 123 on login1; database job 456)``.

    ``db_job`` is recorded with its unit, e.g. ``"job 456"`` (Slurm) or ``"process 789"`` (desktop).
    """
    job = f"; database {record['db_job']}" if record.get("db_job") else ""  # "job 456", "process 789"
    if record.get("database"):
        return (
            f"shared database {record['database']} (started {record.get('started')} by `mspass-cluster db start`, "
            f"process {record.get('pid')} on {record.get('host')}{job})"
        )
    return (
        f"cluster {record.get('cluster')} (started {record.get('started')} by process {record.get('pid')} on "
        f"{record.get('host')}{job})"
    )
