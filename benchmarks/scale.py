"""Scale (issue 13): time to ready at 1, 16, 64 worker nodes, the controller's own RPC counts, a busy controller, a job limit.

``MsPASSCluster`` (worker nodes as one job array per scale-up) against bare
dask-jobqueue ``SLURMCluster`` (one ``sbatch`` per node), with the worker
nodes of :mod:`benchmarks.tools` (one Dask worker, 4 cores, 3 GiB: one
per test-bed node), interleaved (the order flips with each repetition and
size). For each cluster:

* **time to ready** (MsPASSCluster: its constructor; dask-jobqueue:
  constructor + ``scale(jobs=n)`` + ``client.wait_for_workers(n)``);
* **the controller's RPCs** from Slurm's own statistics, ``sdiag``
  ("Remote Procedure Call statistics by message type" and "by user"),
  read before and after start-up, after ``--steady`` seconds of steady
  state, and after teardown (until ``squeue`` lists none of its jobs); the
  differences are the cluster's (and anyone else's on the bed meanwhile:
  foreign jobs are recorded);
* the same under the **busy-controller model** (``--busy-sizes``): every
  Slurm command of both tools (sbatch, squeue, scancel, scontrol, sacct,
  sinfo) is a shim first on ``PATH`` that sleeps ``--delay`` seconds and
  then runs the real one;
* ``--only limit``: the **job limit** run, on a bed started with
  ``TESTBED_MAX_JOBS=<m> ci/testbed up <n>`` (``MaxJobCount``, see the
  README): ``--limit-nodes`` worker nodes asked of each tool; what the user
  gets (a cluster, an error and its words, or a wait cut at ``--limit-cap``).

Run by ``benchmarks/run-scale``; writes ``scale.json`` (merged with an
earlier one, section by section), ``scale.md`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from . import probes
from .bench import _configure_logging, machine_info, median, ordered, ratio
from .tools import JobqueueTool, MsPASSTool

log = logging.getLogger("benchmarks")

#: Extra seconds per Slurm command in the busy-controller model: Slurm 23.02's per-user RPC rate limit,
#: when on, refills 2 tokens a second (rl_refill_rate, docs: slurm.conf), so a user past the bucket of 30
#: is answered every 0.5 s; dask-jobqueue users met "Resource temporarily unavailable" and added 0.3 s
#: pauses (dask-jobqueue #190).
BUSY_DELAY = 0.5
_SDIAG_LINE = re.compile(r"^\s+(\S+)\s+\(\s*(\d+)\)\s+count:(\d+)")


def sdiag() -> dict:
    """RPC counts since the controller started (or ``sdiag --reset``): ``{"type": {...}, "user": {...}}``."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, timeout=30).stdout
    section, counts = None, {"type": {}, "user": {}}
    for line in out.splitlines():
        if line.startswith("Remote Procedure Call statistics by message type"):
            section = "type"
        elif line.startswith("Remote Procedure Call statistics by user"):
            section = "user"
        elif line and not line[0].isspace():
            section = None
        elif section:
            match = _SDIAG_LINE.match(line)
            if match:
                counts[section][match.group(1)] = int(match.group(3))
    return counts


def rpc_delta(before: dict, after: dict) -> dict:
    """RPCs between two :func:`sdiag` readings, by type and by user (zeros left out)."""
    delta = {}
    for section in ("type", "user"):
        diff = {k: v - before[section].get(k, 0) for k, v in after[section].items()}
        delta[section] = {k: v for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v > 0}
    delta["total"] = sum(delta["type"].values())
    delta["submit"] = delta["type"].get("REQUEST_SUBMIT_BATCH_JOB", 0)
    return delta


