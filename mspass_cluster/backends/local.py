"""The all-in-one desktop backend: the same job scripts, run as local processes.

:class:`LocalBackend` has the interface of the Slurm backend
(:class:`~mspass_cluster.backends.Backend`), so the cluster's readiness checks, fail-fast
errors, scaling and teardown are the very ones used on Slurm; only where the
scripts run differs. Each "job" is ``bash <script>`` in its own process
group, its output in the log file the script names. Cancelling sends SIGTERM
to that group (the script forwards it to the server and waits for a clean
exit) and, as Slurm does after ``KillWait``, SIGKILL 30 seconds later.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import signal as signals
import subprocess
import time

from dask.utils import format_bytes

from ..config import ClusterOptions
from ..files import open_new
from ..slurm import JobState, JobStatus, expand_job_id

__all__ = ["LocalBackend", "LOCAL_HOST", "share_of_this_machine"]

logger = logging.getLogger(__name__)

#: Where every local role listens and is reached.
LOCAL_HOST = "127.0.0.1"
#: Seconds between SIGTERM and SIGKILL, like Slurm's default KillWait.
KILL_WAIT = 30.0


def share_of_this_machine(options: ClusterOptions, cpus: int, memory: int) -> ClusterOptions:
    """Give each local "node" its share of this machine's ``cpus`` and ``memory``.

    On Slurm an unset ``cores``/``memory`` means a whole node; on a desktop
    it would mean every "node" sizing itself to the whole machine, N times
    over. As :class:`distributed.LocalCluster` does, the machine is split
    over the ``nodes`` asked for at start; values given by the user stay.

    >>> from mspass_cluster.config import resolve_options
    >>> share = share_of_this_machine(resolve_options(nodes=2, backend="local"), cpus=8, memory=16 * 2**30)
    >>> share.cores, share.memory
    (4, '8.00GiB')
    """
    nodes, processes = max(1, options.nodes), options.processes
    changes = {}
    if options.cores is None:
        changes["cores"] = max(processes, cpus // nodes // processes * processes)
    if options.memory is None:
        changes["memory"] = format_bytes(memory // nodes).replace(" ", "")
    return options.replace(**changes) if changes else options


class LocalBackend:
    """Runs job scripts as local process groups (the desktop), with the :class:`~mspass_cluster.backends.Backend` protocol."""

    #: Asks a job to stop (its script forwards SIGTERM to the server and waits).
    stop_signal = signals.SIGTERM
    #: Ends a job that ignored :attr:`stop_signal` for ``KILL_WAIT`` seconds.
    kill_signal = signals.SIGKILL
    #: Signal the job's whole process group (False: only the process started).
    signal_group = True
    #: What runs a role, in words for messages: its id is the process id.
    unit = "process"

    def __init__(self, file_mode: int | None = None):
        #: Mode of the logs this backend creates (0600 with ``security``); None: the umask decides.
        self.file_mode = file_mode
        self._ids = itertools.count(1)
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancelled: dict[str, float] = {}  # job id -> when SIGKILL is due
        self._nodes: dict[str, str] = {}

    async def submit(self, script_path: str, what: str, output: str = "", role: str = "worker") -> str:
        argv, node = self._placement(script_path, role)
        # The id is the process id, as a job id would be Slurm's: the log is named once it is known. It is
        # created new (never through a planted symlink), 0600 with security.
        if output:
            starting = expand_job_id(output, f"starting-{os.getpid()}-{next(self._ids)}-{secrets.token_hex(3)}")
            log = open_new(starting, self.file_mode)
        else:
            log = os.open(os.devnull, os.O_WRONLY)
        try:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(log)
        job_id = str(proc.pid)
        if output:
            os.replace(starting, expand_job_id(output, job_id))
        self._procs[job_id], self._nodes[job_id] = proc, node
        return job_id

    def _placement(self, script_path: str, role: str) -> tuple[list[str], str]:
        """The command that runs a script, and the node it runs on."""
        return ["bash", script_path], LOCAL_HOST

    def _status(self, job_id: str) -> JobStatus:
        proc = self._procs.get(job_id)
        if proc is None:
            return JobStatus(job_id, JobState.UNKNOWN, "not started here")
        code = proc.poll()
        if code is None or self._group_lingers(proc):
            # A script that ended while processes it started still run (a watchdog's sleep, a server it
            # signalled) is not over yet, as Slurm keeps such a job COMPLETING: its processes go first.
            due = self._cancelled.get(job_id)
            if due is not None and time.monotonic() > due:
                self._signal(job_id, self.kill_signal)
            state = JobState.RUNNING if code is None else JobState.COMPLETING
            return JobStatus(job_id, state, "", self._nodes[job_id])
        exit_code = f"{code}:0" if code >= 0 else f"0:{-code}"
        if job_id in self._cancelled:
            state = JobState.CANCELLED
        else:
            state = JobState.COMPLETED if code == 0 else JobState.FAILED
        return JobStatus(job_id, state, "", self._nodes[job_id], exit_code)

    async def statuses(self, job_ids) -> dict[str, JobStatus]:
        return {j: self._status(j) for j in job_ids}

    async def final_statuses(self, job_ids) -> dict[str, JobStatus]:
        return await self.statuses(job_ids)

    def _group_lingers(self, proc) -> bool:
        """Whether the process group of an ended script still has members (only when signalling groups)."""
        if not self.signal_group:
            return False
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal(self, job_id: str, signum: int) -> None:
        proc = self._procs.get(job_id)
        if proc is not None and (proc.poll() is None or self._group_lingers(proc)):
            try:
                if self.signal_group:
                    os.killpg(proc.pid, signum)  # the group this object started for the job
                else:
                    proc.send_signal(signum)
            except ProcessLookupError:
                pass

    async def cancel(self, job_ids, signal: str | None = None) -> None:
        """SIGTERM the jobs' process groups; without ``signal``, SIGKILL follows after ``KILL_WAIT``."""
        self._terminate(job_ids, escalate=signal is None)

    def _terminate(self, job_ids, escalate: bool) -> None:
        for job_id in job_ids:
            if escalate:
                self._cancelled.setdefault(job_id, time.monotonic() + KILL_WAIT)
            self._signal(job_id, self.stop_signal)

    def signal_now(self, job_ids, signal: str = "TERM") -> None:
        """Ask the jobs to stop (:attr:`stop_signal`, the only one needed) and return at once."""
        self._terminate(job_ids, escalate=False)

    def cancel_now(self, job_ids) -> None:
        """Synchronous: SIGTERM, up to ``KILL_WAIT`` for the processes to end, then SIGKILL."""
        self._terminate(job_ids, escalate=True)
        deadline = time.monotonic() + KILL_WAIT
        for job_id in job_ids:
            proc = self._procs.get(job_id)
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("Job %s did not stop within %.0f s; ending it.", job_id, KILL_WAIT)
                self._signal(job_id, self.kill_signal)
                proc.wait()

    def node_addresses(self, partition: str | None) -> list[str]:
        return [LOCAL_HOST]
