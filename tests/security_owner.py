"""The owner's side of the security tests: a cluster to attack, and where to find it.

Run as the cluster's owner, an ordinary user (``tests/test_security.py`` runs it as
``mspass-owner`` through ``runuser``), with the options of ``MsPASSCluster`` as JSON::

    OWNER_SECRET=... python security_owner.py attack OPTIONS_JSON EXCHANGE_DIR
    python security_owner.py start-and-close OPTIONS_JSON EXCHANGE_DIR

``attack``: start the cluster, store a document holding ``OWNER_SECRET`` in its database
(``mspass_owner.secrets``), write ``EXCHANGE_DIR/targets.json`` (readable by everyone: the
scheduler, worker and nanny addresses, the database's host and port, the dashboard's port and every
file the cluster wrote, by kind), then wait for ``EXCHANGE_DIR/done`` (written by the test once the
intruder has finished; at most ``--wait`` seconds), look at what is left of its data and close.
Telling the intruder the addresses is test scaffolding, not a weakness: ``ss -ltn`` shows every
user the ports, and the attacks must fail although the intruder knows them.

``start-and-close``: start the cluster (the script-swap race needs only its start), close it.

``tls-dask``: not an ``MsPASSCluster`` but a plain Dask cluster on mutual TLS (a scheduler here, one
worker and its nanny, on the login host's external address), with its CA and certificate in
``EXCHANGE_DIR/credentials/{ca,worker}.pem``: private (0700 directory, 0600 files), or readable by
everyone with ``--readable-credentials``. It checks the intruder's TLS attacks, which no
``security=False`` cluster exercises: they must fail without the credentials and succeed with
them. ``OPTIONS_JSON`` is ignored.

Either way ``EXCHANGE_DIR/owner.json`` says at the end what happened: ``started`` (or the
``error`` that stopped the start, which is an outcome here, not a crash), ``job_ids``, and for
``attack`` what the owner finds of its data after the attacks. The cluster is used as a context
manager: leaving this script leaves no job and no process behind (exit status 0), whatever happened.

The process's umask is set to 022, the usual default (Debian's ``UMASK`` in ``/etc/login.defs``),
so that what the cluster makes readable to others is the cluster's doing, not this script's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

SECRET_DB, SECRET_COLLECTION = "mspass_owner", "secrets"
PLANTED_COLLECTION = "planted"  # where the intruder's db_insert attack writes


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (the reader never sees half a file), readable by all."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def files_by_kind(cluster) -> dict[str, list[str]]:
    """Every regular file under the cluster's directories and its jobs' scripts and logs, by kind."""
    options = cluster.options
    roots = {options.work_dir, options.log_dir, options.db_dir, options.worker_dir}
    paths = set()
    for root in roots:
        for folder, _, names in os.walk(root):
            paths.update(os.path.join(folder, name) for name in names)
    for job in cluster._launcher.jobs.values():
        paths.update(p for p in (job.script_path, job.log_path) if p)
    paths.add(cluster._launcher.context.heartbeat)
    db_dir = os.path.join(os.path.realpath(options.db_dir), "")
    kinds: dict[str, list[str]] = {k: [] for k in ("scripts", "logs", "heartbeat", "db_files", "credentials", "other")}
    for path in sorted(p for p in paths if os.path.isfile(p)):
        if os.path.realpath(path).startswith(db_dir):
            kind = "db_files"
        elif path.endswith((".pem", ".key", ".crt")):
            kind = "credentials"
        elif path.endswith(".sh"):
            kind = "scripts"
        elif path.endswith(".heartbeat"):
            kind = "heartbeat"
        elif path.endswith((".out", ".log", ".err")):
            kind = "logs"
        else:
            kind = "other"
        kinds[kind].append(path)
    return kinds


def this_hosts_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (where a dashboard on every interface is reached)."""
    import socket

    import psutil

    return sorted(
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    )


def targets_of(cluster, client) -> dict:
    """What the intruder is told: every address and file of the running cluster."""
    import pwd

    info = client.scheduler_info()
    workers = info["workers"]
    me = pwd.getpwuid(os.getuid())
    return {
        "owner": me.pw_name,
        "owner_uid": me.pw_uid,
        "owner_home": me.pw_dir,
        "backend": cluster.backend,
        "security": repr(cluster.options.security),
        "cluster": cluster._name,
        "scheduler": cluster.scheduler_address,
        "workers": sorted(workers),
        "nannies": sorted(w["nanny"] for w in workers.values() if w.get("nanny")),
        "worker_dashboards": sorted(
            f"{w['host']}:{w['services']['dashboard']}" for w in workers.values() if "dashboard" in w["services"]
        ),
        "dashboard_port": info.get("services", {}).get("dashboard"),
        "dashboard_link": cluster.dashboard_link,
        "login_host_addresses": this_hosts_addresses(),
        "db": {"host": cluster.database.host, "port": cluster.options.db_port, "node": cluster.db_job.node},
        "secret_collection": [SECRET_DB, SECRET_COLLECTION],
        "planted_collection": [SECRET_DB, PLANTED_COLLECTION],
        "worker_nodes": sorted({j.node for j in cluster._launcher.jobs.values() if j.role == "worker" and j.node}),
        "job_ids": sorted(cluster.job_ids),
        "work_dir": cluster.options.work_dir,
        "log_dir": cluster.options.log_dir,
        "db_dir": cluster.options.db_dir,
        "worker_dir": cluster.options.worker_dir,
        "files": files_by_kind(cluster),
    }