def busy_shims(directory: Path, delay: float) -> Path:
    """Shims that wait ``delay`` seconds, then run the real Slurm program; put ``directory`` first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in probes.SLURM_PROGRAMS:
        path = directory / name
        path.write_text(f'#!/bin/sh\nsleep {delay}\nexec {probes.slurm_path(name)} "$@"\n')
        path.chmod(0o755)
    return directory


class ScaleRun:
    def __init__(self, scratch: Path, steady: float):
        self.scratch = scratch
        self.steady = steady
        self.tools = [MsPASSTool(scratch), JobqueueTool(scratch)]
        self.counter = 0
        self.leftovers: list = []

    def tag(self, tool) -> str:
        self.counter += 1
        return f"scale-{tool.name}-{os.getpid() % 1000}-{self.counter}"

    def one(self, tool, nodes: int, *, delay: float = 0.0, timeout: float = 900.0, label: str = "", **options) -> dict:
        """Start, hold ``steady`` s, close one cluster; its times and the controller's RPCs in each phase.

        ``options`` go to ``MsPASSCluster`` (``label`` names the variant in the record's ``tool``).
        """
        tag = self.tag(tool)
        foreign = {j: n for j, n in probes.queued_jobs().items() if not n.startswith("scale-")}
        saved_path = os.environ["PATH"]
        if delay:
            os.environ["PATH"] = f"{busy_shims(self.scratch / tag / 'shims', delay)}{os.pathsep}{saved_path}"
        record = {"tool": label or tool.name, "nodes": nodes, "delay": delay, "foreign_jobs": len(foreign)}
        s0 = sdiag()
        started = time.perf_counter()
        try:
            running = tool.start(nodes, tag, **({"timeout": timeout} if tool.name == "jobqueue" else options))
        except Exception as exc:  # recorded; the jobs are cancelled below
            os.environ["PATH"] = saved_path
            record.update(
                error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}", after_s=time.perf_counter() - started
            )
            self.cancel_left(tag)
            record["rpc_start"] = rpc_delta(s0, sdiag())
            return record
        record["ready_s"] = time.perf_counter() - started
        s1 = sdiag()
        time.sleep(self.steady)
        s2 = sdiag()
        closing = time.perf_counter()
        try:
            record["close_error"] = tool.close(running)
        finally:
            os.environ["PATH"] = saved_path
        probes.wait_until(lambda: not probes.queued_jobs(tag), 180, 0.2)
        record["teardown_s"] = time.perf_counter() - closing
        self.cancel_left(tag)
        s3 = sdiag()
        record.update(rpc_start=rpc_delta(s0, s1), rpc_steady=rpc_delta(s1, s2), rpc_teardown=rpc_delta(s2, s3))
        record["steady_s"] = self.steady
        log.info(
            "%s %d node(s)%s: ready %.2f s, start-up RPCs %d (submit %d), teardown %.2f s",
            tool.name,
            nodes,
            f" (+{delay} s per command)" if delay else "",
            record["ready_s"],
            record["rpc_start"]["total"],
            record["rpc_start"]["submit"],
            record["teardown_s"],
        )
        return record

    def cancel_left(self, tag: str) -> None:
        left = probes.queued_jobs(tag)
        if left:
            probes.scancel(list(left))
            self.leftovers.append({"tag": tag, "jobs": sorted(left)})
            probes.wait_until(lambda: not probes.queued_jobs(tag), 120, 0.5)

    def sizes(self, sizes, repeat: int, delay: float = 0.0, cap: float = 900.0, save=None) -> list:
        """Every tool at every size, interleaved; ``save(records)`` after each cluster (a run cut short keeps them)."""
        records, index = [], 0
        for nodes in sizes:
            for _ in range(repeat):
                for tool in ordered(self.tools, index):
                    records.append(self.one(tool, nodes, delay=delay, timeout=cap))
                    if save is not None:
                        save(records)
                index += 1
        return records

    def limit(self, nodes: int, cap: float) -> list:
        """Each tool asked for ``nodes`` worker nodes on a bed whose controller holds fewer jobs.

        MsPASSCluster twice: as it is by default (a job array, refused with the
        numbers), and with the way out its message gives,
        ``worker_submission="steps"`` (one job for every worker node).
        """
        # dask-jobqueue last: the jobs it leaves fill the controller for MinJobAge after they end.
        mspass = next(t for t in self.tools if t.name == "mspass")
        records = [
            self.one(mspass, nodes, timeout=cap),
            self.one(mspass, nodes, label="mspass (worker_submission='steps')", worker_submission="steps"),
        ]
        records += [self.one(tool, nodes, timeout=cap) for tool in self.tools if tool is not mspass]
        return records


def job_limit_words(config: str, max_job_count) -> str:
    """The job limit the bed enforces now, in words: the user's sacctmgr limits with accounting, else MaxJobCount."""
    if "accounting_storage/slurmdbd" in config:
        user = os.environ.get("USER") or "root"
        out = subprocess.run(
            ["sacctmgr", "--noheader", "--parsable2", "list", "assoc", f"user={user}", "format=maxsubmit,maxjobs"],
            capture_output=True,
            text=True,
        ).stdout.split()
        submit, running = (out[0].split("|") + ["", ""])[:2] if out else ("", "")
        return (
            f"{user} may queue at most {submit or 'any number of'} jobs (sacctmgr MaxSubmitJobs) and run "
            f"{running or 'any number'} (MaxJobs), accounting enforced (slurmdbd)"
        )
    return f"the controller holds at most {max_job_count.group(1) if max_job_count else '?'} jobs (MaxJobCount)"


def summarise(records: list) -> list:
    """Rows per (delay, nodes): medians of both tools and their ratio."""
    rows = {}
    for r in records:
        rows.setdefault((r["delay"], r["nodes"]), {"mspass": [], "jobqueue": []})[r["tool"]].append(r)
    table = []
    for (delay, nodes), by in sorted(rows.items()):

        def med(key, tool, sub=None, by=by):
            values = [(r[key][sub] if sub else r[key]) for r in by[tool] if key in r]
            return median(values)

        row = {"delay": delay, "nodes": nodes}
        for tool in ("mspass", "jobqueue"):
            row[f"{tool}_ready"] = med("ready_s", tool)
            row[f"{tool}_teardown"] = med("teardown_s", tool)
            row[f"{tool}_submit"] = med("rpc_start", tool, "submit")
            row[f"{tool}_rpc_start"] = med("rpc_start", tool, "total")
            row[f"{tool}_rpc_steady"] = med("rpc_steady", tool, "total")
            row[f"{tool}_rpc_teardown"] = med("rpc_teardown", tool, "total")
            row[f"{tool}_samples"] = [round(r["ready_s"], 2) for r in by[tool] if "ready_s" in r]
        row["ratio"] = ratio(row["mspass_ready"], row["jobqueue_ready"])
        table.append(row)
    return table


def _f(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_markdown(results: dict, path: Path) -> Path:
    meta = results.get("meta", {})
    lines = [
        "# Scale: MsPASSCluster (worker nodes as one job array) against dask-jobqueue (one sbatch per node)",
        "",
        f"Run {meta.get('date')} on `{meta.get('uname')}` ({meta.get('cpu_count')} CPUs), test bed of "
        f"{meta.get('testbed_nodes')} nodes ({meta.get('slurm')}); commit {str(meta.get('git_commit'))[:10]}. "
        f"Command: `{results.get('command')}`. Seconds; medians of the samples shown; ratio = MsPASSCluster / "
        "dask-jobqueue (below 1: MsPASSCluster faster). RPCs: `sdiag` differences (every RPC the controller "
        "handled in the phase, from every client: sbatch, squeue, scancel, and the nodes' own messages).",
        "",
        "| controller | worker nodes | MsPASSCluster ready | dask-jobqueue ready | ratio | submit RPCs (M / jq) "
        "| start-up RPCs (M / jq) | steady RPCs (M / jq) | teardown RPCs (M / jq) | teardown s (M / jq) | samples (M; jq) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summarise(results.get("runs", [])):
        controller = "idle" if not row["delay"] else f"busy (+{row['delay']} s per command)"
        lines.append(
            f"| {controller} | {row['nodes']} | {_f(row['mspass_ready'])} | {_f(row['jobqueue_ready'])} | "
            f"{_f(row['ratio'])}x | {_f(row['mspass_submit'], 0)} / {_f(row['jobqueue_submit'], 0)} | "
            f"{_f(row['mspass_rpc_start'], 0)} / {_f(row['jobqueue_rpc_start'], 0)} | "
            f"{_f(row['mspass_rpc_steady'], 0)} / {_f(row['jobqueue_rpc_steady'], 0)} | "
            f"{_f(row['mspass_rpc_teardown'], 0)} / {_f(row['jobqueue_rpc_teardown'], 0)} | "
            f"{_f(row['mspass_teardown'])} / {_f(row['jobqueue_teardown'])} | "
            f"{', '.join(map(str, row['mspass_samples']))}; {', '.join(map(str, row['jobqueue_samples']))} |"
        )
    lines += ["", "## Start-up RPCs by type (first sample of each)", ""]
    seen = set()
    for r in results.get("runs", []):
        key = (r["tool"], r["nodes"], r["delay"])
        if key in seen or "rpc_start" not in r:
            continue
        seen.add(key)
        types = ", ".join(f"{k} {v}" for k, v in r["rpc_start"]["type"].items())
        users = ", ".join(f"{k} {v}" for k, v in r["rpc_start"]["user"].items())
        lines.append(f"* {r['tool']}, {r['nodes']} node(s), +{r['delay']} s: {types} (by user: {users})")
    for key in ("limit", "limit_accounting"):
        if not results.get(key):
            continue
        lim = results[key]
        what = lim.get("limit") or f"the controller holds at most {lim['max_job_count']} jobs (MaxJobCount)"
        lines += [
            "",
            f"## Job limit: {lim['nodes']} worker nodes asked for, {what}",
            "",
            f"Run {lim.get('date', '?')}: `{lim.get('command', '?')}`.",
            "",
            "| tool | outcome | after (s) | submit RPCs |",
            "|---|---|---|---|",
        ]
        for r in lim["runs"]:
            outcome = r.get("error") or f"ready with {r['nodes']} worker nodes"
            seconds = r.get("after_s", r.get("ready_s"))
            lines.append(
                f"| {r['tool']} | {outcome.replace('|', '/')} | {_f(seconds)} | {r.get('rpc_start', {}).get('submit')} |"
            )
    lines += ["", f"Leftovers the harness cancelled: {results.get('leftovers') or 'none'}.", ""]
    path.write_text("\n".join(lines))
    return path


def write_png(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ready_ax, rpc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for delay, style in ((0.0, "-"), (results.get("delay", BUSY_DELAY), "--")):
        for tool, colour, label in (
            ("mspass", "tab:blue", "MsPASSCluster"),
            ("jobqueue", "tab:orange", "dask-jobqueue"),
        ):
            points = sorted(
                (r["nodes"], r["ready_s"])
                for r in results.get("runs", [])
                if r["tool"] == tool and r["delay"] == delay and "ready_s" in r
            )
            if points:
                xs, ys = zip(*points)
                name = f"{label}{'' if not delay else f' (+{delay} s/command)'}"
                ready_ax.plot(xs, ys, style, marker="o", color=colour, label=name)
    ready_ax.set_xlabel("worker nodes")
    ready_ax.set_ylabel("time to ready (s)")
    ready_ax.set_title("time to ready")
    ready_ax.legend(fontsize=8)
    rows = [r for r in summarise(results.get("runs", [])) if not r["delay"]]
    xs = range(len(rows))
    rpc_ax.bar([x - 0.2 for x in xs], [r["mspass_rpc_start"] or 0 for r in rows], 0.4, label="MsPASSCluster")
    rpc_ax.bar([x + 0.2 for x in xs], [r["jobqueue_rpc_start"] or 0 for r in rows], 0.4, label="dask-jobqueue")
    rpc_ax.set_xticks(list(xs), [str(r["nodes"]) for r in rows])
    rpc_ax.set_xlabel("worker nodes (idle controller)")
    rpc_ax.set_ylabel("controller RPCs during start-up (sdiag)")
    rpc_ax.set_title("load on the controller")
    rpc_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,64")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--busy-sizes", default="16,64")
    parser.add_argument("--delay", type=float, default=BUSY_DELAY)
    parser.add_argument("--steady", type=float, default=10.0)
    parser.add_argument("--only", default="idle,busy", help="idle, busy, limit")
    parser.add_argument("--limit-nodes", type=int, default=24)
    parser.add_argument("--limit-cap", type=float, default=120.0)
    parser.add_argument(
        "--limit-key",
        default="limit",
        help="where the job-limit run goes in scale.json: `limit` (MaxJobCount) or `limit_accounting` (sacctmgr)",
    )
    parser.add_argument(
        "--ready-cap",
        type=float,
        default=240.0,
        help="longest wait for dask-jobqueue's workers (it has no error of its own when some die)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--report", action="store_true", help="only write scale.md and scale.png from scale.json")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    json_path = out / "scale.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {"runs": []}
    if not args.report:
        _configure_logging(args.verbose)
        only = set(args.only.split(","))
        scratch = out / "scratch" / "scale"
        scratch.mkdir(parents=True, exist_ok=True)
        run = ScaleRun(scratch, args.steady)
        command = "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
        if only & {"idle", "busy"}:  # the table's run; a job-limit run keeps its own below
            results["meta"], results["command"], results["delay"] = machine_info(), command, args.delay
        earlier = list(results["runs"])

        def save(fresh):
            replaced = {(r["delay"], r["nodes"]) for r in fresh}
            results["runs"] = [r for r in earlier if (r["delay"], r["nodes"]) not in replaced] + fresh
            json_path.write_text(json.dumps(results, indent=1, default=str))

        fresh = []
        if "idle" in only:
            fresh += run.sizes(
                [int(s) for s in args.sizes.split(",") if s],
                args.repeat,
                cap=args.ready_cap,
                save=lambda r: save(fresh + r),
            )
        if "busy" in only:
            base = list(fresh)
            fresh += run.sizes(
                [int(s) for s in args.busy_sizes.split(",") if s],
                1,
                delay=args.delay,
                cap=args.ready_cap,
                save=lambda r: save(base + r),
            )
        if fresh:
            save(fresh)
        if "limit" in only:
            config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
            cap = re.search(r"^MaxJobCount\s*=\s*(\d+)", config, re.M)
            results[args.limit_key] = {
                "nodes": args.limit_nodes,
                "max_job_count": int(cap.group(1)) if cap else None,
                "limit": job_limit_words(config, cap),
                "command": command,
                "date": machine_info().get("date"),
                "runs": run.limit(args.limit_nodes, args.limit_cap),
            }
        results["leftovers"] = (results.get("leftovers") or []) + run.leftovers
        json_path.write_text(json.dumps(results, indent=1, default=str))
    write_markdown(results, out / "scale.md")
    write_png(results, out / "scale.png")
    log.info("wrote %s", out / "scale.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
