"""Start-up and watching: the one loop that reads every job's state and acts on it.

:meth:`Supervisor.wait_ready` polls all jobs with one batched query (0.25 s,
backing off to ``poll_interval``), probes the database, counts workers, logs
what it still waits for, and raises the first failure (a job that ended, a
deadline) with its story. :meth:`Supervisor.watch` then keeps polling while
the cluster runs, so a lost database or worker node is known within
``poll_interval`` and handed to its service. :meth:`Supervisor.beat`
refreshes the heartbeat the jobs' orphan guards watch.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import MsPASSClusterError, StartupTimeoutError
from ..files import file_mode, touch
from ..jobs import JobLauncher
from .database import DatabaseService
from .workers import WorkerNodes

__all__ = ["Supervisor", "ALARM_QUIET"]

logger = logging.getLogger("mspass_cluster")

#: Seconds after a failed database heartbeat during which further ones do not hasten the next poll.
ALARM_QUIET = 30.0


class Supervisor:
    """Watches one cluster's jobs through its services.

    Parameters
    ----------
    launcher : JobLauncher
    database : DatabaseService
    workers : WorkerNodes
    on_database_moved : coroutine function, optional
        Called once a database brought back (or relayed) answers, to re-point
        what the cluster published; :attr:`DatabaseService.moving` is
        cleared after it.
    """

    def __init__(self, launcher: JobLauncher, database: DatabaseService, workers: WorkerNodes, on_database_moved=None):
        self.launcher = launcher
        self.database = database
        self.workers = workers
        self.options = launcher.options
        self.closing = False
        self.on_database_moved = on_database_moved
        self._tending = asyncio.Lock()
        self._alarm_quiet_until = 0.0

    async def beat(self) -> None:
        """Refresh the heartbeat file the jobs watch (see ``orphan_timeout``), off the event loop."""
        path, mode = self.launcher.context.heartbeat, file_mode(self.options)
        while True:
            await asyncio.to_thread(touch, path, mode)
            await asyncio.sleep(max(1.0, min(10.0, self.options.orphan_timeout / 10)))

    def waiting_for(self, connected: set) -> str:
        parts = [self.database.waiting_for()] + self.workers.waiting_for(connected)
        return "; ".join(p for p in parts if p) or "nothing"

    async def wait_ready(self, plan, on_database=None) -> None:
        """Wait until the database answers and every worker of ``plan()`` connected; fail fast otherwise.

        ``on_database``, a coroutine function, is awaited once, as soon as the
        database first answers: workers that join after it learn the
        database's address when they register, with no connection of their own.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.startup_timeout
        interval, next_poll, last_summary, last_logged, started = 0.25, 0.0, None, 0.0, loop.time()
        while True:
            if self.closing:
                raise MsPASSClusterError("The cluster was closed while it was starting.")
            now = loop.time()
            if now >= next_poll:
                await self.launcher.poll_riding_outages(give_up=True)
                error = self.database.startup_failure() or self.workers.startup_failure()
                if error is not None:
                    raise error
                next_poll, interval = now + interval, min(interval * 1.5, self.options.poll_interval)
            db_ready = await self.database.probe()
            if db_ready and on_database is not None:
                await on_database()
                on_database = None
            connected = self.workers.mark_ready()
            if db_ready and self.workers.ready_enough(connected, plan()):
                if not plan() <= connected:
                    self.workers.report_joining()  # remembers where start-up left off
                    logger.info(
                        "Ready with %d of %d worker node(s) (ready_workers=%s); the others join as they start. "
                        "Waiting for %s",
                        sum(1 for job in self.workers.jobs() if job.ready),
                        len(self.workers.cluster.worker_spec),
                        self.options.ready_workers,
                        "; ".join(self.workers.waiting_for(connected)),
                    )
                return
            summary = self.waiting_for(connected)
            if summary != last_summary or now - last_logged > 60:
                # A few lines for a user: a quick start says nothing, a slow one says what it waits for.
                shown = now - started > 2 and (now - last_logged > 10 or last_summary is None)
                logger.log(logging.INFO if shown else self.launcher.detail, "Waiting for %s", summary)
                last_summary = summary
                if shown:
                    last_logged = now
            if now >= deadline:
                raise StartupTimeoutError(
                    f"The cluster was not ready after startup_timeout={self.options.startup_timeout:g} s. Still "
                    f"waiting for {summary}. Every job was cancelled. If the queue is busy, raise startup_timeout; "
                    "if jobs ran but never connected, check the logs in " + self.options.log_dir + "."
                )
            await asyncio.sleep(0.1)

    async def watch(self) -> None:
        """After start-up: keep polling; hand every job that changed to its service; bring the database back.

        A failed heartbeat of the database's server (see
        :func:`~mspass_cluster.db.watch_server`) asks Slurm at once, so its
        end is known within a second rather than at the next poll. While the
        database is being brought back the polls are quick (0.25 s, backing
        off to ``poll_interval``), so that it is re-pointed within a fraction
        of a second of answering.
        """
        interval = self.options.poll_interval
        while not self.closing:
            await self._pause(interval)
            if self.closing:
                return
            alarmed, was_moving = self._alarm_rang(), self.database.moving
            changed = await self.launcher.poll_riding_outages(give_up=False)
            if changed is not None:
                self.workers.mark_ready()
                self.workers.report_joining()
                self.database.warn_before_walltime()
                for job in changed:
                    logger.log(self.launcher.detail, "%s", job.describe())
                    if self.closing:
                        continue
                    (self.database if job.role.split("-")[0] == "db" else self.workers).on_change(job)
            if self.closing:
                return
            try:
                await self.tend_database()
            except Exception as exc:  # never let the watch die: the database's story is kept for the next call
                logger.error("Bringing the database back failed: %s", exc)
            if alarmed or (self.database.moving and not was_moving):
                interval = 0.25  # the database's server went away, or is coming back: look again soon
            elif self.database.moving or interval < self.options.poll_interval:
                interval = min(interval * 1.5, self.options.poll_interval)

    async def _pause(self, interval: float) -> None:
        """Sleep ``interval``, or less when the database's heartbeat fails.

        A failing heartbeat rings every 0.5 s while the server stays away (its
        job may take minutes to end, e.g. copying node-local data back): it
        cuts a pause short at most once every ``ALARM_QUIET`` seconds, so that
        Slurm is asked no more often than the regular polls would.
        """
        alarm = getattr(self.database, "alarm", None)
        loop = asyncio.get_running_loop()
        if alarm is None or loop.time() < self._alarm_quiet_until:
            await asyncio.sleep(interval)
            return
        try:
            await asyncio.wait_for(alarm.wait(), interval)
        except asyncio.TimeoutError:
            pass

    def _alarm_rang(self) -> bool:
        alarm = getattr(self.database, "alarm", None)
        if alarm is None or not alarm.is_set():
            return False
        alarm.clear()
        if asyncio.get_running_loop().time() < self._alarm_quiet_until:
            return False
        self._alarm_quiet_until = asyncio.get_running_loop().time() + ALARM_QUIET
        logger.log(self.launcher.detail, "The database's heartbeat failed: asking Slurm about its job now.")
        return True

    async def tend_database(self) -> None:
        """One step of bringing the database back (see :meth:`DatabaseService.tend`); re-point once it answers."""
        async with self._tending:
            if await self.database.tend() and self.database.moving:
                if self.on_database_moved is not None:
                    await self.on_database_moved()
                self.database.moving = False

    def _database_away(self) -> bool:
        """Being brought back, or its server silent (heartbeats fail) while its job still runs."""
        return self.database.moving or getattr(self.database, "server_silent", False)

    async def database_back(self, timeout: float) -> None:
        """Raise the database's loss, or wait (up to ``timeout``) while it is away.

        Away: being brought back, or its server not answering heartbeats
        while its job still runs (a node-local database copies its data back
        after its server stopped; the job's end then brings it back). What it
        waits for (the job's state and Slurm's reason) is logged when the
        wait starts and once a minute after.
        """
        await self.database.check()
        if not self._database_away():
            return
        loop = asyncio.get_running_loop()
        deadline, said, last, checked = loop.time() + timeout, None, 0.0, loop.time()
        while self._database_away():
            if self.closing:
                raise MsPASSClusterError("The cluster was closed while waiting for its database to come back.")
            if not self.database.moving and loop.time() - checked >= 2.0:
                checked = loop.time()
                await self.database.check()  # its job's end, once the copy-back is done
            await self.tend_database()
            if not self._database_away():
                break
            now = loop.time()
            waiting = self.database.waiting_for() or "its new job"
            if not self.database.moving:
                waiting = (
                    f"its server, which does not answer, while {self.database.job.describe()} still runs (a "
                    "node-local database copies its data back after its server stopped)"
                )
            if said is None or (waiting != said and now - last > 10) or now - last > 60:
                logger.info("Waiting for the database to come back: %s", waiting)
                said, last = waiting, now
            if now >= deadline:
                raise StartupTimeoutError(
                    f"The database did not come back within {timeout:g} s (startup_timeout). Still waiting for "
                    f"{waiting}. What it stored is in {self.options.db_dir}; close this cluster "
                    "and start a new one on the same work_dir if the queue stays busy."
                )
            await asyncio.sleep(0.25)
        error = self.database.lost()
        if error is not None:
            raise error

    async def wait_for_workers(self, wanted_of, timeout: float) -> None:
        """Until ``wanted_of(connected)`` says enough workers are there; raises a worker failure or at ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.workers.failures:
                raise self.workers.failures.pop(0)
            lost = self.database.lost()
            if lost is not None:
                raise lost
            connected = self.workers.connected()
            have, wanted = wanted_of(connected)
            if have >= wanted:
                return
            if loop.time() >= deadline:
                raise StartupTimeoutError(
                    f"Only {have} of {wanted} workers connected within the timeout; "
                    f"Slurm says: {'; '.join(self.workers.waiting_for(connected)) or 'nothing pending'}."
                )
            await asyncio.sleep(0.1)
