"""Publishes MsPASS's variables: in every Dask worker process, and in the notebook's own process.

Worker jobs submitted before the database's node is known cannot carry
``MSPASS_DB_ADDRESS`` in their script. This plugin, registered on the
scheduler once the database answers, sets the variables in every worker
process, present and future (a nanny-restarted process gets them again).

The MsPASS container image does not have this package, so the plugin travels
to the workers by value (cloudpickle), not by import.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import cloudpickle
from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["EnvironmentPlugin", "PublishedEnvironment", "deliver_plugin"]

logger = logging.getLogger("mspass_cluster")

#: Seconds between the tries to reach workers that did not take a plugin (a busy node answers later).
PLUGIN_RETRY_DELAYS = (5.0, 15.0, 45.0)


class EnvironmentPlugin(WorkerPlugin):
    """Sets ``environ`` in each worker process when it joins."""

    name = "mspass-cluster-environment"

    def __init__(self, environ: dict):
        self.environ = dict(environ)

    def setup(self, worker):
        os.environ.update(self.environ)


class PublishedEnvironment:
    """The notebook's own ``os.environ``: variables set while a cluster runs, the old values put back after."""

    def __init__(self):
        self._saved: dict[str, str | None] = {}

    def publish(self, environ: dict, but=()) -> None:
        """Set ``environ`` (except the names in ``but``) in this process, remembering what was there."""
        for key, value in environ.items():
            if key in but:
                continue
            self._saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def restore(self) -> None:
        """Put back what was there before :meth:`publish` (or remove what was not)."""
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved.clear()


async def deliver_plugin(scheduler, name: str, plugin: bytes, *, workers=None, delays=PLUGIN_RETRY_DELAYS) -> list[str]:
    """Give a pickled worker plugin to the workers of ``scheduler``; return the addresses it did not reach.

    Without ``workers``: store it with the scheduler (every worker that joins
    from now on gets it as it registers) and send it to each worker connected
    now, once. With ``workers``, those that did not take it: try again after
    each of ``delays``; a worker that still does not take it is removed, so
    that its nanny starts it again and it gets the plugin as it registers
    (a worker without the cluster's environment would read the wrong
    database). Dask's own ``register_worker_plugin`` fails as a whole when
    one worker does not answer in its connect timeout, which happens to
    workers on a node still starting dozens of processes.
    """
    if workers is None:
        scheduler.worker_plugins[name] = plugin
        return await _send_plugin(scheduler, name, plugin, list(scheduler.workers))
    for delay in delays:
        await asyncio.sleep(delay)
        if scheduler.worker_plugins.get(name) is not plugin:
            return []  # a newer plugin of that name was registered since; it goes its own way
        workers = await _send_plugin(scheduler, name, plugin, [w for w in workers if w in scheduler.workers])
        if not workers:
            return []
    for address in workers:
        logger.warning(
            "Worker %s did not take the cluster's %s after %d tries over %.0f s; restarting it so that it gets it "
            "as it joins again.",
            address,
            name,
            len(delays) + 1,
            sum(delays),
        )
        await scheduler.remove_worker(address, stimulus_id=f"{name}-undelivered-{time.time()}", close=True)
    return workers


async def _send_plugin(scheduler, name: str, plugin: bytes, workers: list[str]) -> list[str]:
    """One broadcast of ``plugin`` to ``workers``; the addresses that failed (logged at debug level)."""
    if not workers:
        return []
    replies = await scheduler.broadcast(
        msg={"op": "plugin-add", "plugin": plugin, "name": name}, workers=workers, on_error="return"
    )
    failed = [address for address, reply in replies.items() if isinstance(reply, Exception)]
    for address in failed:
        logger.debug("Plugin %s not delivered to %s yet: %s", name, address, replies[address])
    return failed


cloudpickle.register_pickle_by_value(sys.modules[__name__])
