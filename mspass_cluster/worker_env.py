"""Publishes MsPASS's variables inside every Dask worker process.

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

__all__ = ["EnvironmentPlugin"]


class EnvironmentPlugin(WorkerPlugin):
    """Sets ``environ`` in each worker process when it joins."""

    name = "mspass-cluster-environment"

    def __init__(self, environ: dict):
        self.environ = dict(environ)

    def setup(self, worker):
        os.environ.update(self.environ)


cloudpickle.register_pickle_by_value(sys.modules[__name__])
