"""The sharded database (issue 12): builders, the stand-ins' replica-set and router commands, and the test bed.

Stand-ins (no mongod or mongos exists here): the config server and the
shards are ``mspass_cluster.embedded_db`` (nx-27017) started with
``--replSet``/``--configsvr``/``--shardsvr``, whose replica-set commands
``mspass_cluster._mongod_replset`` answers; the router is
``mspass_cluster._mongos``, which forwards every data command to its
database's primary shard. They implement the commands the cluster sends as
MongoDB documents them, with their error replies and the states a real
server passes through (not PRIMARY for a while after ``replSetInitiate``,
``addShard`` refused while a shard is not PRIMARY or unreachable), so that a
missing poll or a wrong order fails here. MockupDB servers (the last tests)
pin the exact sequence of commands the cluster sends. Chunk migration and
balancing are not modelled and not verified.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time

import pymongo
import pytest
from conftest import NX_MONGOD, assert_nothing_left, queued, slurm_output
from pymongo.errors import NotPrimaryError, OperationFailure
from test_security import security_users  # noqa: F401  (the fixture: the intruder is a real second Unix user)

from mspass_cluster import MsPASSCluster, cli, sharding
from mspass_cluster.config import resolve_options
from mspass_cluster.errors import ConfigError, JobFailedError

MONGOS = [sys.executable, "-m", "mspass_cluster._mongos"]
#: This file's ports: 28100-28199 (issue 12's range); the stand-in tests below 28150, the test bed's from 28150.
LOCAL_PORT = 28120


# ------------------------------------------------------------ pure builders
def test_parts_ports_and_command_lines():
    options = resolve_options(db_port=28100, db_shards=2, db_dir="/d", db_command=["mongod"], db_memory="2GiB")
    assert sharding.member_argv(options, "db-shard", 1, 0.5) == [
        "mongod", "--port", "28103", "--dbpath", "/d/shard1", "--bind_ip_all", "--nounixsocket",
        "--wiredTigerCacheSizeGB", "0.5", "--replSet", "shard1", "--shardsvr",
    ]  # fmt: skip
    assert sharding.member_argv(options, "db-config", 0, 0.5)[-3:] == ["--replSet", "cfg", "--configsvr"]
    assert sharding.router_argv(options, sharding.config_string("n1", options)) == [
        "mongos", "--port", "28100", "--configdb", "cfg/n1:28101", "--bind_ip_all", "--nounixsocket",
    ]  # fmt: skip
    assert sharding.add_shard_command(1, "n4", options) == {"addShard": "shard1/n4:28103", "name": "shard1"}
    assert sharding.shard_collection_commands(options)[0] == {
        "shardCollection": "mspass.wf_TimeSeries",
        "key": {"_id": "hashed"},
    }
    assert sharding.job_name("c-1", "db-shard", 3) == "c-1-db-shard3"
    assert sharding.shard_index("c-1-db-shard3") == 3


def test_previewed_scripts_run_each_part():
    shard = MsPASSCluster.job_script("db-shard", db_shards=2, db_port=28100, db_command=["mongod"])
    assert "mongod --port 28102 --dbpath" in shard and "--replSet shard0 --shardsvr" in shard
    router = MsPASSCluster.job_script("db-router", db_shards=2, db_port=28100)
    assert 'mongos --port 28100 --configdb "$configdb" --bind_ip_all' in router
    assert 'configdb=$(cat "$configdb_file")' in router


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"db_shard_collections": ["wf_TimeSeries"]}, "'collection:field'"),
        ({"db_storage": "node-local"}, "node-local"),
        ({"db_shard_database": "my.db"}, "not a MongoDB database name"),
        ({"db_router_command": []}, "db_router_command is empty"),
    ],
)
def test_options_a_sharded_database_cannot_honour_are_refused(options, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        sharding.check_options(resolve_options(db_shards=2, **options))


def test_secure_parts_require_tls_and_member_certificates_and_the_router_makes_the_user():
    member = "--clusterAuthMode x509 --tlsClusterFile '<work_dir>/.mspass_cluster/<cluster>/db-member.pem'"
    tls = "--tlsMode requireTLS --tlsCertificateKeyFile '<work_dir>/.mspass_cluster/<cluster>/db-server.pem'"
    for role in ("db-config", "db-shard"):
        script = MsPASSCluster.job_script(role, db_shards=2, db_port=28500, db_command=["mongod"])
        assert f"--auth {tls}" in script and member in script and "--tlsAllowInvalidHostnames" in script
        assert "MSPASS_DB_USERS_END" not in script  # the users live on the config server, made through the router
    router = MsPASSCluster.job_script("db-router", db_shards=2, db_port=28500)
    assert f'--configdb "$configdb" --bind_ip_all --nounixsocket {tls}' in router and member in router
    assert "--auth" not in router  # mongos has no --auth: x.509 membership turns its access control on
    assert "MSPASS_DB_USERS_END" in router and "--port 28500" in router.split("MSPASS_DB_USERS_END")[0]
    assert "#SBATCH --job-name=mspass-preview-db-router\n" in router  # the previewed part's own name
    open_router = MsPASSCluster.job_script("db-router", db_shards=2, db_port=28500, security=False)
    assert "--tls" not in open_router and "MSPASS_DB_USERS_END" not in open_router


# ------------------------------------------------------------ the stand-ins' commands
class Servers:
    """Stand-in servers on loopback, each stopped by its own PID."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, name, env=None):
        log = open(self.tmp / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
        return self.procs[-1]

    def mongod(self, port, name, *args, wait=True, election=None):
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        env = None if election is None else {**os.environ, "MSPASS_STANDIN_ELECTION_SECONDS": str(election)}
        argv = [*NX_MONGOD, "--port", str(port), "--dbpath", str(path), "--bind_ip", "127.0.0.1", *args]
        self.start(argv, name, env)
        return answering(port) if wait else None

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=20)


