"""Slurm's job states, sorted into what a cluster needs to know, and the words of a Slurm that does not answer (pure)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["JobState", "JobStatus", "controller_unreachable", "parse_time_left"]


class JobState(enum.Enum):
    """Slurm job states (``squeue %T`` / ``scontrol JobState`` / ``sacct State``).

    Each member's value is Slurm's word; :attr:`kind` sorts them into
    ``pending`` (not started), ``running`` (processes on a node) and
    ``ended`` (will never run again).
    """

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"  #: nodes are booting; the job has not started
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    SUSPENDED = "SUSPENDED"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"  #: ending; processes may still be cleaning up
    RESIZING = "RESIZING"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"  #: hit its walltime
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REVOKED = "REVOKED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    UNKNOWN = "UNKNOWN"  #: Slurm no longer knows the job (purged after MinJobAge)

    @classmethod
    def parse(cls, word: str) -> "JobState":
        """The state named by ``word`` (``"CANCELLED by 0"`` gives CANCELLED)."""
        word = word.strip().split()[0].upper() if word.strip() else "UNKNOWN"
        try:
            return cls(word)
        except ValueError:
            return cls.UNKNOWN

    @property
    def kind(self) -> str:
        """``"pending"``, ``"running"`` or ``"ended"``."""
        if self in _PENDING:
            return "pending"
        if self in _RUNNING:
            return "running"
        return "ended"


_PENDING = {
    JobState.PENDING,
    JobState.CONFIGURING,
    JobState.REQUEUED,
    JobState.REQUEUE_HOLD,
    JobState.REQUEUE_FED,
    JobState.RESV_DEL_HOLD,
    JobState.SUSPENDED,
}
_RUNNING = {
    JobState.RUNNING,
    JobState.COMPLETING,
    JobState.RESIZING,
    JobState.SIGNALING,
    JobState.STAGE_OUT,
    JobState.STOPPED,
}


@dataclass(frozen=True)
class JobStatus:
    """What Slurm says about one job."""

    job_id: str
    state: JobState
    reason: str = ""
    nodes: str = ""
    exit_code: str | None = None
    #: Seconds until the job's time limit, as Slurm computes it (``squeue %L``); None if unknown or unlimited.
    time_left: int | None = None
    #: The job's name (``squeue %j``), where the query asked for it.
    name: str = ""

    @property
    def kind(self) -> str:
        return self.state.kind


_CONTROLLER_DOWN = re.compile(
    r"unable to contact slurm controller|socket timed out on send/recv|zero bytes were transmitted or received"
    r"|slurm_receive_msg.*timed out|slurmctld.*not responding",
    re.I,
)


def controller_unreachable(stderr: str) -> bool:
    """True when a Slurm command's error output says the controller did not answer.

    >>> controller_unreachable("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)")
    True
    >>> controller_unreachable("sbatch: error: invalid partition specified: nope")
    False
    """
    return bool(_CONTROLLER_DOWN.search(stderr))


_TIME_LEFT = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


def parse_time_left(text: str) -> int | None:
    """Seconds in squeue's ``%L`` (``1-02:03:04``, ``02:03:04``, ``03:04``); None for ``UNLIMITED``, ``INVALID``, ...

    >>> parse_time_left("1-00:00:30"), parse_time_left("59:48"), parse_time_left("UNLIMITED")
    (86430, 3588, None)
    """
    match = _TIME_LEFT.match(text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
