"""The jobs of one cluster, each with one state a user can see, and the launcher that runs them.

:class:`TrackedJob` is one job (a Slurm job, an ``srun`` step or a local
process) and what is known of it; its :attr:`~TrackedJob.phase` is the one
state the wait loop, the watcher, the log, the repr and the errors all read.
:class:`JobLauncher` owns every job of a cluster: it renders each script
from the cluster's :class:`~mspass_cluster.roles.ScriptContext`, writes it
next to its log, submits it through the backend, polls all jobs with one
batched query (riding out a Slurm controller outage), and cancels jobs in
batches, waiting until they are gone.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field

from .backends.steps import step_id, step_log
from .errors import CommandError, JobFailedError, SlurmUnavailableError, SubmitError
from .files import file_mode, write_file
from .roles import ScriptContext, build_worker_array_script, build_worker_holder_script
from .slurm import JobState, JobStatus, array_task_id, build_job_count_argv, expand_job_id, format_array_indices

__all__ = ["JOB_STOP_TIMEOUT", "JobPhase", "JobLauncher", "TrackedJob", "tail", "error_lines", "server_exit_status"]

logger = logging.getLogger(__name__)

#: Seconds to wait for a cancelled job to leave the queue (Slurm's KillWait is 30 s by default).
JOB_STOP_TIMEOUT = 90.0
#: Seconds of Slurm not answering (a controller restart, an overload) that start-up rides out.
SLURM_OUTAGE_TOLERANCE = 300.0


class JobPhase(enum.Enum):
    """Where a job is in its life, as a user asks it: is it there yet, does it serve, did it end as planned?"""

    SUBMITTED = "submitted"  #: handed to the backend, not yet seen by a poll
    PENDING = "pending"  #: queued (Slurm's reason says why)
    RUNNING = "running"  #: on a node, its service not answering yet
    READY = "ready"  #: its service answered (database ping, every worker connected)
    STOPPING = "stopping"  #: asked to stop, not gone yet
    STOPPED = "stopped"  #: ended as planned (asked to, or workers leaving at worker_lifetime)
    FAILED = "failed"  #: ended when it was still needed


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
    return [
        line
        for line in lines
        if _ERROR_WORDS.search(line) and not _WARNING_LINE.search(line) and not line.startswith("mspass_cluster:")
    ][:most]


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
    stopping: bool = False  #: this cluster asked it to stop
    error: JobFailedError | None = None  #: why it failed, once a service has said so

    @property
    def phase(self) -> JobPhase:
        """The one state of this job (see :class:`JobPhase`)."""
        kind = self.state.kind if self.status else None
        if kind is None:
            return JobPhase.SUBMITTED
        if kind == "pending":
            return JobPhase.STOPPING if self.stopping else JobPhase.PENDING
        if kind == "running":
            return JobPhase.STOPPING if self.stopping else (JobPhase.READY if self.ready else JobPhase.RUNNING)
        planned = self.stopping or (self.role == "worker" and self.ready and self.state is JobState.COMPLETED)
        return JobPhase.STOPPED if planned else JobPhase.FAILED

    @property
    def time_left(self) -> int | None:
        """Seconds until its walltime, from the last poll (Slurm's count), or None."""
        return self.status.time_left if self.status and self.state.kind == "running" else None

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
        errors = (
            []
            if self.state is JobState.CANCELLED
            else [line for line in error_lines(self.log_path) if line not in log_tail.splitlines()]
        )
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
            message,
            role=self.role,
            job_id=self.job_id,
            state=self.state.value,
            exit_code=exit_code,
            log_path=self.log_path,
            log_tail=log_tail,
        )


