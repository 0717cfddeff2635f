"""mspass_cluster: a MsPASS virtual cluster (MongoDB + Dask workers) from one line in a notebook.

>>> from mspass_cluster import MsPASSCluster
>>> with MsPASSCluster(nodes=4) as cluster:          # doctest: +SKIP
...     client = cluster.get_client()
...     db = cluster.get_db_client()
"""

from ._version import __version__
from .cluster import MsPASSCluster
from .commands import CommandRunner
from .config import OPTIONS, resolve_options
from .db import DBClient, get_db_client
from .errors import (
    CommandError,
    ConfigError,
    JobFailedError,
    MsPASSClusterError,
    SlurmUnavailableError,
    StartupTimeoutError,
    SubmitError,
)

__all__ = [
    "__version__",
    "MsPASSCluster",
    "CommandRunner",
    "OPTIONS",
    "resolve_options",
    "DBClient",
    "get_db_client",
    "MsPASSClusterError",
    "ConfigError",
    "CommandError",
    "SubmitError",
    "SlurmUnavailableError",
    "JobFailedError",
    "StartupTimeoutError",
]