def answering(port, direct=True, seconds=20.0):
    """A client of the server on ``port`` once it answers ``ping`` (polled every 0.1 s)."""
    uri = f"mongodb://localhost:{port}/"
    with pymongo.MongoClient(uri, directConnection=direct, serverSelectionTimeoutMS=300) as probe:
        deadline = time.monotonic() + seconds
        while True:
            try:
                probe.admin.command("ping")
                break
            except pymongo.errors.ConnectionFailure:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    # A generous selection timeout: after a "not primary" reply pymongo rediscovers the server first.
    return pymongo.MongoClient(uri, directConnection=direct, serverSelectionTimeoutMS=5000)


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    s.stop()


def code_of(call):
    """The code of the server's error reply (pymongo raises NotPrimaryError, not OperationFailure, for 10107)."""
    with pytest.raises((OperationFailure, NotPrimaryError)) as info:
        call()
    return info.value.details["code"]


def wait_primary(client):
    deadline = time.monotonic() + 20
    while client.admin.command("replSetGetStatus")["myState"] != 1:
        assert time.monotonic() < deadline, "never became PRIMARY"
        time.sleep(0.05)


def test_replica_set_member_passes_through_the_states_mongod_does(servers):
    port = LOCAL_PORT
    # A slower election than the stand-in's 1.5 s, so that a busy machine still sees the states before PRIMARY.
    shard = servers.mongod(port, "shard0", "--replSet", "shard0", "--shardsvr", election=4)
    admin = shard.admin
    assert code_of(lambda: admin.command("replSetGetStatus")) == 94  # NotYetInitialized
    assert code_of(lambda: shard.x.y.insert_one({})) == 10107  # not primary: a write before initiation fails
    assert admin.command("hello")["isreplicaset"] is True
    wrong = sharding.replica_set_document("other", "localhost", port, False)
    assert code_of(lambda: admin.command({"replSetInitiate": wrong})) == 93
    elsewhere = sharding.replica_set_document("shard0", "localhost", port + 50, False)
    assert code_of(lambda: admin.command({"replSetInitiate": elsewhere})) == 74  # NodeNotFound
    as_config = sharding.replica_set_document("shard0", "localhost", port, True)
    assert code_of(lambda: admin.command({"replSetInitiate": as_config})) == 93  # configsvr without --configsvr

    admin.command({"replSetInitiate": sharding.replica_set_document("shard0", "localhost", port, False)})
    # Accepted, but not PRIMARY yet: a client that does not poll fails its first write.
    assert admin.command("replSetGetStatus")["myState"] != 1
    assert admin.command("hello")["isWritablePrimary"] is False
    assert code_of(lambda: shard.x.y.insert_one({})) == 10107
    assert code_of(lambda: admin.command({"replSetInitiate": elsewhere})) == 23  # AlreadyInitialized
    stale = {"replSetReconfig": sharding.replica_set_document("shard0", "localhost", port, False)}
    assert code_of(lambda: admin.command(stale)) == 10107  # a reconfiguration without force needs a PRIMARY
    wait_primary(shard)
    assert code_of(lambda: admin.command(stale)) == 103  # version not above the current one
    assert shard.x.y.insert_one({"a": 1}).acknowledged
    assert admin.command("getCmdLineOpts")["parsed"]["sharding"]["clusterRole"] == "shardsvr"
    assert code_of(lambda: shard.x.command("shutdown")) == 13
    try:
        admin.command("shutdown")
    except pymongo.errors.ConnectionFailure:
        pass  # mongod closes the connection without a reply; the stand-in may answer first
    assert servers.procs[-1].wait(timeout=20) == 0


def test_a_member_moved_to_another_host_is_removed_until_a_forced_reconfig(servers):
    port = LOCAL_PORT + 1
    member = servers.mongod(port, "cfg", "--replSet", "cfg", "--configsvr")
    moved = sharding.replica_set_document("cfg", "localhost", port + 50, True)  # the data's old host
    member.admin.command({"replSetInitiate": sharding.replica_set_document("cfg", "localhost", port, True)})
    wait_primary(member)
    servers.procs[-1].terminate()
    servers.procs[-1].wait(timeout=20)
    # The same data on "another node": its stored configuration names a host that is not this one.
    path = servers.tmp / "cfg" / "replset.json"
    path.write_text(json.dumps({**moved, "version": 1}))
    member = servers.mongod(port, "cfg", "--replSet", "cfg", "--configsvr")
    assert code_of(lambda: member.admin.command("replSetGetStatus")) == 93  # REMOVED
    assert code_of(lambda: member.cfgdata.x.insert_one({})) == 10107
    here = sharding.replica_set_document("cfg", "localhost", port, True)
    member.admin.command({"replSetReconfig": here, "force": True})
    wait_primary(member)
    assert json.loads(path.read_text())["members"][0]["host"] == f"localhost:{port}"


