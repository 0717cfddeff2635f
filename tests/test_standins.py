"""Pin the behaviour of the mongod stand-ins in ``tests/bin``.

The package's tests start ``tests/bin/fake_mongod.py`` (process handling) and
``mspass_cluster.embedded_db`` (nx-27017, data path) in place of ``mongod``; these tests
check that the stand-ins behave as ``mongod`` 7.0 does where the package
relies on it, so that a green suite elsewhere means something.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Callable

import bson
import gridfs
import pymongo
import pytest
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError, ServerSelectionTimeoutError

BIN = Path(__file__).resolve().parent / "bin"
FAKE = (str(BIN / "fake_mongod.py"),)
# The nx-27017 adapter ships in the package: it is also the local backend's embedded database.
NX = ("-m", "mspass_cluster.embedded_db")
DEADLINE = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _text_or_empty(path) -> str:
    """A log's text, or "" while it does not exist (it may be between rotation and re-creation)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def wait_until(predicate: Callable[[], object], what: str, timeout: float = DEADLINE):
    """Poll ``predicate`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def client(port: int, timeout_ms: int = 2000) -> pymongo.MongoClient:
    """A direct pymongo client, as the package's readiness probe builds it."""
    return pymongo.MongoClient(
        f"mongodb://127.0.0.1:{port}/",
        directConnection=True,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
    )


def log_records(text: str) -> list[dict]:
    """The JSON log lines in ``text`` (other lines skipped)."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


class Server:
    """A stand-in started by a test, with its output in files (no pipes to fill up)."""

    def __init__(self, proc: subprocess.Popen, port: int, stdout: Path, stderr: Path):
        self.proc = proc
        self.port = port
        self.stdout_path = stdout
        self.stderr_path = stderr

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def answers_ping(self) -> bool:
        """One quick ``ping``; fails the test at once if the process has exited."""
        if self.proc.poll() is not None:
            pytest.fail(
                f"stand-in exited with {self.proc.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
            )
        with client(self.port, timeout_ms=250) as probe:
            try:
                probe.admin.command("ping")
            except PyMongoError:
                return False
        return True

    def wait_ready(self) -> Server:
        wait_until(self.answers_ping, f"ping on port {self.port}")
        return self

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def launch(tmp_path: Path):
    """Start a stand-in script; every process started is killed by its PID at teardown."""
    started: list[subprocess.Popen] = []

    def _launch(script: tuple, *args: str, port: int | None = None, env: dict[str, str] | None = None) -> Server:
        name = f"{'fake' if script == FAKE else 'nx'}-{len(started)}"
        stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, *script, *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        started.append(proc)
        return Server(proc, port, stdout, stderr)

    yield _launch
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(DEADLINE)


@pytest.fixture
def dbpath(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def start_fake(launch, dbpath: Path, *extra: str, port: int | None = None, env=None) -> Server:
    """fake_mongod on 127.0.0.1 with the package's usual options."""
    port = port or free_port()
    return launch(
        FAKE,
        "--port",
        str(port),
        "--dbpath",
        str(dbpath),
        "--bind_ip",
        "127.0.0.1",
        "--nounixsocket",
        *extra,
        port=port,
        env=env,
    )


def run_once(script: tuple, *args: str) -> subprocess.CompletedProcess:
    """Run a stand-in that is expected to exit on its own."""
    return subprocess.run(
        [sys.executable, *script, *args], capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL
    )


# --------------------------------------------------------------------------- both stand-ins: command line

BOTH = pytest.mark.parametrize("script", [FAKE, NX], ids=["fake", "nx"])


@BOTH
def test_unknown_option_exits_2_with_mongods_message(script):
    result = run_once(script, "--port", "1", "--xyz", "3")
    assert result.returncode == 2
    assert "Error parsing command line: unrecognised option '--xyz'" in result.stderr
    assert "try 'mongod --help' for more information" in result.stderr


@BOTH
def test_unknown_option_in_equals_form(script):
    result = run_once(script, "--xyz=3")
    assert result.returncode == 2
    assert "unrecognised option '--xyz'" in result.stderr


