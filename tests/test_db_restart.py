"""The database brought back in place: after its job ends, and before its walltime (issue 11).

A running cluster whose database job ends (``scancel``, a killed server, a
node lost, the walltime) submits a new database job on the same data, waits
until it answers, and re-points what it published: ``MSPASS_DB_ADDRESS`` in
the notebook and in every worker, MsPASS's worker plugin, ``get_db_client()``.
The workers are not restarted. Every test counts what was acknowledged
before the fault and finds all of it afterwards, GridFS files byte for byte.

Stand-ins (no mongod exists on this machine): the nx-27017 server
(``mspass_cluster.embedded_db``, SQLite underneath) for the data, the fake
mongod for process handling. What only a real mongod can confirm
(WiredTiger's journal recovery after SIGKILL) is named in the README.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import gridfs
import pytest
from conftest import FAKE_MONGOD, NX_MONGOD, assert_nothing_left, cluster_processes, queued

from mspass_cluster import JobFailedError, MsPASSCluster
from mspass_cluster.config import resolve_options
from mspass_cluster.roles import ScriptContext
from mspass_cluster.services.database import relay_lead
from mspass_cluster.slurm import parse_node_room

#: The workers' Python finds this module's tasks.
ON_PYTHONPATH = [f"export PYTHONPATH={Path(__file__).parent}"]


def _server_pid(cluster) -> int:
    """The PID of the cluster's database server (the stand-in's Python process)."""
    for pid in cluster_processes(cluster.cluster_id):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mspass_cluster.embedded_db" in cmdline or any(arg.endswith(b"fake_mongod.py") for arg in cmdline):
            return pid
    raise AssertionError(f"no database server of cluster {cluster.cluster_id} is running")


def _store(db, n: int, payload: bytes):
    """n acknowledged documents and one GridFS file; returns the file's id."""
    db.mspass.wf.insert_many([{"i": i} for i in range(n)])
    return gridfs.GridFS(db.mspass).put(payload, filename="trace.bin")


def _assert_everything_there(db, n: int, file_id, payload: bytes, acknowledged=()):
    # The one write in flight when the server died may have been stored without its acknowledgement.
    in_flight = 1 if acknowledged else 0
    assert n + len(acknowledged) <= db.mspass.wf.count_documents({}) <= n + len(acknowledged) + in_flight
    missing = [i for i in acknowledged if db.mspass.wf.count_documents({"w": i}) != 1]
    assert missing == [], f"acknowledged documents lost: {missing[:10]}"
    assert gridfs.GridFS(db.mspass).get(file_id).read() == payload


def _count_on_a_worker():
    """A task as MsPASS code runs it on a worker: a client from MSPASS_DB_ADDRESS."""
    import os

    import pymongo

    client = pymongo.MongoClient(os.environ["MSPASS_DB_ADDRESS"], serverSelectionTimeoutMS=20000)
    try:
        return client.mspass.wf.count_documents({}), os.getpid()
    finally:
        client.close()


def _noticed(cluster, restarts: int, seconds: float = 60) -> None:
    """Wait until the cluster noticed its database's end (a poll or two after it)."""
    deadline = time.monotonic() + seconds
    while cluster.database.restarts < restarts and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.database.restarts == restarts, f"the end of the database job was not noticed within {seconds} s"


def _count_through_mspass_plugin():
    """A task as MsPASS's ensemble readers run it: the worker's own client, from MsPASS's worker plugin."""
    from distributed import get_worker

    return get_worker().data["dbclient"].mspass.wf.count_documents({})


class _Writer(threading.Thread):
    """Inserts one document after another until the first error; remembers what was acknowledged."""

    def __init__(self, db):
        super().__init__(daemon=True)
        self.collection = db.mspass.wf
        self.acknowledged: list[int] = []
        self.error: Exception | None = None

    def run(self):
        i = 0
        while True:
            try:
                self.collection.insert_one({"w": i})
            except Exception as exc:  # the server went away: the writer's story ends here
                self.error = exc
                return
            self.acknowledged.append(i)
            i += 1


