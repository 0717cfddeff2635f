"""Worker nodes as ``srun`` steps of one Slurm job per scale-up (``worker_submission="steps"``).

Where job arrays cannot serve (a site capping the jobs a user may queue
below the number of worker nodes: every array task counts as a job; or
arrays disabled), the worker nodes of one start or ``scale()`` go to Slurm
as one multi-node job, the *holder*: one queued job however many nodes.
Once it runs, each worker node's own job script starts on one of its nodes
as an ``srun`` step (``srun --jobid=<holder> --nodes=1 --overlap``), started
and watched from the notebook's process as in an allocation (see
:class:`~mspass_cluster.backends.allocation.AllocationBackend`). Each node
keeps its script, its log and an id of its own, ``<holder>.w<i>``: it is
watched, stopped cleanly (``scancel --signal=TERM`` of its step) and
replaced one by one.

The price, said in the README: a node scaled down stays in its holder job
until the holder's last worker leaves (then the holder is cancelled), and
the notebook's host runs one ``srun`` process per worker node.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ..commands import CommandRunner
from ..slurm import JobState, JobStatus
from .allocation import AllocationBackend

__all__ = ["HeldSteps", "step_id", "is_step"]

logger = logging.getLogger(__name__)

_MARK = ".w"


def step_id(holder_id: str, index: int) -> str:
    """The id of worker node ``index`` in holder job ``holder_id``.

    >>> step_id("872", 5)
    '872.w5'
    """
    return f"{holder_id}{_MARK}{int(index)}"


def is_step(job_id: str) -> bool:
    """Whether ``job_id`` names a worker node run as a step of a holder job.

    >>> is_step("872.w5"), is_step("872_5"), is_step("872")
    (True, False, False)
    """
    return _MARK in job_id


def holder_of(job_id: str) -> str:
    """The holder job of a step id.

    >>> holder_of("872.w5")
    '872'
    """
    return job_id.split(_MARK, 1)[0]


@dataclasses.dataclass
class _Step:
    script: str
    log: str
    what: str
    local_id: str | None = None
    cancelled: bool = False
    ended: bool = False


@dataclasses.dataclass
class _Holder:
    job_id: str
    steps: dict[str, _Step]
    runner: AllocationBackend | None = None
    released: bool = False


class HeldSteps:
    """The holder jobs of a Slurm backend and the steps in them.

    Parameters
    ----------
    runner : CommandRunner
        Runs ``scontrol``, ``squeue`` and ``scancel``.
    file_mode : int, optional
        Mode of the steps' logs (0600 with ``security``).
    """

    def __init__(self, runner: CommandRunner, file_mode: int | None = None):
        self.runner = runner
        self.file_mode = file_mode
        self.holders: dict[str, _Holder] = {}

    def add(self, holder_id: str, steps: dict[str, tuple[str, str, str]]) -> None:
        """Track holder job ``holder_id`` and its steps: ``{step id: (script path, log path, what)}``."""
        self.holders[holder_id] = _Holder(holder_id, {s: _Step(*v) for s, v in steps.items()})

    def holder_ids(self, step_ids) -> list[str]:
        """The holder jobs of ``step_ids`` that this object tracks."""
        return sorted({holder_of(s) for s in step_ids if holder_of(s) in self.holders})

    async def statuses(self, step_ids, holder_statuses: dict[str, JobStatus]) -> dict[str, JobStatus]:
        """The status of each step, starting the steps of holders that began running.

        A step whose holder is still queued is PENDING with the holder's
        reason (or has the holder's final state if it ended first); a step
        that was started has the state of its ``srun``.
        """
        found: dict[str, JobStatus] = {}
        for holder_id in self.holder_ids(step_ids):
            holder = self.holders[holder_id]
            status = holder_statuses.get(holder_id) or JobStatus(holder_id, JobState.UNKNOWN, "")
            if holder.runner is None and status.state == JobState.RUNNING and not holder.released:
                await self._start_steps(holder, status)
            wanted = [s for s in step_ids if holder_of(s) == holder_id and s in holder.steps]
            started = {holder.steps[s].local_id: s for s in wanted if holder.steps[s].local_id}
            local = await holder.runner.statuses(list(started)) if holder.runner is not None and started else {}
            for step in wanted:
                found[step] = self._status_of(step, holder.steps[step], status, local)
                holder.steps[step].ended = found[step].state.kind == "ended"
            await self._release_when_empty(holder)
        return found

    def _status_of(self, step: str, info: _Step, holder: JobStatus, local: dict) -> JobStatus:
        if info.local_id is not None:
            mine = local.get(info.local_id)
            if mine is not None:
                return dataclasses.replace(mine, job_id=step)
        if info.cancelled:
            return JobStatus(step, JobState.CANCELLED, "stopped before its holder job ran", exit_code="0:15")
        if holder.state.kind == "ended":
            return dataclasses.replace(holder, job_id=step)
        return JobStatus(step, holder.state, holder.reason)

    async def _start_steps(self, holder: _Holder, status: JobStatus) -> None:
        nodes = await self._hostnames(status.nodes)
        holder.runner = AllocationBackend(nodes, self.runner, self.file_mode, job_id=holder.job_id)
        for info in holder.steps.values():
            if info.cancelled:
                continue
            info.local_id = await holder.runner.submit(info.script, info.what, info.log, "worker")
        logger.info(
            "Holder job %s runs on %s: started %d worker node(s) as srun steps in it.",
            holder.job_id,
            status.nodes,
            sum(1 for i in holder.steps.values() if i.local_id),
        )

    async def _hostnames(self, nodelist: str) -> list[str]:
        result = await self.runner.arun(["scontrol", "show", "hostnames", nodelist])
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]

    async def _release_when_empty(self, holder: _Holder) -> None:
        """Cancel a holder job once none of its steps can still run (its nodes go back to Slurm)."""
        if holder.released:
            return
        if all(info.ended or (info.cancelled and info.local_id is None) for info in holder.steps.values()):
            holder.released = True
            logger.info("Holder job %s has no worker left: cancelling it, its nodes go back to Slurm.", holder.job_id)
            await self.runner.arun(["scancel", holder.job_id], check=False)

    async def cancel(self, step_ids, signal: str | None = None) -> None:
        """Stop steps cleanly (``scancel --signal=TERM`` of each, see :class:`AllocationBackend`)."""
        for holder_id in self.holder_ids(step_ids):
            holder = self.holders[holder_id]
            mine = [s for s in step_ids if holder_of(s) == holder_id and s in holder.steps]
            started = [holder.steps[s].local_id for s in mine if holder.steps[s].local_id]
            if signal is None:
                for s in mine:
                    if holder.steps[s].local_id is None:
                        holder.steps[s].cancelled = True
            if started:
                await holder.runner.cancel(started, signal)
            if signal is None and all(i.cancelled for i in holder.steps.values()) and not holder.released:
                holder.released = True  # none was started: nothing needs a clean stop
                await self.runner.arun(["scancel", holder.job_id], check=False)

    def signal_now(self, step_ids) -> list[str]:
        """Ask started steps to stop (returns at once); the holder ids of steps not started, to cancel."""
        unstarted = []
        for holder_id in self.holder_ids(step_ids):
            holder = self.holders[holder_id]
            started = [
                holder.steps[s].local_id
                for s in step_ids
                if holder_of(s) == holder_id and s in holder.steps and holder.steps[s].local_id
            ]
            if started:
                holder.runner.signal_now(started)
            else:
                unstarted.append(holder_id)
        return unstarted

    def log_path(self, step: str) -> str | None:
        """The log of a step (its srun's output)."""
        info = self.holders.get(holder_of(step))
        return info.steps[step].log if info is not None and step in info.steps else None


def step_log(log_dir: str, name: str, step: str) -> str:
    """Where a step's log goes: ``<log_dir>/<name>-<step id>.out``, as a job's would.

    >>> step_log("/l", "c-worker-3", "872.w3")
    '/l/c-worker-3-872.w3.out'
    """
    return os.path.join(log_dir, f"{name}-{step}.out")