@BOTH
def test_fork_is_refused(script, dbpath):
    result = run_once(script, "--dbpath", str(dbpath), "--fork")
    assert result.returncode == 2
    assert "--fork is not supported" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "abc"], "the argument ('abc') for option '--port' is invalid"),
        (["--port"], "the required argument for option '--port' is missing"),
        (["--port", "1", "--port", "2"], "option '--port' cannot be specified more than once"),
        (["--bind_ip", "127.0.0.1", "--bind_ip_all"], "net.bindIp and net.bindIpAll are mutually exclusive"),
        (["--quiet=yes"], "option '--quiet' does not take any arguments"),
        (["stray"], "too many positional options"),
    ],
)
def test_bad_values_exit_2(args, message):
    result = run_once(FAKE, *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "Invalid value for net.port: 70000 is not in range [0, 65535]"),
        (["--wiredTigerCacheSizeGB", "lots"], "the argument ('lots') for option '--wiredTigerCacheSizeGB' is invalid"),
        (["--bind_ip", "127.0.0.1", "--bind_ip_all"], "net.bindIp and net.bindIpAll are mutually exclusive"),
        (["--nounixsocket=yes"], "option '--nounixsocket' does not take any arguments"),
    ],
)
def test_nx_bad_values_of_the_clusters_options_exit_2(args, message):
    result = run_once(NX, *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("option", ["--setParameter", "--unixSocketPrefix", "--quiet", "--keyFile"])
def test_nx_refuses_mongod_options_it_would_not_honour(option):
    # The embedded database accepts only what the cluster gives mongod (--replSet, --configsvr and --shardsvr
    # included: the sharded roles give them, see test_sharded.py); anything else would be silently ignored, so it is refused as mongod refuses a typo.
    result = run_once(NX, option, "x") if option != "--quiet" else run_once(NX, option)
    assert result.returncode == 2
    assert f"Error parsing command line: unrecognised option '{option}'" in result.stderr


@pytest.mark.parametrize(
    ("script", "banner"), [(FAKE, "db version v7.0.0-fake"), (NX, "db version v7.0.0")], ids=["fake", "nx"]
)
def test_version_prints_banner_and_exits_0(script, banner):
    result = run_once(script, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith(banner)


@BOTH
def test_missing_dbpath_exits_100(script, tmp_path):
    missing = tmp_path / "no-such-dir"
    result = run_once(script, "--port", str(free_port()), "--dbpath", str(missing), "--nounixsocket")
    assert result.returncode == 100
    assert f"NonExistentPath: Data directory {missing} not found." in result.stdout
    assert log_records(result.stdout)[-1]["attr"] == {"exitCode": 100}
    assert not missing.exists()


# --------------------------------------------------------------------------- fake_mongod


def test_fake_answers_admin_commands(launch, dbpath):
    port = free_port()
    server = launch(
        FAKE,
        f"--port={port}",
        f"--dbpath={dbpath}",
        "--bind_ip=127.0.0.1",
        "--nounixsocket",
        "--wiredTigerCacheSizeGB",
        "0.25",
        port=port,
    ).wait_ready()
    with client(port) as c:
        assert c.admin.command("ping")["ok"] == 1
        hello = c.admin.command("hello")
        assert hello["isWritablePrimary"] is True
        assert (hello["minWireVersion"], hello["maxWireVersion"]) == (0, 21)
        assert "setName" not in hello
        legacy = c.admin.command("isMaster", helloOk=True)
        assert legacy["ismaster"] is True and legacy["helloOk"] is True
        build = c.admin.command("buildInfo")
        assert build["version"] == "7.0.0-fake" and build["versionArray"][:3] == [7, 0, 0]
        with pytest.raises(OperationFailure) as unknown:
            c.admin.command("frobnicate")
        assert unknown.value.code == 59
        assert "no such command: 'frobnicate'" in str(unknown.value)
        opts = c.admin.command("getCmdLineOpts")
        assert opts["parsed"]["net"]["port"] == port
        assert opts["parsed"]["storage"]["wiredTiger"]["engineConfig"]["cacheSizeGB"] == 0.25
        status = c.mspass.command("serverStatus")
        assert (status["process"], status["pid"], status["version"]) == ("fake_mongod", server.proc.pid, "7.0.0-fake")
        assert any("Waiting for connections" in line for line in c.admin.command("getLog", "global")["log"])
        with pytest.raises(OperationFailure) as not_admin:
            c.mspass.command("shutdown")
        assert not_admin.value.code == 13
    assert (dbpath / "mongod.lock").read_text() == f"{server.proc.pid}\n"
    waiting = [r for r in log_records(server.stdout) if r["msg"] == "Waiting for connections"]
    assert waiting[0]["attr"]["port"] == port


def test_fake_replset_name_in_hello(launch, dbpath):
    server = start_fake(launch, dbpath, "--replSet", "rs0").wait_ready()
    with client(server.port) as c:
        assert c.admin.command("hello")["setName"] == "rs0"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_fake_signal_is_a_clean_shutdown(launch, dbpath, tmp_path, signum):
    pidfile = tmp_path / "mongod.pid"
    server = start_fake(launch, dbpath, "--pidfilepath", str(pidfile)).wait_ready()
    assert pidfile.read_text() == f"{server.proc.pid}\n"
    server.proc.send_signal(signum)
    assert server.wait_exit() == 0
    marker = json.loads((dbpath / "fake_mongod.clean_shutdown").read_text())
    assert marker["signal"] == signum.name and marker["pid"] == server.proc.pid
    # As mongod: the lock file is emptied, not removed; the pid file stays.
    assert (dbpath / "mongod.lock").read_text() == ""
    assert pidfile.exists()
    records = log_records(server.stdout)
    assert any(r["msg"] == "Received signal" and r["attr"]["signal"] == signum for r in records)
    assert records[-1]["msg"] == "Shutting down" and records[-1]["attr"] == {"exitCode": 0}


def test_fake_shutdown_command_closes_connection_and_exits_0(launch, dbpath):
    server = start_fake(launch, dbpath).wait_ready()
    with client(server.port) as c, pytest.raises(ConnectionFailure):
        c.admin.command("shutdown", force=True)
    assert server.wait_exit() == 0
    marker = json.loads((dbpath / "fake_mongod.clean_shutdown").read_text())
    assert marker["signal"] == "shutdown-command"
    assert (dbpath / "mongod.lock").read_text() == ""
    assert "Terminating via shutdown command" in server.stdout


def test_fake_kill_leaves_lock_and_next_start_reports_unclean(launch, dbpath):
    first = start_fake(launch, dbpath).wait_ready()
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    assert (dbpath / "fake_mongod.clean_shutdown").exists()

    second = start_fake(launch, dbpath).wait_ready()
    assert not (dbpath / "fake_mongod.clean_shutdown").exists(), "marker must describe the latest run only"
    assert "Detected unclean shutdown" not in second.stdout
    second.proc.kill()
    assert second.wait_exit() == -signal.SIGKILL
    assert (dbpath / "mongod.lock").read_text() == f"{second.proc.pid}\n"
    assert not (dbpath / "fake_mongod.clean_shutdown").exists()

    third = start_fake(launch, dbpath).wait_ready()
    assert "Detected unclean shutdown - Lock file is not empty" in third.stdout
    assert (dbpath / "mongod.lock").read_text() == f"{third.proc.pid}\n"


def test_fake_second_instance_on_same_dbpath_is_refused(launch, dbpath):
    first = start_fake(launch, dbpath).wait_ready()
    result = run_once(FAKE, "--port", str(free_port()), "--dbpath", str(dbpath), "--nounixsocket")
    assert result.returncode == 100
    assert (
        f"DBPathInUse: Unable to lock the lock file: {dbpath}/mongod.lock (Resource temporarily "
        f"unavailable). Another mongod instance is already running on the {dbpath} directory"
    ) in result.stdout
    assert first.answers_ping()
    assert (dbpath / "mongod.lock").read_text() == f"{first.proc.pid}\n"


def test_fake_port_in_use_exits_48(dbpath):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_once(
            FAKE, "--port", str(port), "--dbpath", str(dbpath), "--bind_ip", "127.0.0.1", "--nounixsocket"
        )
    assert result.returncode == 48
    failure = [r for r in log_records(result.stdout) if r["msg"] == "Error setting up listener"]
    assert failure[0]["attr"]["error"]["errmsg"] == "Address already in use"
    # The listener comes before the data directory, as in mongod: it was never locked.
    assert not (dbpath / "mongod.lock").exists()


def test_fake_logpath_receives_the_log(launch, dbpath, tmp_path):
    logpath = tmp_path / "mongod.log"
    logpath.write_text("previous run\n")
    server = start_fake(launch, dbpath, "--logpath", str(logpath))
    # The server renames the old log aside, then creates the new one, as mongod does: between the two, no file.
    wait_until(
        lambda: "Waiting for connections" in _text_or_empty(logpath),
        "Waiting for connections in --logpath",
    )
    assert server.answers_ping()
    assert server.stdout == ""
    assert "previous run" not in logpath.read_text()
    rotated = [p for p in tmp_path.iterdir() if p.name.startswith("mongod.log.")]
    assert [p.read_text() for p in rotated] == ["previous run\n"]
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0

    again = start_fake(launch, dbpath, "--logpath", str(logpath), "--logappend").wait_ready()
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    starts = [r for r in log_records(logpath.read_text()) if r["msg"] == "MongoDB starting"]
    assert [r["attr"]["pid"] for r in starts] == [server.proc.pid, again.proc.pid]


def test_fake_is_not_ready_during_startup_delay(launch, dbpath):
    server = start_fake(launch, dbpath, env={"FAKE_MONGOD_STARTUP_DELAY": "4"})

    def tcp_connects() -> bool:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    # Like mongod, the port accepts TCP connections before the server answers.
    wait_until(tcp_connects, "the listening socket")
    with client(server.port, timeout_ms=300) as c, pytest.raises(ServerSelectionTimeoutError):
        c.admin.command("ping")
    assert "Waiting for connections" not in server.stdout
    server.wait_ready()
    assert "Waiting for connections" in server.stdout


def test_fake_sigterm_during_startup_is_clean(launch, dbpath):
    server = start_fake(launch, dbpath, env={"FAKE_MONGOD_STARTUP_DELAY": "600"})
    wait_until(lambda: (dbpath / "mongod.lock").exists() and (dbpath / "mongod.lock").read_text(), "the lock file")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert json.loads((dbpath / "fake_mongod.clean_shutdown").read_text())["signal"] == "SIGTERM"


def test_fake_unix_socket(launch, dbpath, tmp_path):
    port = free_port()
    server = launch(
        FAKE, "--port", str(port), "--dbpath", str(dbpath), "--unixSocketPrefix", str(tmp_path), port=port
    ).wait_ready()
    path = tmp_path / f"mongodb-{port}.sock"
    assert path.is_socket()
    uri = f"mongodb://{urllib.parse.quote_plus(str(path))}/"
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000) as c:
        assert c.admin.command("ping")["ok"] == 1
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not path.exists()


@pytest.mark.parametrize(
    "bind", [["--bind_ip", "localhost,127.0.0.1"], ["--bind_ip_all"]], ids=["hostname-and-duplicate", "all"]
)
def test_fake_bind_options(launch, dbpath, bind):
    port = free_port()
    launch(FAKE, "--port", str(port), "--dbpath", str(dbpath), "--nounixsocket", *bind, port=port).wait_ready()


def test_fake_many_concurrent_connections(launch, dbpath):
    server = start_fake(launch, dbpath, "--quiet").wait_ready()
    with pymongo.MongoClient(
        f"mongodb://127.0.0.1:{server.port}/", directConnection=True, maxPoolSize=64, serverSelectionTimeoutMS=5000
    ) as c:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda _: c.admin.command("ping")["ok"], range(400)))
        assert replies == [1.0] * 400
        assert c.admin.command("serverStatus")["connections"]["totalCreated"] > 2
    assert "Connection accepted" not in server.stdout


