"""MsPASSCluster end to end on the real Slurm test bed (ci/testbed up).

The database server is a stand-in (no mongod exists on this machine): the
nx-27017 adapter where data must really be stored, the fake mongod where the
process handling is checked. Every test leaves nothing in squeue and no
process of its cluster behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys

import pymongo
import pytest
from conftest import (
    BIN,
    FAKE_MONGOD,
    NX_MONGOD,
    assert_nothing_left,
    cluster_processes,
    queued,
    queued_names,
    slurm_output,
)

from mspass_cluster import (
    CommandRunner,
    JobFailedError,
    MsPASSCluster,
    SlurmUnavailableError,
    StartupTimeoutError,
    SubmitError,
)

pytestmark = pytest.mark.slurm

# Workers import this module's task functions, as users' jobs import their own modules.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_ON_PYTHONPATH = [f"export PYTHONPATH={TESTS_DIR}"]
PUBLISHED = ("MSPASS_SCHEDULER_ADDRESS", "DASK_SCHEDULER_PORT", "MSPASS_DB_ADDRESS", "MONGODB_PORT")


def store_documents(db_client, worker_index, count):
    """Runs on a worker: write documents through the pickled DB client and through MSPASS_* variables."""
    host = socket.gethostname()
    db_client.mspass_test.wf.insert_many([{"worker": worker_index, "i": i, "host": host} for i in range(count)])
    address, port = os.environ["MSPASS_DB_ADDRESS"], os.environ["MONGODB_PORT"]
    # With security the address is the whole connection string (and MONGODB_PORT empty), as Client() reads them.
    by_env = pymongo.MongoClient(address if "://" in address else f"mongodb://{address}:{port}/")
    by_env.mspass_test.env.insert_one({"worker": worker_index, "host": host})
    by_env.close()
    return host


def environ_of(pid: int) -> dict:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def stand_in_image(directory) -> str:
    """A .sif for the Apptainer/Singularity stand-in, with the image ENV the MsPASS Dockerfile sets.

    The stand-in has no file system of its own, so the image's ``MSPASS_HOME``
    (``/mspass`` in the real image, where mspasspy finds its schema files) is
    a host directory laid out like it, with this Python's mspasspy data.
    """
    image = directory / "mspass_latest.sif"
    image.write_text("stand-in image (tests/bin/container_standin.py)\n")
    mspass_home = stand_in_mspass_home(directory)
    venv_bin = os.path.dirname(sys.executable)
    (directory / "mspass_latest.sif.env").write_text(
        f"PATH={venv_bin}:/usr/local/bin:/usr/bin:/bin\n"  # the image's python and dask
        f"PYTHONPATH={TESTS_DIR}\n"  # the image's Python finds this module's tasks
        f"MONGODB_PORT=27017\nDASK_SCHEDULER_PORT=8786\nMSPASS_HOME={mspass_home}\n"
    )
    return str(image)


def stand_in_mspass_home(directory) -> str:
    home = directory / "mspass_home"
    home.mkdir(exist_ok=True)
    try:
        import mspasspy
    except ImportError:
        return str(home)
    if not (home / "data").exists():
        (home / "data").symlink_to(os.path.join(os.path.dirname(mspasspy.__file__), "data"))
    return str(home)


@pytest.mark.parametrize("runtime", ["none", "apptainer", "singularity"])
def test_three_worker_nodes_store_data_scale_and_leave_nothing(slurm_testbed, shared_dir, runtime):
    before = {k: os.environ.get(k) for k in PUBLISHED}
    options = dict(nodes=3, work_dir=str(shared_dir), db_command=NX_MONGOD, walltime="15")
    if runtime == "none":
        options["job_script_prologue"] = TESTS_ON_PYTHONPATH
    else:
        # The image sets MONGODB_PORT=27017; the cluster's value must win inside the container.
        options.update(
            container=stand_in_image(shared_dir),
            container_runtime=runtime,
            db_port=27311,
            job_script_prologue=[f"export PATH={BIN}:$PATH", "export HOST_ONLY=leak"],
        )
    with MsPASSCluster(**options) as cluster:
        client = cluster.get_client()
        assert client is cluster.get_client()
        hosts = set(client.run(socket.gethostname).values())
        assert len(hosts) == 3, f"3 workers should be on 3 nodes, got {hosts}"
        assert cluster.db_job.node in {"n1", "n2", "n3", "n4"}

        # MsPASS code finds both services from the environment, as mspasspy.client.Client does.
        assert os.environ["MSPASS_DB_ADDRESS"] == cluster.db_address
        assert cluster.database.address == f"mongodb://{cluster.db_job.node}:{cluster.options.db_port}/"
        from distributed import Client

        with Client(f"{os.environ['MSPASS_SCHEDULER_ADDRESS']}:{os.environ['DASK_SCHEDULER_PORT']}") as by_env:
            assert len(by_env.scheduler_info()["workers"]) == 3

        db = cluster.get_db_client()
        futures = [client.submit(store_documents, db, i, 50, pure=False) for i in range(6)]
        task_hosts = set(client.gather(futures))
        del futures  # held results of side-effect tasks would be recomputed when their workers retire
        assert task_hosts <= hosts
        docs = list(db.mspass_test.wf.find({}, {"_id": 0, "worker": 1, "i": 1}))
        assert sorted((d["worker"], d["i"]) for d in docs) == [(w, i) for w in range(6) for i in range(50)]
        assert db.mspass_test.env.count_documents({}) == 6

        if runtime != "none":
            inside = client.run(lambda: {k: os.environ.get(k) for k in ("MONGODB_PORT", "HOST_ONLY", "MSPASS_HOME")})
            image_home = stand_in_mspass_home(shared_dir)
            assert all(v == {"MONGODB_PORT": "", "HOST_ONLY": None, "MSPASS_HOME": image_home} for v in inside.values())
            servers = [
                environ_of(pid)
                for pid in cluster_processes(cluster.cluster_id)
                if environ_of(pid).get("MSPASS_ROLE") == "db" and "MSPASS_CLUSTER_ID" in environ_of(pid)
            ]
            in_image = [e for e in servers if e.get(f"{runtime.upper()}_CONTAINER") == options["container"]]
            assert in_image and all("HOST_ONLY" not in e for e in in_image)

        cluster.scale(1)
        cluster.wait_for_workers(1)
        assert len(client.scheduler_info()["workers"]) == 1
        cluster.scale(3)
        cluster.wait_for_workers()
        assert len(set(client.run(socket.gethostname).values())) == 3
        assert db.mspass_test.wf.count_documents({}) == 300
    assert_nothing_left(cluster)
    assert {k: os.environ.get(k) for k in PUBLISHED} == before


def test_database_gets_a_clean_shutdown(slurm_testbed, shared_dir):
    with MsPASSCluster(nodes=1, work_dir=str(shared_dir), db_command=FAKE_MONGOD, walltime="10") as cluster:
        data = os.path.join(cluster.options.db_dir, "data")
        assert os.path.exists(os.path.join(data, "mongod.lock"))
    marker = json.loads(open(os.path.join(data, "fake_mongod.clean_shutdown")).read())
    assert marker["signal"] == "SIGTERM"
    # Like mongod, the fake empties its lock file on a clean shutdown and leaves its PID there otherwise.
    assert os.path.getsize(os.path.join(data, "mongod.lock")) == 0, "the server did not shut down cleanly"
    assert "db exited with status 0" in open(cluster.db_job.log_path).read()
    assert_nothing_left(cluster)


def test_broken_worker_command_fails_fast_with_slurms_words(slurm_testbed, shared_dir):
    with pytest.raises(JobFailedError) as info:
        MsPASSCluster(
            nodes=2,
            work_dir=str(shared_dir),
            db_command=FAKE_MONGOD,
            python="/nonexistent/python",
            walltime="10",
            startup_timeout=600,
            security=False,  # the database's first-user script would run with that Python and fail first
        )
    error = info.value
    assert error.role == "worker" and error.state == "FAILED" and error.exit_code.startswith("127")
    assert error.log_path.startswith(str(shared_dir / "logs"))
    assert "/nonexistent/python" in error.log_tail and "No such file or directory" in error.log_tail
    for word in (error.job_id, "FAILED", "127", error.log_path, "job_script('worker')"):
        assert word in str(error)
    assert queued([error.job_id]) == []
    assert_no_job_named(shared_dir)


def test_broken_database_command_fails_fast_with_its_log(slurm_testbed, shared_dir):
    with pytest.raises(JobFailedError) as info:
        MsPASSCluster(
            nodes=1,
            work_dir=str(shared_dir),
            db_command=[*FAKE_MONGOD, "--no-such-option"],
            walltime="10",
            startup_timeout=600,
        )
    error = info.value
    assert error.role == "db" and error.state == "FAILED" and error.exit_code.startswith("2")
    assert "unrecognised option '--no-such-option'" in error.log_tail
    assert "job_script('db')" in str(error)
    assert_no_job_named(shared_dir)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"partition": "no-such-partition"}, "invalid partition"),
        ({"memory": "100GB"}, "Memory specification can not be satisfied"),
    ],
)
def test_sbatch_rejection_raises_at_once_with_sbatchs_message(slurm_testbed, shared_dir, options, words):
    with pytest.raises(SubmitError) as info:
        MsPASSCluster(nodes=2, work_dir=str(shared_dir), db_command=FAKE_MONGOD, walltime="10", **options)
    assert words in str(info.value) and "sbatch" in str(info.value)
    assert_no_job_named(shared_dir)


def test_pending_jobs_are_reported_with_slurms_reason_and_cancelled_at_the_deadline(slurm_testbed, shared_dir, caplog):
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    with pytest.raises(StartupTimeoutError) as info:
        MsPASSCluster(
            nodes=1,
            work_dir=str(shared_dir),
            db_command=FAKE_MONGOD,
            walltime="10",
            job_extra_directives=["--hold"],
            startup_timeout=4,
        )
    assert "JobHeldUser" in str(info.value) and "startup_timeout=4" in str(info.value)
    assert any("JobHeldUser" in r.getMessage() for r in caplog.records if r.name == "mspass_cluster")
    assert_no_job_named(shared_dir)


def test_two_clusters_never_touch_each_others_jobs(slurm_testbed, shared_dir):
    first = MsPASSCluster(nodes=1, work_dir=str(shared_dir / "a"), db_command=FAKE_MONGOD, walltime="10")
    try:
        with MsPASSCluster(nodes=1, work_dir=str(shared_dir / "b"), db_command=FAKE_MONGOD, walltime="10") as second:
            assert first.cluster_id != second.cluster_id
            assert not set(first.job_ids) & set(second.job_ids)
        assert_nothing_left(second)
        assert sorted(queued(list(first.job_ids))) == sorted(first.job_ids)
        first.wait_for_workers(1)
    finally:
        first.close()
    first.close()  # idempotent
    assert_nothing_left(first)


def test_interpreter_exit_without_close_cancels_every_job(slurm_testbed, shared_dir):
    script = (
        "import sys\n"
        "from mspass_cluster import MsPASSCluster\n"
        f"c = MsPASSCluster(nodes=1, work_dir={str(shared_dir)!r}, db_command={FAKE_MONGOD!r}, walltime='10')\n"
        "print(','.join(c.job_ids), c.cluster_id, flush=True)\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    ids, cluster_id = out.stdout.split()
    assert queued(ids.split(",")) == []
    assert cluster_processes(cluster_id) == []


def assert_no_job_named(shared_dir):
    """No job whose script lives in this test's log directory is still queued."""
    logs = shared_dir / "logs"
    names = [p.stem for p in logs.glob("*.sh")] if logs.exists() else []
    assert names, "no job script was written"
    still = set(names) & set(queued_names())
    assert not still, f"still queued: {still}"


