"""What each role runs: exact argv, environment, and job scripts executed under bash."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from mspass_cluster import MsPASSCluster
from mspass_cluster.config import resolve_options
from mspass_cluster.errors import ConfigError
from mspass_cluster.roles import db_argv, db_cache_gb, render_job_script, role_environment, worker_argv


def options(**kw):
    return resolve_options(environ={}, work_dir="/shared/run", python="/opt/py/bin/python", **kw)


def test_worker_argv_splits_cores_and_memory_over_processes():
    opts = options(cores=8, memory="32GiB", processes=4, worker_extra_args=["--resources", "GPU=1"])
    assert worker_argv(opts, "tcp://10.0.0.1:8786", "mspass-x-worker-0") == [
        "/opt/py/bin/python",
        "-m",
        "distributed.cli.dask_worker",
        "tcp://10.0.0.1:8786",
        "--name",
        "mspass-x-worker-0",
        "--nworkers",
        "4",
        "--nthreads",
        "2",
        "--memory-limit",
        "8.00GiB",
        "--nanny",
        "--death-timeout",
        "60",
        "--local-directory",
        "/shared/run/work",
        "--lifetime",
        "3330s",
        "--lifetime-stagger",
        "90s",
        "--resources",
        "GPU=1",
    ]


@pytest.mark.parametrize(
    ("walltime", "expected"),
    [
        ("01:00:00", ["--lifetime", "3330s", "--lifetime-stagger", "90s"]),  # leaves 54 to 57 min in
        ("00:10:00", ["--lifetime", "510s", "--lifetime-stagger", "30s"]),  # at least a minute to spare
        ("7-00:00:00", ["--lifetime", "603900s", "--lifetime-stagger", "300s"]),  # at most 10 minutes early
        ("00:03:00", []),  # too short to leave early
    ],
)
def test_workers_leave_gracefully_before_walltime(walltime, expected):
    argv = worker_argv(options(walltime=walltime), "tcp://h:1", "w")
    assert argv[argv.index("/shared/run/work") + 1 :] == expected


def test_worker_lifetime_can_be_set_or_switched_off():
    assert worker_argv(options(worker_lifetime="55m"), "tcp://h:1", "w")[-2:] == ["--lifetime", "3300s"]
    assert "--lifetime" not in worker_argv(options(worker_lifetime="none"), "tcp://h:1", "w")
    own = worker_argv(options(worker_extra_args=["--lifetime=20m"]), "tcp://h:1", "w")
    assert [a for a in own if a.startswith("--lifetime")] == ["--lifetime=20m"]
    with pytest.raises(ConfigError, match=r"worker_lifetime='soon' is not a positive duration.*'55m'"):
        options(worker_lifetime="soon")


def test_local_workers_have_no_walltime_to_leave_before():
    script = MsPASSCluster.job_script("worker", backend="local", work_dir="/tmp/preview")
    assert "--lifetime" not in script
    assert "--lifetime 3330s" in MsPASSCluster.job_script("worker", backend="slurm", work_dir="/tmp/preview")


def test_worker_on_a_whole_node_lets_dask_size_itself():
    argv = worker_argv(options(), "tcp://h:1", "w")
    assert "--nthreads" not in argv and argv[argv.index("--memory-limit") + 1] == "auto"


def test_db_argv_never_forks_and_sizes_its_cache_to_the_job():
    assert db_argv(options(db_memory="8GiB", db_port=27100)) == [
        "mongod",
        "--port",
        "27100",
        "--dbpath",
        "/shared/run/db/data",
        "--bind_ip_all",
        "--nounixsocket",
        "--wiredTigerCacheSizeGB",
        "3.5",
    ]
    assert db_cache_gb("1GiB") == 0.25


def test_environment_is_what_mspasspy_reads():
    env = role_environment(
        options(), "worker", cluster_id="ab12", scheduler_address="tcp://10.77.0.1:40000", db_host="n3"
    )
    assert env["MSPASS_SCHEDULER_ADDRESS"] == "10.77.0.1" and env["DASK_SCHEDULER_PORT"] == "40000"
    assert env["MSPASS_DB_ADDRESS"] == "n3" and env["MONGODB_PORT"] == "27017"
    assert env["DASK_SCHEDULER_ADDRESS"] == "tcp://10.77.0.1:40000" and env["MSPASS_WORK_DIR"] == "/shared/run"


def test_class_level_preview_needs_nothing_started():
    script = MsPASSCluster.job_script(
        "db", partition="debug", account="proj", db_memory="3GiB", work_dir="/tmp/preview"
    )
    assert "#SBATCH --partition=debug" in script and "#SBATCH --account=proj" in script
    assert "#SBATCH --mem=3G" in script and "mongod --port 27017 --dbpath /tmp/preview/db/data" in script
    with pytest.raises(ConfigError, match="role"):
        MsPASSCluster.job_script("scheduler")
    with pytest.raises(ConfigError, match="nodez"):
        MsPASSCluster.job_script("worker", nodez=2)


def run_script(tmp_path, argv, prologue=(), send=None):
    """Render a job script around ``argv`` and run it under bash (no Slurm), optionally signalling it."""
    script = render_job_script(
        role="worker",
        cluster_id="t",
        directives=["#SBATCH --job-name=t"],
        exports={"MSPASS_X": "a b'c"},
        prologue=list(prologue),
        setup=["cd /"],
        argv=argv,
    )
    path = tmp_path / "job.sh"
    path.write_text(script)
    proc = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send:
        time.sleep(0.5)
        proc.send_signal(send)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_script_reports_and_returns_the_servers_exit_status(tmp_path):
    code, out = run_script(tmp_path, ["sh", "-c", 'echo "x=$MSPASS_X"; exit 3'], prologue=["echo prologue-ran"])
    assert code == 3
    assert "prologue-ran" in out and "x=a b'c" in out and "worker exited with status 3" in out


def test_script_forwards_sigterm_and_waits_for_a_clean_exit(tmp_path):
    server = [
        sys.executable,
        "-c",
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1), print('flushed', flush=True), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "while True: time.sleep(0.1)\n",
    ]
    code, out = run_script(tmp_path, server, send=signal.SIGTERM)
    assert code == 0, out
    assert out.index("flushed") < out.index("worker exited with status 0")
