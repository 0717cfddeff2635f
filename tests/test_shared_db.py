"""One database for many clusters: `mspass-cluster db start|status|stop` and `MsPASSCluster(database=...)`.

On the real Slurm test bed: the shared database is started by the command
line, as a user would, with the nx-27017 stand-in for the data; notebooks
are separate processes (and a batch notebook through `mspass-cluster
submit`) that write to it and read from it at the same time. Every test
stops what it started and checks that nothing stays queued.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
import subprocess
import sys
import time

import nbformat
import pymongo
import pytest
from conftest import FAKE_MONGOD, NX_MONGOD, assert_nothing_left, queued

from mspass_cluster import ConfigError, JobFailedError, MsPASSCluster, StartupTimeoutError, standalone_db
from mspass_cluster.commands import CommandRunner
from mspass_cluster.config import resolve_options
from mspass_cluster.services.attached import find_database

CLI = [os.path.join(os.path.dirname(sys.executable), "mspass-cluster")]
#: Workers import this module's task functions, as users' jobs import their own modules.
ON_PYTHONPATH = [f"export PYTHONPATH={os.path.dirname(os.path.abspath(__file__))}"]
#: Worker nodes that share test-bed nodes, so that several clusters and the database fit on it at once.
SMALL = dict(nodes=1, exclusive=False, cores=1, memory="1GiB", walltime="10")


@pytest.fixture
def state_home(tmp_path, monkeypatch):
    """A registry of shared databases of this test's own (XDG_STATE_HOME), for this process and its children.

    A shared database a failed test left running is stopped at the end, so that nothing stays queued.
    """
    path = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(path))
    yield path
    for record in standalone_db.all_records():
        if record.job_id and record.log_path.startswith(str(tmp_path)):  # started by this test, not made up
            cli("db", "stop", record.id)


def cli(*args, timeout=400, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "DASK_MSPASS_CLUSTER__DB_COMMAND": repr(NX_MONGOD), **env}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=environ, timeout=timeout)


def db_port() -> int:
    """A database port of this test's own: on the shared test bed, other tests' databases run on the nodes too."""
    return random.randrange(27400, 28000)


def db_start(work_dir, port=None) -> tuple[str, standalone_db.SharedDatabase, str]:
    port = str(port or db_port())
    out = cli("db", "start", "--work-dir", str(work_dir), "--walltime", "15", "--db-port", port)
    assert out.returncode == 0, out.stdout + out.stderr
    ident = re.search(r"Shared database ([0-9a-f]{8}) is ready", out.stdout).group(1)
    return ident, standalone_db.read_record(ident), out.stdout


def db_stop(ident) -> str:
    out = cli("db", "stop", ident)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def write_through_environment(tag):
    """Runs on a worker: one document through the address the cluster published there."""
    with pymongo.MongoClient(os.environ["MSPASS_DB_ADDRESS"]) as client:
        client.shared_test.docs.insert_one({"tag": tag})
    return os.environ["MSPASS_DB_ADDRESS"]


def wait_for(path, timeout=240, procs=()):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"a notebook process ended early:\n{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


NOTEBOOK = """\
import json, os, sys, time
from mspass_cluster import MsPASSCluster
tag, ident, work, sync = sys.argv[1:5]

def write(tag, n, batch):
    import os, pymongo  # on a worker, through the address the cluster published there
    client = pymongo.MongoClient(os.environ["MSPASS_DB_ADDRESS"])
    client.shared_test.docs.insert_many([{"tag": tag, "batch": batch, "i": i} for i in range(n)])
    client.close()
    return n

def wait(name):
    while not os.path.exists(os.path.join(sync, name)):
        time.sleep(0.2)

def counts(db):
    return {t: db.shared_test.docs.count_documents({"tag": t}) for t in ("A", "B")}