def test_worker_job_script_runs_by_hand_and_joins_the_cluster(slurm_testbed, shared_dir):
    import signal
    import subprocess
    import time

    with MsPASSCluster(nodes=1, work_dir=str(shared_dir), db_command=FAKE_MONGOD, walltime="10") as cluster:
        path = shared_dir / "by-hand.sh"
        path.write_text(cluster.job_script("worker"))
        proc = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            cluster.wait_for_workers(2, timeout=60)
            names = {w["name"] for w in cluster.get_client().scheduler_info()["workers"].values()}
            assert len(names) == 2
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        assert "worker exited with status 0" in out, out[-2000:]
        deadline = time.monotonic() + 30
        while len(cluster.get_client().scheduler_info()["workers"]) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(cluster.get_client().scheduler_info()["workers"]) == 1
    assert_nothing_left(cluster)


def test_previewed_db_script_runs_under_sbatch_as_is(slurm_testbed, shared_dir):
    import subprocess
    import time

    from mspass_cluster.db import ping

    # With security the preview names credentials a cluster makes when it starts: only an open one runs as is.
    script = MsPASSCluster.job_script(
        "db", work_dir=str(shared_dir), db_command=FAKE_MONGOD, walltime="5", security=False
    )
    path = shared_dir / "db.sh"
    path.write_text(script)
    (shared_dir / "logs").mkdir()  # the script says so: sbatch needs the --output directory
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        deadline, node, answer = time.monotonic() + 60, "", "not tried"
        while time.monotonic() < deadline:
            node = slurm_output("squeue", "--noheader", "--format=%N", f"--jobs={job_id}").strip()
            if node:
                answer = ping(f"mongodb://{node}:27017/", 1.0)
                if answer is None:
                    break
            time.sleep(0.2)
        assert answer is None, f"the database never answered: {answer}"
    finally:
        subprocess.run(["scancel", "--signal=TERM", "--full", job_id], check=False)
        deadline = time.monotonic() + 60
        while queued([job_id]) and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run(["scancel", job_id], check=False)
    assert queued([job_id]) == []
    logs = list((shared_dir / "logs").glob(f"*-{job_id}.out"))
    assert logs and "db exited with status 0" in logs[0].read_text()


