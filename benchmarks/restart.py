"""How long a running cluster is without its database: brought back in place, against starting over.

Usage (from the repository root, as root, with the test bed up)::

    benchmarks/run-restart [--repeat 3] [--nodes 2] [--out benchmarks/results] [--smoke]

Three measurements on ``backend="slurm"`` (the nx-27017 stand-in as the
database, its data stored first), the first two interleaved (the order flips
with every repetition), every cluster closed and its jobs gone before the
next one starts:

1. **in place**: ``scancel`` of the database job of a running cluster; the
   seconds until ``get_db_client()`` answers again, and until a task on a
   worker that was never restarted reads the database through
   ``MSPASS_DB_ADDRESS`` (what MsPASS code does);
2. **starting over** (what a user had to do before issue 11): ``close()`` of
   the cluster and a new ``MsPASSCluster`` with the same options on the same
   ``work_dir``; the seconds until its workers' task reads the database;
3. **relay**: the database job's limit cut to one minute with ``scontrol
   update``; the seconds without a database while the next job takes over
   (from the hand-over's start until the cluster re-pointed).

Writes ``restart.json`` and ``restart.md`` under ``--out``; the ratio in
place / starting over is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import bench

__all__ = ["main", "read_through_worker"]

log = logging.getLogger("benchmarks")

REPO = Path(__file__).resolve().parent.parent
NX_MONGOD = [sys.executable, "-m", "mspass_cluster.embedded_db"]
DOCUMENTS = 1000


def read_through_worker():
    """A task as MsPASS code runs it: a client from ``MSPASS_DB_ADDRESS``, one count."""
    import os

    import pymongo

    client = pymongo.MongoClient(os.environ["MSPASS_DB_ADDRESS"], serverSelectionTimeoutMS=2000)
    try:
        return client.mspass.wf.count_documents({}), os.getpid()
    finally:
        client.close()


def _cluster(work_dir: Path, nodes: int):
    from mspass_cluster import MsPASSCluster

    return MsPASSCluster(
        nodes=nodes,
        work_dir=str(work_dir),
        db_command=NX_MONGOD,
        walltime="00:10:00",
        cores=2,
        memory="1GiB",
        # The workers' Python imports this module's task.
        job_script_prologue=[f"export PYTHONPATH={REPO}"],
    )


def _read_until_it_works(client, started: float, timeout: float = 300.0) -> tuple[float, int]:
    """Seconds from ``started`` until the task read every document; and the worker's PID."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            count, pid = client.submit(read_through_worker, pure=False).result(timeout=30)
            if count == DOCUMENTS:
                return time.monotonic() - started, pid
        except Exception as exc:  # the database is not back yet: the task's pymongo error
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers could not read the database for {timeout:g} s: {exc}") from exc
        time.sleep(0.05)


def in_place(work_dir: Path, nodes: int) -> dict:
    cluster = _cluster(work_dir, nodes)
    try:
        client = cluster.get_client()
        cluster.get_db_client().mspass.wf.insert_many([{"i": i} for i in range(DOCUMENTS)])
        _read_until_it_works(client, time.monotonic())
        workers = client.run(os.getpid)  # {worker address: process id}
        job = cluster.db_job.job_id
        started = time.monotonic()
        subprocess.run(["scancel", job], check=True)
        while cluster.database.restarts < 1:  # noticed at the next poll
            time.sleep(0.01)
        noticed = time.monotonic() - started
        cluster.get_db_client()
        db_back = time.monotonic() - started
        task_back, _ = _read_until_it_works(client, started)
        return {
            "noticed_s": noticed,
            "db_answers_s": db_back,
            "task_reads_s": task_back,
            "same_workers": client.run(os.getpid) == workers,
            "old_job": job,
            "new_job": cluster.db_job.job_id,
        }
    finally:
        cluster.close()


def starting_over(work_dir: Path, nodes: int) -> dict:
    cluster = _cluster(work_dir, nodes)
    try:
        cluster.get_db_client().mspass.wf.insert_many([{"i": i} for i in range(DOCUMENTS)])
    finally:
        started = time.monotonic()
        cluster.close()
    closed = time.monotonic() - started
    again = _cluster(work_dir, nodes)
    try:
        ready = time.monotonic() - started
        task, _ = _read_until_it_works(again.get_client(), started)
        return {"close_s": closed, "ready_s": ready, "task_reads_s": task}
    finally:
        again.close()