with MsPASSCluster(database=ident, work_dir=work, nodes=1, exclusive=False, cores=1, memory="1GiB",
                   walltime="10") as cluster:
    assert os.environ["MSPASS_DB_ADDRESS"] == cluster.db_address
    client = cluster.get_client()
    db = cluster.get_db_client()
    assert sum(client.gather([client.submit(write, tag, 50, b, pure=False) for b in range(2)])) == 100
    db.shared_test.docs.insert_one({"tag": tag, "from": "notebook"})
    open(os.path.join(sync, tag + ".written"), "w").close()
    wait("go")
    print("COUNTS", json.dumps(counts(db)), flush=True)
    if tag == "B":
        wait("A.closed")
        assert client.submit(write, tag, 10, 9, pure=False).result() == 10
        print("AFTER", json.dumps(counts(db)), flush=True)
open(os.path.join(sync, tag + ".closed"), "w").close()
"""

BATCH = """\
import os
from mspass_cluster import MsPASSCluster

def write(i):
    import os, pymongo
    client = pymongo.MongoClient(os.environ["MSPASS_DB_ADDRESS"])
    client.shared_test.docs.insert_one({"tag": "batch", "i": i})
    client.close()
    return i

with MsPASSCluster(nodes=1) as cluster:  # the database comes from `submit --database`
    client = cluster.get_client()
    assert sorted(client.gather(client.map(write, range(5)))) == list(range(5))
    db = cluster.get_db_client()
    print("BATCH", db.shared_test.docs.count_documents({"tag": "batch"}), cluster.database.target.what)