# ---------------------------------------------------------------- pure parts
def test_the_relay_starts_a_tenth_of_the_walltime_ahead_within_one_and_ten_minutes():
    assert relay_lead(resolve_options(db_walltime="00:02:00")) == 60
    assert relay_lead(resolve_options(db_walltime="02:00:00")) == 600
    assert relay_lead(resolve_options(db_walltime="01:00:00")) == 360


def test_a_database_brought_back_asks_for_its_old_node_and_waits_for_the_old_job():
    options = resolve_options(db_command=["mongod"], work_dir="/tmp/w")
    script, _ = ScriptContext(options, "ab12cd34", "mspass-ab12cd34").render(
        "db", "mspass-ab12cd34-db", ["--dependency=afterany:41", "--nodelist=n3"]
    )
    lines = script.splitlines()
    assert "#SBATCH --dependency=afterany:41" in lines and "#SBATCH --nodelist=n3" in lines
    assert "--nodelist" not in ScriptContext(options, "ab12cd34", "mspass-ab12cd34").render("db", "x")[0]


def test_the_old_node_is_asked_for_only_when_it_is_up_and_the_database_fits_there():
    """What `scontrol show node` says decides; a full, drained or unresponsive node is not waited for."""
    line = "NodeName=n3 CPUAlloc={a} CPUTot=4 RealMemory=4000 AllocMem={m} State={s} Partitions=debug"
    room = parse_node_room(line.format(a=1, m=2048, s="MIXED"))
    assert room.up and room.fits(1, 1024) and not room.fits(1, 2048)  # 1952 MB free: a 2 GiB database waits
    assert not parse_node_room(line.format(a=4, m=0, s="ALLOCATED")).fits(1, 10)
    assert [parse_node_room(line.format(a=0, m=0, s=s)).up for s in ("IDLE", "IDLE+DRAIN", "DOWN*", "IDLE*")] == [
        True,
        False,
        False,
        False,
    ]
    assert parse_node_room("slurm_load_node error: Invalid node name specified") is None


def test_db_restarts_must_be_a_whole_number_of_zero_or_more():
    from mspass_cluster import ConfigError

    assert resolve_options(db_restarts=0).db_restarts == 0
    with pytest.raises(ConfigError, match=r"db_restarts=-1 is below 0"):
        resolve_options(db_restarts=-1)


# ---------------------------------------------------------------- the desktop
def test_a_killed_database_comes_back_on_the_desktop_and_the_workers_use_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    payload = os.urandom(300_000)
    with MsPASSCluster(
        backend="local", nodes=1, work_dir=str(tmp_path), db_command=NX_MONGOD, job_script_prologue=ON_PYTHONPATH
    ) as cluster:
        client = cluster.get_client()
        db = cluster.get_db_client()
        file_id = _store(db, 100, payload)
        before = client.submit(_count_on_a_worker, pure=False).result()
        assert before[0] == 100
        old_job = cluster.db_job.job_id
        os.kill(_server_pid(cluster), signal.SIGKILL)
        _noticed(cluster, 1)
        again = cluster.get_db_client()  # waits while the database comes back
        assert cluster.db_job.job_id != old_job and cluster.database.restarts == 1
        _assert_everything_there(again, 100, file_id, payload)
        assert db.mspass.wf.count_documents({}) == 100  # the client made before follows (same address)
        count, pid = client.submit(_count_on_a_worker, pure=False).result()
        assert count == 100 and pid == before[1], "the worker was restarted, or cannot reach the database"
        assert os.environ["MSPASS_DB_ADDRESS"] == cluster.db_address
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "Bringing the database back on the same data" in m and "restart 1 of db_restarts=3" in m for m in messages
    )
    assert any(m.startswith("The database is back at ") for m in messages)


