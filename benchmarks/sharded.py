"""Time to ready of a sharded database (issue 12), beside the MsPASS scripts' fixed sleeps.

``python -m benchmarks.sharded [--shards 2,4] [--repeat 2] [--out benchmarks/results]`` starts
``MsPASSCluster(db_shards=N)`` on the Slurm test bed with the stand-ins (config server and shards:
``mspass_cluster.embedded_db`` with ``--replSet``; router: ``mspass_cluster._mongos``), writes 200
documents through the router, closes it, then starts it again on the same ``db_dir`` (the restore
path), and writes ``sharded.json`` and ``sharded.md``.

For each start it reports the time to ready (constructor to return, queue wait included), the
orchestration alone (from the moment the last part's job runs to ready: what the scripts' sleeps
stand for), and the close. The stand-ins elect a PRIMARY 1.5 s after ``replSetInitiate`` (a real
single-member replica set takes about as long); a real ``mongod`` starts more slowly than the
stand-in, so the orchestration figure is a lower bound of what a real cluster takes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from mspass_cluster import MsPASSCluster

#: The scripts' own figures (shared/research/mspass-deployment.md §11.3, 4 shards, S = 15 s sleeps).
REFERENCE = [
    ("HEAD start-mspass.sh, fresh (TACC script)", "30 s theoretical, 45 s typical"),
    ("HEAD start-mspass.sh, fresh (template: frontend at 30 s)", "45-60 s until the database is really ready"),
    ("legacy start-mspass.sh, fresh", "120 s (3 + N + C sleeps of 15 s)"),
    ("HEAD restore (existing data, new nodes)", "150 s ((6 + N) sleeps of 15 s)"),
]
STANDINS = {
    "db_command": [sys.executable, "-m", "mspass_cluster.embedded_db"],
    "db_router_command": [sys.executable, "-m", "mspass_cluster._mongos"],
}


def one_start(work_dir: str, shards: int, port: int) -> dict:
    started = time.monotonic()
    cluster = MsPASSCluster(
        nodes=1,
        work_dir=work_dir,
        walltime="15",
        exclusive=False,
        cores=1,
        memory="1GiB",
        db_memory="300MiB",
        db_shards=shards,
        db_port=port,
        startup_timeout=900,
        **STANDINS,
    )
    ready = time.monotonic() - started
    timeline = list(cluster.database.timeline)
    nodes = {p.label: p.job.node for p in cluster.database.parts}
    moved = list(cluster.database.moved)
    db = cluster.get_db_client().get_database("mspass")
    db.wf_TimeSeries.insert_many([{"i": i} for i in range(200)])
    count = db.wf_TimeSeries.count_documents({})
    closing = time.monotonic()
    cluster.close()
    closed = time.monotonic() - closing
    last_running = max(t for what, t in timeline if " job running on " in what)
    ready_at = next(t for what, t in timeline if what == "ready")
    return {
        "shards": shards,
        "ready_s": round(ready, 2),
        "orchestration_s": round(ready_at - last_running, 2),
        "close_s": round(closed, 2),
        "documents": count,
        "nodes": nodes,
        "moved": moved,
        "timeline": [(what, round(t, 2)) for what, t in timeline],
    }


def render(results: dict) -> str:
    lines = [
        "# Sharded database: time to ready (issue 12)",
        "",
        f"Run {results['date']} on the Slurm test bed ({results['machine']}); stand-ins for mongod and mongos "
        "(`mspass_cluster.embedded_db --replSet`, `mspass_cluster._mongos`); every part a Slurm job; "
        f"{results['repeat']} repetition(s). Written by `python -m benchmarks.sharded`.",
        "",
        "*ready*: constructor to return (queue wait included, one worker node too); *orchestration*: from the "
        "moment the last part's job runs to ready (initiate, poll PRIMARY, point the router, addShard, "
        "enableSharding, shardCollection x3): the part the scripts' sleeps stand for; *restart*: the same "
        "`db_dir` again (restore path). Medians, every sample in brackets.",
        "",
        "| shards | start | ready (s) | orchestration (s) | close (s) |",
        "|---|---|---|---|---|",
    ]
    for shards in results["shards"]:
        for kind in ("fresh", "restart"):
            samples = [r for r in results["runs"] if r["shards"] == shards and r["kind"] == kind]
            if not samples:
                continue
            cells = []
            for key in ("ready_s", "orchestration_s", "close_s"):
                values = [r[key] for r in samples]
                cells.append(f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})")
            lines.append(f"| {shards} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "The MsPASS scripts' fixed sleeps (4 shards, S = 15 s), for comparison:", ""]
    lines += ["| script | time to a ready database |", "|---|---|"]
    lines += [f"| {name} | {figure} |" for name, figure in REFERENCE]
    lines += [
        "",
        "Not measured here: a real `mongod`/`mongos` (start-up, elections, `addShard` on a real cluster, chunk "
        "migration, balancing); the queue wait depends on what else runs on the bed.",
        "",
        "Timeline of the first run of each size (seconds since submission):",
        "",
    ]
    for shards in results["shards"]:
        first = next((r for r in results["runs"] if r["shards"] == shards), None)
        if first:
            lines.append(f"- {shards} shards: " + "; ".join(f"{what} {t:.1f}" for what, t in first["timeline"]))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="2,4")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--port", type=int, default=28180)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--report", action="store_true", help="write sharded.md again from sharded.json")
    args = parser.parse_args()
    path = os.path.join(args.out, "sharded.json")
    if args.report:
        with open(path) as handle:
            results = json.load(handle)
    else:
        sizes = [int(s) for s in args.shards.split(",")]
        runs = []
        for shards in sizes:
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory(prefix="bench-sharded-", dir="/tmp") as work:
                    for kind in ("fresh", "restart"):
                        run = one_start(work, shards, args.port)
                        run["kind"] = kind
                        runs.append(run)
                        print(
                            f"{shards} shards {kind}: ready {run['ready_s']} s, orchestration "
                            f"{run['orchestration_s']} s, close {run['close_s']} s",
                            file=sys.stderr,
                        )
        slurm = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {slurm}",
            "repeat": args.repeat,
            "shards": sizes,
            "runs": runs,
        }
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1)
    with open(os.path.join(args.out, "sharded.md"), "w") as handle:
        handle.write(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
