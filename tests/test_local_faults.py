"""The desktop backend under a new user's mistakes and faults: closed clusters, a killed notebook, busy resources.

Each test once showed a defect (issue 9): a raw ``IOLoop is closed`` after
``close()``, ``adapt(5, 2)`` accepted, SIGTERM handled like SIGKILL, a second
notebook in the same folder failing without saying why, thirty lines of log
for one start. The database is the embedded nx-27017 stand-in or the fake
mongod (no mongod exists here).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import FAKE_MONGOD, NX_MONGOD, cluster_processes

from mspass_cluster import ClusterClosedError, ConfigError, JobFailedError, MsPASSCluster


def _wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.2)
    return predicate()


def test_every_call_on_a_closed_cluster_says_it_is_closed(tmp_path):
    cluster = MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path), db_command=FAKE_MONGOD)
    cluster.close()
    calls = {
        "scale(2)": lambda: cluster.scale(2),
        "adapt()": lambda: cluster.adapt(1, 2),
        "wait_for_workers()": cluster.wait_for_workers,
        "get_client()": cluster.get_client,
        "get_db_client()": cluster.get_db_client,
        "dashboard_link": lambda: cluster.dashboard_link,
    }
    for call, do in calls.items():
        with pytest.raises(
            ClusterClosedError, match=rf"^{__import__('re').escape(call)}: cluster {cluster.name} is closed"
        ):
            do()
    assert ": closed" in cluster._repr_html_() and ": closed" in str(cluster)
    cluster.close()  # still idempotent


def test_adapt_bounds_are_checked_and_scale_turns_adapt_off(tmp_path, caplog):
    with MsPASSCluster(
        backend="local", nodes=1, cores=1, memory="1GiB", work_dir=str(tmp_path), db_command=FAKE_MONGOD
    ) as cluster:
        with pytest.raises(ConfigError, match=r"adapt\(minimum=5, maximum=2\): the minimum is above the maximum"):
            cluster.adapt(minimum=5, maximum=2)
        with pytest.raises(ConfigError, match=r"adapt\(minimum=-1\)"):
            cluster.adapt(minimum=-1, maximum=2)
        cluster.adapt(minimum=2, maximum=2, interval="100ms")
        cluster.wait_for_workers(2, timeout=60)
        cluster.scale(1)
        assert "scale(1) turns off adapt()" in caplog.text
        time.sleep(1.5)  # fifteen adapt intervals: an adapt still running would have scaled back to 2
        assert len(cluster.worker_spec) == 1


def _start_notebook(tmp_path, orphan_timeout: int = 300, python: str = sys.executable):
    """A notebook-like process with a local cluster; returns it, the cluster id and its job (process) ids."""
    script = (
        "import time\nfrom mspass_cluster import MsPASSCluster\n"
        f"c = MsPASSCluster(backend='local', nodes=2, work_dir={str(tmp_path)!r}, db_command={FAKE_MONGOD!r}, "
        f"orphan_timeout={orphan_timeout}, python={python!r})\n"
        "print(c.cluster_id, ','.join(c.job_ids), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cluster_id, ids = proc.stdout.readline().split()
    return proc, cluster_id, ids.split(",")


def _end_what_is_left(cluster_id: str) -> None:
    """A failed test must not leave its cluster's processes behind for the next one."""
    import os

    for pid in cluster_processes(cluster_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_to_the_notebook_stops_the_database_cleanly_at_once(tmp_path):
    proc, cluster_id, _ = _start_notebook(tmp_path)
    try:
        assert cluster_processes(cluster_id)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM  # it still dies of SIGTERM, as the sender expects
    finally:
        if proc.poll() is None:
            proc.kill()
    # Not after orphan_timeout (300 s): within seconds, with the database's clean shutdown.
    try:
        assert _wait_until(lambda: cluster_processes(cluster_id) == [], 30), "jobs of a terminated notebook still run"
    finally:
        _end_what_is_left(cluster_id)
    db_log = next((tmp_path / "logs").glob(f"mspass-{cluster_id}-db-*.out")).read_text()
    assert "db exited with status 0" in db_log and "no heartbeat" not in db_log
    assert not list((tmp_path / "logs").glob("*.heartbeat"))
    assert "SIGTERM: asked" in proc.stderr.read()


def test_workers_that_never_give_up_on_the_scheduler_leave_when_the_notebook_is_gone(tmp_path):
    # Stand-in for a nanny restart-looping a crashing worker, which never reaches death_timeout: a "python"
    # that runs the real worker and then stays, as such a job does.
    stuck = tmp_path / "stuck-python"
    stuck.write_text(f'#!/bin/sh\n{sys.executable} "$@"\nexec sleep 100000\n')
    stuck.chmod(0o755)
    proc, cluster_id, _ = _start_notebook(tmp_path, orphan_timeout=6, python=str(stuck))
    proc.kill()
    proc.wait()
    try:
        assert _wait_until(lambda: cluster_processes(cluster_id) == [], 60), "workers outlived a SIGKILLed notebook"
    finally:
        _end_what_is_left(cluster_id)
    worker_log = next((tmp_path / "logs").glob(f"mspass-{cluster_id}-worker-0-*.out")).read_text()
    assert "no heartbeat from the notebook" in worker_log
    assert not list((tmp_path / "logs").glob("*.heartbeat")), "the stale heartbeat file was left behind"


def test_a_second_notebook_in_the_same_folder_is_told_whose_database_it_is(tmp_path):
    with MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path), db_command=FAKE_MONGOD) as first:
        scripts_before = set((tmp_path / "logs").glob("*.sh"))
        with pytest.raises(ConfigError) as info:
            MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path), db_command=FAKE_MONGOD)
        text = str(info.value)
        assert f"is in use by cluster {first.name}" in text and f"database process {first.db_job.job_id}" in text
        assert f"mspass-cluster down {first.cluster_id}" in text and "work_dir=" in text
        assert set((tmp_path / "logs").glob("*.sh")) == scripts_before  # nothing was started
    # Once the first is closed the folder is free again.
    with MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path), db_command=FAKE_MONGOD):
        pass


