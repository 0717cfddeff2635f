"""Node-local database storage: the builders, the storage script on real directories, and clusters on the test bed.

The storage script (``templates/db_storage.py``) runs for real on
directories, with real faults: a read-only and a full destination (tmpfs
mounts made here, as root), one that fills up halfway (a tmpfs short of
inodes), a node-local directory too small for the data, swaps cut short.
On the Slurm test bed the data path is the nx-27017 stand-in: every fault
(the server killed mid-write, the notebook killed, the walltime's notice, a
full node-local directory) is followed by a new cluster on the same
``db_dir`` that must find every acknowledged document and every GridFS file
byte for byte. What only a real mongod could show (WiredTiger's recovery of
a copied data directory) is named in the README.
"""

from __future__ import annotations

import doctest
import hashlib
import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gridfs
import pytest
from conftest import BIN, FAKE_MONGOD, NX_MONGOD, assert_nothing_left, cluster_processes, queued

from mspass_cluster import ConfigError, JobFailedError, MsPASSCluster, dbstorage
from mspass_cluster.config import resolve_options
from mspass_cluster.roles import OPEN_FILES, build_job_script, db_data_path, db_storage_lines, open_files_lines

SCRIPT = Path(dbstorage.__file__).parent / "templates" / "db_storage.py"


def load_script():
    spec = importlib.util.spec_from_file_location("db_storage_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


storage = load_script()


# ------------------------------------------------------------------ pure builders
def test_the_helpers_examples_hold():
    assert doctest.testmod(dbstorage).failed == 0


def test_the_walltime_notice_grows_with_the_data_and_stays_inside_the_walltime():
    gib = 2**30
    assert dbstorage.signal_seconds(0, 3600) == dbstorage.MIN_SIGNAL_SECONDS == 120
    # 60 s shutdown + twice 100 GiB at 50 MiB/s
    assert dbstorage.signal_seconds(100 * gib, 48 * 3600) == 60 + 4096
    assert dbstorage.signal_seconds(100 * gib, 3600) == 1800  # never more than half the walltime
    assert dbstorage.signal_seconds(0, 120) == 60
    assert dbstorage.signal_seconds(10**15, 10**6) == 65535  # Slurm's limit
    script, _ = build_job_script(
        resolve_options(db_storage="node-local", work_dir="/w", db_walltime="04:00:00"),
        "db",
        cluster_id="c",
        job_name="mspass-c-db",
        scheduler_address="tcp://h:1",
        db_data_bytes=30 * gib,
    )
    assert "#SBATCH --signal=B:USR1@1289\n" in script  # 60 + ceil(60 GiB / 50 MiB/s)
    shared, _ = build_job_script(
        resolve_options(work_dir="/w"), "db", cluster_id="c", job_name="mspass-c-db", scheduler_address="tcp://h:1"
    )
    assert "#SBATCH --signal" not in shared and "db_storage.py" not in shared
    assert "--dbpath /w/db/data " in shared and "data.new-" in shared  # refuses to start beside a newer copy


def test_the_node_local_script_stages_in_runs_on_the_copy_and_copies_back_after_the_server():
    options = resolve_options(db_storage="node-local", work_dir="/w", db_local_dir="$LOCAL_DISK/db")
    script, _ = build_job_script(options, "db", cluster_id="c", job_name="mspass-c-db", scheduler_address="tcp://h:1")
    assert 'db_local_dir="${LOCAL_DISK}"/db\n' in script
    assert 'db_job_dir=$(mktemp -d "$db_local_dir/mspass_cluster-mspass-c-db-${SLURM_JOB_ID:-$$}.XXXXXXXX")' in script
    stage_in = script.index('db_storage.py" stage-in --db-dir /w/db')
    server = script.index('--dbpath "$db_job_dir/data"')
    copy_back = script.index('db_storage.py" copy-back --db-dir /w/db')
    exited = script.index('echo "mspass_cluster: db exited with status $status')
    assert stage_in < server < script.index('wait "$server_pid"') < copy_back < exited
    assert script.rstrip().endswith('exit "$job_status"')
    # the readiness probe knows the server's data directory only as a pattern: the node's own
    assert db_data_path(options, "mspass-c-db") == "*/mspass_cluster-mspass-c-db-*/data"
    assert isinstance(db_data_path(options), dbstorage.DbPathPattern)
    assert db_data_path(resolve_options(work_dir="/w")) == "/w/db/data"


def test_in_a_container_the_storage_script_runs_there_with_the_job_directory_bound(tmp_path):
    image = tmp_path / "image.sif"
    image.write_text("stand-in\n")
    options = resolve_options(db_storage="node-local", work_dir=str(tmp_path), container=str(image))
    script, _ = build_job_script(options, "db", cluster_id="c", job_name="mspass-c-db", scheduler_address="tcp://h:1")
    for command in ("stage-in", "copy-back"):
        line = next(line for line in script.splitlines() if f'db_storage.py" {command}' in line)
        assert line.split().count('"$container_runtime"') == 1 and '--bind "$db_job_dir"' in line
        assert f'{image} python "$db_job_dir/db_storage.py"' in line
    server = next(line for line in script.splitlines() if "--dbpath" in line)
    assert '--bind "$db_job_dir"' in server


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(db_storage="tmp"), "db_storage='tmp' is not one of 'shared', 'node-local'"),
        (dict(db_local_dir="scratch"), "db_local_dir='scratch' is not an absolute path"),
        (dict(db_local_dir="/local/a,b"), "holds a ',' or ':'"),
        (dict(db_local_dir="$1/x"), "is not '$NAME' or '${NAME}'"),
        (dict(db_local_dir="/w/db/local", work_dir="/w"), "lies in db_dir='/w/db'"),
    ],
)
def test_bad_storage_options_are_refused_with_the_fix(options, words):
    with pytest.raises(ConfigError) as info:
        resolve_options(**options)
    assert words in str(info.value)