def test_router_refuses_wrong_orders_and_routes_data_to_the_primary_shard(servers):
    cfg_port, shard_port, router_port = LOCAL_PORT + 2, LOCAL_PORT + 3, LOCAL_PORT + 4
    servers.mongod(cfg_port, "cfg", "--replSet", "cfg", "--configsvr", wait=False)
    servers.mongod(shard_port, "shard0", "--replSet", "shard0", "--shardsvr", wait=False)
    servers.mongod(LOCAL_PORT + 5, "plain", "--replSet", "plain", wait=False)
    servers.start([*MONGOS, "--port", str(router_port), "--configdb", f"cfg/localhost:{cfg_port}"], "router")
    cfg, shard, plain = answering(cfg_port), answering(shard_port), answering(LOCAL_PORT + 5)
    router = answering(router_port, direct=False)
    admin = router.admin
    assert admin.command("hello")["msg"] == "isdbgrid"
    add = {"addShard": f"shard0/localhost:{shard_port}", "name": "shard0"}
    # Before the config server is PRIMARY the router cannot record anything.
    assert code_of(lambda: admin.command(add)) in (96, 133)
    cfg.admin.command({"replSetInitiate": sharding.replica_set_document("cfg", "localhost", cfg_port, True)})
    shard.admin.command({"replSetInitiate": sharding.replica_set_document("shard0", "localhost", shard_port, False)})
    assert code_of(lambda: admin.command(add)) == 133  # the shard is not PRIMARY yet
    assert code_of(lambda: admin.command({"addShard": f"shard1/localhost:{LOCAL_PORT + 9}"})) == 133  # unreachable
    wait_primary(cfg)
    wait_primary(shard)
    assert code_of(lambda: admin.command({"enableSharding": "mspass"})) == 70  # no shard yet
    plain.admin.command({"replSetInitiate": sharding.replica_set_document("plain", "localhost", LOCAL_PORT + 5, False)})
    wait_primary(plain)
    assert code_of(lambda: admin.command({"addShard": f"plain/localhost:{LOCAL_PORT + 5}"})) == 96  # no --shardsvr
    assert code_of(lambda: admin.command({"addShard": f"wrong/localhost:{shard_port}"})) == 96  # set name
    assert admin.command(add)["shardAdded"] == "shard0"
    assert admin.command(add)["shardAdded"] == "shard0"  # the same shard again: ok
    assert code_of(lambda: admin.command({"addShard": f"shard0/localhost:{LOCAL_PORT + 5}", "name": "shard0"})) == 96
    assert [s["_id"] for s in admin.command("listShards")["shards"]] == ["shard0"]
    admin.command({"enableSharding": "mspass"})
    hashed = {"shardCollection": "mspass.wf_TimeSeries", "key": {"_id": "hashed"}}
    admin.command(hashed)
    admin.command(hashed)
    assert code_of(lambda: admin.command({**hashed, "key": {"t": 1}})) == 23
    assert code_of(lambda: admin.command({**hashed, "unique": True, "shardCollection": "mspass.x"})) == 72
    assert code_of(lambda: admin.command({"shardCollection": "nodot", "key": {"_id": 1}})) == 73

    router.mspass.wf_TimeSeries.insert_many([{"i": i} for i in range(300)])
    assert sum(1 for _ in router.mspass.wf_TimeSeries.find().batch_size(40)) == 300  # getMore on the same shard
    assert shard.mspass.wf_TimeSeries.count_documents({}) == 300  # the data is on the shard, not the router
    assert router.config.shards.find_one({"_id": "shard0"})["host"] == f"shard0/localhost:{shard_port}"

    # A shard whose shardIdentity names other config servers gets no command (the restore procedure's step).
    shard.admin["system.version"].update_one(
        {"_id": "shardIdentity"}, {"$set": {"configsvrConnectionString": "cfg/elsewhere:1"}}
    )
    with pytest.raises(OperationFailure, match="shardIdentity") as info:
        router.mspass.wf_TimeSeries.count_documents({})
    assert info.value.code == 96
    with pytest.raises(pymongo.errors.PyMongoError):
        admin.command("shutdown")
    assert servers.procs[3].wait(timeout=20) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clusterAuthMode", "x509"], "BadValue: clusterAuthMode x509 requires TLS"),
        (["--clusterAuthMode", "bogus"], "BadValue: unsupported value for clusterAuthMode bogus"),
        (["--tlsClusterFile", "m.pem"], "BadValue: need to enable TLS via the sslMode/tlsMode flag"),
    ],
)
def test_member_options_are_checked_as_mongod_checks_them(argv, message):
    from mspass_cluster import _mongod_cli

    with pytest.raises(_mongod_cli.CommandLineError, match=re.escape(message)):
        _mongod_cli.parse_command_line(argv)


def test_the_router_standin_has_no_auth_option_and_refuses_keyfile_membership():
    router = subprocess.run([*MONGOS, "--auth", "--configdb", "cfg/a:1"], capture_output=True, text=True, timeout=60)
    assert router.returncode == 2 and "unrecognised option '--auth'" in router.stderr  # as mongos: no --auth
    key_file = subprocess.run(
        [*MONGOS, "--configdb", "cfg/a:1", "--clusterAuthMode", "keyFile"], capture_output=True, text=True, timeout=60
    )
    assert key_file.returncode == 2 and "use --clusterAuthMode x509" in key_file.stderr


