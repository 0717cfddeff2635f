"""Benchmark MsPASSCluster against bare dask-jobqueue SLURMCluster on the Slurm test bed.

Usage (from the repository root, as root, with the test bed up)::

    benchmarks/run [--sizes 1,4,8,16] [--repeat 3] [--out benchmarks/results] [--smoke]

Measures, for both tools with the same worker nodes (see :mod:`benchmarks.tools`):

1. time to ready for each size (interleaved A/B, medians, ratio MsPASS/jobqueue);
2. scale-up and scale-down latency;
3. time until a worker that cannot start becomes an error for the user;
4. teardown: ``close()`` until no job and no process of the cluster is left;
5. load on the Slurm controller: status calls (squeue/sacct/scontrol) per minute.

Writes ``results.json``, ``results.md`` and ``results.png`` under ``--out``.
Timings on a shared VM are noisy, hence medians and ratios measured in the
same run rather than absolute thresholds.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import logging
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from . import probes, report
from .tools import TOOLS, WALLTIME_MINUTES, WORKER_CORES, WORKER_MEMORY, JobqueueTool, MsPASSTool, Running

__all__ = ["main", "Plan", "Harness", "REFERENCE_SLEEPS"]

log = logging.getLogger("benchmarks")

REPO = Path(__file__).resolve().parent.parent
#: A worker command that cannot start, for the failure measurement.
MISSING_PYTHON = "/nonexistent/python"
#: Seconds the harness waits for a closed cluster's jobs to leave squeue before cancelling them itself.
LEFTOVER_GRACE = 60.0
#: Bound on the teardown and scale-down polls (seconds).
POLL_BOUND = 120.0

#: The MsPASS job scripts' fixed sleeps (not run here): ../shared/research/mspass-deployment.md, section 11.
REFERENCE_SLEEPS = {
    "source": "shared/research/mspass-deployment.md, section 11 (MsPASS job scripts and start-mspass.sh)",
    "startup_non_sharded_s": 10,
    "startup_sharded_s": [30, 150],
    "shutdown_non_sharded_s": 20,
    "shutdown_sharded_4_shards_s": 40,
    "note": "Fixed sleeps before the first use of the cluster and at shutdown, whatever the services' real state; "
    "they come on top of queue wait and process start-up.",
}


@dataclass
class Plan:
    """What one run measures."""

    sizes: list
    repeat: int
    scale_from: int
    scale_to: int
    teardown_nodes: int
    load_nodes: int
    failure_cap: float
    steady_s: float
    smoke: bool
    only: list

    def nodes_needed(self) -> int:
        """Test-bed nodes needed: the largest worker count plus MsPASS's database node."""
        return max(max(self.sizes), self.scale_to, self.teardown_nodes, self.load_nodes) + 1


MEASUREMENTS = ("time_to_ready", "scale", "failure", "teardown", "controller_load")


# ---------------------------------------------------------------- arguments
def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give worker node counts of 1 or more, e.g. 1,4,8,16")
    return values


