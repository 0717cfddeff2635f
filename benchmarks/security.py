"""What security costs: the same MsPASSCluster with ``security=True`` (the default) and ``security=False``.

Usage (from the repository root, as root, with the test bed up)::

    benchmarks/run-security [--repeat 5] [--transfer-gib 2] [--out benchmarks/results] [--smoke]

Measures, side by side in one run, the two variants interleaved (the order
flips with every repetition), every cluster closed and its jobs gone before
the next one starts:

1. time to ready on ``backend="slurm"`` (2 worker nodes and the database's
   node) and on ``backend="local"``: medians, every sample, secure / open,
   and the cluster's own milestones (jobs submitted, database answering,
   workers connected) to say where a difference comes from;
2. the throughput of a transfer-heavy task graph on the Slurm clusters
   just started: random arrays made on the worker of one node and consumed
   on the worker of the other (TLS between them, or plain TCP), checked to
   have crossed between the nodes;
3. the parts of security measured alone: making the credentials, a Dask
   connection with and without TLS, and the database's start, first user
   and readiness probe with and without TLS and x.509 authentication.

Writes ``security.json``, ``security.md`` and ``security.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import bench, payload, probes, security_report
from .security_report import MILESTONES
from .tools import NX_MONGOD, WALLTIME_MINUTES, WORKER_CORES, WORKER_MEMORY, MsPASSTool, Running

__all__ = ["main", "Plan", "Variant", "TARGET_RATIO", "transfer", "Milestones"]

log = logging.getLogger("benchmarks")

GiB = 2**30
MiB = 2**20
#: Issue 10: a default (secure) cluster's time to ready within 10 % of the open one's.
TARGET_RATIO = 1.10
#: Longest wait for a worker to let go of a batch's keys.
RELEASE_TIMEOUT = 60.0
#: Longest wait for one batch's arrays to be made, or moved and consumed.
BATCH_TIMEOUT = 300.0
MEASUREMENTS = ("slurm", "local", "parts")


@dataclass
class Plan:
    """What one run measures."""

    repeat: int
    slurm_nodes: int
    local_nodes: int
    transfer_bytes: int
    block_bytes: int
    batch_bytes: int
    parts_repeat: int
    warmup: bool
    smoke: bool
    only: list

    def nodes_needed(self) -> int:
        """Test-bed nodes the Slurm part needs: its worker nodes plus the database's (worker jobs are exclusive)."""
        return self.slurm_nodes + 1 if "slurm" in self.only else 0

    def blocks_per_batch(self) -> int:
        return max(1, self.batch_bytes // self.block_bytes)


# ---------------------------------------------------------------- arguments
def _size(unit: int):
    def parse(text: str) -> int:
        value = float(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a size of 0 or more")
        return int(value * unit)

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/run-security", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeat", type=int, default=None, metavar="N", help="samples of each figure per variant (default 5)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    parser.add_argument("--slurm-nodes", type=int, default=None, metavar="N", help="worker nodes on Slurm (default 2)")
    parser.add_argument(
        "--local-nodes", type=int, default=None, metavar="N", help="worker 'nodes' on the local backend (default 2)"
    )
    parser.add_argument(
        "--transfer-gib",
        type=_size(GiB),
        default=None,
        dest="transfer_bytes",
        metavar="GIB",
        help="GiB moved between the two nodes per sample (default 2; 0: no transfer)",
    )
    parser.add_argument(
        "--block-mib",
        type=_size(MiB),
        default=None,
        dest="block_bytes",
        metavar="MIB",
        help="size of one array (default 128)",
    )
    parser.add_argument(
        "--batch-gib",
        type=_size(GiB),
        default=None,
        dest="batch_bytes",
        metavar="GIB",
        help="most a worker holds at once: arrays made, moved and released per batch (default 1)",
    )
    parser.add_argument(
        "--parts-repeat", type=int, default=None, metavar="N", help="samples of each part measured alone (default 10)"
    )
    parser.add_argument(
        "--only", default=",".join(MEASUREMENTS), help=f"comma-separated subset of {','.join(MEASUREMENTS)}"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="quick check for the tests: 1 repetition, 64 MiB moved in 16 MiB arrays, 1 local node",
    )
    parser.add_argument("--verbose", action="store_true", help="also show mspass_cluster's and distributed's INFO logs")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """Defaults for a full run, or for ``--smoke``; explicit options win over both."""
    smoke = args.smoke
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(MEASUREMENTS))
    if unknown:
        raise SystemExit(f"--only: unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")

    def pick(value, full, quick):
        return value if value is not None else (quick if smoke else full)

    plan = Plan(
        repeat=pick(args.repeat, 5, 1),
        slurm_nodes=pick(args.slurm_nodes, 2, 2),
        local_nodes=pick(args.local_nodes, 2, 1),
        transfer_bytes=pick(args.transfer_bytes, 2 * GiB, 64 * MiB),
        block_bytes=pick(args.block_bytes, 128 * MiB, 16 * MiB),
        batch_bytes=pick(args.batch_bytes, 1 * GiB, 32 * MiB),
        parts_repeat=pick(args.parts_repeat, 10, 1),
        warmup=not smoke,
        smoke=smoke,
        only=only,
    )
    if plan.repeat < 1 or plan.slurm_nodes < 2 or plan.local_nodes < 1 or plan.parts_repeat < 1:
        raise SystemExit("--repeat and --parts-repeat need 1 or more, --slurm-nodes 2 or more, --local-nodes 1 or more")
    if plan.transfer_bytes and plan.block_bytes < 1:
        raise SystemExit("--block-mib must be more than 0")
    return plan


# ------------------------------------------------------------------ variants
class Variant(MsPASSTool):
    """``MsPASSCluster`` on one backend with ``security`` on (``secure``) or off (``open``).

    Parameters
    ----------
    scratch : Path
        Each cluster's ``work_dir`` is ``scratch/<tag>``.
    backend : str
        ``slurm`` or ``local``.
    secure : bool
        ``security=True`` (the default of ``MsPASSCluster``) or ``security=False``.
    """

    def __init__(self, scratch: Path, backend: str, secure: bool):
        super().__init__(scratch)
        self.backend = backend
        self.secure = secure
        self.name = "secure" if secure else "open"
        self.label = f"security={secure}"

    def start(self, nodes: int, tag: str, **kwargs) -> Running:
        return super().start(nodes, tag, backend=self.backend, security=self.secure, **kwargs)


def variants(scratch: Path, backend: str) -> list[Variant]:
    return [Variant(scratch, backend, True), Variant(scratch, backend, False)]


# ---------------------------------------------------------------- milestones
class Milestones(logging.Handler):
    """The cluster's own start-up milestones, from its log records and its scheduler's events.

    While installed (``with Milestones() as m:``) it takes every record of the
    ``mspass_cluster`` logger, the debug ones too (job submissions, database
    ready); the logger's own handlers still show only what they showed before.
    """

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, str]] = []
        self._logger = logging.getLogger("mspass_cluster")
        self._saved: tuple = ()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, record.getMessage()))

    def __enter__(self) -> "Milestones":
        shown = self._logger.getEffectiveLevel()
        self._saved = (self._logger.level, [(h, h.level) for h in self._logger.handlers])
        for handler, level in self._saved[1]:
            handler.setLevel(max(level, shown))
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        level, handlers = self._saved
        self._logger.setLevel(level)
        for handler, handler_level in handlers:
            handler.setLevel(handler_level)

    def _first(self, prefix: str, last: bool = False) -> float | None:
        times = [t for t, message in self.records if message.startswith(prefix)]
        return (max(times) if last else min(times)) if times else None

    def relative_to(self, t0: float, running: Running | None) -> dict:
        """Seconds from ``t0`` (wall clock) to each milestone; None for one that did not happen."""
        connected = []
        if running is not None:
            events = running.cluster.scheduler.get_events("all")
            connected = [t for t, msg in events if isinstance(msg, dict) and msg.get("action") == "add-worker"]
        marks = {
            "db_submitted": self._first("Submitted db "),
            "first_worker_submitted": self._first("Submitted worker "),
            "last_worker_submitted": self._first("Submitted worker ", last=True),
            "db_ready": self._first("Database ready at"),
            "first_worker_connected": min(connected) if connected else None,
            "last_worker_connected": max(connected) if connected else None,
        }
        return {k: (None if v is None else round(v - t0, 4)) for k, v in marks.items()}