def test_adapt_and_scale_count_worker_nodes_not_processes(slurm_testbed, shared_dir):
    with MsPASSCluster(
        nodes=1, processes=2, cores=2, memory="1GiB", work_dir=str(shared_dir), db_command=FAKE_MONGOD, walltime="10"
    ) as cluster:
        assert len(cluster.scheduler_info["workers"]) == 2  # one node, two processes
        cluster.scale(cores=4)  # two nodes of 2 cores
        cluster.wait_for_workers()
        assert len(cluster.worker_spec) == 2 and len(cluster.get_client().scheduler_info()["workers"]) == 4
        cluster.scale(memory="3GiB")  # three nodes of 1 GiB
        cluster.wait_for_workers()
        assert len(cluster.worker_spec) == 3
        cluster.scale(1)
        cluster.adapt(minimum=2, maximum=3, interval="200ms")
        cluster.wait_for_workers(4, timeout=120)
        hosts = set(cluster.get_client().run(socket.gethostname).values())
        assert len(hosts) == 2 and len(cluster.worker_spec) == 2
    assert_nothing_left(cluster)


def test_container_runtime_missing_on_the_node_fails_fast_with_the_fix(slurm_testbed, shared_dir):
    with pytest.raises(JobFailedError) as info:
        MsPASSCluster(
            nodes=1,
            work_dir=str(shared_dir),
            db_command=FAKE_MONGOD,
            walltime="10",
            container=stand_in_image(shared_dir),
            job_script_prologue=["export PATH=/usr/bin:/bin"],
        )
    assert info.value.exit_code.startswith("127")
    assert "apptainer or singularity is not on PATH" in info.value.log_tail and "module load" in info.value.log_tail
    assert_no_job_named(shared_dir)