def test_a_server_already_holding_the_data_directory_is_named(tmp_path):
    data = tmp_path / "db" / "data"
    data.mkdir(parents=True)
    squatter = subprocess.Popen(
        [*FAKE_MONGOD, "--port", "27398", "--dbpath", str(data), "--bind_ip", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_until(lambda: (data / "mongod.lock").exists() and (data / "mongod.lock").stat().st_size, 20)
        with pytest.raises(JobFailedError, match="Another database server holds db_dir") as info:
            MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path), db_command=FAKE_MONGOD, db_port=27399)
        assert "DBPathInUse" in str(info.value)
    finally:
        squatter.terminate()
        squatter.wait(timeout=30)


def test_a_taken_port_is_explained_whatever_the_servers_spelling(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(JobFailedError, match=rf"Another program already listens on db_port={port}"):
            MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path), db_command=NX_MONGOD, db_port=port)


def test_a_cancelled_job_quotes_no_unrelated_error_lines(tmp_path):
    from mspass_cluster.jobs import TrackedJob
    from mspass_cluster.slurm import JobState, JobStatus

    log = tmp_path / "job.out"
    log.write_text("UserWarning: this will be an error in a future version\nready\nmore output\n" * 3 + "x\n" * 30)
    job = TrackedJob("db", "mspass-ab-db", "5", str(log), "s.sh", status=JobStatus("5", JobState.FAILED, "", "n1"))
    assert "Error in the log" not in str(job.failure("ended", "fix"))  # a warning is not the error
    log.write_text("ERROR: cannot open data file\n" + "x\n" * 30)
    assert "Error in the log: ERROR: cannot open data file" in str(job.failure("ended", "fix"))
    job.status = JobStatus("5", JobState.CANCELLED, "", "n1")
    assert "Error in the log" not in str(job.failure("ended", "fix"))  # stopped from outside


def _start_and_close_output(tmp_path, verbose: bool) -> str:
    script = (
        "from mspass_cluster import MsPASSCluster\n"
        f"with MsPASSCluster(backend='local', nodes=2, work_dir={str(tmp_path)!r}, db_command={FAKE_MONGOD!r}, "
        f"dashboard_address=':0', verbose={verbose}) as c:\n    c.get_client().submit(sum, [1, 2]).result()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_a_start_and_close_says_a_few_lines_and_the_rest_on_request(tmp_path):
    lines = _start_and_close_output(tmp_path / "quiet", verbose=False).strip().splitlines()
    assert 2 <= len(lines) <= 6, lines
    assert all(" mspass_cluster " in line for line in lines), lines  # one format, ours
    assert any(" ready: " in line for line in lines) and any("closed" in line for line in lines)
    text = "\n".join(lines)
    assert "interface=" not in text and " job " not in text  # the local backend runs processes
    verbose = _start_and_close_output(tmp_path / "verbose", verbose=True)
    assert "Submitted db process" in verbose and "distributed.scheduler - INFO" in verbose


def test_sigterm_while_the_cluster_starts_leaves_nothing_running(tmp_path):
    # Stand-in for workers stuck in a queue or in start-up: a "python" that never runs a worker.
    never = tmp_path / "never-python"
    never.write_text("#!/bin/sh\nexec sleep 100000\n")
    never.chmod(0o755)
    script = (
        "from mspass_cluster import MsPASSCluster\n"
        f"MsPASSCluster(backend='local', nodes=2, work_dir={str(tmp_path)!r}, db_command={FAKE_MONGOD!r}, "
        f"python={str(never)!r}, orphan_timeout=300)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert _wait_until(lambda: len(list((tmp_path / "logs").glob("*.out"))) == 3, 60)
        cluster_id = next((tmp_path / "logs").glob("*-db-*.out")).name.split("-")[1]
        assert _wait_until(lambda: cluster_processes(cluster_id), 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert _wait_until(lambda: cluster_processes(cluster_id) == [], 30), (
            "a cluster terminated while starting left processes"
        )
    finally:
        _end_what_is_left(cluster_id)
    assert not (tmp_path / "db" / "mspass-cluster.json").exists()


def test_more_desktop_nodes_than_the_memory_can_hold_is_refused_before_starting(tmp_path):
    from distributed.system import MEMORY_LIMIT

    nodes = MEMORY_LIMIT // (128 * 2**20)
    with pytest.raises(ConfigError, match=rf"nodes={nodes} on this machine .* below the 256 MiB one needs"):
        MsPASSCluster(backend="local", nodes=nodes, work_dir=str(tmp_path))
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())
