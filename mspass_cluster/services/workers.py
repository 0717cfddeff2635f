"""The worker role: worker nodes, each one job of ``processes`` Dask workers, sized, watched and replaced.

Dask's :class:`~distributed.deploy.SpecCluster` keeps the plan (the worker
spec) and starts or closes a :class:`WorkerJob` per worker node as ``scale``
and ``adapt`` change it. :class:`WorkerNodes` holds what the cluster knows
about them: which are ready (every process connected), which failed and
why, how many nodes a request for cores or memory means, and what to do
when a job ends (replace it, or report it).
"""

from __future__ import annotations

import collections
import logging
import math
import time

from dask.utils import parse_bytes
from distributed.core import Status
from distributed.deploy import Adaptive
from distributed.deploy.spec import ProcessInterface

from ..errors import ConfigError, JobFailedError
from ..guardrails import raise_open_files
from ..jobs import JOB_STOP_TIMEOUT, JobLauncher, TrackedJob, tail
from ..slurm import JobState, explain_reason

#: Pending reasons that are the queue's ordinary business, not a limit a user can act on.
ORDINARY_REASONS = {"", "None", "Resources", "Priority"}
#: Worker nodes listed one by one in "Waiting for ..."; more are counted by state and reason.
LISTED_NODES = 4

__all__ = ["WorkerJob", "WorkerNodes", "NodeAdaptive", "node_of_worker"]

logger = logging.getLogger("mspass_cluster")


class WorkerJob(ProcessInterface):
    """One worker node: one job running ``processes`` Dask workers.

    The cluster's worker spec holds these; Dask's ``SpecCluster`` starts and
    closes them as ``scale`` and ``adapt`` change the spec.
    """

    def __init__(self, scheduler=None, name=None, *, launcher: JobLauncher):
        super().__init__(scheduler=scheduler, name=name)
        self.name = name
        self.launcher = launcher
        self.job: TrackedJob | None = None

    async def start(self):
        try:
            self.job = await self.launcher.submit_together("worker", self.name)
        except BaseException:
            self.status = Status.failed
            raise
        await super().start()

    async def close(self):
        if self.job is not None and not self.job.ended:
            if not await self.launcher.cancel(self.job, timeout=JOB_STOP_TIMEOUT):
                logger.warning(
                    "Worker job %s was still listed by Slurm %.0f s after scancel.", self.job.job_id, JOB_STOP_TIMEOUT
                )
        await super().close()

    def __repr__(self):
        job = self.job.describe() if self.job else "not submitted"
        return f"<WorkerJob {self.name}: {job}>"


def node_of_worker(grouped: bool, worker_state) -> str:
    """The worker node (job name) of a worker: ``<job>-<i>`` when a node runs several processes."""
    name = str(worker_state.name)
    return name.rsplit("-", 1)[0] if grouped else name


class NodeAdaptive(Adaptive):
    """Adaptive scaling whose decisions are carried out in whole worker nodes."""

    async def scale_up(self, n):
        self.cluster.workers_service.resize(math.ceil(n / self.cluster.options.processes))