def test_container_that_fails_to_start_surfaces_the_runtimes_message(slurm_testbed, shared_dir):
    with pytest.raises(JobFailedError) as info:
        MsPASSCluster(
            nodes=1,
            work_dir=str(shared_dir),
            db_command=FAKE_MONGOD,
            walltime="10",
            container=stand_in_image(shared_dir),
            container_runtime="apptainer",
            container_args=["--no-such-flag"],
            job_script_prologue=[f"export PATH={BIN}:$PATH"],
        )
    assert info.value.exit_code.startswith("1:")  # apptainer's exit status for a command-line error
    assert "unknown flag: --no-such-flag" in str(info.value)  # above the usage text that fills the log's tail
    assert_no_job_named(shared_dir)


def test_a_killed_notebook_leaves_no_job_running(slurm_testbed, shared_dir):
    """SIGKILL of the notebook's process: workers lose the scheduler, the database its heartbeat; both end."""
    import signal
    import subprocess
    import time

    script = (
        "import os, signal\n"
        "from mspass_cluster import MsPASSCluster\n"
        f"c = MsPASSCluster(nodes=2, work_dir={str(shared_dir)!r}, db_command={FAKE_MONGOD!r}, walltime='10',\n"
        "                   death_timeout=10, orphan_timeout=12)\n"
        "print(','.join(c.job_ids), c.cluster_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == -signal.SIGKILL, out.stderr
    ids, cluster_id = out.stdout.split()
    ids = ids.split(",")
    deadline = time.monotonic() + 180
    while queued(ids) and time.monotonic() < deadline:
        time.sleep(1)
    assert queued(ids) == [], "jobs of a dead notebook are still in the queue"
    assert cluster_processes(cluster_id) == []
    db_log = next((shared_dir / "logs").glob(f"mspass-{cluster_id}-db-*.out")).read_text()
    assert "no heartbeat from the notebook" in db_log and "db exited with status 0" in db_log


def test_sigterm_to_the_notebook_stops_every_job_cleanly_at_once(slurm_testbed, shared_dir):
    """SIGTERM (``kill``, a Jupyter job's walltime) is not SIGKILL: the database stops now, not at orphan_timeout."""
    import signal
    import subprocess
    import time

    script = (
        "import time\nfrom mspass_cluster import MsPASSCluster\n"
        f"c = MsPASSCluster(nodes=2, work_dir={str(shared_dir)!r}, db_command={FAKE_MONGOD!r}, walltime='10',\n"
        "                   orphan_timeout=300)\n"
        "print(','.join(c.job_ids), c.cluster_id, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ids, cluster_id = proc.stdout.readline().split()
        ids = ids.split(",")
        assert len(queued(ids)) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 60  # far less than orphan_timeout
    while queued(ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert queued(ids) == [], "jobs of a terminated notebook are still in the queue"
    assert cluster_processes(cluster_id) == []
    db_log = next((shared_dir / "logs").glob(f"mspass-{cluster_id}-db-*.out")).read_text()
    assert "db exited with status 0" in db_log and "no heartbeat" not in db_log


def test_backend_auto_in_a_one_node_interactive_job_submits_new_jobs(slurm_testbed, shared_dir):
    """Jupyter through Open OnDemand or ``srun --pty`` is a one-node Slurm job: it wants nodes of its own."""
    import subprocess

    script = (
        "from mspass_cluster import MsPASSCluster\n"
        f"with MsPASSCluster(nodes=2, work_dir={str(shared_dir)!r}, db_command={FAKE_MONGOD!r}, walltime='10') as c:\n"
        "    print('BACKEND', c.backend, len(c.scheduler.workers), 'workers', flush=True)\n"
        "    ids = list(c.job_ids)\n"
        "print('JOBS', ','.join(ids))\n"
    )
    out = subprocess.run(
        ["srun", "--nodes=1", "--ntasks=1", "--time=5", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=shared_dir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BACKEND slurm 2 workers" in out.stdout
    assert "backend='auto' chose 'slurm'" in out.stderr and "backend='allocation' would" in out.stderr
    ids = out.stdout.split("JOBS ")[1].split()[0].split(",")
    assert len(ids) == 3 and queued(ids) == []


def test_a_worker_job_lost_after_it_ran_is_replaced(slurm_testbed, shared_dir, caplog):
    import subprocess
    import time

    caplog.set_level(logging.WARNING, logger="mspass_cluster")
    with MsPASSCluster(
        nodes=2, work_dir=str(shared_dir), db_command=FAKE_MONGOD, walltime="10", poll_interval=1
    ) as cluster:
        lost = next(j for j, (role, _, _) in cluster.job_ids.items() if role == "worker")
        subprocess.run(["scancel", lost], check=True)  # as if its node failed or its walltime ran out
        deadline = time.monotonic() + 120
        while len(cluster.job_ids) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(cluster.job_ids) == 4, "no replacement job was submitted"
        cluster.wait_for_workers(timeout=120)
        assert len(cluster.get_client().scheduler_info()["workers"]) == 2
        assert any("submitting a replacement" in r.getMessage() for r in caplog.records)
    assert_nothing_left(cluster)


def square(x):
    return x * x


def test_workers_leave_at_their_lifetime_and_are_replaced(slurm_testbed, shared_dir, caplog):
    import time

    caplog.set_level(logging.INFO, logger="mspass_cluster")
    with MsPASSCluster(
        nodes=2,
        work_dir=str(shared_dir),
        db_command=FAKE_MONGOD,
        worker_lifetime="12s",
        poll_interval=1,
        job_script_prologue=TESTS_ON_PYTHONPATH,
    ) as cluster:
        client = cluster.get_client()
        first_jobs = [j for j, (role, _, _) in cluster.job_ids.items() if role == "worker"]
        first_workers = set(client.scheduler_info()["workers"])
        held = client.map(square, range(40))  # results kept in the workers' memory
        assert client.gather(held) == [i * i for i in range(40)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = [cluster.job_ids[j][2] for j in first_jobs]
            newcomers = set(client.scheduler_info()["workers"]) - first_workers
            if all(s not in ("PENDING", "RUNNING", "COMPLETING") for s in states) and len(newcomers) >= 2:
                break
            time.sleep(0.5)
        # Left on their own, gracefully (exit 0), not killed at walltime; two new nodes took over.
        assert states == ["COMPLETED", "COMPLETED"], states
        assert len(newcomers) >= 2, f"replacement workers connected: {newcomers}"
        assert client.gather(held) == [i * i for i in range(40)]
        assert client.submit(square, 7).result(timeout=60) == 49
        replaced = [r for r in caplog.records if "submitting a replacement" in r.getMessage()]
        assert replaced and all(r.levelno == logging.INFO for r in replaced)
    assert_nothing_left(cluster)


# --- the Slurm controller going away: really stopped and restarted (slurmctld keeps its state) ---

CTLD_PIDFILE = "/run/slurmctld.pid"


def stop_controller():
    import signal
    import time

    pid = int(open(CTLD_PIDFILE).read())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)


def start_controller():
    import subprocess
    import time

    if subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout.count("UP"):
        return
    subprocess.run(["slurmctld"], cwd="/", check=True, timeout=60)
    deadline = time.monotonic() + 60
    while "UP" not in subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout:
        assert time.monotonic() < deadline, "slurmctld did not come back; run `ci/testbed up`"
        time.sleep(0.2)


class ControllerRestartAfterSubmission(CommandRunner):
    """A real CommandRunner that stops the real slurmctld once the cluster's jobs are queued and starts it again later."""

    def __init__(self, submissions: int, outage: float):
        super().__init__(60.0)
        self.submissions, self.outage, self.done, self.timer = submissions, outage, 0, None

    async def arun(self, argv, **kwargs):
        import threading

        result = await super().arun(argv, **kwargs)
        if os.path.basename(argv[0]) == "sbatch":
            self.done += 1
            if self.done == self.submissions:
                stop_controller()
                self.timer = threading.Timer(self.outage, start_controller)
                self.timer.start()
        return result


def test_startup_rides_out_a_controller_restart(slurm_testbed, shared_dir, caplog):
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    runner = ControllerRestartAfterSubmission(
        submissions=2, outage=25
    )  # the db job and the workers' array; longer than squeue retries
    try:
        with MsPASSCluster(nodes=2, work_dir=str(shared_dir), db_command=FAKE_MONGOD, command_runner=runner) as cluster:
            assert runner.timer is not None, "the controller was never stopped"
            assert len(cluster.get_client().scheduler_info()["workers"]) == 2
        messages = [r.getMessage() for r in caplog.records]
        assert any("Slurm did not answer" in m and "Unable to contact slurm controller" in m for m in messages)
        assert any("Slurm answers again" in m for m in messages)
        assert_nothing_left(cluster)
    finally:
        if runner.timer is not None:
            runner.timer.join()
        start_controller()


def test_controller_down_says_so_at_once_and_queues_nothing(slurm_testbed, shared_dir):
    import time

    stop_controller()
    try:
        started = time.monotonic()
        with pytest.raises(SlurmUnavailableError, match="controller is not answering.*scontrol ping"):
            MsPASSCluster(nodes=1, work_dir=str(shared_dir), db_command=FAKE_MONGOD)
        assert time.monotonic() - started < 60
        assert not list((shared_dir / "logs").glob("*.sh")), "a job script was written, so something was submitted"
    finally:
        start_controller()


def test_a_database_port_taken_on_its_node_says_which_and_what_to_do(slurm_testbed, shared_dir):
    # Two databases fit on one test-bed node (4000 MB) only with 1 GiB each.
    with MsPASSCluster(nodes=1, work_dir=str(shared_dir / "a"), db_command=FAKE_MONGOD, db_memory="1GiB") as first:
        node = first.db_job.node
        with pytest.raises(JobFailedError, match=rf"db_port=27017 on {node}.*db_port=27117") as info:
            MsPASSCluster(
                nodes=1,
                work_dir=str(shared_dir / "b"),
                db_command=FAKE_MONGOD,
                db_memory="1GiB",
                db_extra_directives=[f"--nodelist={node}"],
                startup_timeout=120,
            )
        assert info.value.role == "db" and "Address already in use" in str(info.value)
        assert first.get_db_client().admin.command("ping")["ok"] == 1  # the first cluster is untouched
    assert_nothing_left(first)


def test_the_database_walltime_is_announced_before_it_comes(slurm_testbed, shared_dir, caplog):
    """With db_restarts=0 nothing relays the database: the user is warned ahead (the relay: test_db_restart.py)."""
    import subprocess
    import time

    caplog.set_level(logging.INFO, logger="mspass_cluster")
    with MsPASSCluster(
        nodes=1, work_dir=str(shared_dir), db_command=FAKE_MONGOD, db_walltime="10", poll_interval=1, db_restarts=0
    ) as cluster:
        assert not [r for r in caplog.records if "reaches its walltime" in r.getMessage()]
        # As an administrator (or `scontrol update` by the user) shortening the limit: Slurm's view counts.
        subprocess.run(["scontrol", "update", f"JobId={cluster.db_job.job_id}", "TimeLimit=1"], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not [
            r for r in caplog.records if "reaches its walltime" in r.getMessage()
        ]:
            time.sleep(0.2)
        warned = [r for r in caplog.records if "reaches its walltime" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert f"database job {cluster.db_job.job_id} reaches its walltime in 0 min" in warned[0].getMessage()
        assert "db_walltime=10" in warned[0].getMessage() and str(shared_dir / "db") in warned[0].getMessage()
        time.sleep(2)
        assert len([r for r in caplog.records if "reaches its walltime" in r.getMessage()]) == 1  # once
    assert_nothing_left(cluster)


def slow_square(x):
    import time

    time.sleep(0.3)
    return x * x


def test_adapt_follows_a_real_load_in_whole_nodes(slurm_testbed, shared_dir):
    import time

    with MsPASSCluster(
        nodes=1,
        processes=2,
        cores=2,
        memory="1GiB",
        work_dir=str(shared_dir),
        db_command=FAKE_MONGOD,
        walltime="10",
        poll_interval=1,
        job_script_prologue=TESTS_ON_PYTHONPATH,
    ) as cluster:
        client = cluster.get_client()
        cluster.adapt(minimum=1, maximum=3, interval="250ms", wait_count=4, target_duration="2s")
        futures = client.map(slow_square, range(120))  # 36 s of work for one node: more nodes are wanted
        most_nodes = 0
        while not all(f.done() for f in futures):
            most_nodes = max(most_nodes, len({w.rsplit("-", 1)[0] for w in cluster.workers_service.connected()}))
            time.sleep(0.2)
        assert client.gather(futures) == [x * x for x in range(120)]
        assert most_nodes == 3, f"adapt reached {most_nodes} worker node(s), not 3"
        deadline = time.monotonic() + 60  # idle: back to the minimum, a node at a time
        while (len(cluster.worker_spec), len(cluster.workers_service.connected())) != (
            1,
            2,
        ) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(cluster.worker_spec) == 1 and len(cluster.workers_service.connected()) == 2
        # Every node is whole: both processes of each remaining job are connected, and the others' jobs ended.
        names = cluster.workers_service.connected()
        assert {n.rsplit("-", 1)[0] for n in names} == set(cluster.worker_spec)
        deadline = time.monotonic() + 60
        while len(cluster._launcher.active()) > 2 and time.monotonic() < deadline:  # the db and one worker job
            time.sleep(0.5)
        assert sorted(j.role for j in cluster._launcher.active()) == ["db", "worker"]
    assert_nothing_left(cluster)


def test_ctrl_c_while_waiting_cancels_every_job_and_raises_keyboardinterrupt(slurm_testbed, shared_dir):
    import signal
    import subprocess
    import time

    script = (
        "from mspass_cluster import MsPASSCluster\n"
        f"MsPASSCluster(nodes=2, work_dir={str(shared_dir)!r}, db_command={FAKE_MONGOD!r}, verbose=True, "
        "job_extra_directives=['--hold'])\n"  # held: it waits, as in a busy queue, until the user gives up
        "print('RETURNED')\n"
    )
    log = shared_dir / "notebook.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "PENDING (JobHeldUser)" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [line for line in log.read_text().splitlines() if "Submitted" in line]
        # The database is a job of its own; the two worker nodes are the tasks of one job array.
        db_ids = [line.split(" job ")[1].split()[0] for line in lines if " job array " not in line]
        array_ids = [line.split(" job array ")[1].split()[0] for line in lines if " job array " in line]
        assert len(db_ids) == 1 and len(array_ids) == 1, lines
        ids = db_ids + [f"{array_ids[0]}_{k}" for k in range(2)]
        assert len(queued(ids)) == 3, (ids, lines)
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            # A failed check must not leave this test's held jobs in the queue: cancel them (and only them).
            mine = re.findall(r"Submitted .*? (?:job|job array) (\d+)", log.read_text())
            if mine:
                subprocess.run(["scancel", *mine], check=False, timeout=30)
    text = log.read_text()
    # Python ends an uncaught KeyboardInterrupt by dying of SIGINT, as shells expect.
    assert returncode == -signal.SIGINT and "KeyboardInterrupt" in text and "RETURNED" not in text, text[-2000:]
    assert queued(ids) == []


def test_a_scheduler_the_nodes_cannot_reach_is_named_with_the_fix(slurm_testbed, shared_dir):
    # interface="lo": the scheduler listens on 127.0.0.1, which inside a node is the node itself.
    with pytest.raises(
        JobFailedError, match=r"could not reach the scheduler at tls://127\.0\.0\.1:\d+.*interface="
    ) as info:
        MsPASSCluster(nodes=1, work_dir=str(shared_dir), db_command=FAKE_MONGOD, interface="lo", death_timeout=5)
    assert info.value.role == "worker" and "Timed out starting worker" in info.value.log_tail


def test_scaling_beyond_the_partition_says_how_many_will_wait(slurm_testbed, shared_dir, caplog):
    caplog.set_level(logging.WARNING, logger="mspass_cluster")
    nodes = len(set(partition_nodes()))
    with MsPASSCluster(nodes=1, partition="debug", work_dir=str(shared_dir), db_command=FAKE_MONGOD) as cluster:
        assert not [r for r in caplog.records if "at most" in r.getMessage()]
        cluster.scale(nodes)  # the database holds one node, so one worker job must wait
        warned = [r.getMessage() for r in caplog.records if "at most" in r.getMessage()]
        assert warned == [
            f"{nodes} worker node(s) asked for, but partition debug has {nodes} node(s), one of them "
            f"for the database, and each worker job takes a whole node: at most {nodes - 1} can run "
            "at once; the other 1 will wait in the queue (Resources) until some end."
        ]
        cluster.scale(1)
    assert_nothing_left(cluster)


def partition_nodes():
    import subprocess

    out = subprocess.run(
        ["sinfo", "--noheader", "--Node", "--partition=debug", "--format=%N"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


def test_a_work_dir_with_a_space_and_a_percent_sign_works(slurm_testbed, shared_dir):
    work_dir = shared_dir / "my run 100%"
    with MsPASSCluster(nodes=1, work_dir=str(work_dir), db_command=NX_MONGOD, walltime="10") as cluster:
        assert cluster.get_client().submit(sum, [1, 2]).result() == 3
        assert os.path.exists(cluster.db_job.log_path) and os.path.exists(cluster.workers_service.jobs()[0].log_path)
    assert_nothing_left(cluster)


def test_a_lost_database_is_raised_by_the_next_call_with_its_story(slurm_testbed, shared_dir):
    """scancel of the database job, not brought back (db_restarts=0): get_db_client() says so at once, not after a
    30 s pymongo timeout."""
    import subprocess
    import time

    from mspass_cluster.jobs import JobPhase

    with MsPASSCluster(
        nodes=1, work_dir=str(shared_dir), db_command=NX_MONGOD, walltime="10", db_restarts=0
    ) as cluster:
        db = cluster.get_db_client()
        db.t.c.insert_one({"x": 1})
        job_id = cluster.db_job.job_id
        subprocess.run(["scancel", job_id], check=True)
        started = time.monotonic()
        deadline = started + 60
        error = None
        while time.monotonic() < deadline:
            try:
                cluster.get_db_client()
            except JobFailedError as exc:
                error = exc
                break
            time.sleep(0.2)
        assert error is not None, "get_db_client() kept handing out a dead database"
        assert time.monotonic() - started < 5
        assert error.role == "db" and error.job_id == job_id and error.state == "CANCELLED"
        assert f"The db job {job_id}" in str(error) and "ended while the cluster was running" in str(error)
        assert cluster.db_job.phase is JobPhase.FAILED
        text = str(cluster)
        assert "running, but its database is lost" in text and "database  lost (db job" in text
        assert re.search(rf"\n  db +{job_id} failed \(CANCELLED\)", text), text
        assert "failed" in cluster._repr_html_() and job_id in cluster._repr_html_()
        with pytest.raises(JobFailedError):
            cluster.wait_for_workers()
    assert_nothing_left(cluster)
