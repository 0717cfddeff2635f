"""The Slurm backend: each role is a Slurm job of its own.

Turns the pure builders and parsers of :mod:`mspass_cluster.slurm` into
commands through a :class:`~mspass_cluster.commands.CommandRunner`, the one
place commands run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re

from .. import slurm
from ..commands import CommandRunner
from ..errors import CommandError, SlurmUnavailableError, SubmitError
from ..slurm import JobState, JobStatus
from .steps import HeldSteps, is_step

__all__ = ["SlurmBackend", "SUBMIT_BACKOFF"]

logger = logging.getLogger(__name__)

#: Seconds between tries of an ``sbatch`` the controller refused for load ("Resource temporarily
#: unavailable", "Socket timed out", a rate limit): doubling, about 30 s in all, each with up to 25 % more
#: at random so that many notebooks refused together do not come back together.
SUBMIT_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)


class SlurmBackend:
    """Each role a Slurm job: ``sbatch``, one batched ``squeue`` per poll, ``scancel``; with timeouts.

    Parameters
    ----------
    runner : CommandRunner
        Runs (and counts) the commands.
    umask : int, optional
        The jobs' umask from their very start (``SLURM_UMASK``), so that the
        logs Slurm creates get it (0600 for 077); None: the notebook's own.
    """

    def __init__(self, runner: CommandRunner, umask: int | None = None):
        self.runner = runner
        self._sacct_works: bool | None = None
        # sbatch passes the umask of its caller, or this variable when set, to the job: Slurm creates the
        # --output file with it before the script's own `umask` line runs.
        self._submit_env = None if umask is None else {"SLURM_UMASK": f"{umask:04o}"}
        #: Worker nodes run as srun steps of holder jobs (``worker_submission="steps"``).
        self.steps = HeldSteps(runner, None if umask is None else 0o666 & ~umask)

    #: What runs a role, in words for messages.
    unit = "job"
    #: Worker nodes can be one job array (see :meth:`JobLauncher.submit_many`).
    arrays = True
    #: Pauses between tries of a submission refused for load (tests shorten them).
    backoff = SUBMIT_BACKOFF
    _limits: slurm.SiteLimits | None = None

    async def site_limits(self) -> slurm.SiteLimits:
        """The controller's limits (``scontrol show config``), read once; empty if Slurm does not say."""
        if self._limits is None:
            result = await self.runner.arun(slurm.build_config_argv(), check=False)
            self._limits = slurm.parse_site_limits(result.stdout) if result.returncode == 0 else slurm.SiteLimits()
        return self._limits

    async def jobs_held(self) -> int | None:
        """Jobs the controller holds now (every user, every array task, ended ones not yet purged); None if unknown."""
        result = await self.runner.arun(slurm.build_job_count_argv(), check=False)
        if result.returncode != 0:
            return None
        return sum(1 for line in result.stdout.splitlines() if line.strip())

    async def submit(self, script_path: str, what: str, output: str = "", role: str = "") -> str:
        """Submit a script; return its job id (``output`` is already in the script's directives).

        Raises
        ------
        SubmitError
            With sbatch's own message when Slurm refuses the job.
        """
        argv = slurm.build_sbatch_argv(script_path)
        tries = len(self.backoff) + 1
        for attempt in range(tries):
            try:
                result = await self.runner.arun(argv, error_cls=SubmitError, env=self._submit_env)
                break
            except SubmitError as exc:
                words = _words(exc)
                full = await self._controller_full(what)
                if full is not None:  # no try will pass until jobs leave: say so now
                    raise SubmitError.explaining(exc, full) from exc
                if attempt + 1 == tries or not slurm.refused_for_load(words):
                    self._refused(exc, words, what, script_path)
                # An sbatch that timed out may have queued the job all the same: never submit it twice.
                queued = await self._queued_as(_job_name(script_path))
                if queued:
                    logger.warning(
                        "sbatch for the %s failed (%s), but Slurm had queued it: job %s.", what, words, queued
                    )
                    return queued
                pause = self.backoff[attempt] * random.uniform(1.0, 1.25)
                logger.warning(
                    "Slurm refused the %s for load (%s); trying again in %.1f s (try %d of %d).",
                    what,
                    words.splitlines()[-1],
                    pause,
                    attempt + 2,
                    tries,
                )
                await asyncio.sleep(pause)
        try:
            return slurm.parse_sbatch_job_id(result.stdout)
        except ValueError as exc:
            raise SubmitError(
                argv, 0, result.stdout, result.stderr, reason=f"sbatch printed no job id for the {what}."
            ) from exc

    async def _controller_full(self, what: str) -> str | None:
        """Why no submission can pass now when the controller holds as many jobs as ``MaxJobCount`` allows, else None.

        ``sbatch`` then waits and retries by itself ("Slurm temporarily unable
        to accept job, sleeping and retrying") until it times out, which
        looks like a busy controller; the count tells them apart.
        """
        limits = await self.site_limits()
        if not limits.max_job_count:
            return None
        held = await self.jobs_held()
        if held is None or held < limits.max_job_count:
            return None
        age = f"{limits.min_job_age} s" if limits.min_job_age else "MinJobAge"
        return (
            f"Slurm did not take the {what}: its controller holds {held} jobs, as many as it may "
            f"(MaxJobCount={limits.max_job_count}: every user's jobs and array tasks, ended ones kept for {age}). "
            "Nothing is wrong with the cluster's options; no job can be queued until some leave. Try again "
            "then, with fewer worker nodes, or with worker_submission='steps' (every worker node in one job)."
        )

    async def _queued_as(self, job_name: str | None) -> str | None:
        """The id of a job of ours named ``job_name`` that Slurm holds (an array's own id), or None."""
        if not job_name:
            return None
        result = await self.runner.arun(slurm.build_squeue_named_argv(job_name), check=False)
        ids = [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []
        return ids[0] if ids else None

    def _refused(self, exc: SubmitError, words: str, what: str, script_path: str):
        """Raise the error for an sbatch refusal that trying again does not mend."""
        if slurm.controller_unreachable(words) or slurm.refused_for_load(words):
            raise SlurmUnavailableError.explaining(
                exc,
                (
                    f"Slurm's controller did not take the {what} ({len(self.backoff) + 1} tries over "
                    f"{sum(self.backoff):.0f} s): {words}\n"
                    "Nothing is wrong with the cluster's options. `scontrol ping` shows when the "
                    "controller is back; try again then, or ask your cluster's support."
                ),
            ) from exc
        if _POLICY.search(words):
            raise SubmitError.explaining(
                exc,
                (
                    f"Slurm refused the {what}: {words}\n"
                    "That is a limit of your account or QOS on jobs queued or running at once (MaxSubmitJobs, "
                    "MaxJobs, MaxTRESPerUser): each worker node is one job, also in a job array. "
                    "`sacctmgr show assoc user=$USER` and `sacctmgr show qos` show the limits; ask for fewer "
                    "nodes, or set worker_submission='steps' (the nodes of a start or scale() as one job, each "
                    "an srun step in it), or run the cluster inside one allocation (`mspass-cluster submit "
                    "--nodes <N+1> notebook.ipynb`). The job script is " + script_path + "."
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

    async def statuses(self, job_ids) -> dict[str, JobStatus]:
        """The status of every job in ``job_ids``, with one ``squeue`` call.

        Jobs squeue no longer lists are asked of ``sacct`` when accounting
        works here, else ``scontrol show job``; jobs Slurm has forgotten get
        :attr:`JobState.UNKNOWN`.
        """
        job_ids = list(job_ids)
        if not job_ids:
            return {}
        steps = [j for j in job_ids if is_step(j)]
        if steps:  # their holder jobs are asked in the same squeue
            job_ids = [j for j in job_ids if not is_step(j)]
            holders = self.steps.holder_ids(steps)
            found = await self.statuses(job_ids + holders) if job_ids or holders else {}
            found.update(await self.steps.statuses(steps, found))
            return {j: s for j, s in found.items() if j not in holders or j in job_ids}
        result = await self.runner.arun(slurm.build_squeue_argv(job_ids), check=False)
        found = slurm.parse_squeue(result.stdout)
        if result.returncode != 0 and not found and "Invalid job id" not in result.stderr:
            error = SlurmUnavailableError if slurm.controller_unreachable(result.stderr) else CommandError
            raise error(
                result.argv,
                result.returncode,
                result.stdout,
                result.stderr,
                reason="squeue failed while watching the cluster's jobs.",
            )
        missing = [j for j in job_ids if j not in found]
        if missing:
            found.update(await self.final_statuses(missing))
        return found

    async def final_statuses(self, job_ids) -> dict[str, JobStatus]:
        """Final state and exit code of ended jobs (sacct, else scontrol)."""
        steps = [j for j in job_ids if is_step(j)]
        if steps:
            found = await self.statuses(steps)
            job_ids = [j for j in job_ids if not is_step(j)]
            return {**found, **(await self.final_statuses(job_ids) if job_ids else {})}
        found: dict[str, JobStatus] = {}
        if self._sacct_works is not False:
            result = await self.runner.arun(slurm.build_sacct_argv(job_ids), check=False)
            self._sacct_works = result.returncode == 0
            if self._sacct_works:
                found.update(slurm.parse_sacct(result.stdout))
        missing = [j for j in job_ids if j not in found]
        if len(missing) > 1:  # one call for all of them: a teardown asks for every job at once
            result = await self.runner.arun(slurm.build_scontrol_jobs_argv(), check=False)
            if result.returncode == 0:
                every = slurm.parse_scontrol_jobs(result.stdout)
                found.update({j: every[j] for j in missing if j in every})
        for job_id in job_ids:
            if job_id in found:
                continue
            result = await self.runner.arun(slurm.build_scontrol_job_argv(job_id), check=False)
            status = slurm.parse_scontrol_job(result.stdout) if result.returncode == 0 else None
            found[job_id] = status or JobStatus(job_id, JobState.UNKNOWN, "Slurm no longer knows this job")
        return found

    async def cancel(self, job_ids, signal: str | None = None) -> None:
        """``scancel`` the jobs (or only send them ``signal``); jobs already gone are fine.

        Steps of holder jobs are stopped as steps (see :class:`~mspass_cluster.backends.steps.HeldSteps`).
        """
        job_ids = list(job_ids)
        steps = [j for j in job_ids if is_step(j)]
        if steps:
            await self.steps.cancel(steps, signal)
            job_ids = [j for j in job_ids if not is_step(j)]
        if job_ids:
            await self.runner.arun(slurm.build_scancel_argv(job_ids, signal), check=False)

    def cancel_now(self, job_ids) -> None:
        """Synchronous ``scancel``, for interpreter exit and other last resorts (a step: its whole holder job)."""
        job_ids = list(job_ids)
        holders = self.steps.holder_ids([j for j in job_ids if is_step(j)])
        job_ids = [j for j in job_ids if not is_step(j)] + holders
        if job_ids:
            self.runner.run(slurm.build_scancel_argv(job_ids), check=False, timeout=30)

    def signal_now(self, job_ids, signal: str = "TERM") -> None:
        """Synchronous: send ``signal`` to every process of the jobs and return at once."""
        job_ids = list(job_ids)
        steps = [j for j in job_ids if is_step(j)]
        if steps:  # started steps are asked to stop; holders whose steps never started are cancelled
            job_ids = [j for j in job_ids if not is_step(j)]
            unstarted = self.steps.signal_now(steps)
            if unstarted:
                self.runner.run(slurm.build_scancel_argv(unstarted), check=False, timeout=10)
        if job_ids:
            self.runner.run(slurm.build_scancel_argv(job_ids, signal), check=False, timeout=10)

    async def node_room(self, node: str) -> slurm.NodeRoom | None:
        """``node``'s state and free CPUs and memory, as Slurm counts them; None if Slurm cannot tell."""
        result = await self.runner.arun(slurm.build_node_argv(node), check=False)
        return slurm.parse_node_room(result.stdout) if result.returncode == 0 else None

    def node_addresses(self, partition: str | None) -> list[str]:
        """Addresses of the partition's nodes (``sinfo``), for choosing the scheduler's address."""
        argv = ["sinfo", "--noheader", "--Node", "--format=%o"]
        if partition:
            argv.append(f"--partition={partition}")
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if slurm.controller_unreachable(result.stderr):
                raise SlurmUnavailableError(
                    argv,
                    result.returncode,
                    result.stdout,
                    result.stderr,
                    reason=(
                        "Slurm's controller is not answering, so no job can be submitted now; nothing was "
                        "queued. `scontrol ping` shows when it is back; try again then, or ask your "
                        "cluster's support."
                    ),
                )
            logger.warning(
                "sinfo failed (%s); the scheduler's address is chosen without the nodes' addresses.",
                result.stderr.strip() or f"exit code {result.returncode}",
            )
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]


_POLICY = re.compile(r"QOS|accounting|association|job submit limit|MaxSubmit", re.I)
_JOB_NAME = re.compile(r"^#SBATCH\s+--job-name=(\S+)", re.M)


def _words(exc: SubmitError) -> str:
    """What sbatch said (or why it said nothing)."""
    return exc.stderr.strip() or exc.stdout.strip() or str(exc).splitlines()[0] or "(sbatch printed nothing)"


def _job_name(script_path: str) -> str | None:
    """The ``--job-name`` directive of a job script, or None."""
    try:
        with open(script_path) as f:
            match = _JOB_NAME.search(f.read(64 * 1024))
    except OSError:
        return None
    return match.group(1).strip("\"'") if match else None