class WorkerNodes:
    """What the cluster knows of its worker nodes; the plan itself is the ``SpecCluster``'s worker spec.

    Parameters
    ----------
    cluster : MsPASSCluster
        Whose ``worker_spec``, ``workers`` and scheduler these are.
    capacity : int or None
        Most worker nodes the backend can hold (an allocation), or None.
    partition_nodes : int or None
        Nodes in the partition, when it was named (to warn of jobs that must wait).
    """

    role = "worker"

    def __init__(self, cluster, capacity: int | None = None, partition_nodes: int | None = None):
        self.cluster = cluster
        self.options = cluster.options
        self.capacity = capacity
        self.partition_nodes = partition_nodes
        #: Failures of worker jobs not yet raised to the user (by ``wait_for_workers``).
        self.failures: list[JobFailedError] = []
        self._joining_said: tuple[int, int] | None = None
        self._joining_at = 0.0
        raise_open_files(self.options.nodes * self.options.processes)

    # ------------------------------------------------------------ what is there
    def jobs(self) -> list[TrackedJob]:
        """The jobs of the worker nodes in the plan now."""
        return [w.job for w in self.cluster.workers.values() if isinstance(w, WorkerJob) and w.job is not None]

    def connected(self) -> set:
        """Names of the Dask workers connected to the scheduler."""
        return {ws.name for ws in self.cluster.scheduler.workers.values()}

    def worker_names(self, job_name: str) -> set:
        """The Dask worker names a worker node's job runs."""
        spec = self.cluster.worker_spec.get(job_name) or self.cluster.new_spec
        return {f"{job_name}{suffix}" for suffix in spec.get("group", [""])}

    def mark_ready(self) -> set:
        """Mark worker jobs whose every process has connected; return the connected worker names."""
        connected = self.connected()
        for job in self.jobs():
            if self.worker_names(job.name) <= connected:
                job.ready = True
        return connected

    def waiting_for(self, connected: set) -> list[str]:
        """What start-up still waits for from the worker nodes: each one, or counts by state and reason when many.

        Pending reasons that are limits (``QOSMaxJobsPerUserLimit``,
        ``AssocMaxJobsLimit``...) are followed by what they mean and what to do.
        """
        waiting = [job for job in self.jobs() if not job.ready]
        if len(waiting) <= LISTED_NODES:
            texts = []
            for job in waiting:
                names = self.worker_names(job.name)
                text = f"{job.describe()}, {len(names & connected)}/{len(names)} workers connected"
                reason = job.status.reason if job.status else ""
                if reason not in ORDINARY_REASONS and explain_reason(reason) != reason:
                    text += f": {explain_reason(reason)}"
                texts.append(text)
            return texts
        groups = collections.Counter(
            (job.state.value, job.status.reason if job.status else "", job.phase.value) for job in waiting
        )
        texts = []
        for (state, reason, phase), count in sorted(groups.items(), key=lambda item: -item[1]):
            text = f"{count} worker node(s) {phase} ({state}"
            if reason:
                text += f", {reason}"
                if reason not in ORDINARY_REASONS and explain_reason(reason) != reason:
                    text += f": {explain_reason(reason)}"
            text += ")"
            if phase == "running":
                text += " whose workers have not all connected yet"
            texts.append(text)
        return texts

    def needed(self, planned: int) -> int:
        """Worker nodes that must be ready before start-up is done (``ready_workers``), of ``planned``."""
        wanted = self.options.ready_workers
        if wanted is None:
            return planned
        if isinstance(wanted, float):
            return min(planned, math.ceil(wanted * planned - 1e-9))
        return min(planned, wanted)

    def ready_enough(self, connected: set, planned_workers: set) -> bool:
        """Every planned worker connected, or as many worker nodes ready as ``ready_workers`` asks."""
        if planned_workers <= connected:
            return True
        if self.options.ready_workers is None:
            return False
        ready = sum(1 for job in self.jobs() if job.ready)
        return ready >= self.needed(len(self.cluster.worker_spec))

    def report_joining(self) -> None:
        """After a start with ``ready_workers``: say how many worker nodes are ready as more join, and what the rest wait for.

        A line when the count changes (at most every 10 s) and when the last one is ready.
        """
        if self.options.ready_workers is None:
            return
        planned = len(self.cluster.worker_spec)
        jobs = self.jobs()
        ready = sum(1 for job in jobs if job.ready)
        now = time.monotonic()
        said = self._joining_said
        if said is None or said == (ready, planned):
            self._joining_said = (ready, planned) if said is None else said
            return
        if ready >= planned:
            logger.info("Every worker node is ready now: %d of %d.", ready, planned)
        elif now - self._joining_at >= 10:
            logger.info(
                "%d of %d worker node(s) ready; waiting for %s",
                ready,
                planned,
                "; ".join(self.waiting_for(self.connected())) or "their jobs to be submitted",
            )
        else:
            return
        self._joining_said, self._joining_at = (ready, planned), now

    def startup_failure(self) -> JobFailedError | None:
        """The error to raise when a worker job ended before its workers connected."""
        for job in self.jobs():
            if job.ended and not job.ready:
                fix = (
                    "Check python=, worker_extra_args and the log above; "
                    "print(cluster.job_script('worker')) shows what ran."
                )
                if "Timed out starting worker" in tail(job.log_path, 200):
                    fix = (
                        f"The workers on {job.node or 'the node'} could not reach the scheduler at "
                        f"{self.cluster.scheduler.address} within death_timeout={self.options.death_timeout} s: "
                        "that address is not reachable from the compute nodes. Set interface= to a network they "
                        "share with this machine (e.g. interface='ib0'; `ip -brief addr` lists them)."
                    )
                job.error = job.failure(
                    "ended before its Dask workers connected", "Every job of this cluster was cancelled. " + fix
                )
                return job.error
        return None

    def on_change(self, job: TrackedJob) -> None:
        """After start-up: replace a node whose job ended after its workers ran; report one that never ran."""
        cluster = self.cluster
        worker = cluster.workers.get(job.name)
        if (
            not job.ended
            or not isinstance(worker, WorkerJob)
            or worker.job is not job
            or job.name not in cluster.worker_spec
        ):
            return
        del cluster.workers[job.name]
        worker.status = Status.closed
        if job.ready:
            # COMPLETED: its workers reached worker_lifetime and left gracefully, as planned.
            level = logging.INFO if job.state is JobState.COMPLETED else logging.WARNING
            logger.log(
                level,
                "%s; submitting a replacement to keep %d worker node(s).",
                job.describe(),
                len(cluster.worker_spec),
            )
            cluster._correct_state()
        else:
            del cluster.worker_spec[job.name]
            job.error = job.failure(
                "ended before its Dask workers connected", "It was not replaced; check the log above."
            )
            self.failures.append(job.error)
            logger.error("%s", job.error)

    # ------------------------------------------------------------ sizing
    def nodes_for(self, n, jobs, memory, cores) -> int:
        """Worker nodes for ``scale(n, jobs=, memory=, cores=)``; ConfigError for what cannot be."""
        target = n if n is not None else (jobs or 0)
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ConfigError(f"scale({target!r}): give a whole number of worker nodes, 0 or more.")
        if memory is not None:
            if self.options.memory_bytes is None:
                raise ConfigError(
                    "scale(memory=...) needs memory= per worker node, e.g. MsPASSCluster(memory='64GiB')."
                )
            target = max(target, math.ceil(parse_bytes(memory) / self.options.memory_bytes))
        if cores is not None:
            if self.options.cores is None:
                raise ConfigError("scale(cores=...) needs cores= per worker node, e.g. MsPASSCluster(cores=32).")
            target = max(target, math.ceil(cores / self.options.cores))
        if self.capacity is not None and target > self.capacity:
            raise ConfigError(
                f"scale({target}) is beyond this allocation: it holds {self.capacity} worker node(s). Submit with "
                "more nodes, or use backend='slurm' to get worker nodes as separate jobs."
            )
        return target

    def check_adapt_bounds(self, minimum, maximum) -> None:
        """ConfigError for ``adapt`` bounds that are not whole node counts, are reversed, or exceed an allocation."""
        for name, value in (("minimum", minimum), ("maximum", maximum)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value < 0
                or (value != math.inf and value != int(value))
            ):
                raise ConfigError(f"adapt({name}={value!r}): give a whole number of worker nodes, 0 or more.")
        if minimum > maximum:
            raise ConfigError(
                f"adapt(minimum={minimum}, maximum={maximum}): the minimum is above the maximum. "
                f"Give e.g. adapt(minimum={maximum}, maximum={minimum})."
            )
        if self.capacity is not None and maximum > self.capacity:
            raise ConfigError(
                f"adapt(maximum={maximum}) is beyond this allocation: it holds {self.capacity} worker "
                f"node(s). Give maximum={self.capacity} or less, or use backend='slurm'."
            )

    def warn_if_beyond_partition(self, target: int) -> None:
        """Say so when ``target`` whole-node worker jobs can never all run at once in the partition."""
        if not (self.partition_nodes and self.options.exclusive):
            return
        room = self.partition_nodes - (1 if self.options.db_partition == self.options.partition else 0)
        if target > room:
            logger.warning(
                "%d worker node(s) asked for, but partition %s has %d node(s)%s, and each worker job takes a whole "
                "node: at most %d can run at once; the other %d will wait in the queue (Resources) until some end.",
                target,
                self.options.partition,
                self.partition_nodes,
                ", one of them for the database" if room < self.partition_nodes else "",
                max(room, 0),
                target - max(room, 0),
            )

    def resize(self, target: int) -> None:
        """Edit the worker spec to ``target`` nodes; jobs are submitted or cancelled by ``_correct_state``.

        Shrinking drops nodes whose workers have not connected first, then the newest.
        """
        cluster = self.cluster
        if cluster.status in (Status.closing, Status.closed):
            target = 0
        raise_open_files(target * self.options.processes)
        spec = cluster.worker_spec
        if len(spec) > target:
            connected = self.connected()
            newest_first = list(spec)[::-1]
            idle_first = sorted(newest_first, key=lambda name: bool(self.worker_names(name) & connected))
            for name in idle_first[: len(spec) - target]:
                del spec[name]
        while len(spec) < target:
            spec.update(cluster.new_worker_spec())
        cluster.loop.add_callback(cluster._correct_state)

    def forget_unsubmitted(self) -> None:
        """After a refused submission: drop the nodes whose job was never submitted from the plan."""
        for name, worker in list(self.cluster.workers.items()):
            if isinstance(worker, WorkerJob) and worker.job is None:
                del self.cluster.workers[name]
                self.cluster.worker_spec.pop(name, None)