def test_copy_back_failure_reads_the_log_of_an_ended_job():
    staged = (
        "mspass_cluster: stage-in done: n2:/tmp/j.x/data is the server's copy of /w/db/data (3 files, 1 KiB, 0.0 s)\n"
    )
    failed = (
        "mspass_cluster: copy-back failed: writing /w/db/data.new-7.x/t.db: No space left on device. /w/db/data is "
        "the previous complete copy; the newer files are on n2:/tmp/j.x/data (...)\n"
    )
    assert dbstorage.copy_back_failure("mspass_cluster: db starting on n1\n") is None
    assert dbstorage.copy_back_failure(staged + "mspass_cluster: copy-back done: /w/db/data is ...\n") is None
    assert dbstorage.copy_back_failure(staged + "mspass_cluster: copy-back verified: ...\n") is None
    assert dbstorage.copy_back_failure(staged + failed) == failed[len("mspass_cluster: ") :].rstrip("\n")
    started = "mspass_cluster: copy-back started: n2:/tmp/j.x/data to /w/db/data (3 files, 1 KiB)\n"
    assert dbstorage.copy_back_failure(started) == dbstorage.copy_back_failure(staged)  # either line will do
    cut = dbstorage.copy_back_failure(staged + started)
    assert cut == (
        "copy-back did not finish (the job ended first): /w/db/data is the previous complete copy; the newer "
        "files are on n2:/tmp/j.x/data."
    )