def _pair(text: str) -> tuple[int, int]:
    low, high = _int_list(text)
    if not low < high:
        raise argparse.ArgumentTypeError(f"{text!r}: give FROM,TO with FROM < TO, e.g. 4,8")
    return low, high


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=_int_list, default=None, help="worker node counts for time to ready (default 1,4,8,16)"
    )
    parser.add_argument("--repeat", type=int, default=None, help="repetitions of each measurement (default 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    parser.add_argument("--scale", type=_pair, default=None, help="scale-up FROM,TO worker nodes (default 4,8)")
    parser.add_argument("--teardown-nodes", type=int, default=None, help="worker nodes for teardown (default 4)")
    parser.add_argument(
        "--load-nodes", type=int, default=None, help="worker nodes for controller load (default: largest size)"
    )
    parser.add_argument(
        "--failure-cap",
        type=float,
        default=None,
        help="seconds dask-jobqueue may wait for a worker that cannot start (default 60)",
    )
    parser.add_argument(
        "--steady", type=float, default=None, help="seconds of steady-state polling counted after ready (default 30)"
    )
    parser.add_argument(
        "--only", default=",".join(MEASUREMENTS), help=f"comma-separated subset of {','.join(MEASUREMENTS)}"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="quick check for the tests: 1 node, 1 repetition, scale 1->2, 20 s cap, 5 s steady state",
    )
    parser.add_argument("--verbose", action="store_true", help="also show mspass_cluster's and distributed's INFO logs")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """Defaults for a full run, or for ``--smoke``; explicit options win over both."""
    smoke = args.smoke
    sizes = args.sizes or ([1] if smoke else [1, 4, 8, 16])
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(MEASUREMENTS))
    if unknown:
        raise SystemExit(f"--only: unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    scale_from, scale_to = args.scale or ((1, 2) if smoke else (4, 8))
    return Plan(
        sizes=sizes,
        repeat=args.repeat or (1 if smoke else 3),
        scale_from=scale_from,
        scale_to=scale_to,
        teardown_nodes=args.teardown_nodes or (1 if smoke else 4),
        load_nodes=args.load_nodes or max(sizes),
        failure_cap=args.failure_cap or (20.0 if smoke else 60.0),
        steady_s=args.steady if args.steady is not None else (5.0 if smoke else 30.0),
        smoke=smoke,
        only=only,
    )


# ------------------------------------------------------------------ helpers
def median(values) -> float | None:
    """Median of the samples that exist (failed samples are None)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(mspass: float | None, jobqueue: float | None) -> float | None:
    """MsPASS / jobqueue; below 1 means MsPASSCluster was faster."""
    if mspass is None or not jobqueue:
        return None
    return mspass / jobqueue


def status_calls(counts: dict) -> int:
    return sum(counts.get(p, 0) for p in probes.STATUS_PROGRAMS)


def per_minute(count: int, seconds: float) -> float | None:
    return count / seconds * 60.0 if seconds > 0 else None


def ordered(tools: list, index: int) -> list:
    """A/B interleaving: the tools' order flips with each repetition (and size)."""
    return tools if index % 2 == 0 else tools[::-1]


def machine_info() -> dict:
    """uname, CPUs, versions, date, test-bed size: what the figures were measured on."""

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def command(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"({exc})"

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "uname": command(["uname", "-a"]),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "versions": {
            d: version(d) for d in ("dask", "distributed", "dask-jobqueue", "mspass-cluster", "pymongo", "nx-27017")
        },
        "slurm": command([probes.slurm_path("sinfo"), "--version"]),
        "git_commit": command(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        # Uncommitted changes to the package measured: the figures are not those of the commit alone.
        "package_modified": bool(command(["git", "-C", str(REPO), "status", "--porcelain", "--", "mspass_cluster"])),
        "testbed_nodes": probes.testbed_nodes(),
    }


# ------------------------------------------------------------------ harness
class Harness:
    """Runs the measurements; every cluster is closed and its jobs gone before the next one starts.

    Parameters
    ----------
    plan : Plan
    scratch : Path
        Work directories of the clusters (job scripts, logs, database files).
    tools : list, optional
        What is compared (default: MsPASSCluster and dask-jobqueue, :data:`benchmarks.tools.TOOLS`);
        each has ``name``, ``start``, ``close`` and ``pids`` as those do.
    """

    def __init__(self, plan, scratch: Path, tools=None):
        self.plan = plan
        self.scratch = scratch
        self.tools = list(tools) if tools is not None else [cls(scratch) for cls in TOOLS]
        self.leftovers: list[dict] = []
        self.errors: list[dict] = []
        self.sequence: list[str] = []
        self.foreign: list[dict] = []
        self.tags: set[str] = set()

    # ---------------------------------------------------------- bookkeeping
    def _tag(self, tool) -> str:
        tag = f"bench-{tool.name}-{secrets.token_hex(3)}"
        self.tags.add(tag)
        return tag

    def cancel_own_jobs(self) -> dict:
        """Last resort after an interruption: ``scancel`` (by id) any job of this run's clusters still queued."""
        mine = {
            j: n for j, n in probes.queued_jobs().items() if any(n == t or n.startswith(t + "-") for t in self.tags)
        }
        if mine:
            log.warning("cancelling jobs left by this run: %s", ", ".join(sorted(mine)))
            probes.scancel(mine)
        return mine

    def _begin(self, context: str, tool) -> None:
        """Record the start of a cluster, and any job in squeue that is not this run's (it would disturb the figures)."""
        self.sequence.append(f"{context}: {tool.name}")
        others = {j: n for j, n in probes.queued_jobs().items() if not n.startswith("bench-")}
        if others:
            log.warning(
                "%s, %s: %d job(s) of someone else in squeue: %s",
                context,
                tool.name,
                len(others),
                ", ".join(sorted(set(others.values()))),
            )
            self.foreign.append({"context": context, "tool": tool.name, "jobs": others})

    def _error(self, context: str, tool, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        log.error("%s, %s: %s", context, tool.name, text.splitlines()[0] if text else text)
        self.errors.append({"context": context, "tool": tool.name, "error": text})

    def ensure_gone(self, tag: str, context: str, tool, running: Running | None = None) -> None:
        """Wait until squeue lists no job of ``tag``; cancel leftovers by id and record that it had to."""
        if not probes.wait_until(lambda: not probes.queued_jobs(tag), LEFTOVER_GRACE, 0.2):
            left = probes.queued_jobs(tag)
            log.warning(
                "%s, %s: jobs %s still queued %.0f s after close(); cancelling them",
                context,
                tool.name,
                ", ".join(left),
                LEFTOVER_GRACE,
            )
            probes.scancel(left)
            gone = probes.wait_until(lambda: not probes.queued_jobs(tag), LEFTOVER_GRACE, 0.2)
            self.leftovers.append(
                {"context": context, "tool": tool.name, "tag": tag, "jobs": left, "gone_after_scancel": gone}
            )
        if running is not None and not probes.wait_until(lambda: not tool.pids(running), 30.0, 0.2):
            pids = tool.pids(running)
            log.warning("%s, %s: processes %s outlived their jobs", context, tool.name, pids)
            self.leftovers.append({"context": context, "tool": tool.name, "tag": tag, "processes": pids})

    def close_and_check(self, tool, running: Running, context: str) -> None:
        error = tool.close(running)
        if error:
            log.warning("%s, %s: close() raised %s", context, tool.name, error.splitlines()[0])
            self.errors.append({"context": context + " close()", "tool": tool.name, "error": error})
        self.ensure_gone(running.tag, context, tool, running)

    def _start(self, tool, nodes: int, context: str, **kwargs) -> tuple[Running | None, float | None]:
        """Start a cluster; (running, seconds) or (None, None) after recording the error and cleaning up."""
        tag = self._tag(tool)
        self._begin(context, tool)
        started = time.perf_counter()
        try:
            running = tool.start(nodes, tag, **kwargs)
        except Exception as exc:
            self._error(context, tool, exc)
            self.ensure_gone(tag, context, tool)
            return None, None
        return running, time.perf_counter() - started

    # --------------------------------------------------------- measurements
    def time_to_ready(self) -> dict:
        """From creating the cluster object to database answering and all workers connected."""
        samples = {t.name: {str(n): [] for n in self.plan.sizes} for t in self.tools}
        for rep in range(self.plan.repeat):
            for index, nodes in enumerate(self.plan.sizes):
                for tool in ordered(self.tools, rep + index):
                    context = f"time to ready, {nodes} node(s), repetition {rep + 1}/{self.plan.repeat}"
                    running, seconds = self._start(tool, nodes, context)
                    samples[tool.name][str(nodes)].append(seconds)
                    if running is not None:
                        log.info("%s, %s: %.2f s", context, tool.name, seconds)
                        self.close_and_check(tool, running, context)
        medians = {t: {n: median(v) for n, v in by_size.items()} for t, by_size in samples.items()}
        return {
            "sizes": self.plan.sizes,
            "samples": samples,
            "median": medians,
            "ratio": {str(n): ratio(medians["mspass"][str(n)], medians["jobqueue"][str(n)]) for n in self.plan.sizes},
        }

    def scale(self) -> dict:
        """Scale-up (until all new workers connected) and scale-down (until the scheduler and squeue agree)."""
        low, high = self.plan.scale_from, self.plan.scale_to
        up = {t.name: [] for t in self.tools}
        down = {t.name: [] for t in self.tools}
        for rep in range(self.plan.repeat):
            for tool in ordered(self.tools, rep):
                context = f"scale {low}->{high}->{low}, repetition {rep + 1}/{self.plan.repeat}"
                running, _ = self._start(tool, low, context)
                if running is None:
                    up[tool.name].append(None)
                    down[tool.name].append(None)
                    continue
                up_s, down_s = self._scale_once(tool, running, low, high, context)
                up[tool.name].append(up_s)
                down[tool.name].append(down_s)
                log.info("%s, %s: up %s s, down %s s", context, tool.name, _fmt(up_s), _fmt(down_s))
                self.close_and_check(tool, running, context)
        result = {"from": low, "to": high}
        for name, samples in (("up", up), ("down", down)):
            medians = {t: median(v) for t, v in samples.items()}
            result[name] = {
                "samples": samples,
                "median": medians,
                "ratio": ratio(medians["mspass"], medians["jobqueue"]),
            }
        return result

    def _scale_once(self, tool, running: Running, low: int, high: int, context: str):
        started = time.perf_counter()
        try:
            tool.scale_up(running, high)
        except Exception as exc:
            self._error(context + " (up)", tool, exc)
            return None, None
        up_s = time.perf_counter() - started

        remaining_jobs = low + tool.extra_jobs
        started = time.perf_counter()
        try:
            tool.scale_down(running, low)
        except Exception as exc:
            self._error(context + " (down)", tool, exc)
            return up_s, None
        settled = probes.wait_until(
            lambda: running.workers() == low and len(probes.queued_jobs(running.tag)) == remaining_jobs,
            POLL_BOUND,
        )
        if not settled:
            self.errors.append(
                {
                    "context": context + " (down)",
                    "tool": tool.name,
                    "error": f"not settled after {POLL_BOUND:g} s: {running.workers()} workers, "
                    f"jobs {probes.queued_jobs(running.tag)}",
                }
            )
            return up_s, None
        return up_s, time.perf_counter() - started

    def failure(self) -> dict:
        """Time from creating a cluster whose worker cannot start until the user gets an error."""
        samples = {t.name: [] for t in self.tools}
        errors = {t.name: [] for t in self.tools}
        for rep in range(self.plan.repeat):
            for tool in ordered(self.tools, rep):
                context = f"failure detection, repetition {rep + 1}/{self.plan.repeat}"
                self._begin(context, tool)
                fail = self._fail_mspass if isinstance(tool, MsPASSTool) else self._fail_jobqueue
                seconds, record = fail(tool, context)
                samples[tool.name].append(seconds)
                errors[tool.name].append(record)
                log.info("%s, %s: %s s, %s", context, tool.name, _fmt(seconds), record.get("error_type"))
        medians = {t: median(v) for t, v in samples.items()}
        return {
            "cap_s": self.plan.failure_cap,
            "worker_python": MISSING_PYTHON,
            "samples": samples,
            "median": medians,
            "ratio": ratio(medians["mspass"], medians["jobqueue"]),
            "errors": errors,
        }

    def _fail_mspass(self, tool: MsPASSTool, context: str):
        from mspass_cluster import JobFailedError

        tag = self._tag(tool)
        started = time.perf_counter()
        try:
            running = tool.start(1, tag, python=MISSING_PYTHON)
        except JobFailedError as exc:
            seconds = time.perf_counter() - started
            message = str(exc)
            record = {
                "error_type": type(exc).__name__,
                "message": message,
                "job_id": exc.job_id,
                "exit_code": exc.exit_code,
                "state": exc.state,
                "names_job_id": bool(exc.job_id) and exc.job_id in message,
                "names_exit_code": bool(exc.exit_code) and exc.exit_code in message,
                "hit_cap": False,
            }
        except Exception as exc:
            seconds = time.perf_counter() - started
            record = {
                "error_type": type(exc).__name__,
                "message": str(exc),
                "job_id": None,
                "exit_code": None,
                "names_job_id": False,
                "names_exit_code": False,
                "hit_cap": False,
            }
        else:
            seconds, record = (
                None,
                {
                    "error_type": None,
                    "message": "the cluster started with a missing python",
                    "job_id": None,
                    "exit_code": None,
                    "names_job_id": False,
                    "names_exit_code": False,
                    "hit_cap": False,
                },
            )
            tool.close(running)
        self.ensure_gone(tag, context, tool)
        return seconds, record

    def _fail_jobqueue(self, tool: JobqueueTool, context: str):
        tag = self._tag(tool)
        cap = self.plan.failure_cap
        started = time.perf_counter()
        running = tool.create(tag, python=MISSING_PYTHON)
        try:
            running.cluster.scale(jobs=1)
            running.client.wait_for_workers(1, timeout=cap)
        except Exception as exc:
            seconds, error = time.perf_counter() - started, exc
        else:
            seconds, error = None, None
        job_ids = sorted(tool.job_ids(running))
        message = f"{type(error).__name__}: {error}" if error is not None else "workers connected"
        record = {
            "error_type": type(error).__name__ if error is not None else None,
            "message": message,
            "job_ids": job_ids,
            "hit_cap": error is not None and seconds >= cap,
            "names_job_id": any(j in message for j in job_ids),
            "names_exit_code": "127" in message or "exit code" in message.lower(),
            "slurm_saw": [job_state(j) for j in job_ids],
        }
        record["close_error"] = tool.close(running)
        before = len(self.leftovers)
        self.ensure_gone(tag, context, tool, running)
        record["harness_scancelled"] = len(self.leftovers) > before
        return seconds, record

    def teardown(self) -> dict:
        """``close()`` until squeue lists none of the cluster's jobs and none of its processes is alive."""
        nodes = self.plan.teardown_nodes
        returned = {t.name: [] for t in self.tools}
        nothing_left = {t.name: [] for t in self.tools}
        for rep in range(self.plan.repeat):
            for tool in ordered(self.tools, rep):
                context = f"teardown, {nodes} node(s), repetition {rep + 1}/{self.plan.repeat}"
                running, _ = self._start(tool, nodes, context)
                if running is None:
                    returned[tool.name].append(None)
                    nothing_left[tool.name].append(None)
                    continue
                close_s, gone_s = self._teardown_once(tool, running, context)
                returned[tool.name].append(close_s)
                nothing_left[tool.name].append(gone_s)
                log.info(
                    "%s, %s: close() returned after %.2f s, nothing left after %s s",
                    context,
                    tool.name,
                    close_s,
                    _fmt(gone_s),
                )
                self.ensure_gone(running.tag, context, tool, running)
        medians = {t: median(v) for t, v in nothing_left.items()}
        return {
            "nodes": nodes,
            "samples": nothing_left,
            "close_returned": returned,
            "median": medians,
            "median_close_returned": {t: median(v) for t, v in returned.items()},
            "ratio": ratio(medians["mspass"], medians["jobqueue"]),
        }

    def _teardown_once(self, tool, running: Running, context: str):
        tool.job_ids(running)
        if running.client is not None:
            # Neither tool has a client open in the timed part.
            running.client.close()
            running.client = None
        started = time.perf_counter()
        error = tool.close(running)
        close_s = time.perf_counter() - started
        if error:
            self.errors.append({"context": context + " close()", "tool": tool.name, "error": error})
        gone = probes.wait_until(lambda: not probes.queued_jobs(running.tag) and not tool.pids(running), POLL_BOUND)
        return close_s, (time.perf_counter() - started if gone else None)

    def controller_load(self) -> dict:
        """Slurm status calls while waiting for ``load_nodes`` nodes, and in steady state after."""
        nodes = self.plan.load_nodes
        result = {"nodes": nodes, "steady_window_s": self.plan.steady_s}
        for tool in self.tools:
            context = f"controller load, {nodes} node(s)"
            measure = self._load_mspass if isinstance(tool, MsPASSTool) else self._load_jobqueue
            result[tool.name] = measure(tool, nodes, context)
            log.info(
                "%s, %s: %s status calls in %s s of start-up, %s per minute in steady state",
                context,
                tool.name,
                result[tool.name].get("startup_status_calls"),
                _fmt(result[tool.name].get("startup_s")),
                _fmt(result[tool.name].get("steady_status_per_min")),
            )
        return result

    def _load_mspass(self, tool: MsPASSTool, nodes: int, context: str) -> dict:
        from mspass_cluster import CommandRunner

        runner = CommandRunner()
        running, startup_s = self._start(tool, nodes, context, command_runner=runner)
        if running is None:
            return {"method": "CommandRunner.calls", "error": True}
        # The cluster keeps polling after ready: snapshot the counter right away.
        at_ready = collections.Counter(runner.calls)
        steady_s = self._steady()
        steady = dict(collections.Counter(runner.calls) - at_ready)
        self.close_and_check(tool, running, context)
        return _load_record(
            "CommandRunner.calls (every Slurm command the cluster ran)", startup_s, dict(at_ready), steady_s, steady
        )

    def _load_jobqueue(self, tool: JobqueueTool, nodes: int, context: str) -> dict:
        tag = self._tag(tool)
        counter = probes.make_status_shims(self.scratch / tag / "shims")
        saved_path = os.environ.get("PATH", "")
        # dask-jobqueue runs Slurm's programs by name: shims first on PATH see every call.
        self._begin(context, tool)
        os.environ["PATH"] = f"{counter.parent}{os.pathsep}{saved_path}"
        try:
            started = time.perf_counter()
            try:
                running = tool.start(nodes, tag)
            except Exception as exc:
                self._error(context, tool, exc)
                self.ensure_gone(tag, context, tool)
                return {"method": "PATH shims", "error": True}
            startup_s = time.perf_counter() - started
            at_ready = probes.read_shim_counts(counter)
            steady_s = self._steady()
            steady = dict(collections.Counter(probes.read_shim_counts(counter)) - collections.Counter(at_ready))
        finally:
            os.environ["PATH"] = saved_path
        self.close_and_check(tool, running, context)
        record = _load_record(
            "PATH shims for squeue/sacct/scontrol (and sbatch, to show the shims were on its path)",
            startup_s,
            at_ready,
            steady_s,
            steady,
        )
        return record

    def _steady(self) -> float:
        if self.plan.steady_s <= 0:
            return 0.0
        started = time.perf_counter()
        time.sleep(self.plan.steady_s)
        return time.perf_counter() - started


def _load_record(method: str, startup_s: float, startup: dict, steady_s: float, steady: dict) -> dict:
    return {
        "method": method,
        "startup_s": startup_s,
        "startup_calls": startup,
        "startup_status_calls": status_calls(startup),
        "startup_status_per_min": per_minute(status_calls(startup), startup_s),
        "steady_s": steady_s,
        "steady_calls": steady,
        "steady_status_calls": status_calls(steady),
        "steady_status_per_min": per_minute(status_calls(steady), steady_s),
    }


def job_state(job_id: str) -> dict:
    """Slurm's own view of a job (state, exit code), from ``scontrol``, for the failure record."""
    out = subprocess.run(
        [probes.slurm_path("scontrol"), "--oneliner", "show", "job", job_id], capture_output=True, text=True, timeout=20
    ).stdout
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    return {
        "job_id": job_id,
        "state": fields.get("JobState"),
        "exit_code": fields.get("ExitCode"),
        "run_time": fields.get("RunTime"),
    }


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------- main
def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s bench %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    import distributed  # noqa: F401  (it configures its loggers on import; quiet them after)

    import mspass_cluster  # noqa: F401

    level = logging.INFO if verbose else logging.WARNING
    for name in ("distributed", "dask_jobqueue", "mspass_cluster"):
        logging.getLogger(name).setLevel(level)
    # Another cluster's dashboard may hold :8787; Dask then picks another port, which is fine here.
    warnings.filterwarnings("ignore", message="Port .* is already in use")
    if not verbose:
        # Expected noise: workers retired on purpose, the dashboard port reused run after run.
        logging.getLogger("distributed").setLevel(logging.ERROR)


def run(plan: Plan, out: Path) -> dict:
    """Run the planned measurements and return the results (written by :func:`main`)."""
    available = probes.testbed_nodes()
    if available < plan.nodes_needed():
        raise SystemExit(
            f"The test bed has {available} usable node(s); this plan needs {plan.nodes_needed()} "
            f"({max(plan.sizes)} worker nodes plus the database's). Run `ci/testbed up {plan.nodes_needed()}` as root, "
            "or use --smoke."
        )
    scratch = out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    foreign = probes.queued_jobs()
    if foreign:
        log.warning("squeue already lists %d job(s) not started by this run: figures may be disturbed", len(foreign))

    harness = Harness(plan, scratch)
    results = {
        "meta": machine_info(),
        "plan": asdict(plan),
        "worker_options": {
            "processes_per_node": 1,
            "cores": WORKER_CORES,
            "memory": WORKER_MEMORY,
            "walltime_minutes": WALLTIME_MINUTES,
            "python": sys.executable,
            "partition": "default",
            "mspass_db": "nx-27017 stand-in (python -m mspass_cluster.embedded_db)",
            "jobqueue_scheduler_interface": "br-hpc",
        },
        "tools": {t.name: t.label for t in harness.tools},
        "reference_sleeps": REFERENCE_SLEEPS,
    }
    results["meta"]["foreign_jobs_at_start"] = len(foreign)
    started = time.perf_counter()
    try:
        for name in MEASUREMENTS:
            if name in plan.only:
                log.info("=== %s", name.replace("_", " "))
                results[name] = getattr(harness, name)()
    finally:
        # Normally empty: every measurement cleans up after itself; not after Ctrl-C or a crash.
        results["cancelled_at_end"] = harness.cancel_own_jobs()
    results["meta"]["duration_s"] = time.perf_counter() - started
    results["leftovers"] = harness.leftovers
    results["errors"] = harness.errors
    results["sequence"] = harness.sequence
    results["foreign_jobs"] = harness.foreign
    results["tags"] = sorted(harness.tags)
    return results


def main(argv=None) -> int:
    """Command-line entry point: run, then write results.json, results.md and results.png under ``--out``."""
    args = parse_args(argv)
    _configure_logging(args.verbose)
    plan = make_plan(args)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log.info("plan: %s; results in %s", asdict(plan), out)
    results = run(plan, out)
    written = report.write_all(results, out)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    left = probes.queued_jobs()
    mine = {j: n for j, n in left.items() if n.startswith("bench-")}
    if mine:
        log.error("jobs of this run still queued: %s", mine)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