# ------------------------------------------------------------ the stand-ins' security (loopback)
SECURE_PORT = 28500  # this test's: 28500 router, 28501 config server, 28502 shard


def tls_client(port, pem, ca, authenticate=False, **extra):
    """A pymongo client over TLS presenting ``pem``; MONGODB-X509 with it if ``authenticate``."""
    auth = dict(authMechanism="MONGODB-X509", authSource="$external") if authenticate else {}
    return pymongo.MongoClient(
        f"mongodb://127.0.0.1:{port}/", directConnection=True, tls=True, tlsCAFile=ca, tlsCertificateKeyFile=pem,
        tlsAllowInvalidHostnames=True, **{"serverSelectionTimeoutMS": 3000, **auth, **extra},
    )  # fmt: skip


def refusal(call):
    """The exception ``call()`` raises (the test fails if it raises none)."""
    try:
        call()
    except pymongo.errors.PyMongoError as exc:
        return exc
    pytest.fail(f"{call} was not refused")


def test_secure_standins_refuse_strangers_and_admit_only_members_and_the_clusters_user(servers, tmp_path):
    """Config server, shard (stand-ins for mongod) and router (stand-in for mongos) with TLS and x.509 membership."""
    from importlib import resources

    from mspass_cluster.security import ClusterCredentials

    tls = ClusterCredentials.create(str(tmp_path / "cred"), cluster="secure").files
    stranger = ClusterCredentials.create(str(tmp_path / "other"), cluster="stranger").files  # another CA
    options = resolve_options(db_port=SECURE_PORT, db_shards=1, db_dir=str(tmp_path / "db"), db_command=NX_MONGOD,
                              db_router_command=MONGOS, backend="local")  # fmt: skip
    for role in ("db-config", "db-shard"):
        os.makedirs(sharding.member_dbpath(options, role, 0))
        argv = sharding.member_argv(options, role, 0, 0.25, tls)
        argv[argv.index("--bind_ip_all")] = "--bind_ip=127.0.0.1"
        servers.start(argv, role)
    service = mock_service(SECURE_PORT, 1, tls)
    router = sharding.router_argv(options, sharding.config_string("localhost", options), tls)
    try:
        for part in [service.config, *service.shards]:
            started = time.monotonic()
            while not part.ready:  # initiated and polled as a member (the member certificate, __system)
                try:
                    run_part(service, part)
                except pymongo.errors.ConnectionFailure:
                    assert time.monotonic() - started < 30, f"the {part.label} never answered"
                time.sleep(0.2)
        servers.start(router, "router")
        deadline = time.monotonic() + 30
        while not service.router.ready:
            try:
                service._advance_router(service.router)  # addShard etc. through the router, as a member
            except pymongo.errors.ConnectionFailure:
                assert time.monotonic() < deadline, "the router never answered"
                time.sleep(0.2)
        users = subprocess.run(
            [sys.executable, str(resources.files("mspass_cluster") / "templates" / "db_users.py"), "--port", str(SECURE_PORT),
             "--ca", tls.db_ca_file, "--cert", tls.db_client_pem, "--subject", tls.db_user, "--timeout", "30"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert users.returncode == 0, users.stderr
    finally:
        service._close_clients()

    owner = tls_client(SECURE_PORT, tls.db_client_pem, tls.db_ca_file, authenticate=True)
    owner.mspass.wf_TimeSeries.insert_many([{"i": i} for i in range(20)])
    assert owner.mspass.wf_TimeSeries.count_documents({}) == 20  # forwarded to the shard on a member link
    assert owner.admin.command("usersInfo", {"forAllDBs": True})["users"][0]["user"] == tls.db_user

    for label, port in (("router", SECURE_PORT), ("config server", SECURE_PORT + 1), ("shard", SECURE_PORT + 2)):
        plain = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", directConnection=True, serverSelectionTimeoutMS=800)
        assert isinstance(refusal(lambda: plain.admin.command("ping")), pymongo.errors.ServerSelectionTimeoutError)
        # Another CA's client certificate (the server's own not even checked): the server ends the handshake.
        alien = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", directConnection=True, tls=True,
                                    tlsCertificateKeyFile=stranger.db_client_pem, tlsAllowInvalidCertificates=True,
                                    serverSelectionTimeoutMS=800)  # fmt: skip
        failed = refusal(lambda: alien.admin.command("ping"))
        assert isinstance(failed, pymongo.errors.ServerSelectionTimeoutError), label
        assert any(w in str(failed).lower() for w in ("alert", "reset", "eof", "closed")), f"{label}: {failed}"
        anonymous = tls_client(port, tls.db_client_pem, tls.db_ca_file)  # the CA's certificate, not authenticated
        assert anonymous.admin.command("ping")["ok"] == 1  # mongod answers ping unauthenticated
        refused = refusal(lambda: anonymous.mspass.wf_TimeSeries.find_one())
        assert (refused.code, refused.details["codeName"]) == (13, "Unauthorized"), label
        assert "requires authentication" in refused.details["errmsg"]
        # The localhost exception is closed: the first user exists (it lives on the config server).
        closed = refusal(lambda: anonymous["$external"].command("createUser", "CN=x,O=y", roles=[]))
        assert closed.code == 13, f"{label}: {closed}"
        for client in (plain, alien, anonymous):
            client.close()

    # A member is recognised by its certificate's O/OU, not by being on the CA: the client certificate is not one.
    as_member = tls_client(SECURE_PORT + 2, tls.db_member_pem, tls.db_ca_file, authenticate=True)
    assert as_member.admin.command("connectionStatus")["authInfo"]["authenticatedUsers"] == [
        {"user": "__system", "db": "local"}
    ]
    as_member_with_client_cert = tls_client(SECURE_PORT + 2, tls.db_client_pem, tls.db_ca_file, authenticate=True)
    assert as_member_with_client_cert.admin.command("connectionStatus")["authInfo"]["authenticatedUsers"] == [
        {"user": tls.db_user, "db": "$external"}  # the shard-local user that closed the shard's localhost exception
    ]
    stranger_on_shard = tls_client(SECURE_PORT + 2, tls.db_server_pem, tls.db_ca_file, authenticate=True)
    failed = refusal(lambda: stranger_on_shard.admin.command("ping"))  # the CA's, but neither member nor user
    assert "Authentication failed" in str(failed) and "18" in str(failed)
    member_like = refusal(
        lambda: owner["$external"].command("createUser", "CN=evil,OU=mspass-member,O=mspass_cluster", roles=[])
    )
    assert member_like.code == 2 and "internal cluster member" in member_like.details["errmsg"]
    for client in (owner, as_member, as_member_with_client_cert, stranger_on_shard):
        client.close()
    # The router reached the shard as a member: the shard's log has the router's member authentication.
    shard_log = (tmp_path / "db-shard.log").read_text()
    assert "'principalName': 'CN=mspass-db-member,OU=mspass-member,O=mspass_cluster'" in shard_log
    assert "'user': '__system', 'isClusterMember': True" in shard_log


# ------------------------------------------------------------ the test bed
BED_PORT = 28150


def bed_options(work_dir, **extra):
    return {
        **dict(
            nodes=1,
            work_dir=str(work_dir),
            security=False,
            walltime="10",
            exclusive=False,
            cores=1,
            memory="1GiB",
            db_memory="300MiB",
            db_shards=2,
            db_port=BED_PORT,
            db_command=NX_MONGOD,
            db_router_command=MONGOS,
            startup_timeout=600,
        ),
        **extra,
    }


def exit_time(log_path: str) -> str:
    """When the job script saw its server exit, from its last line (Slurm's accounting is off on the bed)."""
    found = re.findall(r"exited with status (\d+) at (\S+)", open(log_path).read())
    assert found and found[-1][0] == "0", f"not a clean stop: {log_path}"
    return found[-1][1]


@pytest.mark.timeout(900)  # three clusters in turn; a shared bed's queue can hold each for minutes
@pytest.mark.usefixtures("security_users")
def test_sharded_database_on_the_bed_starts_serves_stops_in_order_and_restarts_on_other_nodes(
    slurm_testbed, shared_dir
):
    with MsPASSCluster(**bed_options(shared_dir)) as cluster:
        service = cluster.database
        assert cluster.db_address == f"mongodb://{service.router.job.node}:{BED_PORT}/"  # the router's
        steps = [what for what, _ in service.timeline]
        # Each replica set was initiated, then polled until PRIMARY, before the router existed.
        told = steps.index("router told the config servers")
        assert told > max(steps.index(f"{part} PRIMARY") for part in ("shard 0", "shard 1", "config server"))
        db = cluster.get_db_client().get_database("mspass")
        db.wf_TimeSeries.insert_many([{"i": i} for i in range(200)])
        assert db.wf_TimeSeries.count_documents({}) == 200
        # What a worker sees is the router too (MsPASS code reads MSPASS_DB_ADDRESS).
        seen = cluster.get_client().run(lambda: os.environ["MSPASS_DB_ADDRESS"])
        assert set(seen.values()) == {service.router.job.node}
        primary = int(db.client.config.databases.find_one({"_id": "mspass"})["primary"][len("shard") :])
        on_shard = pymongo.MongoClient(
            f"mongodb://{service.shards[primary].job.node}:{BED_PORT + 2 + primary}/", directConnection=True
        )
        assert on_shard.mspass.wf_TimeSeries.count_documents({}) == 200  # the data is on its primary shard
        on_shard.close()
        # The negative control of the secure test's intruder: without security the same attacks get through.
        db.secrets.insert_one({"secret": "the owner's"})
        report = attack_parts({"router": (service.router.job.node, BED_PORT, ["mspass", "secrets"])})["router"]
        assert {name for name, r in report.items() if r["succeeded"]} == {"db_list", "db_read", "db_insert", "db_drop"}
        nodes_before = {p.label: p.job.node for p in service.parts}
        logs = {p.label: p.job.log_path for p in service.parts}
    assert_nothing_left(cluster)
    ends = {label: exit_time(log) for label, log in logs.items()}  # ISO times: string order is time order
    assert ends["router"] <= min(ends["shard 0"], ends["shard 1"])
    assert max(ends["shard 0"], ends["shard 1"]) <= ends["config server"]

    # The same db_dir on other nodes: the replica sets and the shard registry follow, the data stays.
    away = [f"--exclude={nodes_before['config server']}"]
    with MsPASSCluster(**bed_options(shared_dir, db_extra_directives=away)) as again:
        service = again.database
        nodes_after = {p.label: p.job.node for p in service.parts}
        moved = {
            label for label in ("config server", "shard 0", "shard 1") if nodes_after[label] != nodes_before[label]
        }
        assert "config server" in moved
        assert set(service.moved) == moved
        for label in moved - {"config server"}:
            assert any(what.startswith(f"config.shards: shard{label[-1]} ") for what, _ in service.timeline)
        db = again.get_db_client().get_database("mspass")
        assert db.wf_TimeSeries.count_documents({}) == 200
    assert_nothing_left(again)

    # A step that errors: the same collection with another shard key. The router's reply is in the error.
    with pytest.raises(JobFailedError) as info:
        MsPASSCluster(**bed_options(shared_dir, db_shard_collections=["wf_TimeSeries:starttime,sta"]))
    error = info.value
    assert error.role == "db-router"
    assert "shardCollection mspass.wf_TimeSeries" in str(error) and "AlreadyInitialized" in str(error)
    assert error.job_id in str(error)
    assert queued([error.job_id]) == []
    assert not [n for n in slurm_output("squeue", "--noheader", "--format=%j").split() if "-db-" in n and
                n.startswith("mspass-") and n.split("-db-")[0] in str(error)]  # fmt: skip


def intruder_targets(directory, token, node, port, secret):
    """``targets.json`` for ``security_intruder.py``'s database attacks on one part (readable by the intruder)."""
    import pwd

    directory.mkdir(mode=0o755, exist_ok=True)
    directory.chmod(0o755)
    me = pwd.getpwuid(os.getuid())
    path = directory / f"targets-{port}.json"
    path.write_text(json.dumps({
        "owner": me.pw_name, "owner_uid": me.pw_uid, "owner_home": me.pw_dir, "backend": "slurm",
        "scheduler": "tls://127.0.0.1:1", "secret_collection": secret, "planted_collection": [secret[0], f"pwned_{token}"],
        "db": {"host": node, "port": port, "node": node}, "files": {},
    }))  # fmt: skip
    path.chmod(0o644)
    return str(path)


def attack_parts(targets):
    """``security_intruder.py``'s database attacks, as the intruder, in each part's node, all at once: {label: report}."""
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from test_security import intrude

    directory = Path(tempfile.mkdtemp(prefix="mspass-shard-intruder-", dir="/tmp"))  # pytest's are 0700

    token = f"{os.getpid()}"
    argv = ["--token", token, "--only", "db_list,db_read,db_insert,db_drop"]

    def one(item):
        label, (node, port, secret) = item
        path = intruder_targets(directory, token, node, port, secret)
        return label, intrude(["attack", path, *argv, "--where", f"node:{node}"], netns=node)

    try:
        with ThreadPoolExecutor(len(targets)) as pool:
            return dict(pool.map(one, targets.items()))
    finally:
        shutil.rmtree(directory)


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("security_users")
def test_secure_sharded_database_serves_its_owner_refuses_an_intruder_and_restarts(slurm_testbed, shared_dir, caplog):
    """The default security with 2 shards: MsPASS through the router over TLS; another Unix user gets nothing."""
    from conftest import require_mspasspy

    require_mspasspy()
    from mspasspy.db.database import Database
    from test_mspasspy import synthetic_timeseries

    options = bed_options(shared_dir, security=True, db_port=28550)
    with MsPASSCluster(**options) as cluster:
        service = cluster.database
        router_node = service.router.job.node
        assert service.address == f"mongodb://{router_node}:28550/"
        assert cluster.db_address == service.uri  # the router's, with TLS and x.509: what clients are handed
        assert service.uri.startswith(service.address + "?tls=true&") and "MONGODB-X509" in service.uri
        steps = [what for what, _ in service.timeline]
        assert "the cluster's user authenticates through the router" in steps
        assert steps.index("the cluster's user authenticates through the router") > steps.index(
            "router told the config servers"
        )
        db = Database(cluster.get_db_client(), "mspass")
        ts = synthetic_timeseries("AAK", "BHZ", 0)
        wf_id = db.save_data(ts, storage_mode="gridfs", return_data=True)["_id"]
        back = db.read_data(wf_id, collection="wf_TimeSeries")
        assert back.live and list(back.data) == list(ts.data)
        # A worker reads through the router with the cluster's certificate (a Database pickled to it).
        assert cluster.get_client().submit(lambda d: d.wf_TimeSeries.count_documents({}), db).result() == 1
        db.secrets.insert_one({"secret": "the owner's"})
        primary = int(db.client.config.databases.find_one({"_id": "mspass"})["primary"][len("shard") :])
        shard = service.shards[primary]
        reports = attack_parts(
            {
                "router": (router_node, 28550, ["mspass", "secrets"]),
                "shard": (shard.job.node, 28552 + primary, ["mspass", "secrets"]),
                "config server": (service.config.job.node, 28551, ["config", "shards"]),
            },
        )
        for label, report in reports.items():
            assert set(report) == {"db_list", "db_read", "db_insert", "db_drop"}, label
            won = {name: r["evidence"] for name, r in report.items() if r["succeeded"]}
            assert won == {}, f"the intruder got through the {label}: {won}"
        assert db.secrets.find_one()["secret"] == "the owner's" and db.wf_TimeSeries.count_documents({}) == 1
        nodes_before = {p.label: p.job.node for p in service.parts}

        # Every part, named, with its job and node: print(cluster) and mspass-cluster status.
        shown = str(cluster)
        for part in service.parts:
            row = next(line for line in shown.splitlines() if line.strip().startswith(part.label + " "))
            assert part.job.job_id in row and part.job.node in row and "ready" in row, row
        listed = io.StringIO()
        with contextlib.redirect_stdout(listed):
            assert cli.main(["status"]) == 0
        for part in service.parts:
            row = next(line for line in listed.getvalue().splitlines() if line.split()[0] == part.job.job_id)
            assert row.endswith(f"({part.label})") and part.job.name in row, row

        # A part that ends is surfaced: the heartbeat asks Slurm at once; the error names the part, job and log.
        gone = service.shards[1 - primary]
        gone_job = gone.job
        caplog.set_level(logging.ERROR, logger="mspass_cluster")
        subprocess.run(["scancel", gone.job.job_id], check=True, timeout=30)
        deadline = time.monotonic() + 60
        while service.lost() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        error = service.lost()
        assert error is not None, f"the {gone.label}'s end was not noticed: {gone.job.describe()}"
        text = str(error)
        assert f"(the {gone.label} of the sharded database)" in text and gone.job.job_id in text
        assert "Last lines of the log:" in text and gone.job.log_path in text and error.role == "db-shard"
        assert any(r.levelno == logging.ERROR and gone.job.job_id in r.getMessage() for r in caplog.records)
        assert "running, but its database is lost" in str(cluster) and "lost (db-shard" in str(cluster)
        with pytest.raises(JobFailedError, match=gone.label):
            cluster.get_db_client()
        assert "cluster.restart_database()" in text  # what to do

        # restart_database() brings it back: every part started again on the same data, re-pointed, data kept.
        cluster.restart_database()
        assert service.lost() is None and gone_job.job_id not in {p.job.job_id for p in service.parts}
        assert all(p.job.ready for p in service.parts)
        assert "lost" not in str(cluster).splitlines()[0]
        db = Database(cluster.get_db_client(), "mspass")
        assert db.read_data(wf_id, collection="wf_TimeSeries").live and db.secrets.count_documents({}) == 1
        assert cluster.get_client().submit(lambda d: d.wf_TimeSeries.count_documents({}), db).result() == 1
        nodes_before = {p.label: p.job.node for p in service.parts}
    assert_nothing_left(cluster)

    # Restart on the same db_dir, the config server elsewhere: members reconfigured as members, the user kept.
    away = [f"--exclude={nodes_before['config server']}"]
    with MsPASSCluster(**{**options, "db_extra_directives": away}) as again:
        assert again.database.host_of(again.database.config.job) != nodes_before["config server"]
        assert "config server" in again.database.moved
        db = Database(again.get_db_client(), "mspass")
        back = db.read_data(wf_id, collection="wf_TimeSeries")
        assert back.live and list(back.data) == list(ts.data)
    assert_nothing_left(again)


def test_a_shard_job_that_fails_stops_the_start_with_its_role_job_and_log(slurm_testbed, shared_dir):
    db_dir = shared_dir / "db"
    db_dir.mkdir()
    (db_dir / "shard1").write_text("a file where the shard's data directory should be\n")
    with pytest.raises(JobFailedError) as info:
        MsPASSCluster(**bed_options(shared_dir, db_port=BED_PORT + 10))
    error = info.value
    assert error.role == "db-shard" and "shard 1" in str(error)
    assert error.state == "FAILED"
    assert "shard1" in error.log_tail
    name = re.search(r"\((mspass-[0-9a-f]+)-db-shard1\)", str(error)).group(1)
    assert [n for n in slurm_output("squeue", "--noheader", "--format=%j").split() if n.startswith(name)] == []


# ------------------------------------------------------------ the exact command sequence (mockupdb)
MOCK_PORT = 28140


class Recorder:
    """MockupDB servers standing for the config server, the shards and the router; every command logged in order."""

    def __init__(self, shards, fail=None):
        from mockupdb import MockupDB

        self.log = []
        self.fail = fail or {}
        self.servers = []
        self.status_calls = {}
        labels = [("router", MOCK_PORT, True), ("cfg", MOCK_PORT + 1, False)]
        labels += [(f"shard{i}", MOCK_PORT + 2 + i, False) for i in range(shards)]
        for label, port, mongos in labels:
            server = MockupDB(port=port, request_timeout=10)
            server.autoresponds(self.handler(label, mongos))
            server.run()
            self.servers.append(server)

    def handler(self, label, mongos):
        hello = {"ismaster": True, "isWritablePrimary": True, "maxWireVersion": 21, "minWireVersion": 0}
        if mongos:
            hello["msg"] = "isdbgrid"

        def respond(request):
            name = request.command_name
            if name.lower() in ("ismaster", "hello"):  # the driver's handshakes and the router check alike
                return request.ok(**hello)
            if name == "endSessions":
                return request.ok()
            self.log.append((label, name, dict(request.doc)))
            if (label, name) in self.fail:
                return request.reply(ok=0, **self.fail[(label, name)])
            if name == "replSetGetStatus":
                calls = self.status_calls[label] = self.status_calls.get(label, 0) + 1
                if calls == 1:
                    return request.reply(ok=0, code=94, errmsg="no replset config has been received")
                return request.ok(myState=2 if calls == 2 else 1)
            if name == "find":
                return request.ok(cursor={"id": 0, "firstBatch": [], "ns": "x.y"})
            if name == "listShards":
                added = [doc["name"] for lab, cmd, doc in self.log if lab == label and cmd == "addShard"]
                return request.ok(shards=[{"_id": n, "host": n} for n in added])
            return request.ok()

        return respond

    def commands(self, label):
        return [name for lab, name, _ in self.log if lab == label]

    def stop(self):
        for server in self.servers:
            server.stop()


def run_steps(service, recorder_parts=None):
    """Drive the service's steps as its probe does, without Slurm: every part 'runs' on localhost."""
    from types import SimpleNamespace

    from mspass_cluster.services.sharded import StepFailed

    for part in service.parts:
        part.job = SimpleNamespace(node="localhost", job_id=f"9{part.index}", role=part.role, unit="job",
                                   name=part.name, log_path="/dev/null", state=SimpleNamespace(value="RUNNING"))  # fmt: skip
    service._started = time.monotonic()
    for part in [service.config, *service.shards]:
        for _ in range(10):
            service._advance_member(part)
            if part.ready:
                break
    service._point_registry(service.config)
    for _ in range(5):
        service._advance_router(service.router)
        if service.router.ready:
            return
    raise StepFailed("test", "the router never got ready")


def mock_service(port=None, shards=2, tls=None):
    import logging
    from types import SimpleNamespace

    from mspass_cluster.services.sharded import ShardedDatabaseService

    options = resolve_options(db_port=port or MOCK_PORT, db_shards=shards, security=False, backend="local")
    launcher = SimpleNamespace(detail=logging.DEBUG, context=SimpleNamespace(heartbeat=None), backend=None)
    service = ShardedDatabaseService(options, launcher, "c-1", tls=tls)
    if tls is not None:
        fake_jobs(service)
    return service


def fake_jobs(service):
    """Every part 'runs' on localhost (no Slurm)."""
    from types import SimpleNamespace

    for part in service.parts:
        part.job = SimpleNamespace(node="localhost", job_id=f"9{part.index}", role=part.role, unit="job",
                                   name=part.name, log_path="/dev/null", state=SimpleNamespace(value="RUNNING"))  # fmt: skip
    service._started = time.monotonic()


def run_part(service, part):
    service._advance_member(part)


def test_the_exact_command_sequence_initiate_poll_primary_then_route():
    recorder = Recorder(shards=2)
    service = mock_service()
    try:
        run_steps(service)
    finally:
        service._close_clients()
        recorder.stop()
    polled = ["replSetGetStatus", "replSetInitiate", "replSetGetStatus", "replSetGetStatus", "find"]
    assert recorder.commands("cfg") == polled
    assert recorder.commands("shard0") == recorder.commands("shard1") == polled
    initiate = next(doc for lab, name, doc in recorder.log if lab == "cfg" and name == "replSetInitiate")
    assert initiate["replSetInitiate"] == {
        "_id": "cfg",
        "version": 1,
        "members": [{"_id": 0, "host": f"localhost:{MOCK_PORT + 1}"}],
        "configsvr": True,
    }
    assert recorder.commands("router") == [
        "listShards", "addShard", "addShard", "listShards", "enableSharding",
        "shardCollection", "shardCollection", "shardCollection",
    ]  # fmt: skip
    adds = [doc for lab, name, doc in recorder.log if name == "addShard"]
    assert [(d["addShard"], d["name"]) for d in adds] == [
        (f"shard0/localhost:{MOCK_PORT + 2}", "shard0"),
        (f"shard1/localhost:{MOCK_PORT + 3}", "shard1"),
    ]
    assert all(doc["$db"] == "admin" for lab, name, doc in recorder.log if lab == "router")
    # Every addShard came after every shard's PRIMARY answer (the last replSetGetStatus).
    order = [(lab, name) for lab, name, _ in recorder.log]
    last_primary = max(i for i, (lab, name) in enumerate(order) if name == "replSetGetStatus")
    assert min(i for i, (lab, name) in enumerate(order) if name == "addShard") > last_primary


def test_a_refused_add_shard_stops_the_sequence_with_the_servers_reply():
    from mspass_cluster.services.sharded import StepFailed

    reply = {"code": 133, "errmsg": "Could not find host matching read preference for set shard1"}
    recorder = Recorder(shards=2, fail={("router", "addShard"): reply})
    service = mock_service()
    try:
        with pytest.raises(StepFailed) as info:
            run_steps(service)
    finally:
        service._close_clients()
        recorder.stop()
    assert info.value.step.startswith("addShard shard0/") and info.value.reply["code"] == 133
    assert "enableSharding" not in recorder.commands("router")
    error = service._step_failure(service.router, info.value)
    assert "db-router job 90" in str(error) and "Could not find host" in str(error) and error.role == "db-router"