@pytest.mark.parametrize("role", ["db", "worker"])
def test_every_job_raises_its_open_files_limit_and_says_when_the_hard_limit_is_low(role):
    lines = "\n".join(open_files_lines(role))
    need = OPEN_FILES[role]
    low = subprocess.run(
        ["bash", "-c", f"ulimit -Sn 256; ulimit -Hn 1024\n{lines}\necho soft=$(ulimit -Sn)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert low.stdout.splitlines()[-1] == "soft=1024"
    [said] = [line for line in low.stdout.splitlines() if line.startswith("mspass_cluster:")]
    assert f"the hard limit on {os.uname().nodename} is 1024, below the {need}" in said
    assert "Ask your administrators to raise the hard nofile limit" in said


def test_a_hard_limit_high_enough_is_used_without_a_word():
    import resource

    need = OPEN_FILES["worker"]  # the database's 64000 is above this machine's own hard limit
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < need + 100:
        pytest.skip(f"this machine's hard open-files limit ({hard}) is below {need + 100}")
    lines = "\n".join(open_files_lines("worker"))
    high = subprocess.run(
        ["bash", "-c", f"ulimit -Sn 256; ulimit -Hn {need + 100}\n{lines}\necho soft=$(ulimit -Sn)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert high.stdout == f"soft={need + 100}\n", high.stderr


@pytest.mark.parametrize(
    "state, refused",
    [
        ("a stale old copy beside data", None),
        ("a complete copy waiting", "data.new-8.y"),
        ("data missing, old beside", "data.old-7.x"),
        ("a node-local copy not back", "node-local.json"),
    ],
)
def test_a_shared_database_never_starts_on_an_older_copy_than_one_waiting_beside_it(tmp_path, state, refused):
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    if state != "data missing, old beside":
        (db_dir / "data").mkdir()
    (db_dir / "data.old-7.x").mkdir()
    if state == "a complete copy waiting":
        (db_dir / "data.new-8.y").mkdir()
        (db_dir / "data.new-8.y" / storage.MARKER).write_text("{}")
    if state == "a node-local copy not back":
        storage.write_lease(str(db_dir), {"job": "7", "node": "n9", "path": "/tmp/j/data"})
    lines = db_storage_lines(resolve_options(work_dir=str(tmp_path)), "mspass-c-db")
    run = subprocess.run(["bash", "-c", "set -u\n" + "\n".join(lines)], capture_output=True, text=True, timeout=30)
    if refused is None:
        assert run.returncode == 0 and run.stderr == ""
        return
    assert run.returncode == 1
    assert (db_dir / "data").exists() == (state != "data missing, old beside")  # no empty data made to start on
    assert run.stderr.startswith(f"mspass_cluster: {db_dir}/{refused} was left by a node-local database whose ")
    assert f"so {db_dir}/data may be older than its newest data. Start the database once with db_storage=" in (
        run.stderr
    )


# ------------------------------------------------------------------ the storage script on directories
def make_data(root: Path, seed: int = 1, files: int = 6) -> None:
    """A data directory like mongod's: files of several sizes, a subdirectory, a link."""
    rng = random.Random(seed)
    (root / "journal").mkdir(parents=True)
    for i in range(files):
        (root / f"collection-{i}.wt").write_bytes(rng.randbytes(rng.choice([0, 17, 4096, 300_000, 9 * 2**20 + 3])))
    (root / "journal" / "WiredTigerLog.1").write_bytes(rng.randbytes(70_000))
    (root / "mongod.lock").write_text("")
    (root / "latest").symlink_to("collection-0.wt")
    os.chmod(root / "collection-1.wt", 0o400)


def snapshot(root: Path) -> dict:
    """Every entry of a tree: files by SHA-256 and mode, links by target."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            found[relative] = ("link", os.readlink(path))
        elif path.is_dir():
            found[relative] = ("dir",)
        else:
            found[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), oct(path.stat().st_mode & 0o777))
    return found


def run_script(*args: str) -> subprocess.CompletedProcess:
    """The script as the job runs it: a separate Python, its own file."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def job_dir(local: Path) -> Path:
    directory = Path(
        subprocess.run(
            ["mktemp", "-d", f"{local}/mspass_cluster-t-db-1.XXXXXXXX"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    shutil.copy(SCRIPT, directory / "db_storage.py")
    return directory


def stage_in(db_dir: Path, job: Path) -> subprocess.CompletedProcess:
    return run_script("stage-in", "--db-dir", str(db_dir), "--job-dir", str(job), "--node", "n9", "--job", "1")


def copy_back(db_dir: Path, job: Path, *more: str) -> subprocess.CompletedProcess:
    return run_script("copy-back", "--db-dir", str(db_dir), "--job-dir", str(job), "--node", "n9", "--job", "7", *more)


def leftovers(db_dir: Path) -> list[str]:
    """What ``db_dir`` holds besides ``data`` and the lease (``node-local.json``, checked on its own)."""
    return sorted(p.name for p in db_dir.iterdir() if p.name not in ("data", storage.LEASE))


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size, inodes=None)``: a real small file system (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        message = "mounting a tmpfs needs root (ci/test runs as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    mounted = []

    def mount(name: str, size: str, inodes: int | None = None) -> Path:
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        options = f"size={size},mode=0700" + (f",nr_inodes={inodes}" if inodes else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"mspass-test-{name}", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("swap", ["auto", "rename"])
def test_stage_in_and_copy_back_are_byte_exact_and_leave_one_complete_copy(tmp_path, swap):
    db_dir, local = tmp_path / "db", tmp_path / "local"
    make_data(db_dir / "data")
    local.mkdir()
    before = snapshot(db_dir / "data")
    job = job_dir(local)
    staged = stage_in(db_dir, job)
    assert staged.returncode == 0, staged.stderr
    assert staged.stdout == ""
    assert snapshot(job / "data") == before
    assert f"stage-in done: n9:{job}/data is the server's copy of {db_dir}/data (8 files" in staged.stderr
    assert oct(job.stat().st_mode & 0o777) == "0o700"
    assert json.loads((db_dir / storage.LEASE).read_text())["path"] == f"{job}/data"

    (job / "data" / "collection-2.wt").write_bytes(b"newer" * 1000)  # what the server wrote
    (job / "data" / "collection-9.wt").write_bytes(b"new collection")
    os.unlink(job / "data" / "mongod.lock")
    after = snapshot(job / "data")
    done = copy_back(db_dir, job, "--swap", swap)
    assert done.returncode == 0, done.stderr
    assert snapshot(db_dir / "data") == after and after != before
    assert leftovers(db_dir) == [] and not job.exists() and not (db_dir / storage.LEASE).exists()
    method = "renameat2(RENAME_EXCHANGE)" if swap == "auto" else "two renames"
    assert f"copy-back done: {db_dir}/data is the copy of n9:{job}/data (8 files" in done.stderr
    assert method in done.stderr and dbstorage.copy_back_failure(staged.stderr + done.stderr) is None


def test_the_signals_that_end_a_job_do_not_stop_a_copy_back(tmp_path):
    """scancel and the walltime send SIGTERM to every process of the job: the copy-back goes on (KillWait)."""
    db_dir, local = tmp_path / "db", tmp_path / "local"
    (db_dir / "data").mkdir(parents=True)
    local.mkdir()
    job = job_dir(local)
    assert stage_in(db_dir, job).returncode == 0
    for i in range(24):
        (job / "data" / f"collection-{i}.wt").write_bytes(os.urandom(8 * 2**20))
    newer = snapshot(job / "data")
    argv = [sys.executable, str(SCRIPT), "copy-back", "--db-dir", str(db_dir), "--job-dir", str(job), "--node", "n9"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert "copy-back started" in proc.stderr.readline()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        proc.send_signal(signum)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest
    assert "copy-back done" in rest and snapshot(db_dir / "data") == newer


def test_a_stage_in_stopped_by_a_signal_leaves_no_partial_copy(tmp_path):
    db_dir, local = tmp_path / "db", tmp_path / "local"
    (db_dir / "data").mkdir(parents=True)
    for i in range(24):
        (db_dir / "data" / f"collection-{i}.wt").write_bytes(os.urandom(8 * 2**20))
    local.mkdir()
    job = job_dir(local)
    argv = [sys.executable, str(SCRIPT), "stage-in", "--db-dir", str(db_dir), "--job-dir", str(job), "--node", "n9"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert "stage-in started" in proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert rest.startswith("mspass_cluster: stage-in failed: stopped by a signal. The database did not start;")
    assert not (job / "data").exists() and len(os.listdir(db_dir / "data")) == 24


def test_the_first_copy_back_of_a_new_database_creates_data_and_not_db_dir_itself(tmp_path):
    """MsPASS's `scp -r /tmp/db/data $MSPASS_DB_DIR` made db_dir the data directory on a first run (item 31)."""
    db_dir, local = tmp_path / "db", tmp_path / "local"
    db_dir.mkdir()
    local.mkdir()
    job = job_dir(local)
    assert stage_in(db_dir, job).returncode == 0
    (job / "data" / "t.db").write_bytes(b"x" * 100)
    assert copy_back(db_dir, job).returncode == 0
    assert (db_dir / "data" / "t.db").read_bytes() == b"x" * 100 and leftovers(db_dir) == []


class Killed(BaseException):
    """SIGKILL at that point: nothing after it runs, no handler cleans up."""


@pytest.mark.parametrize("cut", ["after the first rename", "before the swap", "after the exchange"])
def test_a_swap_cut_short_is_completed_by_the_next_stage_in(tmp_path, monkeypatch, cut):
    db_dir, local = tmp_path / "db", tmp_path / "local"
    make_data(db_dir / "data", seed=1)
    local.mkdir()
    source = local / "job" / "data"
    make_data(source, seed=2)
    newer = snapshot(source)
    storage.write_lease(str(db_dir), {"job": "7", "node": "n9", "path": str(source)})  # as its stage-in did
    renames = []
    real_rename = os.rename

    def rename(a, b):
        renames.append((a, b))
        if cut == "after the first rename" and len(renames) == 2:
            raise Killed
        return real_rename(a, b)

    def swap_in(db, new, how="auto"):
        if cut == "before the swap":
            raise Killed
        if cut == "after the exchange":
            assert storage.exchange(new, os.path.join(db, "data"))
            raise Killed
        return real_swap(db, new, how)

    real_swap = storage.swap_in
    monkeypatch.setattr(storage.os, "rename", rename)
    monkeypatch.setattr(storage, "swap_in", swap_in)
    with pytest.raises(Killed):
        storage.copy_back(str(db_dir), str(local / "job"), "n9", "rename", "7")
    monkeypatch.undo()
    state = {p.name for p in db_dir.iterdir()}
    if cut == "after the first rename":
        assert "data" not in state  # the moment two renames cannot avoid: the next start finishes the swap
    else:
        assert "data" in state
    job = job_dir(local)
    again = stage_in(db_dir, job)
    assert again.returncode == 0, again.stderr
    assert "recovered an interrupted copy-back" in again.stderr
    assert snapshot(db_dir / "data") == newer == snapshot(job / "data")
    assert leftovers(db_dir) == [] and json.loads((db_dir / storage.LEASE).read_text())["path"] == f"{job}/data"


def test_a_start_after_an_unfinished_copy_back_refuses_until_the_newer_files_are_back(tmp_path):
    """The job was killed in its copy-back (or the node failed): data is older than the node's files."""
    db_dir, local = tmp_path / "db", tmp_path / "local"
    make_data(db_dir / "data")
    local.mkdir()
    first = job_dir(local)
    assert stage_in(db_dir, first).returncode == 0
    (first / "data" / "collection-2.wt").write_bytes(b"newer")
    newer = snapshot(first / "data")
    second = job_dir(local)
    refused = stage_in(db_dir, second)
    assert refused.returncode == 1 and not (second / "data").exists()
    [line] = [line for line in refused.stderr.splitlines() if "stage-in failed" in line]
    assert f"job 1 ran the database on n9:{first}/data and its copy-back did not finish" in line
    assert f"remove {db_dir}/node-local.json to start from the older copy" in line
    command = line.split("from a job on that node: ", 1)[1].split(";")[0]
    assert command.startswith(f"srun --nodelist=n9 python3 {first}/db_storage.py copy-back --db-dir {db_dir} ")
    again = subprocess.run(shlex.split(command.split(" ", 2)[2]), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr  # the command, without srun (no job needed here)
    assert snapshot(db_dir / "data") == newer and not (db_dir / storage.LEASE).exists()
    assert stage_in(db_dir, second).returncode == 0


def test_recovery_removes_a_partial_copy_and_keeps_data(tmp_path):
    db_dir = tmp_path / "db"
    make_data(db_dir / "data")
    before = snapshot(db_dir / "data")
    partial = db_dir / "data.new-7.abc"
    partial.mkdir()
    (partial / "collection-0.wt").write_bytes(b"half")
    recovered = run_script("recover", "--db-dir", str(db_dir))
    assert recovered.returncode == 0
    assert f"removed {partial}, a copy not marked complete" in recovered.stderr
    assert snapshot(db_dir / "data") == before and leftovers(db_dir) == []


def test_recovery_refuses_a_complete_copy_older_than_data(tmp_path):
    """A newer data (someone ran a server on it since) is never replaced by an older complete copy."""
    db_dir = tmp_path / "db"
    make_data(db_dir / "data")
    waiting = db_dir / "data.new-7.abc"
    make_data(waiting, seed=3)
    (waiting / storage.MARKER).write_text(json.dumps({"job": "7", "verified": time.time() - 3600}))
    recovered = run_script("recover", "--db-dir", str(db_dir))
    assert recovered.returncode == 1
    assert "was written after it; keep the one you want as data" in recovered.stderr
    assert waiting.exists()


def copy_back_must_fail(db_dir: Path, job: Path, words: str) -> str:
    """The failure a user sees: one line, the previous copy intact, no partial copy, the newer files kept."""
    before = snapshot(db_dir / "data")
    newer = snapshot(job / "data")
    failed = copy_back(db_dir, job)
    assert failed.returncode == 1
    [line] = [line for line in failed.stderr.splitlines() if "failed" in line]
    assert line.startswith("mspass_cluster: copy-back failed: ") and words in line, line
    assert f"{db_dir}/data is the previous complete copy; the newer files are on n9:{job}/data" in line
    assert snapshot(db_dir / "data") == before and leftovers(db_dir) == []
    assert snapshot(job / "data") == newer
    assert json.loads((db_dir / storage.LEASE).read_text())["path"] == f"{job}/data"  # the next start refuses
    # read from the end of a job's log alone (the stage-in line is far up in a long one)
    assert dbstorage.copy_back_failure("server log lines\n" + failed.stderr) == line[len("mspass_cluster: ") :]
    return line


def test_a_read_only_destination_keeps_the_previous_copy_and_the_newer_files(tmp_path, tmpfs):
    db_dir, local = tmpfs("db", "64m"), tmp_path / "local"
    make_data(db_dir / "data")
    local.mkdir()
    job = job_dir(local)
    assert stage_in(db_dir, job).returncode == 0
    (job / "data" / "collection-2.wt").write_bytes(b"newer")
    subprocess.run(["mount", "-o", "remount,ro", str(db_dir)], check=True)
    copy_back_must_fail(db_dir, job, "Read-only file system")


def test_a_full_destination_keeps_the_previous_copy_and_the_newer_files(tmp_path, tmpfs):
    db_dir, local = tmpfs("db", "24m"), tmp_path / "local"
    make_data(db_dir / "data", files=3)
    local.mkdir()
    job = job_dir(local)
    assert stage_in(db_dir, job).returncode == 0
    (job / "data" / "collection-9.wt").write_bytes(random.randbytes(12 * 2**20))
    line = copy_back_must_fail(db_dir, job, f"{db_dir} has ")
    assert "free, the new copy needs" in line


def test_a_destination_failing_halfway_keeps_the_previous_copy_and_the_newer_files(tmp_path, tmpfs):
    """Room for the bytes, not for the files (a tmpfs short of inodes): the copy fails after some files."""
    db_dir, local = tmpfs("db", "256m", inodes=40), tmp_path / "local"
    make_data(db_dir / "data", files=3)
    local.mkdir()
    job = job_dir(local)
    assert stage_in(db_dir, job).returncode == 0
    for i in range(40):
        (job / "data" / f"index-{i}.wt").write_bytes(b"i" * 5000)
    line = copy_back_must_fail(db_dir, job, "No space left on device")
    assert f"{db_dir}/data.new-7." in line  # it got as far as the new copy


def test_a_node_local_directory_too_small_is_refused_before_anything_is_copied(tmp_path, tmpfs):
    db_dir, local = tmp_path / "db", tmpfs("local", "8m")
    (db_dir / "data").mkdir(parents=True)
    (db_dir / "data" / "collection-0.wt").write_bytes(random.randbytes(10 * 2**20))
    job = job_dir(local)
    refused = stage_in(db_dir, job)
    assert refused.returncode == 1 and refused.stdout == ""
    [line] = [line for line in refused.stderr.splitlines() if "stage-in failed" in line]
    assert line.startswith("mspass_cluster: stage-in failed: ")
    assert f"{db_dir}/data holds 10.0 MiB but the node-local directory {local} on n9 has " in line
    assert "Give db_local_dir a node-local directory with more room" in line and "db_storage='shared'" in line
    assert not (job / "data").exists() and os.listdir(db_dir) == ["data"]


def test_a_copy_that_reads_back_differently_is_caught(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    make_data(source)
    copied = storage.copy_tree(str(source), str(target))
    with open(target / "collection-4.wt", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]) if first else b"x")
    with pytest.raises(storage.StorageError, match=r"collection-4.wt reads back with"):
        storage.verify_tree(str(target), storage.inventory(str(source)), copied)


# ------------------------------------------------------------------ on the Slurm test bed
#: One small worker that shares its node: these tests need no whole node, and the test bed is shared (so the
#: database has a port of its own: other tests' databases may be on the same node, on 27017).
SMALL = dict(nodes=1, exclusive=False, cores=1, memory="1GiB", db_memory="1GiB", walltime="10", db_port=27417)


def nx_cluster(work_dir: Path, **options) -> MsPASSCluster:
    return MsPASSCluster(work_dir=str(work_dir), db_command=NX_MONGOD, db_storage="node-local", **SMALL, **options)


class Workload:
    """Documents and GridFS files stored, and which of them the server acknowledged."""

    def __init__(self):
        self.documents: set[str] = set()
        self.files: dict = {}

    def store(self, db, documents: int = 200, files: int = 3, prefix: str = "a") -> None:
        fs = gridfs.GridFS(db.mspass_test)
        for start in range(0, documents, 50):
            batch = [{"_id": f"{prefix}{i}", "i": i} for i in range(start, min(start + 50, documents))]
            db.mspass_test.wf.insert_many(batch)
            self.documents.update(d["_id"] for d in batch)
        for i in range(files):
            content = random.Random(f"{prefix}{i}").randbytes(200_000 + 4099 * i)
            self.files[fs.put(content, filename=f"{prefix}{i}.bin")] = content

    def keep_writing(self, db, stop: threading.Event, prefix: str) -> threading.Thread:
        """Insert one document after another until the server stops answering (or ``stop``)."""

        def write():
            i = 0
            while not stop.is_set():
                try:
                    db.mspass_test.wf.insert_one({"_id": f"{prefix}{i}", "i": i})
                except Exception:  # the server is gone: what it acknowledged is what counts
                    return
                self.documents.add(f"{prefix}{i}")
                i += 1

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    def check(self, db) -> None:
        """0 acknowledged documents lost, every GridFS file byte for byte."""
        present = {d["_id"] for d in db.mspass_test.wf.find({}, {"_id": 1})}
        assert self.documents <= present, f"{len(self.documents - present)} acknowledged documents lost"
        fs = gridfs.GridFS(db.mspass_test)
        for file_id, content in self.files.items():
            assert fs.get(file_id).read() == content


def db_dir_holds_one_complete_copy(db_dir: Path) -> None:
    assert sorted(p.name for p in db_dir.iterdir() if p.name.startswith("data")) == ["data"]


def node_local_dirs(job_id: str) -> list[Path]:
    """This job's node-local directories (the test bed's nodes share this machine's /tmp)."""
    return list(Path("/tmp").glob(f"mspass_cluster-*-{job_id}.*"))


def reopen_and_check(work_dir: Path, workload: Workload, **options) -> None:
    reopen_and_check_at(work_dir, work_dir / "db", workload, **options)


def reopen_and_check_at(work_dir: Path, db_dir: Path, workload: Workload, **options) -> None:
    """A new node-local cluster on ``db_dir`` finds everything acknowledged, and copies it back again."""
    db_dir_holds_one_complete_copy(db_dir)
    with nx_cluster(work_dir, db_dir=str(db_dir), **options) as again:
        workload.check(again.get_db_client())
        log = again.db_job.log_path
    assert "copy-back done" in Path(log).read_text()
    db_dir_holds_one_complete_copy(db_dir)


def wait_until_gone(job_ids, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while queued(job_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert queued(job_ids) == [], f"jobs {job_ids} still queued after {seconds} s"


def server_pid(cluster) -> int:
    for pid in cluster_processes(cluster.cluster_id):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mspass_cluster.embedded_db" in command:
            return pid
    raise AssertionError("no database server process found")


@pytest.mark.slurm
@pytest.mark.parametrize("runtime", ["none", "apptainer"])
def test_a_node_local_database_keeps_what_it_stored(slurm_testbed, shared_dir, runtime):
    options = {}
    if runtime == "apptainer":
        image = shared_dir / "image.sif"
        image.write_text("stand-in image (tests/bin/container_standin.py)\n")
        (shared_dir / "image.sif.env").write_text(f"PATH={os.path.dirname(sys.executable)}:/usr/bin:/bin\n")
        # --contain: the container's /tmp (and home) are its own, so the job's node-local directory must be
        # bound to be seen; the image's Python is this one, bound.
        options = dict(
            container=str(image),
            container_runtime="apptainer",
            container_args=["--contain"],
            # ... and this package's source (an editable install), wherever the clone is (under /tmp in CI).
            binds=[sys.prefix, sys.base_prefix, str(Path(dbstorage.__file__).resolve().parent.parent)],
            job_script_prologue=[f"export PATH={BIN}:$PATH"],
        )
    workload = Workload()
    with nx_cluster(shared_dir, **options) as cluster:
        workload.store(cluster.get_db_client())
        job_id, log = cluster.db_job.job_id, Path(cluster.db_job.log_path)
        [local] = node_local_dirs(job_id)
        assert (local / "data").is_dir() and oct(local.stat().st_mode & 0o777) == "0o700"
    assert_nothing_left(cluster)
    text = log.read_text()
    assert "copy-back done" in text and "db exited with status 0" in text
    assert dbstorage.copy_back_failure(text) is None and node_local_dirs(job_id) == []
    reopen_and_check(shared_dir, workload, **options)


@pytest.mark.slurm
def test_the_probe_knows_a_node_local_server_by_its_data_directory(slurm_testbed, shared_dir):
    """The fake mongod reports its dbPath (nx-27017 does not): the node's own directory must pass the check."""
    with MsPASSCluster(work_dir=str(shared_dir), db_command=FAKE_MONGOD, db_storage="node-local", **SMALL) as cluster:
        assert cluster.get_db_client().admin.command("ping")["ok"] == 1
    assert_nothing_left(cluster)


@pytest.mark.slurm
def test_sigkill_of_the_server_mid_write_loses_no_acknowledged_data(slurm_testbed, shared_dir):
    workload = Workload()
    with nx_cluster(shared_dir, db_restarts=0) as cluster:  # the copy-back alone (restarts: below)
        db = cluster.get_db_client()
        workload.store(db)
        stop = threading.Event()
        writer = workload.keep_writing(db, stop, "k")
        time.sleep(1.0)
        os.kill(server_pid(cluster), signal.SIGKILL)
        writer.join(timeout=60)
        stop.set()
        job_id, log = cluster.db_job.job_id, Path(cluster.db_job.log_path)
        wait_until_gone([job_id], 60)
        with pytest.raises(JobFailedError):
            cluster.get_db_client()
    text = log.read_text()
    assert "db exited with status 137" in text and "copy-back done" in text
    assert dbstorage.copy_back_failure(text) is None
    assert len(workload.documents) > 200, "the writer should have had time to write"
    reopen_and_check(shared_dir, workload)


@pytest.mark.slurm
def test_a_node_local_database_brought_back_in_place_has_everything_acknowledged(slurm_testbed, shared_dir):
    """SIGKILL mid-write with db_restarts (the default): copy-back, then the cluster's new job stages it in."""
    workload = Workload()
    with nx_cluster(shared_dir) as cluster:
        db = cluster.get_db_client()
        workload.store(db)
        stop = threading.Event()
        writer = workload.keep_writing(db, stop, "r")
        time.sleep(1.0)
        first, first_log = cluster.db_job.job_id, Path(cluster.db_job.log_path)
        os.kill(server_pid(cluster), signal.SIGKILL)
        writer.join(timeout=60)
        stop.set()
        wait_until_gone([first], 60)  # the job outlives its server by the copy-back
        again = cluster.get_db_client()  # waits until the database is back
        assert cluster.db_job.job_id != first
        workload.check(again)
        second_log = Path(cluster.db_job.log_path).read_text()
    text = first_log.read_text()
    assert "db exited with status 137" in text and "copy-back done" in text
    assert "stage-in done" in second_log and len(workload.documents) > 200
    reopen_and_check(shared_dir, workload)


@pytest.mark.slurm
def test_scancel_of_the_database_job_copies_back_within_killwait(slurm_testbed, shared_dir):
    """scancel: SIGTERM to every process of the job, SIGKILL 30 s later (KillWait); the copy-back fits between."""
    workload = Workload()
    with nx_cluster(shared_dir) as cluster:
        workload.store(cluster.get_db_client(), documents=500, files=4)
        job_id, log = cluster.db_job.job_id, Path(cluster.db_job.log_path)
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        wait_until_gone([job_id], 60)
    text = log.read_text()
    assert "copy-back done" in text and dbstorage.copy_back_failure(text) is None
    assert node_local_dirs(job_id) == []
    reopen_and_check(shared_dir, workload)


@pytest.mark.slurm
def test_a_killed_notebook_copies_its_database_back(slurm_testbed, shared_dir):
    """SIGKILL of the notebook: the orphan guard stops the server, and the copy-back follows."""
    script = (
        "import os, random, signal, gridfs\n"
        "from mspass_cluster import MsPASSCluster\n"
        f"c = MsPASSCluster(work_dir={str(shared_dir)!r}, db_command={NX_MONGOD!r}, db_storage='node-local',\n"
        f"                   death_timeout=10, orphan_timeout=12, **{SMALL!r})\n"
        "db = c.get_db_client()\n"
        "db.mspass_test.wf.insert_many([{'_id': f'n{i}', 'i': i} for i in range(300)])\n"
        "ids = [str(gridfs.GridFS(db.mspass_test).put(random.Random(f'n{i}').randbytes(150_000))) for i in range(2)]\n"
        "print(','.join(c.job_ids), c.db_job.job_id, c.db_job.log_path, ','.join(ids), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == -signal.SIGKILL, out.stderr
    ids, db_job, log, file_ids = out.stdout.split()
    wait_until_gone(ids.split(","), 120)
    text = Path(log).read_text()
    assert "no heartbeat from the notebook" in text and "copy-back done" in text and "exited with status 0" in text
    assert node_local_dirs(db_job) == []
    workload = Workload()
    workload.documents = {f"n{i}" for i in range(300)}
    from bson import ObjectId

    workload.files = {ObjectId(f): random.Random(f"n{i}").randbytes(150_000) for i, f in enumerate(file_ids.split(","))}
    reopen_and_check(shared_dir, workload)


@pytest.mark.slurm
def test_the_walltime_notice_stops_the_server_and_copies_back_in_time(slurm_testbed, shared_dir):
    """db_walltime of 2 minutes: Slurm's USR1 comes about a minute before; the job ends before the limit."""
    workload = Workload()
    with nx_cluster(shared_dir, db_walltime="2", db_restarts=0) as cluster:  # no relay: the notice alone
        script = Path(cluster.db_job.script_path).read_text()
        assert "#SBATCH --signal=B:USR1@60\n" in script  # half of the walltime: the cap
        db = cluster.get_db_client()
        workload.store(db)
        stop = threading.Event()
        writer = workload.keep_writing(db, stop, "w")
        writer.join(timeout=150)  # writes until the server stops at the notice
        stop.set()
        job_id, log = cluster.db_job.job_id, Path(cluster.db_job.log_path)
        wait_until_gone([job_id], 60)
        deadline = time.monotonic() + 30
        while not cluster.db_job.ended and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cluster.db_job.state.value == "COMPLETED", cluster.db_job.state  # not TIMEOUT
    text = log.read_text()
    assert "db job near its walltime (SIGUSR1 from Slurm): stopping the server" in text
    assert "copy-back done" in text and "db exited with status 0" in text and "TIME LIMIT" not in text
    reopen_and_check(shared_dir, workload)


@pytest.mark.slurm
def test_a_copy_back_that_cannot_finish_fails_the_job_and_says_where_the_newer_files_are(
    slurm_testbed, shared_dir, tmpfs
):
    db_dir = tmpfs("db", "64m")
    workload = Workload()
    with nx_cluster(shared_dir, db_dir=str(db_dir)) as cluster:
        workload.store(cluster.get_db_client())
        before = snapshot(db_dir / "data")
        subprocess.run(["mount", "-o", "remount,ro", str(db_dir)], check=True)
        job, log = cluster.db_job, Path(cluster.db_job.log_path)
    assert job.state.value == "FAILED" and job.status.exit_code.startswith("1:"), job.status
    text = log.read_text()
    [line] = [line for line in text.splitlines() if line.startswith("mspass_cluster: copy-back failed: ")]
    [local] = node_local_dirs(job.job_id)
    assert "Read-only file system" in line and f"on {job.node}:{local}/data " in line
    assert dbstorage.copy_back_failure(text) == line[len("mspass_cluster: ") :]
    assert "db exited with status 0" in text  # the server stopped cleanly; the copy-back is what failed
    assert snapshot(db_dir / "data") == before  # the previous complete copy
    # The way out the line gives, once db_dir is writable again: the copy-back, run again on that node.
    subprocess.run(["mount", "-o", "remount,rw", str(db_dir)], check=True)
    command = line.split(f"copy them back from a job on {job.node}: ", 1)[1].split(";")[0]
    assert command.startswith(f"srun --nodelist={job.node} python3 {local}/db_storage.py copy-back --db-dir {db_dir} ")
    again = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "copy-back done" in again.stderr, again.stderr
    assert not local.exists()
    reopen_and_check_at(shared_dir, db_dir, workload)


@pytest.mark.slurm
def test_a_full_node_local_directory_loses_nothing_acknowledged_and_a_small_one_is_refused(
    slurm_testbed, shared_dir, tmpfs
):
    local = tmpfs("local", "6m")
    workload = Workload()
    with nx_cluster(shared_dir, db_local_dir=str(local)) as cluster:
        db = cluster.get_db_client()
        fs = gridfs.GridFS(db.mspass_test)
        rejected = None
        for i in range(200):  # 200 x 100 kB: more than the 6 MiB file system holds
            content = random.Random(f"f{i}").randbytes(100_000)
            try:
                file_id = fs.put(content, filename=f"f{i}")
            except Exception as exc:
                rejected = exc
                break
            workload.files[file_id] = content
        assert rejected is not None and "full" in str(rejected).lower(), rejected
    assert_nothing_left(cluster)
    text = Path(cluster.db_job.log_path).read_text()
    assert "copy-back done" in text, text[-2000:]
    assert len(workload.files) > 5
    db_dir_holds_one_complete_copy(shared_dir / "db")
    # The same data do not fit there with room to grow: refused at once, with both sizes and the fix.
    with pytest.raises(JobFailedError) as info:
        nx_cluster(shared_dir, db_local_dir=str(local))
    assert "stage-in failed:" in str(info.value) and f"node-local directory {local} on n" in str(info.value)
    assert "Give db_local_dir a node-local directory with more room" in str(info.value)
    reopen_and_check(shared_dir, workload)