def test_restarts_used_up_say_so_and_restart_database_brings_it_back(tmp_path):
    with MsPASSCluster(
        backend="local", nodes=1, work_dir=str(tmp_path), db_command=NX_MONGOD, db_restarts=1
    ) as cluster:
        db = cluster.get_db_client()
        db.mspass.wf.insert_one({"i": 1})
        os.kill(_server_pid(cluster), signal.SIGKILL)
        _noticed(cluster, 1)
        assert cluster.get_db_client().mspass.wf.count_documents({}) == 1  # restart 1 of 1
        os.kill(_server_pid(cluster), signal.SIGKILL)
        deadline = time.monotonic() + 30
        error = None
        while error is None and time.monotonic() < deadline:
            try:
                cluster.get_db_client()
                time.sleep(0.2)
            except JobFailedError as exc:
                error = exc
        assert error is not None, "a database lost for good was not reported"
        assert "brought back 1 time(s) already, the most db_restarts=1 allows" in str(error)
        assert "lost" in str(cluster)
        cluster.restart_database()
        assert cluster.get_db_client().mspass.wf.count_documents({}) == 1
        assert "lost" not in str(cluster)


def test_a_database_that_cannot_come_back_says_why_and_restart_database_retries(tmp_path):
    """The restarted server finds its port taken: the error says so, and that the cluster still runs."""
    import socket

    with MsPASSCluster(
        backend="local", nodes=1, work_dir=str(tmp_path), db_command=NX_MONGOD, db_port=27517
    ) as cluster:
        cluster.get_db_client().mspass.wf.insert_one({"i": 1})
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        os.kill(_server_pid(cluster), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                squatter.bind(("127.0.0.1", 27517))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed server's port stayed taken"
                time.sleep(0.01)
        squatter.listen()
        try:
            _noticed(cluster, 1)
            with pytest.raises(JobFailedError) as info:
                cluster.get_db_client()
            text = str(info.value)
            assert "ended before the database came back" in text and "Another program already listens on" in text
            assert "The cluster and its workers still run" in text and "cluster.restart_database()" in text
        finally:
            squatter.close()
        cluster.restart_database()
        assert cluster.get_db_client().mspass.wf.count_documents({}) == 1


# ---------------------------------------------------------------- Slurm
@pytest.mark.slurm
def test_a_cancelled_or_killed_database_job_comes_back_and_nothing_acknowledged_is_lost(slurm_testbed, shared_dir):
    """scancel of the db job, then SIGKILL of its server mid-write: each time the same data come back."""
    payload = os.urandom(1_000_000)
    with MsPASSCluster(
        nodes=1, work_dir=str(shared_dir), db_command=NX_MONGOD, walltime="10", job_script_prologue=ON_PYTHONPATH
    ) as cluster:
        client = cluster.get_client()
        db = cluster.get_db_client()
        file_id = _store(db, 200, payload)
        _, worker_pid = client.submit(_count_on_a_worker, pure=False).result()

        first = cluster.db_job
        subprocess.run(["scancel", first.job_id], check=True)
        _noticed(cluster, 1)
        again = cluster.get_db_client()
        assert cluster.db_job is not first and queued([first.job_id]) == []
        _assert_everything_there(again, 200, file_id, payload)
        count, pid = client.submit(_count_on_a_worker, pure=False).result()
        assert (count, pid) == (200, worker_pid), "the worker's task does not reach the database that came back"

        writer = _Writer(cluster.get_db_client())
        writer.start()
        while len(writer.acknowledged) < 50:
            time.sleep(0.05)
        os.kill(_server_pid(cluster), signal.SIGKILL)  # mid-write
        writer.join(60)
        assert writer.error is not None and not writer.is_alive()
        _noticed(cluster, 2)
        again = cluster.get_db_client()
        assert cluster.database.restarts == 2
        _assert_everything_there(again, 200, file_id, payload, writer.acknowledged)
        count, pid = client.submit(_count_on_a_worker, pure=False).result()
        assert count == again.mspass.wf.count_documents({}) and pid == worker_pid
    assert_nothing_left(cluster)


@pytest.mark.slurm
def test_a_database_back_on_another_node_is_found_by_workers_and_old_clients_say_what_to_do(slurm_testbed, shared_dir):
    """Its node drained (as after a node failure): the database comes back elsewhere, everything is re-pointed."""
    from conftest import require_mspasspy

    from mspass_cluster import DatabaseMovedError

    require_mspasspy()
    payload = os.urandom(100_000)
    with MsPASSCluster(
        nodes=1, work_dir=str(shared_dir), db_command=NX_MONGOD, walltime="10", job_script_prologue=ON_PYTHONPATH
    ) as cluster:
        client = cluster.get_client()  # registers MsPASS's worker plugin
        db = cluster.get_db_client()
        file_id = _store(db, 40, payload)
        assert client.submit(_count_through_mspass_plugin, pure=False).result() == 40
        workers = client.run(os.getpid)
        node = cluster.db_job.node
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=mspass test"], check=True)
        try:
            subprocess.run(["scancel", cluster.db_job.job_id], check=True)
            _noticed(cluster, 1)
            again = cluster.get_db_client()
        finally:
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=True)
        assert cluster.db_job.node != node
        assert again is not db and not os.environ["MSPASS_DB_ADDRESS"].startswith(f"mongodb://{node}:")
        assert os.environ["MSPASS_DB_ADDRESS"].startswith(f"mongodb://{cluster.db_job.node}:")
        with pytest.raises(DatabaseMovedError, match=r"Call cluster.get_db_client\(\) again"):
            db.mspass.wf.count_documents({})
        _assert_everything_there(again, 40, file_id, payload)
        assert client.submit(_count_on_a_worker, pure=False).result()[0] == 40
        assert client.submit(_count_through_mspass_plugin, pure=False).result() == 40
        assert client.run(os.getpid) == workers, "the workers were restarted"
    assert_nothing_left(cluster)


