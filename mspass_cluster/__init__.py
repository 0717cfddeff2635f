"""mspass_cluster: a MsPASS virtual cluster (MongoDB + Dask workers) from one line in a notebook.

>>> from mspass_cluster import MsPASSCluster
>>> with MsPASSCluster(nodes=4) as cluster:          # doctest: +SKIP
...     client = cluster.get_client()
...     db = cluster.get_db_client()
"""

from ._version import __version__
from .errors import ConfigError

try:
    import dask.config  # noqa: F401  (reads every YAML file of dask config on import)
except ValueError as _exc:  # dask's words for a YAML file it cannot parse
    raise ConfigError(
        f"{_exc}\nDask reads this file whenever it is imported, so nothing that uses Dask can start. Fix its "
        "YAML (options of this package go in a section 'mspass_cluster:', one 'key: value' per line) or move "
        "the file away."
    ) from None

from .cluster import MsPASSCluster
from .commands import CommandRunner
from .config import OPTIONS, resolve_options
from .db import DBClient, get_db_client
from .errors import (
    AuthenticationError,
    ClusterClosedError,
    CommandError,
    DatabaseMovedError,
    HostKeyError,
    HostUnreachableError,
    JobFailedError,
    MsPASSClusterError,
    SlurmUnavailableError,
    StartupTimeoutError,
    SubmitError,
    TunnelError,
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
    "ClusterClosedError",
    "DatabaseMovedError",
    "StartupTimeoutError",
    "TunnelError",
    "HostKeyError",
    "AuthenticationError",
    "HostUnreachableError",
]