"""


@pytest.mark.slurm
def test_two_notebooks_and_a_batch_notebook_share_one_database(slurm_testbed, shared_dir, state_home):
    ident, record, said = db_start(shared_dir / "dbhome")
    for words in (f'MsPASSCluster(nodes=4, database="{ident}")', f"db stop {ident}", "walltime (15)", record.uri):
        assert words in said
    assert stat.S_IMODE(os.stat(record.private_dir).st_mode) == 0o700
    # Its connection string names it as well as its id does.
    assert (
        find_database(resolve_options(database=record.uri, work_dir=str(shared_dir)), CommandRunner()).record == record
    )
    listing = cli("status").stdout
    assert f"{record.name}" in listing and "db stop ID" in listing
    sync = shared_dir / "sync"
    sync.mkdir()
    procs = {
        tag: subprocess.Popen(
            [sys.executable, "-c", NOTEBOOK, tag, ident, str(shared_dir / tag), str(sync)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for tag in ("A", "B")
    }
    try:
        for tag in ("A", "B"):
            wait_for(sync / f"{tag}.written", procs=procs.values())
        status = cli("db", "status", ident).stdout
        assert f"{ident}  ready" in status and status.count("cluster mspass-") == 2, status

        notebook = shared_dir / "batch.ipynb"
        nbformat.write(
            nbformat.v4.new_notebook(
                cells=[nbformat.v4.new_code_cell(BATCH)],
                metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            ),
            notebook,
        )
        out = cli(
            "submit", str(notebook), "--database", ident, "--backend", "local", "--nodes", "1", "--walltime", "10"
        )
        assert out.returncode == 0, out.stderr
        batch_job = out.stdout.split(" as job ")[1].split(";")[0]

        (sync / "go").touch()
        a_out, _ = procs["A"].communicate(timeout=180)
        assert procs["A"].returncode == 0, a_out[-4000:]
        b_out, _ = procs["B"].communicate(timeout=180)
        assert procs["B"].returncode == 0, b_out[-4000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    # Each saw the other's writes; B kept working after A closed, on the same database.
    assert json.loads(a_out.split("COUNTS ")[1].splitlines()[0]) == {"A": 101, "B": 101}
    assert json.loads(b_out.split("COUNTS ")[1].splitlines()[0]) == {"A": 101, "B": 101}
    assert json.loads(b_out.split("AFTER ")[1].splitlines()[0]) == {"A": 101, "B": 111}

    deadline = time.monotonic() + 240
    while queued([batch_job]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert queued([batch_job]) == []
    executed = nbformat.read(shared_dir / f"batch-{batch_job}.ipynb", as_version=4)
    text = "".join(o.get("text", "") + "\n".join(o.get("traceback", [])) for o in executed.cells[0].outputs)
    assert f"BATCH 5 shared database {ident}" in text, text

    # Closing the clusters left the database running: it still has every document.
    assert queued([record.job_id]) == [record.job_id]
    with pymongo.MongoClient(record.uri) as client:
        assert client.shared_test.docs.count_documents({}) == 101 + 111 + 5
    stopped = db_stop(ident)
    assert f"Shared database {ident} stopped cleanly (job {record.job_id}, server exit status 0)" in stopped
    assert queued([record.job_id]) == []
    assert "db exited with status 0" in open(record.log_path).read()
    assert not os.path.exists(record.private_dir)
    assert standalone_db.all_records() == []
    assert not os.path.exists(os.path.join(record.db_dir, "mspass-cluster.json"))


@pytest.mark.slurm
def test_a_lost_shared_database_is_raised_then_found_again_after_db_start(slurm_testbed, shared_dir, state_home):
    home = shared_dir / "dbhome"
    ident, record, _ = db_start(home)
    with MsPASSCluster(
        database=ident[:5], work_dir=str(shared_dir / "nb"), poll_interval=1, job_script_prologue=ON_PYTHONPATH, **SMALL
    ) as cluster:
        assert cluster.db_job.job_id == record.job_id and cluster.db_address == record.uri
        shown = str(cluster)
        assert f"db     {record.job_id:>8} ready (RUNNING)" in shown and record.address in shown, shown
        cluster.get_db_client().shared_test.docs.insert_many([{"i": i} for i in range(20)])
        with pytest.raises(ConfigError, match=r"this cluster runs no database job; it uses the shared database"):
            cluster.job_script("db")

        # It runs already: a second `db start` on its directory says how to use it or stop it.
        twice = cli("db", "start", "--work-dir", str(home))
        assert twice.returncode == 2 and f"already serves shared database {ident}" in twice.stderr
        assert f'MsPASSCluster(database="{ident}")' in twice.stderr and f"db stop {ident}" in twice.stderr
        # The job itself keeps its claim on db_dir fresh (no notebook does).
        stamp = os.stat(record.heartbeat).st_mtime
        time.sleep(standalone_db.HEARTBEAT_EVERY + 1)
        assert os.stat(record.heartbeat).st_mtime > stamp

        # The database's own directory is taken: the message offers both ways out, attaching first.
        with pytest.raises(ConfigError) as info:
            MsPASSCluster(work_dir=str(home), **SMALL)
        assert f'database="{ident}"' in str(info.value) and "db_dir='<another folder>'" in str(info.value)

        db_stop(ident)
        with pytest.raises(JobFailedError) as info:
            cluster.get_db_client()
        assert f"shared database {ident} ended while this cluster was using it" in str(info.value)
        assert f"db start --db-dir {record.db_dir}" in str(info.value)
        assert "lost" in str(cluster)

        again, record2, _ = db_start(home, port=record.port)  # a port of its own: the tests share the nodes
        assert again == ident and record2.job_id != record.job_id and record2.uri != record.uri  # new credentials
        # The cluster's watch finds it again and re-points what it published, here and on the workers.
        deadline = time.monotonic() + 60
        while os.environ.get("MSPASS_DB_ADDRESS") != record2.uri or cluster.database.moving:
            assert time.monotonic() < deadline, f"the cluster never found its shared database again: {cluster}"
            time.sleep(0.2)
        assert cluster.db_job.job_id == record2.job_id and cluster.db_address == record2.uri
        assert cluster.get_db_client().shared_test.docs.count_documents({}) == 20  # same data, new server
        client = cluster.get_client()
        assert client.submit(write_through_environment, "after", pure=False).result() == record2.uri
        assert cluster.get_db_client().shared_test.docs.count_documents({"tag": "after"}) == 1
        assert cluster._launcher.context.tls.db_client_pem == record2.client_pem  # for workers started from now on
    assert_nothing_left(cluster)
    assert queued([record2.job_id]) == [record2.job_id], "closing the cluster stopped the shared database"

    # A shared database whose job ended without `db stop` (a node failure): clear error, then clean-up.
    subprocess.run(["scancel", record2.job_id], check=True)
    deadline = time.monotonic() + 60
    while queued([record2.job_id]) and time.monotonic() < deadline:
        time.sleep(0.5)
    with pytest.raises(JobFailedError) as info:
        MsPASSCluster(database=ident, work_dir=str(shared_dir / "nb2"), **SMALL)
    assert f"of shared database {ident} is not running" in str(info.value)
    assert f"db start --db-dir {record.db_dir}" in str(info.value)
    assert not os.path.exists(shared_dir / "nb2" / "logs" / "mspass-worker-0.sh")
    assert "ended (CANCELLED)" in cli("db", "status").stdout
    assert "was not running" in db_stop(ident)
    assert standalone_db.all_records() == []


@pytest.mark.slurm
def test_a_directory_held_by_a_cluster_says_how_to_share_it(slurm_testbed, shared_dir, state_home):
    work = shared_dir / "run"
    with MsPASSCluster(work_dir=str(work), db_command=FAKE_MONGOD, db_port=db_port(), **SMALL) as first:
        with pytest.raises(ConfigError) as info:
            MsPASSCluster(work_dir=str(work), db_command=FAKE_MONGOD, **SMALL)
        text = str(info.value)
        ident = standalone_db.database_id(first.options.db_dir)
        assert f"mspass-cluster down {first.cluster_id}" in text and "db_dir='<another folder>'" in text
        assert f"mspass-cluster db start --db-dir {first.options.db_dir}" in text and f'database="{ident}"' in text
        out = cli("db", "start", "--work-dir", str(work))
        assert out.returncode == 2 and f"cluster {first.name}" in out.stderr and "--db-dir" in out.stderr
    assert_nothing_left(first)
    assert standalone_db.all_records() == []


@pytest.mark.slurm
def test_bad_ids_and_uris_are_refused_before_anything_is_submitted(slurm_testbed, shared_dir, state_home):
    work = shared_dir / "nb"
    for value, words in (
        ("1a2b3c4d", "is not the id of a shared database of yours"),
        ("n1:27017", "nor a connection string starting with mongodb://"),
        ("mongodb://n1:27017,n2:27017/", "names 2 servers"),
        ("mongodb://me:secret@n1:27017/", "cannot hand on username/password"),
    ):
        with pytest.raises(ConfigError, match=re.escape(words)):
            MsPASSCluster(database=value, work_dir=str(work), **SMALL)
    assert not (work / "logs").exists() or not list((work / "logs").glob("*.sh"))
    assert not list((work / ".mspass_cluster").iterdir()), "the cluster's credentials were left behind"

    # A server that does not answer: start-up says what it waited for, and leaves nothing queued.
    with pytest.raises(StartupTimeoutError) as info:
        MsPASSCluster(database="mongodb://n1:27999/", work_dir=str(work), startup_timeout=5, **SMALL)
    assert "the database at mongodb://n1:27999/" in str(info.value) and "not answering" in str(info.value)
    scripts = [p.stem for p in (work / "logs").glob("*.sh")]
    assert scripts and not [n for n in scripts if n in subprocess.check_output(["squeue", "-h", "-o", "%j"], text=True)]


def test_database_ids_records_and_uris(tmp_path, state_home, monkeypatch):
    assert standalone_db.database_id(str(tmp_path / "db")) == standalone_db.database_id(str(tmp_path / "x/../db/"))
    for db_dir, job in (("/d/one", "11"), ("/d/two", "12")):
        record = standalone_db.SharedDatabase(
            id=standalone_db.database_id(db_dir),
            name="n",
            db_dir=db_dir,
            work_dir="/d",
            log_dir="/d/logs",
            port=27017,
            heartbeat="/d/hb",
            walltime="10",
            started="now",
            job_id=job,
        )
        standalone_db.write_record(record)
    ids = sorted(r.id for r in standalone_db.all_records())
    assert standalone_db.find_record(ids[0][:4]).id == ids[0] or ids[0][:4] == ids[1][:4]
    with pytest.raises(ConfigError, match="ids are matched whole"):
        standalone_db.find_record("ffff0000" if "ffff0000" not in ids else "eeee0000")
    with pytest.raises(ConfigError, match="4 characters"):
        standalone_db.find_record(ids[0][:3])
    assert stat.S_IMODE(os.stat(standalone_db.registry_dir()).st_mode) == 0o700
    registry = standalone_db.registry_dir()
    os.chmod(registry, 0o777)
    with pytest.raises(ConfigError, match="not yours alone"):
        standalone_db.all_records()
    os.chmod(registry, 0o700)


def test_a_plain_or_x509_connection_string_is_handed_on_as_is(tmp_path, state_home):
    from mspass_cluster.security import ClusterCredentials, db_client_uri

    plain = find_database(resolve_options(database="mongodb://dbhost:27100/", work_dir=str(tmp_path)), CommandRunner())
    assert (plain.host, plain.port, plain.client_pem, plain.uri) == ("dbhost", 27100, None, "mongodb://dbhost:27100/")
    options, tls = plain.adopted(resolve_options(work_dir=str(tmp_path)), None)
    assert options.db_port == 27100 and tls is None

    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "db-client.pem").write_text("")
    uri = db_client_uri("dbhost", 27200, str(tmp_path / "ca.pem"), str(tmp_path / "db-client.pem"))
    secure = find_database(resolve_options(database=uri, work_dir=str(tmp_path)), CommandRunner())
    assert secure.uri == uri
    own = ClusterCredentials.create(str(tmp_path / "own")).files
    options, tls = secure.adopted(resolve_options(work_dir=str(tmp_path)), own)
    assert tls.db_uri("dbhost", options.db_port) == uri and tls.worker_cert == own.worker_cert
    with pytest.raises(ConfigError, match="security=False"):
        secure.adopted(resolve_options(work_dir=str(tmp_path)), None)
    with pytest.raises(ConfigError, match="must exist on this machine"):
        find_database(resolve_options(database=uri.replace("ca.pem", "no.pem"), work_dir=str(tmp_path)), None)


@pytest.mark.slurm
def test_down_stops_a_shared_database_cleanly(slurm_testbed, shared_dir, state_home):
    ident, record, _ = db_start(shared_dir / "dbhome")
    out = cli("down", ident, "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Shared database {ident} stopped cleanly (job {record.job_id}, server exit status 0)" in out.stdout
    assert queued([record.job_id]) == []
    assert standalone_db.all_records() == [] and not os.path.exists(record.private_dir)


def test_a_connection_string_on_the_desktop_is_used_then_lost_when_its_server_goes(tmp_path, state_home):
    from mspass_cluster import MsPASSClusterError

    owner = MsPASSCluster(backend="local", nodes=1, work_dir=str(tmp_path / "owner"), db_command=NX_MONGOD)
    try:
        with MsPASSCluster(
            backend="local", nodes=1, work_dir=str(tmp_path / "user"), database=owner.db_address, poll_interval=0.5
        ) as user:
            assert user.db_job is None and user.db_address == owner.db_address
            assert os.environ["MSPASS_DB_ADDRESS"] == owner.db_address
            user.get_db_client().shared_test.docs.insert_one({"from": "user"})
            assert owner.get_db_client().shared_test.docs.count_documents({"from": "user"}) == 1
            owner.close()
            deadline = time.monotonic() + 30
            while user.database.lost() is None:
                assert time.monotonic() < deadline, "the lost database was never noticed"
                time.sleep(0.2)
            with pytest.raises(MsPASSClusterError, match="stopped answering"):
                user.get_db_client()
            assert "lost (the database at mongodb://127.0.0.1:" in str(user)
    finally:
        owner.close()


def test_submit_hands_an_all_digit_id_to_the_notebook_as_text(tmp_path):
    from mspass_cluster.submit import render_submit_script

    notebook = tmp_path / "flow.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), notebook)
    script = render_submit_script(str(notebook), nodes=1, walltime="10", database="64659630")
    export = next(line for line in script.splitlines() if "DASK_MSPASS_CLUSTER__DATABASE" in line)
    read = (
        f"{sys.executable} -c 'import dask, mspass_cluster; print(repr(dask.config.get(\"mspass_cluster.database\")))'"
    )
    out = subprocess.run(["bash", "-c", f"{export}; {read}"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "'64659630'"  # dask reads DASK_* values as Python literals: quoted, it stays text
