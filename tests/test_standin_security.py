"""The mongod stand-ins really enforce the secure command line, and the first-user script works against them.

Both stand-ins (``fake_mongod.py`` and ``mspass_cluster.embedded_db``) run as
subprocesses with the options the cluster gives ``mongod`` when security is
on (``--auth --tlsMode requireTLS --tlsCertificateKeyFile --tlsCAFile``) and
certificates from :class:`mspass_cluster.security.ClusterCredentials`; real
pymongo clients (and raw sockets) connect over TCP and TLS. A refusal here is
the server's refusal, so the package's tests of a secure cluster mean
something. The gate's rules are also pinned without a server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import bson
import gridfs
import pymongo
import pytest
from conftest import FAKE_MONGOD, NX_MONGOD
from pymongo.errors import OperationFailure, PyMongoError, ServerSelectionTimeoutError

from mspass_cluster import _mongod_security as security
from mspass_cluster.security import ClusterCredentials

STANDINS = {"fake": FAKE_MONGOD, "nx": NX_MONGOD}
BOTH = pytest.mark.parametrize("standin", ["fake", "nx"])
DB_USERS = Path(__file__).resolve().parent.parent / "mspass_cluster" / "templates" / "db_users.py"
DEADLINE = 20.0
REFUSED_WITHIN_MS = 500
ROOT = [{"role": "root", "db": "admin"}]
SOMEONE_ELSE = "CN=someone-else,OU=mspass-client,O=mspass_cluster"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> ClusterCredentials:
    return ClusterCredentials.create(str(tmp_path_factory.mktemp("creds") / "cluster"), user="alice")


@pytest.fixture(scope="module")
def other_creds(tmp_path_factory) -> ClusterCredentials:
    """The same user name, certified by another CA."""
    return ClusterCredentials.create(str(tmp_path_factory.mktemp("creds") / "other"), user="alice")


class Server:
    """A stand-in started with the secure command line."""

    def __init__(self, standin: str, proc: subprocess.Popen, host: str, port: int, dbpath: Path, output: Path):
        self.standin, self.proc, self.host, self.port, self.dbpath, self.output = (
            standin,
            proc,
            host,
            port,
            dbpath,
            output,
        )

    def client(self, cert: str | None, ca: str, *, timeout_ms: int = 3000, **options) -> pymongo.MongoClient:
        """A direct TLS client (no authentication unless ``options`` ask for it)."""
        if cert is not None:
            options["tlsCertificateKeyFile"] = cert
        return pymongo.MongoClient(
            self.host,
            self.port,
            tls=True,
            tlsCAFile=ca,
            tlsAllowInvalidHostnames=True,
            directConnection=True,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            **options,
        )

    def x509(self, creds: ClusterCredentials) -> pymongo.MongoClient:
        """The cluster's client, exactly as its connection string says."""
        return pymongo.MongoClient(
            creds.db_uri(self.host, self.port), directConnection=True, serverSelectionTimeoutMS=3000
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(DEADLINE)


def secure_argv(standin: str, creds: ClusterCredentials, port: int, dbpath: Path, bind: str) -> list[str]:
    return [
        *STANDINS[standin],
        "--port",
        str(port),
        "--dbpath",
        str(dbpath),
        "--bind_ip",
        bind,
        "--nounixsocket",
        "--wiredTigerCacheSizeGB",
        "0.25",
        "--auth",
        "--tlsMode",
        "requireTLS",
        "--tlsCertificateKeyFile",
        creds.db_server_pem,
        "--tlsCAFile",
        creds.ca_file,
    ]


def _start(standin: str, creds: ClusterCredentials, directory: Path, started: list, dbpath: Path | None, bind: str):
    if dbpath is None:
        dbpath = directory / f"data-{len(started)}"
        dbpath.mkdir()
    port = free_port()
    output = directory / f"{standin}-{len(started)}.log"
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            secure_argv(standin, creds, port, dbpath, bind),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    started.append(proc)
    server = Server(standin, proc, bind, port, dbpath, output)
    deadline = time.monotonic() + DEADLINE
    with server.client(creds.db_client_pem, creds.ca_file, timeout_ms=250) as probe:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{standin} exited with {proc.returncode}:\n{output.read_text()}")
            try:
                probe.admin.command("ping")  # a handshake command: allowed before authentication
                return server
            except PyMongoError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{standin} did not answer ping over TLS within {DEADLINE:g} s:\n{output.read_text()}")


def _kill(started: list) -> None:
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(DEADLINE)


@pytest.fixture
def start(tmp_path, creds):
    """Start a stand-in with the secure command line; every process started is killed by its PID at teardown."""
    started: list[subprocess.Popen] = []

    def _launch(standin: str, *, dbpath: Path | None = None, bind: str = "127.0.0.1") -> Server:
        return _start(standin, creds, tmp_path, started, dbpath, bind)

    yield _launch
    _kill(started)


@pytest.fixture(scope="module", params=["fake", "nx"])
def pristine(request, tmp_path_factory, creds):
    """A secure stand-in without users, shared by the tests that change nothing."""
    started: list[subprocess.Popen] = []
    server = _start(request.param, creds, tmp_path_factory.mktemp(request.param), started, None, "127.0.0.1")
    yield server
    _kill(started)


@pytest.fixture(scope="module", params=["fake", "nx"])
def populated(request, tmp_path_factory, creds):
    """A secure stand-in whose one user, the cluster's client subject, was created through the localhost exception."""
    started: list[subprocess.Popen] = []
    server = _start(request.param, creds, tmp_path_factory.mktemp(request.param), started, None, "127.0.0.1")
    create_first_user(server, creds, creds.db_user)
    yield server
    _kill(started)


def refused(command: str):
    """``pytest.raises`` for mongod's refusal of an unauthenticated command."""
    return pytest.raises(OperationFailure, match=f"^command {command} requires authentication")


def create_first_user(server: Server, creds: ClusterCredentials, subject: str) -> None:
    with server.client(creds.db_client_pem, creds.ca_file) as c:
        assert c["$external"].command("createUser", subject, roles=ROOT) == {"ok": 1.0}


def run_db_users(server_port: int, creds: ClusterCredentials, *, timeout: float = 10) -> subprocess.CompletedProcess:
    """The first-user script as the db job runs it: ``python - ARGS`` with the script on stdin."""
    with open(DB_USERS, "rb") as script:
        return subprocess.run(
            [
                sys.executable,
                "-",
                "--port",
                str(server_port),
                "--ca",
                creds.ca_file,
                "--cert",
                creds.db_client_pem,
                "--subject",
                creds.db_user,
                "--timeout",
                str(timeout),
            ],
            stdin=script,
            capture_output=True,
            text=True,
            timeout=timeout + DEADLINE,
            cwd="/",
            env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
        )


# --------------------------------------------------------------------------- command line


@BOTH
def test_help_lists_the_security_options(standin):
    result = subprocess.run([*STANDINS[standin], "--help"], capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 0
    for option in ("--auth ", "--tlsMode arg", "--tlsCertificateKeyFile arg", "--tlsCAFile arg"):
        assert option in result.stdout
    assert "not enforced" not in result.stdout.split("--auth", 1)[1].splitlines()[0]


# (arguments, exit status, message on stderr): mongod's checks of the TLS options, and the stand-ins' refusals.
TLS_OPTION_ERRORS = [
    (["--tlsMode", "bogus"], 2, "BadValue: unsupported value for tlsMode bogus"),
    (
        ["--tlsMode", "requireTLS"],
        2,
        "BadValue: need tlsCertificateKeyFile or certificateSelector when TLS is enabled",
    ),
    (["--tlsCAFile", "/x.pem"], 2, "BadValue: need to enable TLS via the sslMode/tlsMode flag"),
    (
        ["--tlsMode", "allowTLS", "--tlsCertificateKeyFile", "/x"],
        2,
        "--tlsMode allowTLS is not supported by this mongod stand-in",
    ),
    (["--tlsMode", "preferTLS", "--tlsCertificateKeyFile", "/x"], 2, "--tlsMode preferTLS is not supported"),
    (
        ["--tlsMode", "requireTLS", "--tlsCertificateKeyFile", "/no/such.pem", "--tlsCAFile", "/no/ca.pem"],
        1,
        "Failed global initialization: InvalidSSLConfiguration: Can not set up PEM key file.",
    ),
]


@pytest.mark.parametrize(("args", "status", "message"), TLS_OPTION_ERRORS)
def test_tls_option_errors(args, status, message, tmp_path):
    result = subprocess.run(
        [*NX_MONGOD, "--dbpath", str(tmp_path), *args], capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == status
    assert message in result.stderr


@pytest.mark.parametrize(("args", "status", "message"), [TLS_OPTION_ERRORS[3], TLS_OPTION_ERRORS[5]])
def test_fake_refuses_tls_options_the_same_way(args, status, message, tmp_path):
    # The parser and the TLS context are the package's, shared by both stand-ins: two cases show the fake uses them.
    result = subprocess.run(
        [*FAKE_MONGOD, "--dbpath", str(tmp_path), *args], capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == status
    assert message in result.stderr


def test_tls_without_a_ca_file_is_refused(creds, tmp_path):
    result = subprocess.run(
        [
            *NX_MONGOD,
            "--dbpath",
            str(tmp_path),
            "--tlsMode",
            "requireTLS",
            "--tlsCertificateKeyFile",
            creds.db_server_pem,
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 1
    assert "The use of TLS without specifying a chain of trust is no longer supported" in result.stderr


# --------------------------------------------------------------------------- transport


def test_plain_tcp_client_gets_nothing_usable(pristine):
    with pymongo.MongoClient(
        pristine.host, pristine.port, directConnection=True, serverSelectionTimeoutMS=REFUSED_WITHIN_MS
    ) as plain:
        with pytest.raises(ServerSelectionTimeoutError):
            plain.admin.command("ping")
    # Byte level: a wire-protocol hello gets no wire-protocol reply, only the end of the connection (or a TLS alert).
    message = struct.pack("<I", 0) + b"\0" + bson.encode({"hello": 1, "$db": "admin"})
    with socket.create_connection((pristine.host, pristine.port), timeout=5) as sock:
        sock.sendall(struct.pack("<iiii", 16 + len(message), 1, 0, 2013) + message)
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass  # the TLS library's way of refusing, too
    assert answer == b"" or answer[0] == 0x15, answer[:32]


def test_tls_client_without_a_certificate_is_refused(pristine, creds):
    with pristine.client(None, creds.ca_file, timeout_ms=REFUSED_WITHIN_MS) as c:
        with pytest.raises(ServerSelectionTimeoutError):
            c.admin.command("ping")


def test_certificate_from_another_ca_is_refused(pristine, creds, other_creds):
    # The client trusts the server (creds' CA), but its own certificate comes from another cluster's CA.
    with pristine.client(other_creds.db_client_pem, creds.ca_file, timeout_ms=REFUSED_WITHIN_MS) as c:
        with pytest.raises(ServerSelectionTimeoutError):
            c.admin.command("ping")


def test_the_clusters_client_certificate_completes_the_handshake(pristine, creds):
    with pristine.client(creds.db_client_pem, creds.ca_file) as c:
        assert c.admin.command("ping")["ok"] == 1


# --------------------------------------------------------------------------- --auth before authentication


def test_unauthenticated_connection_runs_only_handshake_commands(pristine, creds):
    with pristine.client(creds.db_client_pem, creds.ca_file) as c:
        assert c.admin.command("hello")["isWritablePrimary"] is True
        assert c.admin.command("isMaster")["ok"] == 1
        assert c.admin.command("buildInfo")["version"].startswith("7.0.0")
        assert c.admin.command("connectionStatus")["authInfo"] == {
            "authenticatedUsers": [],
            "authenticatedUserRoles": [],
        }
        with refused("find") as error:
            c.mspass.wf_TimeSeries.find_one()
        assert (error.value.code, error.value.details["codeName"]) == (13, "Unauthorized")
        with refused("insert"):
            c.mspass.wf_TimeSeries.insert_one({"sta": "S01"})
        with refused("listDatabases"):
            c.list_database_names()
        with refused("serverStatus"):
            c.admin.command("serverStatus")
        with refused("usersInfo"):
            c.admin.command("usersInfo", 1)
        with refused("shutdown"):
            c.admin.command("shutdown")
        # Only admin and $external are open to the localhost exception.
        with refused("createUser"):
            c.mspass.command("createUser", "x", roles=["read"])
        assert c.admin.command("ping")["ok"] == 1
    assert pristine.proc.poll() is None


def _tls_exchange(server: Server, creds: ClusterCredentials, opcode: int, payload: bytes) -> bytes:
    """One wire-protocol message over TLS with the client certificate; the reply's body."""
    context = ssl.create_default_context(cafile=creds.ca_file)
    context.check_hostname = False
    context.load_cert_chain(creds.db_client_pem)
    with socket.create_connection((server.host, server.port), timeout=5) as raw:
        with context.wrap_socket(raw) as sock:
            sock.sendall(struct.pack("<iiii", 16 + len(payload), 7, 0, opcode) + payload)
            data = b""
            while len(data) < 16 or len(data) < struct.unpack_from("<i", data)[0]:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection without a reply"
                data += chunk
    return data[16:]


def _op_query(namespace: str, query: dict) -> bytes:
    return struct.pack("<i", 0) + namespace.encode() + b"\0" + struct.pack("<ii", 0, -1) + bson.encode(query)


def test_op_query_is_refused_before_authentication(pristine, creds):
    reply = bson.decode(_tls_exchange(pristine, creds, 2004, _op_query("admin.$cmd", {"isMaster": 1}))[20:])
    assert reply["ok"] == 1 and reply["maxWireVersion"] >= 17
    refusal = bson.decode(_tls_exchange(pristine, creds, 2004, _op_query("mspass.wf", {"sta": "S01"}))[20:])
    # nx-27017 serves a legacy find, so the gate refuses it; the fake answers as mongod 5.1+, which serves none.
    if pristine.standin == "nx":
        assert (refusal["code"], refusal["errmsg"]) == (13, "command find requires authentication")
    else:
        assert refusal["code"] == 352


def test_sasl_mechanisms_are_not_served(pristine, creds):
    with pristine.client(creds.db_client_pem, creds.ca_file) as c:
        with pytest.raises(OperationFailure) as error:
            c.admin.command("saslStart", 1, mechanism="SCRAM-SHA-256", payload=b"n,,n=x,r=abc")
    assert error.value.code == 334


# --------------------------------------------------------------------------- the localhost exception and x.509 users


@BOTH
def test_localhost_exception_creates_the_first_user_once(start, creds, standin):
    server = start(standin)
    with server.client(creds.db_client_pem, creds.ca_file) as c:
        assert c["$external"].command("createUser", creds.db_user, roles=ROOT) == {"ok": 1.0}
        # Creating the user does not authenticate the connection, and the exception is now closed.
        with refused("find"):
            c.mspass.wf_TimeSeries.find_one()
        with refused("createUser"):
            c["$external"].command("createUser", SOMEONE_ELSE, roles=ROOT)
    users_file = server.dbpath / security.USERS_FILE
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    with server.x509(creds) as c:
        users = c["$external"].command("usersInfo", 1)["users"]
    assert [(u["user"], u["db"], u["roles"]) for u in users] == [(creds.db_user, "$external", ROOT)]


@BOTH
def test_non_loopback_peer_never_gets_the_localhost_exception(start, creds, standin):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address (the gate's rule is pinned in test_gate_rules)")
    server = start(standin, bind=address)
    with server.client(creds.db_client_pem, creds.ca_file) as c:
        assert c.admin.command("ping")["ok"] == 1
        with refused("createUser"):
            c["$external"].command("createUser", creds.db_user, roles=ROOT)
    assert not (server.dbpath / security.USERS_FILE).exists()


@pytest.mark.parametrize("populated", ["nx"], indirect=True)
def test_x509_user_has_full_crud_and_gridfs_on_nx(populated, creds):
    payload = os.urandom(600_000)  # several GridFS chunks
    with populated.x509(creds) as c:
        status = c.admin.command("connectionStatus")["authInfo"]
        assert status["authenticatedUsers"] == [{"user": creds.db_user, "db": "$external"}]
        db = c.mspass
        db.wf_TimeSeries.insert_many([{"sta": f"S{i:02d}", "npts": i} for i in range(20)])
        assert db.wf_TimeSeries.count_documents({"npts": {"$gte": 10}}) == 10
        db.wf_TimeSeries.update_one({"sta": "S03"}, {"$set": {"npts": 300}})
        assert db.wf_TimeSeries.find_one({"sta": "S03"})["npts"] == 300
        file_id = gridfs.GridFS(db).put(payload, filename="trace.bin")
        assert gridfs.GridFS(db).get(file_id).read() == payload
        assert "mspass" in c.list_database_names()
    # Another connection without authentication still sees nothing.
    with populated.client(creds.db_client_pem, creds.ca_file) as c, refused("find"):
        c.mspass.wf_TimeSeries.find_one()


def test_x509_user_runs_admin_commands_on_fake(start, creds):
    server = start("fake")
    create_first_user(server, creds, creds.db_user)
    with server.x509(creds) as c:
        assert c.admin.command("serverStatus")["process"] == "fake_mongod"
        parsed = c.admin.command("getCmdLineOpts")["parsed"]
        assert parsed["security"] == {"authorization": "enabled"}
        assert parsed["net"]["tls"] == {
            "mode": "requireTLS",
            "certificateKeyFile": creds.db_server_pem,
            "CAFile": creds.ca_file,
        }
        with pytest.raises(PyMongoError):
            c.admin.command("shutdown")
    assert server.proc.wait(DEADLINE) == 0
    records = [json.loads(line) for line in server.output.read_text().splitlines() if line.startswith("{")]
    assert any(r["msg"] == "Waiting for connections" and r["attr"]["ssl"] == "on" for r in records)
    assert any(
        r["msg"] == "Successfully authenticated" and r["attr"]["principalName"] == creds.db_user for r in records
    )


def test_no_speculative_authentication_without_the_user(pristine, creds):
    speculative = {"authenticate": 1, "mechanism": "MONGODB-X509"}
    with pristine.client(creds.db_client_pem, creds.ca_file) as c:
        assert "speculativeAuthenticate" not in c.admin.command("hello", speculativeAuthenticate=speculative)
        with refused("find"):
            c.mspass.wf.find_one()


def test_speculative_authentication_in_hello(populated, creds):
    speculative = {"authenticate": 1, "mechanism": "MONGODB-X509"}
    with populated.client(creds.db_client_pem, creds.ca_file, maxPoolSize=1) as c:
        mismatched = dict(speculative, user=SOMEONE_ELSE)
        assert "speculativeAuthenticate" not in c.admin.command("hello", speculativeAuthenticate=mismatched)
        with refused("find"):
            c.mspass.wf.find_one()
        hello = c.admin.command("hello", speculativeAuthenticate=speculative)
        assert hello["speculativeAuthenticate"] == {"dbname": "$external", "user": creds.db_user}
        # The same connection is now authenticated (maxPoolSize=1: every command used it).
        status = c.admin.command("connectionStatus")["authInfo"]
        assert status["authenticatedUsers"] == [{"user": creds.db_user, "db": "$external"}]


def test_a_certificate_whose_subject_is_no_user_fails_authentication(populated, creds):
    # The server's own certificate is signed by the same CA, so the handshake succeeds; its subject is no user.
    with populated.client(
        creds.db_server_pem, creds.ca_file, authMechanism="MONGODB-X509", authSource="$external"
    ) as c:
        with pytest.raises(OperationFailure) as error:
            c.admin.command("ping")
    assert (error.value.code, error.value.details["errmsg"]) == (18, "Authentication failed.")
    with populated.client(creds.db_client_pem, creds.ca_file) as c:
        with pytest.raises(OperationFailure) as error:
            c["$external"].command("authenticate", 1, mechanism="MONGODB-X509", user=SOMEONE_ELSE)
        assert error.value.code == 18
        with pytest.raises(OperationFailure) as error:
            c.admin.command("authenticate", 1, mechanism="MONGODB-X509")
        assert error.value.code == 18
        reply = c["$external"].command("authenticate", 1, mechanism="MONGODB-X509", user=creds.db_user)
        assert reply == {"dbname": "$external", "user": creds.db_user, "ok": 1.0}


@BOTH
def test_users_persist_across_a_restart_on_the_same_data(start, creds, standin):
    first = start(standin)
    create_first_user(first, creds, creds.db_user)
    assert first.stop() == 0
    again = start(standin, dbpath=first.dbpath)
    with again.x509(creds) as c:
        assert c.admin.command("connectionStatus")["authInfo"]["authenticatedUsers"][0]["user"] == creds.db_user
    with again.client(creds.db_client_pem, creds.ca_file) as c, refused("createUser"):
        c["$external"].command("createUser", SOMEONE_ELSE, roles=ROOT)


# --------------------------------------------------------------------------- the gate without a server


def _peer_cert(subject: str) -> dict:
    """A getpeercert() dict for ``CN=...,OU=...,O=...``."""
    names = {"CN": "commonName", "OU": "organizationalUnitName", "O": "organizationName"}
    rdns = [tuple(part.split("=", 1)) for part in subject.split(",")]
    return {"subject": tuple(((names[key], value),) for key, value in reversed(rdns))}


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        (("127.0.0.1", 5000), True),
        (("127.5.6.7", 5000), True),
        (("::1", 5000, 0, 0), True),
        (("::ffff:127.0.0.1", 5000, 0, 0), True),
        ("", True),  # a Unix domain socket
        (("192.0.2.2", 5000), False),
        (("10.77.0.1", 5000), False),
        (("::ffff:10.0.0.1", 5000, 0, 0), False),
        (("fe80::1%eth0", 5000, 0, 2), False),
    ],
)
def test_which_peers_are_local(peer, local):
    assert security.is_local(peer) is local


def test_gate_rules(tmp_path):
    control = security.AccessControl(security.UserStore(str(tmp_path)), auth=True)
    alice = "CN=alice,OU=mspass-client,O=mspass_cluster"
    remote = control.session(("192.0.2.2", 4000), _peer_cert(alice))
    create = {"createUser": alice, "roles": ROOT}
    assert remote.check("createUser", "$external", create)["code"] == 13
    assert remote.check("ping", "admin", {"ping": 1}) is None
    assert remote.check("find", "mspass", {"find": "wf"})["errmsg"] == "command find requires authentication"
    local = control.session(("127.0.0.1", 4001), _peer_cert(alice))
    assert local.check("createUser", "mspass", dict(create))["code"] == 13  # not a database the exception opens
    assert local.check("createUser", "$external", {"createUser": alice, "roles": ["root"]})["code"] == 31
    assert local.check("createUser", "$external", dict(create)) == {"ok": 1.0}
    assert local.check("createUser", "$external", {"createUser": "CN=b", "roles": ROOT})["code"] == 13
    assert local.check("find", "mspass", {"find": "wf"})["code"] == 13
    reply = local.check("authenticate", "$external", {"authenticate": 1, "mechanism": "MONGODB-X509"})
    assert reply == {"dbname": "$external", "user": alice, "ok": 1.0}
    assert local.check("find", "mspass", {"find": "wf"}) is None
    assert local.check("createUser", "$external", dict(create))["code"] == 51003
    # The store is on disk: a new server on the same data has the user, and its exception is closed.
    reopened = security.AccessControl(security.UserStore(str(tmp_path)), auth=True)
    assert (
        reopened.session(("127.0.0.1", 1), None).check("createUser", "$external", {"createUser": "x", "roles": ROOT})[
            "code"
        ]
        == 13
    )
    # Dropping the user ends its authentication on every connection.
    assert local.check("dropUser", "$external", {"dropUser": alice}) == {"ok": 1.0}
    assert local.check("find", "mspass", {"find": "wf"})["code"] == 13


def test_without_auth_nothing_is_refused_but_users_still_work(tmp_path):
    control = security.AccessControl(security.UserStore(str(tmp_path)), auth=False)
    anyone = control.session(("192.0.2.2", 4000), None)
    assert anyone.check("find", "mspass", {"find": "wf"}) is None
    assert anyone.check("createUser", "$external", {"createUser": "CN=x", "roles": ROOT}) == {"ok": 1.0}
    assert anyone.check("authenticate", "$external", {"authenticate": 1, "mechanism": "MONGODB-X509"})["code"] == 18


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (
            {"subject": ((("organizationName", "mspass_cluster"),), (("commonName", "alice"),))},
            "CN=alice,O=mspass_cluster",
        ),
        ({"subject": ((("commonName", 'a,b+c"d\\e<f>g;h'),),)}, 'CN=a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h'),
        ({"subject": ((("commonName", "#lead "),),)}, "CN=\\#lead\\ "),
        ({"subject": ((("commonName", "x"), ("userId", "7")),)}, "CN=x+UID=7"),
        (None, None),
    ],
)
def test_subject_names_as_mongodb_writes_them(subject, expected):
    assert security.subject_name(subject) == expected


def test_subject_name_matches_the_clusters_db_user(creds):
    context = ssl.create_default_context(cafile=creds.ca_file)
    context.check_hostname = False
    context.load_cert_chain(creds.db_client_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(creds.db_server_pem)
    server_context.load_verify_locations(creds.ca_file)
    server_context.verify_mode = ssl.CERT_REQUIRED
    left, right = socket.socketpair()
    with left, right:
        server_side = server_context.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
        client_side = context.wrap_socket(right, do_handshake_on_connect=False)
        server_side.setblocking(False)
        client_side.setblocking(False)
        for _ in range(100):
            done = 0
            for end in (client_side, server_side):
                try:
                    end.do_handshake()
                    done += 1
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if done == 2:
                break
        assert security.subject_name(server_side.getpeercert()) == creds.db_user


# --------------------------------------------------------------------------- the first-user script


@BOTH
def test_db_users_creates_the_user_then_finds_it(start, creds, standin):
    server = start(standin)
    created = run_db_users(server.port, creds)
    assert created.returncode == 0, created.stderr
    assert created.stdout == f"mspass_cluster: created database user {creds.db_user} (root on admin)\n"
    assert created.stderr == ""
    again = run_db_users(server.port, creds)
    assert (again.returncode, again.stdout, again.stderr) == (
        0,
        f"mspass_cluster: database user {creds.db_user} exists\n",
        "",
    )
    with server.x509(creds) as c:
        assert c.admin.command("ping")["ok"] == 1


def test_db_users_fails_when_someone_else_is_the_user(start, creds):
    server = start("fake")
    create_first_user(server, creds, SOMEONE_ELSE)
    result = run_db_users(server.port, creds)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mspass_cluster: cannot create the database user {creds.db_user}: ")
    assert "the localhost exception is closed" in lines[0]


def test_db_users_waits_for_the_server(start, creds, tmp_path):
    port = free_port()
    result = run_db_users(port, creds, timeout=1)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"mspass_cluster: the database on 127.0.0.1:{port} did not answer over TLS within 1 s"
    )
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("pristine", ["nx"], indirect=True)
def test_db_users_is_refused_with_another_clusters_certificate(pristine, other_creds):
    result = run_db_users(pristine.port, other_creds, timeout=1)
    assert result.returncode == 1
    assert result.stderr.startswith("mspass_cluster: the database on 127.0.0.1:")
    assert not (pristine.dbpath / security.USERS_FILE).exists()