def relay(work_dir: Path, nodes: int) -> dict:
    cluster = _cluster(work_dir, nodes)
    try:
        cluster.get_db_client().mspass.wf.insert_many([{"i": i} for i in range(DOCUMENTS)])
        first = cluster.db_job
        subprocess.run(["scontrol", "update", f"JobId={first.job_id}", "TimeLimit=1"], check=True)
        deadline = time.monotonic() + 120
        while not cluster.database.moving and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        while cluster.database.moving and time.monotonic() < deadline:
            time.sleep(0.01)
        gap = time.monotonic() - started
        count = cluster.get_db_client().mspass.wf.count_documents({})
        return {"without_database_s": gap, "documents_after": count, "relayed": cluster.db_job is not first}
    finally:
        cluster.close()


def _median(samples, key):
    return statistics.median(s[key] for s in samples)


#: The table's rows: what, which measurement, which figure of its samples.
ROWS = (
    ("in place: the cluster knows the job ended (a failed heartbeat, then `squeue`)", "in_place", "noticed_s"),
    ("in place: `get_db_client()` answers again", "in_place", "db_answers_s"),
    ("in place: a worker's task reads the database again", "in_place", "task_reads_s"),
    ("starting over (close, new cluster): its workers' task reads the database", "starting_over", "task_reads_s"),
    ("relay before the walltime: seconds without a database", "relay", "without_database_s"),
)


def write_markdown(results: dict, path: Path) -> None:
    s = results["summary"]
    lines = [
        "# A lost database brought back in place, against starting over",
        "",
        f"Measured {results['date']} on the Slurm test bed ({results['nodes']} worker nodes, nx-27017 stand-in as "
        f"the database with {DOCUMENTS} documents, {results['repeat']} repetitions, medians; "
        "`benchmarks/run-restart`).",
        "",
        "| after the database job ends | seconds (median) | samples |",
        "|---|---|---|",
        *(
            f"| {label} | {_median(results[kind], key):.1f} | "
            + ", ".join(f"{x[key]:.1f}" for x in results[kind])
            + " |"
            for label, kind, key in ROWS
        ),
        "",
        f"**Ratio in place / starting over: {s['ratio']:.2f}** (below 1: in place is faster). "
        f"The same worker processes (addresses and PIDs) before and after, in every in-place sample: "
        f"{s['workers_kept']}.",
        "",
        "The in-place figure includes the cluster learning of the end (the server's heartbeat fails within "
        "milliseconds and hastens the next `squeue`; without it, `poll_interval` = 5 s at most), the new job's "
        "start and the server's readiness; starting over includes a clean close and a whole "
        "new start, workers included. On this idle test bed every job starts at once: on a busy cluster starting "
        "over queues every worker node again, in place queues one database job; and starting over loses what the "
        "workers held in memory, in place keeps it.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    """Measure (or, with ``--report``, write ``restart.md`` again from ``restart.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="only write restart.md again from restart.json")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="one repetition, one node")
    args = parser.parse_args(argv)
    if args.report:
        write_markdown(json.loads((args.out / "restart.json").read_text()), args.out / "restart.md")
        return 0
    if args.smoke:
        args.repeat, args.nodes = 1, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    scratch = args.out / "scratch" / f"restart-{os.getpid()}"
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "nodes": args.nodes, "repeat": args.repeat}
    results["machine"] = bench.machine_info()
    results.update(in_place=[], starting_over=[], relay=[])
    for i in range(args.repeat):
        order = [("in_place", in_place), ("starting_over", starting_over)]
        for name, measure in order if i % 2 == 0 else order[::-1]:
            sample = measure(scratch / f"{name}-{i}", args.nodes)
            log.info("%s %d: %s", name, i, sample)
            results[name].append(sample)
        sample = relay(scratch / f"relay-{i}", args.nodes)
        log.info("relay %d: %s", i, sample)
        results["relay"].append(sample)
    results["summary"] = {
        "in_place_noticed_s": _median(results["in_place"], "noticed_s"),
        "in_place_db_s": _median(results["in_place"], "db_answers_s"),
        "in_place_task_s": _median(results["in_place"], "task_reads_s"),
        "starting_over_task_s": _median(results["starting_over"], "task_reads_s"),
        "relay_gap_s": _median(results["relay"], "without_database_s"),
        "workers_kept": all(x["same_workers"] for x in results["in_place"]),
    }
    results["summary"]["ratio"] = results["summary"]["in_place_task_s"] / results["summary"]["starting_over_task_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "restart.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, args.out / "restart.md")
    print(args.out / "restart.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