def wait_for(path: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.2)
    return False


def what_is_left(cluster, secret: str) -> dict:
    """The owner's view of its data after the attacks (read with the cluster's own credentials)."""
    db = cluster.get_db_client()[SECRET_DB]
    return {
        "secret_document_intact": db[SECRET_COLLECTION].find_one({"secret": secret}) is not None,
        "planted_documents": db[PLANTED_COLLECTION].count_documents({}),
    }


def write_credentials(directory: str, readable: bool) -> tuple[str, str]:
    """A fresh CA and a certificate it signed (for every Dask role), as ``ca.pem`` and ``worker.pem``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, key, issuer, issuer_key, ca):
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256())
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("owner's test CA", ca_key, "owner's test CA", ca_key, True)
    leaf = certificate("mspass-worker", key, "owner's test CA", ca_key, False)
    os.makedirs(directory, mode=0o755 if readable else 0o700)
    mode = 0o644 if readable else 0o600
    ca_path, leaf_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "worker.pem")
    pem = serialization.Encoding.PEM
    for path, data in (
        (ca_path, ca.public_bytes(pem)),
        (
            leaf_path,
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            + leaf.public_bytes(pem),
        ),
    ):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            f.write(data)
    return ca_path, leaf_path


def tls_dask(exchange: str, readable: bool, wait: float) -> dict:
    """A Dask cluster on mutual TLS to attack (see the module's docstring); what happened."""
    import pwd

    from distributed import Client, LocalCluster
    from distributed.security import Security

    ca, cert = write_credentials(os.path.join(exchange, "credentials"), readable)
    roles = ("scheduler", "worker", "client")
    security = Security(
        tls_ca_file=ca,
        require_encryption=True,
        **{f"tls_{role}_{part}": cert for role in roles for part in ("cert", "key")},
    )
    host = (this_hosts_addresses() or ["127.0.0.1"])[0]  # reachable by other users, as a cluster's would be
    me = pwd.getpwuid(os.getuid())
    with (
        LocalCluster(
            n_workers=1,
            processes=True,
            host=host,
            protocol="tls://",
            security=security,
            dashboard_address="127.0.0.1:0",  # the HTTP servers (plain) only on loopback
            worker_dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster, security=security) as client,
    ):
        workers = client.scheduler_info()["workers"]
        targets = {
            "owner": me.pw_name,
            "owner_uid": me.pw_uid,
            "owner_home": me.pw_dir,
            "backend": "tls-dask",
            "scheduler": cluster.scheduler_address,
            "workers": sorted(workers),
            "nannies": sorted(w["nanny"] for w in workers.values() if w.get("nanny")),
            "login_host_addresses": this_hosts_addresses(),
            "files": {"credentials": [ca, cert]},
        }
        write_json(os.path.join(exchange, "targets.json"), targets)
        return {"started": True, "done_seen": wait_for(os.path.join(exchange, "done"), wait)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["attack", "start-and-close", "tls-dask"])
    parser.add_argument("options", help="MsPASSCluster's options, as JSON")
    parser.add_argument("exchange", help="directory for targets.json and owner.json; the test writes 'done' there")
    parser.add_argument("--wait", type=float, default=600.0, help="longest wait for EXCHANGE/done, in seconds")
    parser.add_argument("--readable-credentials", action="store_true", help="tls-dask: credentials readable by all")
    args = parser.parse_args(argv)
    os.umask(0o022)
    if args.mode == "tls-dask":
        outcome = tls_dask(args.exchange, args.readable_credentials, args.wait)
        write_json(os.path.join(args.exchange, "owner.json"), outcome)
        return 0

    from mspass_cluster import MsPASSCluster

    options = json.loads(args.options)
    secret = os.environ.get("OWNER_SECRET", "")
    outcome: dict = {"started": False, "job_ids": []}
    cluster = None
    try:
        with MsPASSCluster(**options) as cluster:
            outcome["started"] = True
            outcome["job_ids"] = sorted(cluster.job_ids)
            if args.mode == "attack":
                client = cluster.get_client()
                cluster.get_db_client()[SECRET_DB][SECRET_COLLECTION].insert_one({"secret": secret})
                write_json(os.path.join(args.exchange, "targets.json"), targets_of(cluster, client))
                outcome["done_seen"] = wait_for(os.path.join(args.exchange, "done"), args.wait)
                outcome.update(what_is_left(cluster, secret))
            outcome["job_ids"] = sorted(cluster.job_ids)
    except Exception as exc:  # the outcome, reported: a refused start is what a secure cluster may answer
        outcome["error"] = f"{type(exc).__name__}: {exc}"
        outcome["traceback"] = traceback.format_exc()
        if cluster is not None:
            outcome["job_ids"] = sorted(cluster.job_ids)
    write_json(os.path.join(args.exchange, "owner.json"), outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
