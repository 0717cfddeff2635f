"""When this process ends, its clusters end with it: at interpreter exit, and on SIGTERM.

Python runs ``atexit`` at a normal exit but not when SIGTERM ends it
(``kill``, the walltime or ``scancel`` of a Jupyter job): the database
would then wait for ``orphan_timeout`` before stopping. :func:`guard`
registers a cluster for both.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref

from distributed.core import Status

__all__ = ["guard", "guard_at_exit"]

_LIVE_CLUSTERS: weakref.WeakSet = weakref.WeakSet()
_SIGTERM_PREVIOUS: list = []


def _stop_clusters_on_sigterm() -> None:
    """Make SIGTERM to this process (``kill``, Slurm's walltime or ``scancel`` of a Jupyter job) stop the clusters.

    Python ends at SIGTERM without running ``atexit``: the database would stay
    until ``orphan_timeout``. Installed once, from the main thread, over
    Python's default action or another handler (which is then called too).
    """
    if _SIGTERM_PREVIOUS or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        return
    _SIGTERM_PREVIOUS.append(previous)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame):
    for cluster in list(_LIVE_CLUSTERS):
        cluster._stop_at_once()
    previous = _SIGTERM_PREVIOUS[0]
    if callable(previous):
        previous(signum, frame)
    else:  # Python's default: die of SIGTERM, as the sender expects
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _close_at_exit(ref):
    cluster = ref()
    if cluster is not None and cluster.status != Status.closed:
        cluster.close()


def guard(cluster) -> None:
    """On SIGTERM to this process, ask ``cluster``'s jobs to stop cleanly (``cluster._stop_at_once()``)."""
    _LIVE_CLUSTERS.add(cluster)
    _stop_clusters_on_sigterm()


def guard_at_exit(cluster) -> None:
    """At interpreter exit, close ``cluster`` if it is still open."""
    atexit.register(_close_at_exit, weakref.ref(cluster))
