"""What a user sees of a cluster's progress: a few log lines, the rest on request.

The ``mspass_cluster`` logger reports what start-up waits for, failures and
the end, and is shown in a notebook even when logging is not configured.
Routine events (each submission, each job's state change) are logged at
DEBUG unless ``verbose=True``. Dask's own scheduler, which runs in this
process, logs about twenty INFO lines for one start and close (every worker
and client connecting and leaving); while a cluster runs they are held back
to warnings, unless ``verbose=True`` or the user chose distributed's log level.
"""

from __future__ import annotations

import logging

__all__ = ["logger", "make_progress_visible", "DaskChatter"]

logger = logging.getLogger("mspass_cluster")


def make_progress_visible() -> None:
    """Show INFO lines of ``mspass_cluster`` when nothing else configured logging (a notebook)."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s mspass_cluster %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


class DaskChatter:
    """Holds distributed's INFO lines back while clusters run (counted: several clusters may overlap).

    Only a ``distributed`` logger left at its configured default (INFO) is
    changed, and it is put back when the last quiet cluster closes.
    """

    _quiet_clusters = 0
    _raised = False

    @classmethod
    def hold(cls) -> None:
        dask_logger = logging.getLogger("distributed")
        if cls._quiet_clusters == 0 and dask_logger.level == logging.INFO:
            dask_logger.setLevel(logging.WARNING)
            cls._raised = True
        cls._quiet_clusters += 1

    @classmethod
    def release(cls) -> None:
        cls._quiet_clusters = max(0, cls._quiet_clusters - 1)
        dask_logger = logging.getLogger("distributed")
        if cls._quiet_clusters == 0 and cls._raised:
            if dask_logger.level == logging.WARNING:
                dask_logger.setLevel(logging.INFO)
            cls._raised = False
