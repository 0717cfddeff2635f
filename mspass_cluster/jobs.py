"""Slurm jobs of one cluster: submit, watch (one batched query per poll), cancel.

:class:`SlurmClient` turns the pure builders of :mod:`mspass_cluster.slurm`
into commands through a :class:`~mspass_cluster.commands.CommandRunner`.
:class:`JobLauncher` owns every job a cluster submitted: it writes each job
script next to its log, submits it, keeps its latest status, and cancels
jobs in batches, waiting until Slurm lists them no more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field

from . import slurm
from .commands import CommandRunner
from .config import ClusterOptions
from .errors import CommandError, JobFailedError, SlurmUnavailableError, SubmitError
from .roles import build_job_script
from .slurm import JobState, JobStatus

__all__ = ["SlurmClient", "JobLauncher", "TrackedJob", "tail", "error_lines"]

logger = logging.getLogger(__name__)


def tail(path: str, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file, or a note saying why there are none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc.strerror or exc})"
    return "\n".join(deque(text.splitlines(), maxlen=lines)) or "(the log is empty)"


_ERROR_WORDS = re.compile(r"error|fatal|exception|not found|no such file|permission denied|refused|killed", re.I)
#: Warnings mention errors too ("... will be an error in a future version"); they are not why a job ended.
_WARNING_LINE = re.compile(r'"s":"W"|\bWARN(ING)?\b|Warning:|\bwarnings\.warn', re.I)


def error_lines(path: str, most: int = 5) -> list[str]:
    """The first lines of a log that look like errors (a usage text can push them out of the tail)."""
    lines = tail(path, 2000).splitlines()
    return [line for line in lines if _ERROR_WORDS.search(line) and not _WARNING_LINE.search(line)
            and not line.startswith("mspass_cluster:")][:most]


class SlurmClient:
    """Slurm's commands, batched and with timeouts.

    Parameters
    ----------
    runner : CommandRunner
        Runs (and counts) the commands.
    """

    def __init__(self, runner: CommandRunner):
        self.runner = runner
        self._sacct_works: bool | None = None

    #: What runs a role, in words for messages.
    unit = "job"

    async def submit(self, script_path: str, what: str, output: str = "", role: str = "") -> str:
        """Submit a script; return its job id (``output`` is already in the script's directives).

        Raises
        ------
        SubmitError
            With sbatch's own message when Slurm refuses the job.
        """
        argv = slurm.build_sbatch_argv(script_path)
        try:
            result = await self.runner.arun(argv, error_cls=SubmitError)
        except SubmitError as exc:
            words = exc.stderr.strip() or exc.stdout.strip() or "(sbatch printed nothing)"
            if slurm.controller_unreachable(words):
                raise SlurmUnavailableError.explaining(
                    exc,
                    (
                        f"Slurm's controller did not answer sbatch for the {what}: {words}\n"
                        "Nothing is wrong with the cluster's options. `scontrol ping` shows when the "
                        "controller is back; try again then, or ask your cluster's support."
                    ),
                ) from exc
            raise SubmitError.explaining(
                exc,
                (
                    f"Slurm refused the {what}: {words}\n"
                    "Check partition, account, qos, walltime, cores and memory against "
                    "`sinfo` and your allocation; the job script is " + script_path + "."
                ),
            ) from exc
        try:
            return slurm.parse_sbatch_job_id(result.stdout)
        except ValueError as exc:
            raise SubmitError(argv, 0, result.stdout, result.stderr, reason=f"sbatch printed no job id for the {what}.") from exc

    async def statuses(self, job_ids) -> dict[str, JobStatus]:
        """The status of every job in ``job_ids``, with one ``squeue`` call.

        Jobs squeue no longer lists are asked of ``sacct`` when accounting
        works here, else ``scontrol show job``; jobs Slurm has forgotten get
        :attr:`JobState.UNKNOWN`.
        """
        job_ids = list(job_ids)
        if not job_ids:
            return {}
        result = await self.runner.arun(slurm.build_squeue_argv(job_ids), check=False)
        found = slurm.parse_squeue(result.stdout)
        if result.returncode != 0 and not found and "Invalid job id" not in result.stderr:
            error = SlurmUnavailableError if slurm.controller_unreachable(result.stderr) else CommandError
            raise error(result.argv, result.returncode, result.stdout, result.stderr,
                        reason="squeue failed while watching the cluster's jobs.")
        missing = [j for j in job_ids if j not in found]
        if missing:
            found.update(await self.final_statuses(missing))
        return found

    async def final_statuses(self, job_ids) -> dict[str, JobStatus]:
        """Final state and exit code of ended jobs (sacct, else scontrol)."""
        found: dict[str, JobStatus] = {}
        if self._sacct_works is not False:
            result = await self.runner.arun(slurm.build_sacct_argv(job_ids), check=False)
            self._sacct_works = result.returncode == 0
            if self._sacct_works:
                found.update(slurm.parse_sacct(result.stdout))
        for job_id in job_ids:
            if job_id in found:
                continue
            result = await self.runner.arun(slurm.build_scontrol_job_argv(job_id), check=False)
            status = slurm.parse_scontrol_job(result.stdout) if result.returncode == 0 else None
            found[job_id] = status or JobStatus(job_id, JobState.UNKNOWN, "Slurm no longer knows this job")
        return found

    async def cancel(self, job_ids, signal: str | None = None) -> None:
        """``scancel`` the jobs (or only send them ``signal``); jobs already gone are fine."""
        if job_ids:
            await self.runner.arun(slurm.build_scancel_argv(job_ids, signal), check=False)

    def cancel_now(self, job_ids) -> None:
        """Synchronous ``scancel``, for interpreter exit and other last resorts."""
        if job_ids:
            self.runner.run(slurm.build_scancel_argv(job_ids), check=False, timeout=30)

    def signal_now(self, job_ids, signal: str = "TERM") -> None:
        """Synchronous: send ``signal`` to every process of the jobs and return at once."""
        if job_ids:
            self.runner.run(slurm.build_scancel_argv(job_ids, signal), check=False, timeout=10)

    def node_addresses(self, partition: str | None) -> list[str]:
        """Addresses of the partition's nodes (``sinfo``), for choosing the scheduler's address."""
        argv = ["sinfo", "--noheader", "--Node", "--format=%o"]
        if partition:
            argv.append(f"--partition={partition}")
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if slurm.controller_unreachable(result.stderr):
                raise SlurmUnavailableError(
                    argv, result.returncode, result.stdout, result.stderr,
                    reason=(
                        "Slurm's controller is not answering, so no job can be submitted now; nothing was "
                        "queued. `scontrol ping` shows when it is back; try again then, or ask your "
                        "cluster's support."
                    ),
                )
            logger.warning("sinfo failed (%s); the scheduler's address is chosen without the nodes' addresses.",
                           result.stderr.strip() or f"exit code {result.returncode}")
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]


@dataclass
class TrackedJob:
    """One job a cluster submitted, and what Slurm last said about it."""

    role: str
    name: str
    job_id: str
    log_path: str
    script_path: str
    submitted: float = field(default_factory=time.monotonic)
    status: JobStatus | None = None
    ready: bool = False  #: its service answered at least once
    unit: str = "job"  #: what runs it, in words: a Slurm "job", a local "process", an srun "step"

    @property
    def state(self) -> JobState:
        return self.status.state if self.status else JobState.PENDING

    @property
    def ended(self) -> bool:
        return self.state.kind == "ended"

    @property
    def node(self) -> str:
        return self.status.nodes if self.status else ""

    def describe(self) -> str:
        """``worker job 123 (mspass-ab-worker-0): PENDING (Resources)``."""
        text = f"{self.role} {self.unit} {self.job_id} ({self.name}): {self.state.value}"
        if self.status and self.status.reason:
            text += f" ({self.status.reason})"
        if self.node and self.state.kind != "pending":
            text += f" on {self.node}"
        return text

    def failure(self, what: str, fix: str) -> JobFailedError:
        """A :class:`JobFailedError` for this ended job, with the log's last lines."""
        exit_code = self.status.exit_code if self.status else None
        log_tail = tail(self.log_path)
        # A cancelled job was stopped from outside: what its log calls errors did not end it.
        errors = [] if self.state is JobState.CANCELLED else [
            line for line in error_lines(self.log_path) if line not in log_tail.splitlines()]
        exit_text = f", exit code {exit_code}" if exit_code else ""
        node_text = f" on node {self.node}" if self.node else ""
        message = (
            f"The {self.role} {self.unit} {self.job_id} ({self.name}) {what}.\n"
            f"  {'Slurm state' if self.unit != 'process' else 'State'}: {self.state.value}{exit_text}{node_text}"
            + (f", reason: {self.status.reason}" if self.status and self.status.reason else "")
            + f"\n  Log: {self.log_path}\n"
            + "".join(f"  Error in the log: {line}\n" for line in errors)
            + "  Last lines of the log:\n"
            + "\n".join("    | " + line for line in log_tail.splitlines())
            + f"\n  {fix}"
        )
        return JobFailedError(
            message, role=self.role, job_id=self.job_id, state=self.state.value,
            exit_code=exit_code, log_path=self.log_path, log_tail=log_tail,
        )


class JobLauncher:
    """Submits, tracks and cancels the jobs of one cluster.

    Parameters
    ----------
    options : ClusterOptions
    cluster_name : str
        Unique prefix of every job name, ``<job_name>-<id>``.
    slurm_client : SlurmClient or LocalProcesses
        Where jobs run: Slurm, or local processes for the desktop backend.
    local : bool
        Build scripts for the desktop backend (loopback addresses only).
    """

    def __init__(self, options: ClusterOptions, cluster_name: str, slurm_client, local: bool = False):
        self.options = options
        self.cluster_name = cluster_name
        self.slurm = slurm_client
        self.local = local
        self.scheduler_address: str | None = None
        self.db_host: str | None = None
        self.heartbeat: str | None = None
        self.jobs: dict[str, TrackedJob] = {}
        #: Log level of routine events (submissions): INFO with ``verbose``, else DEBUG.
        self.detail = logging.INFO if options.verbose else logging.DEBUG
        self._gone: dict[str, asyncio.Future] = {}
        self._cancel_queue: list[tuple[str, str | None]] = []
        self._canceller: asyncio.Task | None = None

    @property
    def cluster_id(self) -> str:
        return self.cluster_name.rsplit("-", 1)[-1]

    def script(self, role: str, name: str, scheduler_address: str | None = None) -> tuple[str, str]:
        """The job script for ``role`` named ``name``, and its log pattern."""
        return build_job_script(
            self.options, role, cluster_id=self.cluster_id, job_name=name,
            scheduler_address=scheduler_address or self.scheduler_address,
            db_host=self.db_host, local=self.local, heartbeat=self.heartbeat,
        )

    async def submit(self, role: str, name: str) -> TrackedJob:
        """Write the script to ``<log_dir>/<name>.sh`` and submit it."""
        script, output = self.script(role, name)
        path = os.path.join(self.options.log_dir, f"{name}.sh")
        with open(path, "w") as f:
            f.write(script)
        job_id = await self.slurm.submit(path, f"{role} job {name}", output, role)
        unit = getattr(self.slurm, "unit", "job")
        job = TrackedJob(role, name, job_id, output.replace("%j", job_id), path, unit=unit)
        self.jobs[job_id] = job
        logger.log(self.detail, "Submitted %s %s %s (%s); log: %s", role, unit, job_id, name, job.log_path)
        return job

    def active(self) -> list[TrackedJob]:
        """Jobs that have not ended (as far as the last poll knows)."""
        return [j for j in self.jobs.values() if not j.ended]

    async def poll(self, job_ids=None) -> list[TrackedJob]:
        """Refresh the status of ``job_ids`` (default: every active job) with one batched query.

        Returns the jobs whose state changed.
        """
        active = self.active() if job_ids is None else [self.jobs[j] for j in job_ids if j in self.jobs]
        statuses = await self.slurm.statuses([j.job_id for j in active])
        changed = []
        for job in active:
            new = statuses.get(job.job_id)
            if new is None:
                continue
            if new.state.kind == "ended" and new.exit_code is None:
                new = (await self.slurm.final_statuses([job.job_id])).get(job.job_id, new)
            old = job.status
            job.status = new
            if old is None or (old.state, old.reason, old.nodes) != (new.state, new.reason, new.nodes):
                changed.append(job)
        return changed

    async def cancel(self, job: TrackedJob, *, signal: str | None = None, timeout: float = 120.0) -> bool:
        """Cancel ``job`` (or send it ``signal``) and wait until Slurm lists it no more.

        Calls made together are batched into one ``scancel`` and one poll
        loop. Returns False when the job was still listed at ``timeout``.
        """
        loop = asyncio.get_running_loop()
        future = self._gone.get(job.job_id)
        if future is None or future.done():
            future = self._gone[job.job_id] = loop.create_future()
        self._cancel_queue.append((job.job_id, signal))
        if self._canceller is None or self._canceller.done():
            self._canceller = asyncio.ensure_future(self._cancel_loop())
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _cancel_loop(self) -> None:
        interval = 0.2
        while True:
            await asyncio.sleep(0)  # let callers in the same tick join this batch
            batch, self._cancel_queue = self._cancel_queue, []
            for signal in {s for _, s in batch}:
                ids = [j for j, s in batch if s == signal]
                try:
                    await self.slurm.cancel(ids, signal=signal)
                except CommandError as exc:
                    logger.warning("%s; cancelling jobs %s outright.", exc, ", ".join(ids))
                    await self.slurm.cancel(ids)
            waiting = [j for j, f in self._gone.items() if not f.done()]
            if not waiting:
                return
            try:
                await self.poll(waiting)
            except CommandError as exc:
                # Callers give up at their own timeouts; Slurm may answer again before.
                logger.warning("Could not confirm that jobs %s ended: %s", ", ".join(waiting), str(exc).splitlines()[0])
            for job_id in waiting:
                job = self.jobs.get(job_id)
                if job is None or job.ended:
                    self._gone[job_id].set_result(True)
            if not self._cancel_queue:
                await asyncio.sleep(interval)
                interval = min(interval * 1.5, 2.0)
            if self._cancel_queue:
                interval = 0.2  # newly cancelled jobs usually end within a fraction of a second

    def stop_everything_now(self) -> list[str]:
        """Synchronous, without waiting: SIGTERM to every job not known to have ended.

        Each job's script passes the signal to its server, which stops cleanly
        (the database flushes, workers leave); for when this process is about
        to end (it was sent SIGTERM) and cannot wait.
        """
        ids = [j.job_id for j in self.active()]
        try:
            self.slurm.signal_now(ids, "TERM")
        except CommandError as exc:
            logger.error("Could not stop jobs %s: %s", ids, exc)
        return ids

    def cancel_everything_now(self) -> list[str]:
        """Synchronous last resort: ``scancel`` every job not known to have ended."""
        ids = [j.job_id for j in self.active()]
        if ids:
            try:
                self.slurm.cancel_now(ids)
            except CommandError as exc:
                logger.error("Could not cancel jobs %s: %s", ids, exc)
        return ids


_EXIT_LINE = re.compile(r"mspass_cluster: (\w+) exited with status (\d+)")


def server_exit_status(log_path: str) -> int | None:
    """The server's exit status that the job script logged, if it did."""
    matches = _EXIT_LINE.findall(tail(log_path, 50))
    return int(matches[-1][1]) if matches else None
