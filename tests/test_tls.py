"""The cluster's credentials and what the roles do with them (security on by default).

Real certificates, a real Dask scheduler and worker over TLS, a real HTTP
server behind the dashboard guard; the mongod command line is pinned here
because no real mongod exists on this machine (the stand-ins enforce it: see
the stand-in tests).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import os
import stat
import urllib.error
import urllib.request

import pytest
from distributed import Client, Scheduler, Worker
from distributed.security import Security

from mspass_cluster import dashboard_guard
from mspass_cluster.config import resolve_options
from mspass_cluster.errors import ConfigError
from mspass_cluster.roles import ScriptContext, db_argv, service_environment, worker_argv
from mspass_cluster.security import ClusterCredentials, CredentialFiles


@pytest.fixture
def credentials(tmp_path):
    return ClusterCredentials.create(str(tmp_path / "cred"), user="alice", cluster="mspass-test")


def test_credentials_are_private_files_and_the_ca_key_is_nowhere(credentials):
    assert stat.S_IMODE(os.stat(credentials.directory).st_mode) == 0o700
    names = sorted(os.listdir(credentials.directory))
    assert names == ["ca.pem", "db-client.pem", "db-member.pem", "db-server.pem", "worker.pem"]
    for name in names:
        path = os.path.join(credentials.directory, name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(credentials.ca_file) as f:
        assert "PRIVATE KEY" not in f.read()
    assert credentials.db_user == "CN=alice,OU=mspass-client,O=mspass_cluster"


def test_the_database_command_line_requires_tls_client_certificates_and_auth(credentials):
    options = resolve_options(db_command=["mongod"], db_port=27100, work_dir="/w", db_memory="4GiB")
    assert db_argv(options, tls=credentials.files) == [
        "mongod",
        "--port",
        "27100",
        "--dbpath",
        "/w/db/data",
        "--bind_ip_all",
        "--nounixsocket",
        "--wiredTigerCacheSizeGB",
        "1.5",
        "--auth",
        "--tlsMode",
        "requireTLS",
        "--tlsCertificateKeyFile",
        credentials.db_server_pem,
        "--tlsCAFile",
        credentials.ca_file,
    ]
    assert "--auth" not in db_argv(options)


def test_workers_listen_on_tls_only_without_a_dashboard(credentials):
    options = resolve_options(work_dir="/w")
    argv = worker_argv(options, "tls://10.0.0.1:8786", "w-0", credentials.files)
    joined = " ".join(argv)
    assert f"--tls-ca-file {credentials.ca_file} --tls-cert {credentials.worker_pem}" in joined
    assert "--no-dashboard" in argv and argv[argv.index("--dashboard-address") + 1] == "127.0.0.1:0"
    local = worker_argv(options, "tls://127.0.0.1:8786", "w-0", None, local=True)
    assert local[local.index("--host") + 1] == "127.0.0.1"


def test_the_published_database_address_is_a_uri_of_file_paths_and_the_port_variable_empty(credentials):
    env = service_environment("tls://10.0.0.1:8786", "n3", 27017, credentials.files)
    uri = env["MSPASS_DB_ADDRESS"]
    assert uri.startswith("mongodb://n3:27017/?tls=true&")
    assert "authMechanism=MONGODB-X509" in uri and "db-client.pem" in uri
    # mspasspy.client.Client() appends a non-empty MONGODB_PORT to MSPASS_DB_ADDRESS.
    assert env["MONGODB_PORT"] == ""
    assert env["MSPASS_SCHEDULER_ADDRESS"] == "10.0.0.1" and env["DASK_SCHEDULER_PORT"] == "8786"
    open_env = service_environment("tcp://10.0.0.1:8786", "n3", 27017)
    assert open_env["MSPASS_DB_ADDRESS"] == "n3" and open_env["MONGODB_PORT"] == "27017"


def test_the_db_job_script_creates_the_user_and_stops_the_server_when_it_cannot():
    options = resolve_options(work_dir="/w", db_command=["mongod"])
    context = ScriptContext(options, "abcd", "mspass-abcd", tls=CredentialFiles.placeholder())
    script, _ = context.render("db", "mspass-abcd-db")
    assert "--tlsMode requireTLS" in script and "--auth" in script
    assert "<<'MSPASS_DB_USERS_END' &" in script and "--subject" in script
    assert 'kill -TERM "$server_pid"' in script
    open_script, _ = ScriptContext(options, "abcd", "mspass-abcd").render("db", "mspass-abcd-db")
    assert "MSPASS_DB_USERS_END" not in open_script and "--tlsMode" not in open_script


def test_a_security_object_without_encryption_is_refused():
    with pytest.raises(ConfigError, match="does not require encryption"):
        resolve_options(security=Security())


def test_dask_refuses_plain_clients_and_certificates_of_another_cluster(credentials, tmp_path):
    other = ClusterCredentials.create(str(tmp_path / "other"), cluster="another")

    async def scenario():
        security = credentials.dask_security()
        async with Scheduler(security=security, host="127.0.0.1", port=0, dashboard_address=":0", protocol="tls") as s:
            worker_security = Security(
                require_encryption=True,
                tls_ca_file=credentials.ca_file,
                tls_worker_cert=credentials.worker_pem,
                tls_worker_key=credentials.worker_pem,
            )
            async with Worker(s.address, security=worker_security):
                async with Client(s.address, security=security, asynchronous=True) as client:
                    assert await client.submit(sum, [1, 2]) == 3
                for address, sec in ((s.address.replace("tls://", "tcp://"), None), (s.address, other.dask_security())):
                    with pytest.raises((OSError, asyncio.TimeoutError)):
                        async with Client(address, security=sec, asynchronous=True, timeout="3s"):
                            pass

    asyncio.run(scenario())


def test_the_dashboard_guard_refuses_requests_without_the_token():
    from tornado import httpserver, web

    class Page(web.RequestHandler):
        def get(self):
            self.write("the scheduler's logs")

    async def scenario():
        app = web.Application([(r"/info/logs", Page)])
        server = httpserver.HTTPServer(app)
        server.listen(0, "127.0.0.1")
        port = next(iter(server._sockets.values())).getsockname()[1]
        dashboard_guard.guard(app, "s3cret", port)
        base = f"http://127.0.0.1:{port}/info/logs"

        def fetch(url, opener):
            try:
                with opener.open(url, timeout=5) as reply:
                    return reply.status, reply.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        plain = urllib.request.build_opener()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        loop = asyncio.get_running_loop()
        no_token = await loop.run_in_executor(None, fetch, base, plain)
        wrong = await loop.run_in_executor(None, fetch, dashboard_guard.with_token(base, "guess"), plain)
        right = await loop.run_in_executor(None, fetch, dashboard_guard.with_token(base, "s3cret"), browser)
        again = await loop.run_in_executor(None, fetch, base, browser)  # the cookie, no token in the URL
        server.stop()
        return no_token, wrong, right, again

    no_token, wrong, right, again = asyncio.run(scenario())
    assert no_token[0] == 403 and "needs its token" in no_token[1]
    assert wrong[0] == 403
    assert right == (200, "the scheduler's logs")
    assert again == (200, "the scheduler's logs")


def test_a_security_object_of_the_users_own_is_used_for_dask(tmp_path):
    from conftest import FAKE_MONGOD

    from mspass_cluster import MsPASSCluster

    mine = ClusterCredentials.create(str(tmp_path / "mine"), cluster="users-own")
    security = Security(
        require_encryption=True,
        tls_ca_file=mine.ca_file,
        tls_scheduler_cert=mine.worker_pem,
        tls_scheduler_key=mine.worker_pem,
        tls_client_cert=mine.worker_pem,
        tls_client_key=mine.worker_pem,
        tls_worker_cert=mine.worker_pem,
        tls_worker_key=mine.worker_pem,
    )
    work = tmp_path / "run"
    with MsPASSCluster(backend="local", nodes=1, work_dir=str(work), db_command=FAKE_MONGOD, security=security) as c:
        assert c.scheduler_address.startswith("tls://") and c.security is security
        assert c.get_client().submit(sum, [2, 3]).result() == 5
        script = c.job_script("worker")
        assert f"--tls-ca-file {mine.ca_file}" in script
        # The database still gets the cluster's own credentials.
        assert "--tlsMode requireTLS" in c.job_script("db") and mine.directory not in c.job_script("db")
    with pytest.raises(ConfigError, match="tls_ca_file=.* is not a file"):
        resolve_options(security=Security(require_encryption=True, tls_ca_file="-----BEGIN CERTIFICATE-----"))