def _raw_exchange(port: int, opcode: int, payload: bytes) -> tuple[int, bytes]:
    """Send one wire-protocol message; return (opcode, payload) of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("<iiii", 16 + len(payload), 7, 0, opcode) + payload)
        header = b""
        while len(header) < 16:
            header += sock.recv(16 - len(header))
        length, _, response_to, reply_opcode = struct.unpack("<iiii", header)
        assert response_to == 7
        body = b""
        while len(body) < length - 16:
            body += sock.recv(length - 16 - len(body))
    return reply_opcode, body


def _op_query(namespace: str, query: dict) -> bytes:
    return struct.pack("<i", 0) + namespace.encode() + b"\0" + struct.pack("<ii", 0, -1) + bson.encode(query)


def test_fake_wire_protocol_legacy_handshake_and_sequences(launch, dbpath):
    server = start_fake(launch, dbpath).wait_ready()
    opcode, body = _raw_exchange(server.port, 2004, _op_query("admin.$cmd", {"isMaster": 1, "helloOk": True}))
    assert opcode == 1
    reply = bson.decode(body[20:])
    assert reply["ismaster"] is True and reply["helloOk"] is True and reply["maxWireVersion"] == 21

    opcode, body = _raw_exchange(server.port, 2004, _op_query("test.coll", {"find": "coll"}))
    assert opcode == 1 and bson.decode(body[20:])["code"] == 352

    docs = b"".join(bson.encode({"i": i}) for i in range(3))
    sequence = b"documents\0" + docs
    message = (
        struct.pack("<I", 0)
        + b"\0"
        + bson.encode({"ping": 1, "$db": "admin"})
        + b"\1"
        + struct.pack("<i", 4 + len(sequence))
        + sequence
    )
    opcode, body = _raw_exchange(server.port, 2013, message)
    assert opcode == 2013 and bson.decode(body[5:]) == {"ok": 1.0}


# --------------------------------------------------------------------------- nx_mongod


def test_nx_stores_documents_and_gridfs_files_across_restarts(launch, dbpath, tmp_path):
    pidfile = tmp_path / "nx.pid"
    port = free_port()
    server = launch(
        NX,
        "--port",
        str(port),
        "--dbpath",
        str(dbpath),
        "--bind_ip",
        "127.0.0.1",
        "--nounixsocket",
        "--wiredTigerCacheSizeGB",
        "0.25",
        "--pidfilepath",
        str(pidfile),
        port=port,
    ).wait_ready()
    assert "nx-27017" in server.stdout
    # The adapter runs nx-27017 in its own process: the PID the launcher knows is the server's.
    assert pidfile.read_text().strip() == str(server.proc.pid)
    payload = os.urandom(700_000)  # several GridFS chunks
    with client(port) as c:
        db = c.mspass
        db.wf_TimeSeries.insert_many([{"sta": f"S{i:02d}", "npts": i * 10} for i in range(50)])
        assert db.wf_TimeSeries.count_documents({"npts": {"$gte": 250}}) == 25
        assert db.wf_TimeSeries.find_one({"sta": "S07"})["npts"] == 70
        file_id = gridfs.GridFS(db).put(payload, filename="trace.bin")
        assert gridfs.GridFS(db).get(file_id).read() == payload

    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 10

    port = free_port()
    again = launch(NX, "--port", str(port), "--dbpath", str(dbpath), "--bind_ip_all", port=port).wait_ready()
    with client(port) as c:
        db = c.mspass
        assert db.wf_TimeSeries.count_documents({}) == 50
        assert db.wf_TimeSeries.find_one({"sta": "S49"})["npts"] == 490
        assert gridfs.GridFS(db).get(file_id).read() == payload
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait_exit(timeout=10) == 0


# --------------------------------------------------------------------------- the readiness probe against them


def test_readiness_probe_refuses_a_server_that_is_not_the_clusters(launch, dbpath, tmp_path):
    from mspass_cluster.db import ping

    server = start_fake(launch, dbpath).wait_ready()
    uri = f"mongodb://127.0.0.1:{server.port}/"
    assert ping(uri, 2.0, str(dbpath)) is None
    assert ping(uri, 2.0) is None
    other = str(tmp_path / "someone-else" / "data")
    assert ping(uri, 2.0, other) == (
        f"a server that is not this cluster's answers there (its dbPath is {dbpath}, not {other})"
    )


def test_readiness_probe_takes_the_nx_stand_in_at_its_word(launch, dbpath):
    from mspass_cluster.db import ping

    port = free_port()
    launch(NX, "--port", str(port), "--dbpath", str(dbpath), "--bind_ip", "127.0.0.1", port=port).wait_ready()
    # nx-27017 answers getCmdLineOpts without saying its dbPath: nothing to compare (a stand-in limit).
    assert ping(f"mongodb://127.0.0.1:{port}/", 2.0, "/not/its/path") is None
