"""Limits that grow with the number of workers: open files of this process, connect timeouts of the workers.

A Dask scheduler holds a connection (a file descriptor) per worker process
and a few more per client, and the default soft limit of open files is often
1024 (the Dask FAQ names it as the first wall of a large cluster). Hundreds
of workers connecting to one scheduler at once wait longer for its answer
than Dask's default 30 s connect timeout allows on a busy machine
(distributed #2820: 3,000 workers saw 3 to 7 s latencies; #3691: 921 nodes
froze the scheduler's loop for 33 s). The figures below are this package's
choice from those reports, documented in the README; the builders are pure,
:func:`raise_open_files` is the one effect.
"""

from __future__ import annotations

import logging

__all__ = [
    "DASK_CONNECT_TIMEOUT",
    "connect_timeout",
    "open_files_needed",
    "raise_open_files",
    "worker_timeout_environment",
]

logger = logging.getLogger("mspass_cluster")

#: Dask's own ``distributed.comm.timeouts.connect`` and ``...tcp`` (seconds), kept up to 300 worker processes.
DASK_CONNECT_TIMEOUT = 30
#: Beyond 300 worker processes: one second more per 10 of them, at most this.
MOST_CONNECT_TIMEOUT = 300
#: Open files of the notebook's process besides its connections to workers: clients, the dashboard's
#: sockets, the database client's pool, Python's own files.
BASE_OPEN_FILES = 512
#: Connections a worker process may hold to the scheduler (its comm, the batched stream, heartbeats, a
#: nanny's) — the Dask FAQ counts 1 to 10 per worker; three is what a steady worker keeps open.
FILES_PER_WORKER = 3


def connect_timeout(workers: int) -> int:
    """Seconds a worker may take to connect (and to complete a handshake) when ``workers`` processes join at once.

    >>> connect_timeout(16), connect_timeout(300), connect_timeout(1000), connect_timeout(10**5)
    (30, 30, 100, 300)
    """
    extra = max(0, workers - 300) // 10
    return min(MOST_CONNECT_TIMEOUT, DASK_CONNECT_TIMEOUT + extra)


def worker_timeout_environment(workers: int) -> dict[str, str]:
    """Variables that give a worker process :func:`connect_timeout`; empty while Dask's defaults suffice.

    >>> worker_timeout_environment(4)
    {}
    >>> worker_timeout_environment(1000)["DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"]
    '100s'
    """
    seconds = connect_timeout(workers)
    if seconds == DASK_CONNECT_TIMEOUT:
        return {}
    return {
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": f"{seconds}s",
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": f"{seconds}s",
    }


def open_files_needed(workers: int) -> int:
    """Open files the scheduler's process needs for ``workers`` worker processes.

    >>> open_files_needed(16), open_files_needed(1000)
    (560, 3512)
    """
    return BASE_OPEN_FILES + FILES_PER_WORKER * workers


def raise_open_files(workers: int, resource_module=None) -> int | None:
    """Raise this process's soft open-files limit towards what ``workers`` need (up to the hard limit).

    Returns the soft limit now, or None where there is no such limit. Warns,
    once per call that falls short, with the numbers and the fix when the
    hard limit is lower than the need.
    """
    if resource_module is None:
        try:
            import resource as resource_module
        except ImportError:  # not on this platform
            return None
    soft, hard = resource_module.getrlimit(resource_module.RLIMIT_NOFILE)
    need = open_files_needed(workers)
    unlimited = resource_module.RLIM_INFINITY
    if soft == unlimited or soft >= need:
        return soft
    target = need if hard == unlimited else min(need, hard)
    if target > soft:
        resource_module.setrlimit(resource_module.RLIMIT_NOFILE, (target, hard))
        logger.info("Open files of this process raised from %d to %d for %d worker process(es).", soft, target, workers)
    if target < need:
        logger.warning(
            "%d worker process(es) need about %d open files in this process (the scheduler holds a connection per "
            "worker), but its hard limit is %d: workers beyond it will fail to connect ('Too many open files'). "
            "Start the notebook with a higher `ulimit -Hn` (ask your administrators), or use fewer, larger worker "
            "nodes (processes= per node).",
            workers,
            need,
            hard,
        )
    return target