# ------------------------------------------------------------------ transfer
def _host(address: str) -> str:
    return address.split("://", 1)[-1].rpartition(":")[0].strip("[]")


def _union_seconds(intervals) -> float:
    """Length of the union of ``(start, stop)`` intervals: time some transfer was under way."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _wait_released(client, workers: list[str], held_keys, mark: str) -> None:
    """Until no worker holds a key with ``mark`` in its name."""

    def held():
        return client.run(held_keys, mark, workers=workers)

    if not probes.wait_until(lambda: not any(held().values()), RELEASE_TIMEOUT):
        raise RuntimeError(
            f"workers still hold keys {RELEASE_TIMEOUT:.0f} s after their futures were released: {held()}"
        )


def _results(client, futures: list, what: str) -> list:
    """The futures' results, or an error after ``BATCH_TIMEOUT`` saying what did not finish."""
    from distributed import wait

    try:
        wait(futures, timeout=BATCH_TIMEOUT)
    except TimeoutError as exc:
        raise RuntimeError(f"{what} did not finish within {BATCH_TIMEOUT:.0f} s") from exc
    return client.gather(futures)


def transfer(client, plan: Plan, label: str) -> dict:
    """Move ``plan.transfer_bytes`` from the worker of one node to the worker of the other; time and check it.

    Per batch: arrays are made on the producer (not timed) and checked to be
    there only; then the consumers, pinned to the other worker, are submitted
    and their results gathered (timed: scheduling, the transfer, receiving,
    a trivial task); then every key is released and both workers are checked
    to hold nothing before the next batch. Keys are new in every batch, and
    every sample runs on a cluster of its own, so nothing is cached.
    """
    task = payload.tasks()
    workers = sorted(client.scheduler_info()["workers"])
    if len(workers) < 2:
        raise RuntimeError(f"the transfer needs two workers; the scheduler has {workers}")
    hostnames = client.run(task.hostname)
    producer, consumer = workers[0], workers[1]
    if _host(producer) == _host(consumer) or hostnames[producer] == hostnames[consumer]:
        raise RuntimeError(f"both workers are on one node ({hostnames}): the data would not cross the network")
    pinned = dict(allow_other_workers=False, pure=False)
    token = secrets.token_hex(3)

    # Warm-up: the connection between the two workers (and, with TLS, its handshake) exists before the timing.
    warm = client.submit(task.make_block, 0, MiB, workers=[producer], key=f"warm-{token}", **pinned)
    _results(client, [client.submit(task.consume_block, warm, workers=[consumer], **pinned)], "the warm-up")
    del warm
    _wait_released(client, workers, task.held_keys, token)

    per_batch = plan.blocks_per_batch()
    blocks = max(1, plan.transfer_bytes // plan.block_bytes)
    batch_seconds, prefix, seed = [], f"block-{token}-", 1
    for batch, first in enumerate(range(0, blocks, per_batch)):
        count = min(per_batch, blocks - first)
        made = [
            client.submit(
                task.make_block,
                seed + i,
                plan.block_bytes,
                workers=[producer],
                key=f"{prefix}{batch}-{i}",
                **pinned,
            )
            for i in range(count)
        ]
        seed += count
        _results(client, made, f"{label}: making batch {batch + 1}")
        where = client.who_has(made)
        if any(set(holders) != {producer} for holders in where.values()):
            raise RuntimeError(
                f"{label}: a block was not (only) on the producer {producer} before the transfer: {where}"
            )
        started = time.perf_counter()
        used = [client.submit(task.consume_block, block, workers=[consumer], **pinned) for block in made]
        received = _results(client, used, f"{label}: moving batch {batch + 1}")
        batch_seconds.append(time.perf_counter() - started)
        if sum(received) != count * plan.block_bytes:
            raise RuntimeError(f"{label}: the consumer received {sum(received)} bytes, not {count * plan.block_bytes}")
        del made, used
        _wait_released(client, workers, task.held_keys, token)

    log_entries = client.run(task.incoming_log, workers=[consumer])[consumer]
    ours = [e for e in log_entries if any(k.startswith(prefix) for k in e["keys"])]
    moved = sum(v for e in ours for k, v in e["keys"].items() if k.startswith(prefix))
    sources = sorted({e["who"] for e in ours})
    busy = _union_seconds((e["start"], e["stop"]) for e in ours)
    total = blocks * plan.block_bytes
    seconds = sum(batch_seconds)
    return {
        "bytes": total,
        "blocks": blocks,
        "block_bytes": plan.block_bytes,
        "batches": len(batch_seconds),
        "batch_seconds": batch_seconds,
        "seconds": seconds,
        "gib_per_s": total / GiB / seconds,
        "dask_transfer_seconds": busy,
        "dask_gib_per_s": moved / GiB / busy if busy else None,
        "checks": {
            "producer": producer,
            "consumer": consumer,
            "hostnames": {producer: hostnames[producer], consumer: hostnames[consumer]},
            "scheme": producer.split("://", 1)[0],
            "bytes_fetched_by_consumer": moved,
            "fetches": len(ours),
            "sources": sources,
            "crossed_nodes": sources == [producer] and moved == total,
            "released_after_each_batch": True,
            "compression": client.run(task.compression, workers=[producer])[producer],
        },
    }


# ---------------------------------------------------------------- the runs
class Run:
    """One benchmark run: the harness of ``benchmarks.bench`` (bookkeeping, leftovers) with the two variants."""

    def __init__(self, plan: Plan, scratch: Path):
        self.plan = plan
        self.harness = bench.Harness(plan, scratch, tools=[])
        self.scratch = scratch

    def backend(self, backend: str, nodes: int, with_transfer: bool) -> dict:
        """Time to ready of both variants on ``backend``, interleaved; the transfer too on a cluster just started."""
        harness, tools = self.harness, variants(self.scratch, backend)
        if self.plan.warmup:
            self._warm_up(tools, nodes, backend)
        ready = {t.name: [] for t in tools}
        marks = {t.name: [] for t in tools}
        moved = {t.name: [] for t in tools}
        for rep in range(self.plan.repeat):
            for tool in bench.ordered(tools, rep):
                context = f"{backend}, {nodes} node(s), repetition {rep + 1}/{self.plan.repeat}"
                with Milestones() as milestones:
                    t0 = time.time()
                    running, seconds = harness._start(tool, nodes, context)
                ready[tool.name].append(seconds)
                marks[tool.name].append(milestones.relative_to(t0, running))
                if running is None:
                    moved[tool.name].append(None)
                    continue
                log.info("%s, %s: ready in %.2f s", context, tool.name, seconds)
                if with_transfer:
                    moved[tool.name].append(self._transfer(tool, running, context))
                harness.close_and_check(tool, running, context)
        medians = {name: bench.median(values) for name, values in ready.items()}
        result = {
            "backend": backend,
            "nodes": nodes,
            "ready": {
                "samples": ready,
                "median": medians,
                "ratio": bench.ratio(medians["secure"], medians["open"]),
                "target_ratio": TARGET_RATIO,
                "milestones": marks,
                "milestone_medians": {
                    name: {key: bench.median([m[key] for m in samples]) for key, _ in MILESTONES}
                    for name, samples in marks.items()
                },
            },
        }
        if with_transfer:
            rates = {name: [s["gib_per_s"] if s else None for s in samples] for name, samples in moved.items()}
            dask_rates = {
                name: [s["dask_gib_per_s"] if s else None for s in samples] for name, samples in moved.items()
            }
            rate_medians = {name: bench.median(values) for name, values in rates.items()}
            dask_medians = {name: bench.median(values) for name, values in dask_rates.items()}
            result["transfer"] = {
                "bytes": moved_bytes(self.plan),
                "block_bytes": self.plan.block_bytes,
                "batch_bytes": self.plan.blocks_per_batch() * self.plan.block_bytes,
                "gib_per_s": rates,
                "median_gib_per_s": rate_medians,
                "ratio": bench.ratio(rate_medians["secure"], rate_medians["open"]),
                "dask_gib_per_s": dask_rates,
                "median_dask_gib_per_s": dask_medians,
                "dask_ratio": bench.ratio(dask_medians["secure"], dask_medians["open"]),
                "samples": moved,
            }
        return result

    def _warm_up(self, tools: list[Variant], nodes: int, backend: str) -> None:
        """One untimed cluster of each variant: the first clusters of a process pay for its imports."""
        for tool in tools:
            context = f"{backend}, {nodes} node(s), warm-up (not counted)"
            running, seconds = self.harness._start(tool, nodes, context)
            if running is not None:
                log.info("%s, %s: ready in %.2f s", context, tool.name, seconds)
                self.harness.close_and_check(tool, running, context)

    def _transfer(self, tool: Variant, running: Running, context: str) -> dict | None:
        try:
            client = running.cluster.get_client()
            sample = transfer(client, self.plan, f"{context}, {tool.name}")
        except Exception as exc:
            self.harness._error(context + " transfer", tool, exc)
            return None
        log.info(
            "%s, %s: %.2f GiB in %.2f s, %.2f GiB/s (Dask's own record: %s GiB/s), across %s",
            context,
            tool.name,
            sample["bytes"] / GiB,
            sample["seconds"],
            sample["gib_per_s"],
            bench._fmt(sample["dask_gib_per_s"]),
            " -> ".join(sample["checks"]["hostnames"].values()),
        )
        if not sample["checks"]["crossed_nodes"]:
            self.harness.errors.append(
                {
                    "context": context + " transfer",
                    "tool": tool.name,
                    "error": f"not all data crossed: {sample['checks']}",
                }
            )
        return sample


def moved_bytes(plan: Plan) -> int:
    return max(1, plan.transfer_bytes // plan.block_bytes) * plan.block_bytes


# ------------------------------------------------------------- parts alone
def time_credentials(repeat: int) -> dict:
    """``ClusterCredentials.create`` (a CA and five EC P-256 keys and certificates, written 0600), and Dask's Security."""
    from mspass_cluster.security import ClusterCredentials

    create, security = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            started = time.perf_counter()
            credentials = ClusterCredentials.create(os.path.join(tmp, str(i)), cluster=f"bench-{i}")
            create.append(time.perf_counter() - started)
            started = time.perf_counter()
            credentials.dask_security()
            security.append(time.perf_counter() - started)
    return {
        "create_s": create,
        "median_create_s": bench.median(create),
        "dask_security_s": security,
        "median_dask_security_s": bench.median(security),
    }


async def _connect_times(scheme: str, security, repeat: int) -> tuple[list[float], object]:
    from distributed.comm import connect, listen

    async def handle(comm):
        await comm.close()

    listener = listen(f"{scheme}://127.0.0.1:0", handle, **security.get_listen_args("scheduler"))
    await listener.start()
    args = security.get_connection_args("client")
    times, cipher = [], None
    try:
        for _ in range(repeat + 1):
            started = time.perf_counter()
            comm = await connect(listener.contact_address, timeout=10, **args)
            times.append(time.perf_counter() - started)
            cipher = comm.extra_info.get("cipher")
            await comm.close()
    finally:
        listener.stop()
    return times[1:], cipher  # the first pays for imports and the event loop's first use


def time_dask_connections(repeat: int) -> dict:
    """A new Dask connection (Dask's handshake included) with mutual TLS and with plain TCP, on loopback."""
    from distributed.security import Security

    from mspass_cluster.security import ClusterCredentials

    with tempfile.TemporaryDirectory() as tmp:
        secure = ClusterCredentials.create(os.path.join(tmp, "c"), cluster="bench").dask_security()
        samples, ciphers = {}, {}
        for i in range(2):
            for scheme, security in bench.ordered([("tls", secure), ("tcp", Security())], i):
                times, ciphers[scheme] = asyncio.run(_connect_times(scheme, security, repeat))
                samples.setdefault(scheme, []).extend(times)
    medians = {k: bench.median(v) for k, v in samples.items()}
    return {
        "samples_s": samples,
        "median_s": medians,
        "ratio": bench.ratio(medians["tls"], medians["tcp"]),
        "tls_cipher": ciphers.get("tls"),
    }


async def _worker_sample(argv_for, security, protocol: str) -> float:
    """Seconds from starting ``dask worker`` (nanny and worker) until an in-process scheduler has it."""
    from distributed import Scheduler

    async with Scheduler(host="127.0.0.1", port=0, dashboard=False, security=security, protocol=protocol) as scheduler:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv_for(scheduler.address), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            while not scheduler.workers:
                if proc.returncode is not None or time.perf_counter() - started > 120:
                    raise RuntimeError(f"the worker did not connect (exit status {proc.returncode})")
                await asyncio.sleep(0.01)
            return time.perf_counter() - started
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()


def time_worker_start(repeat: int) -> dict:
    """A worker node's ``dask worker`` command as the cluster builds it, secure and open, on loopback.

    Three kinds, interleaved: ``secure`` (TLS, and no worker dashboard, as
    security turns it off), ``open`` (TCP, with the dashboard), and
    ``open_no_dashboard`` (TCP without the dashboard), which tells TLS's
    share apart from the dashboard's.
    """
    from distributed.security import Security

    from mspass_cluster.config import resolve_options
    from mspass_cluster.roles import worker_argv
    from mspass_cluster.security import ClusterCredentials

    with tempfile.TemporaryDirectory() as tmp:
        credentials = ClusterCredentials.create(os.path.join(tmp, "credentials"), cluster="bench")
        options = resolve_options(
            python=sys.executable,
            processes=1,
            cores=WORKER_CORES,
            memory=WORKER_MEMORY,
            worker_dir=tmp,
            worker_lifetime="none",
        )
        kinds = {
            "secure": (
                lambda address: worker_argv(options, address, "w", credentials.files, local=True),
                credentials.dask_security(),
                "tls",
            ),
            "open": (lambda address: worker_argv(options, address, "w", None, local=True), Security(), "tcp"),
            "open_no_dashboard": (
                lambda address: worker_argv(options, address, "w", None, local=True) + ["--no-dashboard"],
                Security(),
                "tcp",
            ),
        }
        samples = {name: [] for name in kinds}
        for rep in range(repeat):
            names = list(kinds) if rep % 2 == 0 else list(kinds)[::-1]
            for name in names:
                samples[name].append(asyncio.run(_worker_sample(*kinds[name])))
    return {"samples_s": samples, "median_s": {name: bench.median(v) for name, v in samples.items()}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _db_users_argv(port: int, files) -> list[str]:
    """The database job's first-user step (see ``mspass_cluster.roles.db_users_lines``), script on stdin."""
    return [
        sys.executable,
        "-",
        "--port",
        str(port),
        "--ca",
        files.db_ca_file,
        "--cert",
        files.db_client_pem,
        "--subject",
        files.db_user,
        "--timeout",
        "60",
    ]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Watch:
    """Seconds from ``started`` until each of some conditions first held, polled every 10 ms in a thread."""

    def __init__(self, started: float, conditions: dict):
        self.started = started
        self.pending = dict(conditions)
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.pending and not self._stop.is_set():
            for name, condition in list(self.pending.items()):
                if condition():
                    self.seen[name] = time.perf_counter() - self.started
                    del self.pending[name]
            self._stop.wait(0.01)

    def result(self, timeout: float = 60.0) -> dict:
        self._thread.join(timeout)
        self._stop.set()
        if self.pending:
            raise RuntimeError(f"not within {timeout:g} s: {', '.join(self.pending)}")
        return self.seen


def _db_server_argv(tmp: str, secure: bool) -> tuple:
    """The stand-in's command line as the local backend's job has it; data and credentials in ``tmp``.

    Returns ``(argv, port, dbpath, uri, files)``: ``uri`` is the cluster's
    connection string, ``files`` the credentials' files (None when open).
    """
    from mspass_cluster.db import connection_string
    from mspass_cluster.security import ClusterCredentials, db_security_args

    dbpath = os.path.join(tmp, "data")
    os.mkdir(dbpath)
    port = _free_port()
    argv = [*NX_MONGOD, "--port", str(port), "--dbpath", dbpath, "--bind_ip", "127.0.0.1", "--nounixsocket"]
    if not secure:
        return argv, port, dbpath, connection_string("127.0.0.1", port), None
    credentials = ClusterCredentials.create(os.path.join(tmp, "credentials"), cluster="bench")
    argv += db_security_args(credentials.files)
    return argv, port, dbpath, credentials.db_uri("127.0.0.1", port), credentials.files


def _db_users_script() -> str:
    return importlib.resources.files("mspass_cluster").joinpath("templates/db_users.py").read_text()


def _stop(*procs) -> None:
    """SIGTERM the processes this harness started, SIGKILL after 20 s."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


#: Runs the first-user script (on stdin) through its own functions, in the order of its ``main``, noting the
#: time (since ``BENCH_T0``, wall clock) after each step and every pymongo client it makes.
_TIMED_FIRST_USER = r"""
import json, os, sys, time, types
t0 = float(os.environ["BENCH_T0"])
marks = {}
module = types.ModuleType("db_users")
exec(compile(sys.stdin.read(), "db_users.py", "exec"), module.__dict__)
marks["imported_s"] = time.time() - t0
args = module.parse_arguments(sys.argv[1:])
clients = []
connect = module.connect
def counted(*a, **k):
    clients.append(time.time() - t0)
    return connect(*a, **k)
module.connect = counted
module.wait_for_server(args)
marks["server_noticed_s"] = time.time() - t0
marks["tries_before_noticing"] = len(clients)
if not module.authenticates(args):
    module.create_user(args)
marks["user_created_s"] = time.time() - t0
if not module.authenticates(args):
    sys.exit("authentication fails after createUser")
marks["verified_s"] = time.time() - t0
marks["clients_at_s"] = clients
print(json.dumps(marks))
"""


def _first_user_steps_sample() -> dict:
    """The secure database and its first-user script started together; when the port opened, and each step."""
    with tempfile.TemporaryDirectory() as tmp:
        argv, port, _, _, files = _db_server_argv(tmp, True)
        users_argv = _db_users_argv(port, files)
        users_argv[1:2] = ["-c", _TIMED_FIRST_USER]
        t0, started = time.time(), time.perf_counter()
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        users = None
        try:
            users = subprocess.Popen(
                users_argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "BENCH_T0": repr(t0)},
            )
            watch = _Watch(started, {"listening_s": lambda: _listening(port)})
            out, err = users.communicate(_db_users_script(), timeout=60)
            if users.returncode != 0:
                raise RuntimeError(f"the timed first-user script failed: {err.strip()[-500:]}")
            marks = json.loads(out.strip().splitlines()[-1])
            marks.update(watch.result())
        finally:
            _stop(users, server)
    return marks


def time_first_user_steps(repeat: int) -> dict:
    """Where the first-user step spends its time, step by step (see :data:`_TIMED_FIRST_USER`)."""
    samples = [_first_user_steps_sample() for _ in range(repeat)]
    keys = ("listening_s", "imported_s", "server_noticed_s", "user_created_s", "verified_s", "tries_before_noticing")
    medians = {key: bench.median([s[key] for s in samples]) for key in keys}
    medians["noticed_after_listening_s"] = bench.median([s["server_noticed_s"] - s["listening_s"] for s in samples])
    medians["steps_after_noticing_s"] = bench.median([s["verified_s"] - s["server_noticed_s"] for s in samples])
    return {"samples": samples, "median": medians}


def _db_sample(secure: bool, probes_per_sample: int) -> dict:
    """Start the database stand-in as the job does, with or without security, on loopback; time its milestones.

    From starting the server (and, when secure, the first-user script next to
    it, as the job script does): when its port first accepts a connection,
    when the user exists (the stand-in's users file appears), when the
    first-user script has exited (polled every 10 ms), and when the cluster's
    own readiness probe (:func:`mspass_cluster.db.ping`, x.509 authentication
    when secure), tried every 0.1 s as the cluster does, first succeeds. Then
    the probe's cost on the ready server.
    """
    from mspass_cluster._mongod_security import USERS_FILE
    from mspass_cluster.db import ping

    with tempfile.TemporaryDirectory() as tmp:
        argv, port, dbpath, uri, files = _db_server_argv(tmp, secure)
        users = None
        started = time.perf_counter()
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            conditions = {"listening_s": lambda: _listening(port)}
            if secure:
                users = subprocess.Popen(
                    _db_users_argv(port, files),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                users.stdin.write(_db_users_script())
                users.stdin.close()
                conditions["user_created_s"] = lambda: os.path.exists(os.path.join(dbpath, USERS_FILE))
                conditions["users_script_exited_s"] = lambda: users.poll() is not None
            watch = _Watch(started, conditions)
            ready = _until(lambda: ping(uri, 1.0, dbpath) is None, started, interval=0.1)
            marks = watch.result()
            if users is not None and users.returncode != 0:
                raise RuntimeError(f"the first-user script failed: {users.stderr.read().strip()}")
            probe = []
            for _ in range(probes_per_sample):
                t = time.perf_counter()
                problem = ping(uri, 1.0, dbpath)
                probe.append(time.perf_counter() - t)
                if problem:
                    raise RuntimeError(f"the probe failed on a ready server: {problem}")
        finally:
            _stop(users, server)
            if users is not None:
                users.stderr.close()
    return {
        "listening_s": marks["listening_s"],
        "user_created_s": marks.get("user_created_s"),
        "users_script_exited_s": marks.get("users_script_exited_s"),
        "ready_s": ready,
        "probe_s": probe,
    }


def time_interpreter(repeat: int) -> list[float]:
    """A Python that imports pymongo and exits: what the first-user script pays before its first try."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import pymongo"], check=True, timeout=60)
        times.append(time.perf_counter() - started)
    return times


def _until(condition, started: float, timeout: float = 60.0, interval: float = 0.05) -> float:
    """Seconds from ``started`` until ``condition()`` holds (polled like the cluster's probe loop)."""
    if not probes.wait_until(condition, timeout, interval):
        raise RuntimeError(f"not within {timeout:g} s")
    return time.perf_counter() - started


def time_database(repeat: int) -> dict:
    """The database's part: start, first user, readiness probe; secure and open interleaved."""
    samples = {"secure": [], "open": []}
    for rep in range(repeat):
        for name in bench.ordered(["secure", "open"], rep):
            samples[name].append(_db_sample(name == "secure", 5))
    medians = {
        name: {
            key: bench.median([s[key] for s in values])
            for key in ("listening_s", "user_created_s", "users_script_exited_s", "ready_s")
            if any(s[key] is not None for s in values)
        }
        for name, values in samples.items()
    }
    for name, values in samples.items():
        medians[name]["probe_s"] = bench.median([p for s in values for p in s["probe_s"]])
    interpreter = time_interpreter(repeat)
    return {
        "samples": samples,
        "median": medians,
        "python_imports_pymongo_s": interpreter,
        "median_python_imports_pymongo_s": bench.median(interpreter),
    }


def parts(plan: Plan, harness: bench.Harness) -> dict:
    """Each part of security's cost measured alone (no Slurm)."""
    result = {}
    for name, measure, repeat in (
        ("credentials", time_credentials, max(plan.parts_repeat, 5) * 2),
        ("dask_connection", time_dask_connections, max(plan.parts_repeat, 5) * 5),
        ("worker_start", time_worker_start, plan.parts_repeat),
        ("database", time_database, plan.parts_repeat),
        ("first_user_steps", time_first_user_steps, plan.parts_repeat),
    ):
        try:
            result[name] = measure(repeat)
        except Exception as exc:
            harness.errors.append({"context": f"parts, {name}", "tool": "-", "error": f"{type(exc).__name__}: {exc}"})
            log.error("parts, %s: %s: %s", name, type(exc).__name__, exc)
    return result


# --------------------------------------------------------------------- main
def machine_info() -> dict:
    """The harness's machine info, and what TLS's speed depends on: OpenSSL, cryptography, the CPU's AES support."""
    meta = bench.machine_info()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        meta["versions"]["cryptography"] = importlib.metadata.version("cryptography")
    meta["versions"]["numpy"] = importlib.metadata.version("numpy")
    meta["openssl"] = ssl.OPENSSL_VERSION
    model, flags = None, set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    meta["cpu_model"] = model
    meta["cpu_aes"] = "aes" in flags
    meta["openssl_speed_aes_256_gcm_16k"] = _openssl_speed()
    meta["memory_total_kib"] = _meminfo_total()
    return meta


def _openssl_speed() -> float | None:
    """Bytes per second one core encrypts with AES-256-GCM in 16 KiB records (``openssl speed``), or None."""
    try:
        out = subprocess.run(
            ["openssl", "speed", "-seconds", "1", "-bytes", "16384", "-evp", "aes-256-gcm"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return float(out.strip().splitlines()[-1].split()[-1].rstrip("k")) * 1000
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _meminfo_total() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return None


def run(plan: Plan, out: Path) -> dict:
    """Run the planned measurements and return the results (written by :func:`main`)."""
    if plan.nodes_needed():
        available = probes.testbed_nodes()
        if available < plan.nodes_needed():
            raise SystemExit(
                f"The test bed has {available} usable node(s); the Slurm part needs {plan.nodes_needed()} "
                f"({plan.slurm_nodes} worker nodes plus the database's). Run `ci/testbed up 4` as root, "
                "or leave it out with --only local,parts."
            )
    scratch = out / "scratch-security"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    foreign = probes.queued_jobs() if plan.nodes_needed() else {}
    if foreign:
        log.warning("squeue already lists %d job(s) not started by this run: figures may be disturbed", len(foreign))
    runner = Run(plan, scratch)
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
            "db": "nx-27017 stand-in (python -m mspass_cluster.embedded_db)",
        },
        "variants": {"secure": "security=True (the default)", "open": "security=False"},
        "target_ratio": TARGET_RATIO,
    }
    results["meta"]["foreign_jobs_at_start"] = len(foreign)
    started = time.perf_counter()
    try:
        if "slurm" in plan.only:
            log.info("=== slurm: time to ready%s", ", transfer" if plan.transfer_bytes else "")
            results["slurm"] = runner.backend("slurm", plan.slurm_nodes, with_transfer=bool(plan.transfer_bytes))
        if "local" in plan.only:
            log.info("=== local: time to ready")
            results["local"] = runner.backend("local", plan.local_nodes, with_transfer=False)
        if "parts" in plan.only:
            log.info("=== parts of the cost, measured alone")
            results["parts"] = parts(plan, runner.harness)
    finally:
        results["cancelled_at_end"] = runner.harness.cancel_own_jobs() if plan.nodes_needed() else {}
    harness = runner.harness
    results["meta"]["duration_s"] = time.perf_counter() - started
    results["leftovers"] = harness.leftovers
    results["errors"] = harness.errors
    results["sequence"] = harness.sequence
    results["foreign_jobs"] = harness.foreign
    results["tags"] = sorted(harness.tags)
    return results


def main(argv=None) -> int:
    """Command-line entry point: run, then write security.json, security.md and security.png under ``--out``."""
    args = parse_args(argv)
    bench._configure_logging(args.verbose)
    plan = make_plan(args)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log.info("plan: %s; results in %s", asdict(plan), out)
    results = run(plan, out)
    written = security_report.write_all(results, out)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    if results["tags"]:
        left = {j: n for j, n in probes.queued_jobs().items() if any(n.startswith(t) for t in results["tags"])}
        if left:
            log.error("jobs of this run still queued: %s", left)
            return 1
    return 0 if not results["errors"] else 2


if __name__ == "__main__":
    sys.exit(main())