@pytest.mark.slurm
def test_the_database_is_relayed_before_its_walltime_to_a_new_job_on_the_same_data(slurm_testbed, shared_dir, caplog):
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    payload = os.urandom(200_000)
    with MsPASSCluster(
        nodes=1, work_dir=str(shared_dir), db_command=NX_MONGOD, walltime="10", poll_interval=1
    ) as cluster:
        db = cluster.get_db_client()
        file_id = _store(db, 30, payload)
        first = cluster.db_job
        # As an administrator (or `scontrol update` by the user) shortening the limit: one minute left.
        subprocess.run(["scontrol", "update", f"JobId={first.job_id}", "TimeLimit=1"], check=True)
        deadline = time.monotonic() + 50
        while cluster.db_job is first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.db_job is not first, "no relay within 50 s of a one-minute limit"
        again = cluster.get_db_client()
        _assert_everything_there(again, 30, file_id, payload)
        assert db.mspass.wf.count_documents({}) == 30  # the old client follows: same node, same port
        assert cluster.database.restarts == 0  # a relay is planned, not a restart
        log = Path(first.log_path).read_text()
        assert "db exited with status 0" in log, "the relayed job's server did not stop cleanly"
        assert first.state.value == "COMPLETED"
    relayed = [r.getMessage() for r in caplog.records if "relaying it to job" in r.getMessage()]
    assert len(relayed) == 1 and f"database job {first.job_id} reaches its walltime" in relayed[0]
    assert_nothing_left(cluster)


@pytest.mark.slurm
def test_a_database_stopped_at_close_is_not_brought_back(slurm_testbed, shared_dir, caplog):
    """Closing stops the database on purpose: no restart, no warning, nothing left."""
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    with MsPASSCluster(nodes=1, work_dir=str(shared_dir), db_command=FAKE_MONGOD, walltime="10") as cluster:
        cluster.get_db_client()
    assert not [r for r in caplog.records if "Bringing the database back" in r.getMessage()]
    assert len([j for j in cluster.job_ids.values() if j[0] == "db"]) == 1
    assert_nothing_left(cluster)
