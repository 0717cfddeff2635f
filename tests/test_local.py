"""The desktop backend: same API, same guarantees, processes on this machine.

The database is the embedded nx-27017 server (no mongod exists here), which
is also what a desktop user without MongoDB gets.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from conftest import FAKE_MONGOD, cluster_processes
from dask.system import CPU_COUNT
from dask.utils import format_bytes, parse_bytes
from distributed.system import MEMORY_LIMIT

from mspass_cluster import JobFailedError, MsPASSCluster

PUBLISHED = ("MSPASS_SCHEDULER_ADDRESS", "DASK_SCHEDULER_PORT", "MSPASS_DB_ADDRESS", "MONGODB_PORT")


def test_local_cluster_stores_data_scales_and_leaves_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mspass_cluster")
    with MsPASSCluster(backend="local", nodes=2, work_dir=str(tmp_path), db_port=27391) as cluster:
        assert any("nx-27017" in r.getMessage() and "stand-in" in r.getMessage() for r in caplog.records)
        assert cluster.backend == "local" and cluster.database.address == "mongodb://127.0.0.1:27391/"
        assert cluster.db_address.startswith("mongodb://127.0.0.1:27391/?tls=true&")
        # With security (the default) the whole connection string, and no MONGODB_PORT for Client() to append.
        assert os.environ["MSPASS_DB_ADDRESS"] == cluster.db_address and os.environ["MONGODB_PORT"] == ""
        client = cluster.get_client()
        db = cluster.get_db_client()
        client.gather(client.map(lambda i, c: c.t.docs.insert_one({"i": i}).acknowledged, range(20), c=db))
        assert sorted(d["i"] for d in db.t.docs.find()) == list(range(20))
        envs = client.run(lambda: (os.environ.get("MSPASS_DB_ADDRESS"), os.environ.get("MONGODB_PORT")))
        assert set(envs.values()) == {(cluster.db_address, "")}
        # The machine is shared between the two "nodes", not given whole to each.
        sizes = {(w["nthreads"], w["memory_limit"]) for w in client.scheduler_info()["workers"].values()}
        assert sizes == {(max(1, CPU_COUNT // 2), parse_bytes(format_bytes(MEMORY_LIMIT // 2)))}, sizes
        cluster.scale(3)
        cluster.wait_for_workers()
        assert len(client.scheduler_info()["workers"]) == 3
        cluster.scale(1)
        cluster.wait_for_workers(1)
        cluster.adapt(minimum=2, maximum=2, interval="200ms")
        cluster.wait_for_workers(2, timeout=60)
        pids = cluster_processes(cluster.cluster_id)
        assert pids
    assert cluster_processes(cluster.cluster_id) == []
    assert all(state in ("COMPLETED", "CANCELLED") for _, _, state in cluster.job_ids.values())
    assert all(os.environ.get(k) != "27391" for k in PUBLISHED)


def test_local_worker_failure_is_reported_with_its_log(tmp_path):
    with pytest.raises(JobFailedError) as info:
        MsPASSCluster(
            backend="local",
            nodes=1,
            work_dir=str(tmp_path),
            db_command=FAKE_MONGOD,
            db_port=27392,
            python="/nonexistent/python",
            # The database's first-user script would run with that Python too, and fail first.
            security=False,
        )
    assert info.value.role == "worker" and info.value.exit_code == "127:0"
    assert "/nonexistent/python" in info.value.log_tail
    assert not [p for p in cluster_processes_in(tmp_path)]


def cluster_processes_in(tmp_path):
    ids = {p.name.split("-")[1] for p in (tmp_path / "logs").glob("*.sh")}
    return [pid for cid in ids for pid in cluster_processes(cid)]


def test_backend_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MSPASS_CLUSTER_BACKEND", "local")
    with MsPASSCluster(nodes=1, work_dir=str(tmp_path), db_command=FAKE_MONGOD, db_port=27393) as cluster:
        assert cluster.backend == "local"


def test_the_demo_round_trips_every_record_and_leaves_nothing(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mspass_cluster.demo", "--records", "12", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "12/12 records round-tripped intact" in out.stdout and "0 left running" in out.stdout
    assert cluster_processes_in(tmp_path) == []


def test_local_nodes_share_the_machine_unless_told_otherwise():
    from mspass_cluster.backends.local import share_of_this_machine
    from mspass_cluster.config import resolve_options

    def share(**kw):
        opts = share_of_this_machine(resolve_options(environ={}, backend="local", **kw), cpus=16, memory=64 * 2**30)
        return opts.cores, opts.memory

    assert share(nodes=4) == (4, "16.00GiB")
    assert share(nodes=3, processes=2) == (4, "21.33GiB")  # whole threads per process
    assert share(nodes=32) == (1, "2.00GiB")  # more nodes than cores: one each
    assert share(nodes=2, cores=12, memory="40GiB") == (12, "40GiB")
    script = MsPASSCluster.job_script("worker", backend="local", nodes=2, work_dir="/tmp/preview")
    assert f"--nthreads {max(1, CPU_COUNT // 2)}" in script


def test_two_desktop_clusters_get_a_database_each(tmp_path):
    # Both on the default db_port: the second notebook's database takes the next free port.
    with (
        MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path / "a")) as first,
        MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path / "b")) as second,
    ):
        assert first.db_address != second.db_address
        first.get_db_client().t.c.insert_one({"cluster": "first"})
        assert second.get_db_client().t.c.count_documents({}) == 0
        assert first.get_db_client().t.c.count_documents({}) == 1


def test_adapt_grows_with_the_load_and_shrinks_when_idle(tmp_path):
    import time

    with MsPASSCluster(
        backend="local",
        nodes=1,
        cores=1,
        memory="1GiB",
        work_dir=str(tmp_path),
        db_command=FAKE_MONGOD,
        poll_interval=1,
    ) as cluster:
        client = cluster.get_client()
        adaptive = cluster.adapt(minimum=1, maximum=2, interval="250ms", wait_count=4, target_duration="1s")
        futures = client.map(lambda x: time.sleep(0.25) or x, range(60))
        most = 0
        while not all(f.done() for f in futures):
            most = max(most, len(client.scheduler_info()["workers"]))
            time.sleep(0.1)
        assert client.gather(futures) == list(range(60)) and most == 2
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(client.scheduler_info()["workers"]) == 1 and len(cluster.worker_spec) == 1
        assert [entry for _, entry in adaptive.log if entry["status"] == "down"], "adapt never scaled down"
