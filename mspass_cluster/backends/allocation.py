"""Running inside an existing Slurm allocation: roles as ``srun`` steps, no new jobs.

When the notebook itself runs in a Slurm job (a batch notebook, or
``salloc``), the cluster submits nothing: the database runs as a step on the
allocation's first node, beside the notebook and the scheduler, and each
worker node is a step on one of the other nodes, as MsPASS's
``run_mspass.sh`` lays them out. Steps are started with ``srun --overlap``
so that they never wait for each other's resources, and are tracked through
their ``srun`` processes, whose exit status is the step's. The readiness,
fail-fast and teardown logic is the cluster's own; only where scripts run
differs (see :class:`~mspass_cluster.backends.local.LocalBackend`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from ..commands import CommandRunner
from ..errors import ConfigError
from .local import KILL_WAIT, LocalBackend

__all__ = ["AllocationBackend", "in_allocation", "allocation_size", "allocation_nodes"]


def in_allocation(environ=None) -> bool:
    """True inside a Slurm job or ``salloc`` session."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("SLURM_JOB_ID") and environ.get("SLURM_JOB_NODELIST"))


def allocation_size(environ=None) -> int | None:
    """How many nodes the current Slurm job has (``SLURM_JOB_NUM_NODES``), or None if unknown."""
    environ = os.environ if environ is None else environ
    text = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or ""
    return int(text) if text.isdigit() else None


def allocation_nodes(runner: CommandRunner, environ=None) -> list[str]:
    """The allocation's node names, in Slurm's order (``scontrol show hostnames``)."""
    environ = os.environ if environ is None else environ
    result = runner.run(["scontrol", "show", "hostnames", environ["SLURM_JOB_NODELIST"]])
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


class AllocationBackend(LocalBackend):
    """Runs job scripts as ``srun`` steps on the allocation's nodes.

    Parameters
    ----------
    nodes : list of str
        The allocation's nodes; the first holds the database (and the
        notebook), the others one worker node each. A one-node allocation
        puts everything on that node.
    runner : CommandRunner
        Runs ``scontrol``, ``squeue`` and ``scancel``.
    file_mode : int, optional
        Mode of the steps' logs (0600 with ``security``); None: the umask decides.
    """

    # SIGTERM to srun makes Slurm end the step (SIGKILL soon after): the forceful way.
    # Stopping cleanly is `scancel --signal=TERM <step>`, as on the Slurm backend.
    kill_signal = signal.SIGTERM
    signal_group = False
    unit = "step"

    def __init__(
        self, nodes: list[str], runner: CommandRunner, file_mode: int | None = None, job_id: str | None = None
    ):
        super().__init__(file_mode)
        self.nodes = list(nodes)
        self.runner = runner
        #: The job the steps go to when it is not this process's own (``srun --jobid``): every node a worker's.
        self.job_id = job_id
        self._step_names: dict[str, str] = {}

    async def cancel(self, job_ids, signal: str | None = None) -> None:
        """``scancel --signal=TERM`` the steps, in a thread: squeue and scancel must not block the scheduler's loop."""
        await asyncio.to_thread(self._terminate, job_ids, signal is None)

    def _terminate(self, job_ids, escalate: bool) -> None:
        steps = self._running_steps()
        for job_id in job_ids:
            if escalate:
                self._cancelled.setdefault(job_id, time.monotonic() + KILL_WAIT)
            step = steps.get(self._step_names.get(job_id))
            if step:
                self.runner.run(["scancel", "--signal=TERM", step], check=False)
            else:  # srun has not started the step yet: nothing runs that needs a clean stop
                self._signal(job_id, self.kill_signal)

    def _running_steps(self) -> dict[str, str]:
        """Step ids of this allocation's running steps, by step name."""
        result = self.runner.run(
            [
                "squeue",
                "--steps",
                "--noheader",
                "--format=%i|%j",
                f"--jobs={self.job_id or os.environ['SLURM_JOB_ID']}",
            ],
            check=False,
        )
        pairs = (line.strip().split("|", 1) for line in result.stdout.splitlines() if "|" in line)
        return {name: step for step, name in pairs}

    @property
    def worker_capacity(self) -> int:
        """How many worker nodes fit: one per node after the first (one if there is only one node)."""
        if self.job_id is not None:
            return len(self.nodes)
        return max(1, len(self.nodes) - 1)

    def _placement(self, script_path: str, role: str) -> tuple[list[str], str]:
        if self.job_id is None and (role == "db" or len(self.nodes) == 1):
            node = self.nodes[0]
        else:
            busy = {self._nodes[j] for j, p in self._procs.items() if p.poll() is None}
            free = [n for n in self.nodes[0 if self.job_id is not None else 1 :] if n not in busy]
            if not free:
                raise ConfigError(
                    f"All {self.worker_capacity} worker nodes of this allocation ({', '.join(self.nodes[1:])}) are in "
                    "use; ask sbatch for more nodes (--nodes) to scale further."
                )
            node = free[0]
        name = os.path.basename(script_path)[: -len(".sh")]
        argv = [
            "srun",
            *([f"--jobid={self.job_id}"] if self.job_id is not None else []),
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={node}",
            "--overlap",
            "--kill-on-bad-exit=1",
            f"--job-name={name}",
            "bash",
            script_path,
        ]
        return argv, node

    async def submit(self, script_path: str, what: str, output: str = "", role: str = "worker") -> str:
        job_id = await super().submit(script_path, what, output, role)
        self._step_names[job_id] = os.path.basename(script_path)[: -len(".sh")]
        return job_id

    def node_addresses(self, partition: str | None) -> list[str]:
        return list(self.nodes)