class JobLauncher:
    """Submits, tracks and cancels the jobs of one cluster.

    Parameters
    ----------
    context : ScriptContext
        What every job script is rendered from; :meth:`know` replaces it
        when the scheduler's or the database's address becomes known.
    backend : Backend
        Where jobs run (see :mod:`mspass_cluster.backends`).
    """

    def __init__(self, context: ScriptContext, backend):
        self.context = context
        self.backend = backend
        self.jobs: dict[str, TrackedJob] = {}
        #: Log level of routine events (submissions): INFO with ``verbose``, else DEBUG.
        self.detail = logging.INFO if context.options.verbose else logging.DEBUG
        self._gone: dict[str, asyncio.Future] = {}
        self._cancel_queue: list[tuple[str, str | None]] = []
        self._canceller: asyncio.Task | None = None
        self._silent_since: float | None = None
        self._silence_warned = 0.0
        self._together: list[tuple[str, str, asyncio.Future]] = []
        self._said_no_array = False

    @property
    def options(self):
        return self.context.options

    def know(self, **facts) -> None:
        """Scripts rendered from now on carry ``facts`` (``scheduler_address=``, ``db_host=``)."""
        self.context = self.context.knowing(**facts)

    def script(self, role: str, name: str, directives=()) -> tuple[str, str]:
        """The job script for ``role`` named ``name`` (with Slurm's extra ``directives``), and its log pattern."""
        return self.context.render(role, name, directives)

    async def submit(self, role: str, name: str, directives=()) -> TrackedJob:
        """Write the script to ``<log_dir>/<name>.sh`` and submit it.

        ``directives`` are Slurm options for this job only (``--dependency=...``,
        ``--nodelist=...``); the backends without Slurm jobs ignore them.

        The script is written whole under a fresh name and renamed into place
        (see :func:`~mspass_cluster.files.write_file`), 0600 with ``security``,
        in a log directory only its owner can write: what ``sbatch`` or
        ``bash`` reads is what was written, also when a name is submitted again.
        """
        script, output = self.script(role, name, directives)
        path = os.path.join(self.options.log_dir, f"{name}.sh")
        write_file(path, script, file_mode(self.options))
        unit = self.backend.unit
        job_id = await self.backend.submit(path, f"{role} {unit} {name}", output, role)
        job = TrackedJob(role, name, job_id, expand_job_id(output, job_id), path, unit=unit)
        self.jobs[job_id] = job
        logger.log(self.detail, "Submitted %s %s %s (%s); log: %s", role, unit, job_id, name, job.log_path)
        return job

    async def submit_together(self, role: str, name: str) -> TrackedJob:
        """Like :meth:`submit`, but the calls made in the same turn of the event loop go together (:meth:`submit_many`).

        Dask's ``SpecCluster`` starts every new worker node of a ``scale()``
        at once; gathered here, they reach Slurm as one job array.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._together.append((role, name, future))
        if len(self._together) == 1:
            loop.create_task(self._submit_gathered())
        return await future

    async def _submit_gathered(self) -> None:
        for _ in range(3):  # every start of this turn has joined after these
            await asyncio.sleep(0)
        batch, self._together = self._together, []
        for role in dict.fromkeys(r for r, _, _ in batch):
            mine = [(n, f) for r, n, f in batch if r == role]
            try:
                jobs = await self.submit_many(role, [n for n, _ in mine])
            except BaseException as exc:  # every node of the batch learns why
                for _, future in mine:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), job in zip(mine, jobs):
                if not future.done():
                    future.set_result(job)

    async def submit_many(self, role: str, names: list[str]) -> list[TrackedJob]:
        """Submit the jobs ``names`` of ``role``: one job array on Slurm (``worker_submission="array"``), else one by one.

        Each array task keeps its own script (``<log_dir>/<name>.sh``), log
        and id (``<array id>_<i>``), so it is polled, cancelled and replaced
        as a job of its own. Before submitting, the controller's limits
        (``scontrol show config``) are read once: an array whose highest
        index reaches ``MaxArraySize`` is submitted as separate jobs instead
        (logged once), and nodes that ``MaxJobCount`` leaves no room for are
        refused here with the numbers, instead of an ``sbatch`` that retries
        for minutes.
        """
        if not names:
            return []
        indices = [_node_index(name) for name in names]
        steps = getattr(self.backend, "steps", None)
        if self.options.worker_submission == "steps" and steps is not None and role == "worker" and None not in indices:
            return await self._submit_steps(role, names, indices, steps)
        site = getattr(self.backend, "site_limits", None)
        limits = await site() if site is not None else None
        if limits is not None and limits.max_job_count and len(names) * 10 >= limits.max_job_count:
            await self._check_room(names, limits)
        arrays = (
            self.options.worker_submission == "array"
            and getattr(self.backend, "arrays", False)
            and role == "worker"
            and None not in indices
        )
        if arrays and limits is not None and not limits.arrays:
            arrays = self._no_array(f"this site disables job arrays (MaxArraySize={limits.max_array_size})")
        elif arrays and limits is not None and limits.max_array_size and max(indices) >= limits.max_array_size:
            arrays = self._no_array(
                f"worker node {max(indices)} is beyond this site's highest array index "
                f"(MaxArraySize={limits.max_array_size}, so at most {limits.max_array_size - 1})"
            )
        if not arrays:
            return list(await asyncio.gather(*(self.submit(role, name) for name in names)))
        self.know(cluster_size=max(self.context.cluster_size, len(self.active()) + len(names)))
        cluster_name = names[0].rsplit("-", 2)[0]
        mode = file_mode(self.options)
        for name in names:
            script, _ = self.script(role, name)
            write_file(os.path.join(self.options.log_dir, f"{name}.sh"), script, mode)
        script, array_name, output = build_worker_array_script(self.options, cluster_name, indices)
        spec = format_array_indices(indices)
        path = os.path.join(self.options.log_dir, f"{array_name}-{min(indices)}-{max(indices)}.sh")
        write_file(path, script, mode)
        unit = self.backend.unit
        what = f"{role} {unit} array of {len(names)} node(s) {array_name} [{spec}]"
        array_id = await self.backend.submit(path, what, output, role)
        jobs = []
        for name, index in zip(names, indices):
            job_id = array_task_id(array_id, index)
            log_path = os.path.join(self.options.log_dir, f"{name}-{job_id}.out")
            job = TrackedJob(role, name, job_id, log_path, os.path.join(self.options.log_dir, f"{name}.sh"), unit=unit)
            self.jobs[job_id] = job
            jobs.append(job)
        logger.log(
            self.detail,
            "Submitted %d %s node(s) as job array %s [%s]; script: %s",
            len(names),
            role,
            array_id,
            spec,
            path,
        )
        return jobs

    async def _submit_steps(self, role: str, names: list[str], indices: list[int], steps) -> list[TrackedJob]:
        """Worker nodes ``names`` as srun steps of one holder job (``worker_submission="steps"``).

        See :mod:`mspass_cluster.backends.steps`: one ``sbatch`` and one
        queued job however many nodes; each node's own script starts in it
        as a step once it runs, with its own log and id ``<holder>.w<i>``.
        """
        self.know(cluster_size=max(self.context.cluster_size, len(self.active()) + len(names)))
        cluster_name = names[0].rsplit("-", 2)[0]
        mode = file_mode(self.options)
        paths = []
        for name in names:
            script, _ = self.script(role, name)
            paths.append(os.path.join(self.options.log_dir, f"{name}.sh"))
            write_file(paths[-1], script, mode)
        script, holder_name, output = build_worker_holder_script(
            self.options, cluster_name, indices, self.context.heartbeat
        )
        spec = format_array_indices(indices)
        path = os.path.join(self.options.log_dir, f"{holder_name}-{min(indices)}-{max(indices)}.sh")
        write_file(path, script, mode)
        what = f"{role} nodes {holder_name} [{spec}], one job of {len(names)} node(s)"
        holder_id = await self.backend.submit(path, what, output, role)
        jobs, tracked = [], {}
        for name, index, script_path in zip(names, indices, paths):
            job_id = step_id(holder_id, index)
            log = step_log(self.options.log_dir, name, job_id)
            tracked[job_id] = (script_path, log, f"{role} step {name}")
            job = TrackedJob(role, name, job_id, log, script_path, unit="step")
            self.jobs[job_id] = job
            jobs.append(job)
        steps.add(holder_id, tracked)
        logger.info(
            "Submitted %d %s node(s) as one job, %s [%s]; each node is an srun step in it once it runs "
            "(worker_submission='steps'); script: %s",
            len(names),
            role,
            holder_id,
            spec,
            path,
        )
        return jobs

    def _no_array(self, why: str) -> bool:
        if not self._said_no_array:
            self._said_no_array = True
            logger.warning(
                "Worker nodes go to Slurm as separate jobs, one sbatch each, not as one job array: %s. "
                "Nothing to do; set worker_submission='jobs' to choose this yourself.",
                why,
            )
        return False

    async def _check_room(self, names: list[str], limits) -> None:
        """Refuse nodes the controller has no room for (``MaxJobCount``), with the numbers and the ways out."""
        held = await self.backend.jobs_held()
        if held is None or held + len(names) <= limits.max_job_count:
            return
        room = max(0, limits.max_job_count - held)
        age = f"{limits.min_job_age} s" if limits.min_job_age else "MinJobAge"
        raise SubmitError(
            build_job_count_argv(),
            0,
            reason=(
                f"{len(names)} worker node(s) asked for, but Slurm's controller holds at most {limits.max_job_count} "
                f"jobs (MaxJobCount, every user's and every array task counted, ended ones for {age}) and holds "
                f"{held} now: room for {room}. Each worker node is one job, also in a job array, so nothing was "
                f"submitted. Ask for {room} or fewer, wait for jobs to leave the queue, or set "
                "worker_submission='steps': the worker nodes of a start or scale() go as one job, each node an srun "
                "step in it (or run the whole cluster inside one allocation: `mspass-cluster submit --nodes <N+1> "
                "notebook.ipynb`)."
            ),
        )

    def active(self) -> list[TrackedJob]:
        """Jobs that have not ended (as far as the last poll knows)."""
        return [j for j in self.jobs.values() if not j.ended]

    async def poll(self, job_ids=None) -> list[TrackedJob]:
        """Refresh the status of ``job_ids`` (default: every active job) with one batched query.

        Returns the jobs whose state changed.
        """
        active = self.active() if job_ids is None else [self.jobs[j] for j in job_ids if j in self.jobs]
        statuses = await self.backend.statuses([j.job_id for j in active])
        # Jobs squeue lists as ended but without an exit code: asked together, one call (a teardown ends them all).
        unfinished = [j for j, s in statuses.items() if s.state.kind == "ended" and s.exit_code is None]
        if unfinished:
            finals = await self.backend.final_statuses(unfinished)
            statuses.update({j: s for j, s in finals.items() if j in statuses})
        changed = []
        for job in active:
            new = statuses.get(job.job_id)
            if new is None:
                continue
            old = job.status
            job.status = new
            if old is None or (old.state, old.reason, old.nodes) != (new.state, new.reason, new.nodes):
                changed.append(job)
        return changed

    async def poll_riding_outages(self, give_up: bool) -> list[TrackedJob] | None:
        """:meth:`poll`, riding out a Slurm controller outage (a restart, an overload).

        Returns the jobs that changed, or None while Slurm does not answer.
        With ``give_up`` (during start-up), an outage longer than
        ``SLURM_OUTAGE_TOLERANCE`` raises; afterwards the running cluster
        does not need Slurm and only warns (once a minute).
        """
        loop = asyncio.get_running_loop()
        try:
            changed = await self.poll()
        except CommandError as exc:
            now = loop.time()
            first_line = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else str(exc).splitlines()[0]
            if self._silent_since is None:
                self._silent_since = self._silence_warned = now
                logger.warning("Slurm did not answer (%s): %s Retrying.", exc.argv[0], first_line)
            elif give_up and now - self._silent_since > SLURM_OUTAGE_TOLERANCE:
                raise SlurmUnavailableError.explaining(
                    exc,
                    (
                        f"Slurm did not answer for {now - self._silent_since:.0f} s while the cluster was "
                        "starting. Its jobs were cancelled as far as Slurm could be reached; if any is still "
                        "listed once `scontrol ping` says the controller is back, `mspass-cluster down` "
                        "cancels it. Start the cluster again then."
                    ),
                ) from exc
            elif now - self._silence_warned >= 60:
                self._silence_warned = now
                logger.warning("Slurm has not answered for %.0f s: %s", now - self._silent_since, first_line)
            return None
        if self._silent_since is not None:
            logger.info("Slurm answers again, after %.0f s.", loop.time() - self._silent_since)
            self._silent_since = None
        return changed

    async def cancel(self, job: TrackedJob, *, signal: str | None = None, timeout: float = 120.0) -> bool:
        """Cancel ``job`` (or send it ``signal``) and wait until Slurm lists it no more.

        Calls made together are batched into one ``scancel`` and one poll
        loop. Returns False when the job was still listed at ``timeout``.
        """
        job.stopping = True
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
                    await self.backend.cancel(ids, signal=signal)
                except CommandError as exc:
                    logger.warning("%s; cancelling jobs %s outright.", exc, ", ".join(ids))
                    await self.backend.cancel(ids)
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
        for job in self.active():
            job.stopping = True
        try:
            self.backend.signal_now(ids, "TERM")
        except CommandError as exc:
            logger.error("Could not stop jobs %s: %s", ids, exc)
        return ids

    def cancel_everything_now(self) -> list[str]:
        """Synchronous last resort: ``scancel`` every job not known to have ended."""
        ids = [j.job_id for j in self.active()]
        if ids:
            try:
                self.backend.cancel_now(ids)
            except CommandError as exc:
                logger.error("Could not cancel jobs %s: %s", ids, exc)
        return ids


def _node_index(name: str) -> int | None:
    """The number at the end of a worker node's name (``mspass-ab-worker-7`` gives 7), or None."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


_EXIT_LINE = re.compile(r"mspass_cluster: ([\w-]+) exited with status (\d+)")


def server_exit_status(log_path: str) -> int | None:
    """The server's exit status that the job script logged, if it did."""
    matches = _EXIT_LINE.findall(tail(log_path, 50))
    return int(matches[-1][1]) if matches else None
