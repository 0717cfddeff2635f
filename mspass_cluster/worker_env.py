"""Publishes MsPASS's variables: in every Dask worker process, and in the notebook's own process.

Worker jobs submitted before the database's node is known cannot carry
``MSPASS_DB_ADDRESS`` in their script. This plugin, registered on the
scheduler once the database answers, sets the variables in every worker
process, present and future (a nanny-restarted process gets them again).

The MsPASS container image does not have this package, so the plugin travels
to the workers by value (cloudpickle), not by import.
"""

from __future__ import annotations

import os
import sys

import cloudpickle
from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["EnvironmentPlugin", "PublishedEnvironment"]


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


cloudpickle.register_pickle_by_value(sys.modules[__name__])
