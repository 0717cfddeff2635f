"""Issue 10, tested honestly: another user of the machine attacks a running cluster, for real.

Two ordinary users, made by ``ci/setup``: ``mspass-owner`` starts a cluster
(``security_owner.py``, through ``runuser``) on the Slurm test bed or the local
backend; ``mspass-intruder`` runs every attack of the issue (``security_intruder.py``)
from the login host and from inside a node's network namespace (``ip netns exec``),
and reports, per attack, whether it succeeded and the evidence.

Each case runs twice:

* with the default ``security`` every attack must fail;
* with ``security=False``, the **negative control**, every attack must succeed,
  so that no test passes because an attack is broken. The test also checks the
  control's evidence from outside the intruder: the files it planted exist and
  belong to the owner, the secret it read is the owner's, and the owner finds its
  data changed.

The newline injection has no control: input validation refuses it whatever
``security`` says (issue 10: input hygiene is not switchable).

Needs root (to switch users and enter the namespaces) and ``ci/setup``'s users;
with ``CI=true`` a missing user, like a missing test bed, is a failure, not a skip.
Every case leaves no job and no process of either user behind.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import NX_MONGOD, slurm_output

OWNER, INTRUDER = "mspass-owner", "mspass-intruder"
HERE = Path(__file__).parent
OWNER_SCRIPT = str(HERE / "security_owner.py")
INTRUDER_SCRIPT = str(HERE / "security_intruder.py")
#: What the two users' processes see of the environment: nothing of root's (no DASK_*, MSPASS_*, CI...).
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Seconds for a cluster to start, allowing for other tests' jobs on the shared test bed.
START_PATIENCE = 240.0

#: Every attack of ``security_intruder.py attack``, from wherever the intruder runs.
ATTACKS = (
    "scheduler_run_on_workers",
    "scheduler_run_on_scheduler",
    "worker_rpc_run",
    "nanny_rpc_run",
    "db_list",
    "db_read",
    "db_insert",
    "db_drop",
    "dashboard_logs_external",
    "read_job_scripts",
    "read_job_logs",
    "read_heartbeat",
    "read_db_files",
    "plain_tcp_listeners",
)
#: Only from the login host, where the scheduler's loopback is the intruder's loopback.
LOGIN_ONLY = ("dashboard_logs_loopback",)
#: Only from a node: the listeners on the worker nodes (the intruder runs in the database's node).
NODE_ONLY = ("plain_tcp_listeners_on_worker_nodes",)
#: The attacks whose code, run as the owner, writes a file into the owner's home.
PLANTING = ("scheduler_run_on_workers", "worker_rpc_run", "nanny_rpc_run")


# --------------------------------------------------------------------------- the users


def _users_problem() -> str | None:
    if os.geteuid() != 0:
        return "the security tests must run as root (they become the test users with runuser)"
    for user in (OWNER, INTRUDER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"user {user} does not exist"
        check = as_user(user, [sys.executable, "-c", "import mspass_cluster"])
        try:
            out = subprocess.run(check, capture_output=True, text=True, timeout=60, cwd="/", env=clean_env())
        except subprocess.TimeoutExpired:
            return f"{user} could not import mspass_cluster with {sys.executable} within 60 s"
        if out.returncode != 0:
            return f"{user} cannot run {sys.executable} -c 'import mspass_cluster': {out.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def security_users():
    """The owner and the intruder (ci/setup); missing under CI=true is a failure, not a skip."""
    problem = _users_problem()
    if problem:
        message = f"{problem}; ci/setup (as root) creates the users and lets them run this clone's .venv."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return pwd.getpwnam(OWNER), pwd.getpwnam(INTRUDER)


def clean_env(**extra) -> dict:
    return {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def as_user(user: str, argv: list[str], netns: str | None = None) -> list[str]:
    """``argv`` run as ``user`` (runuser sets HOME, USER, LOGNAME, SHELL), inside node ``netns`` if given."""
    command = ["runuser", "-u", user, "--", *argv]
    return ["ip", "netns", "exec", netns, *command] if netns else command


def user_processes(uid: int) -> list[str]:
    """``pid command`` of every live process of ``uid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            state = (entry / "stat").read_text().split(") ", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(f"{entry.name} {command[:160]}")
    return found


def owner_jobs() -> list[str]:
    return slurm_output("squeue", "--noheader", f"--user={OWNER}", "--format=%i %j %T").splitlines()


# --------------------------------------------------------------------------- a case's directories


@pytest.fixture
def base(security_users):
    """A directory every user can search: ``exchange/`` and ``scratch/`` of the owner, ``shared/`` (1777)."""
    owner, _ = security_users
    root = Path(tempfile.mkdtemp(prefix="mspass-security-", dir="/tmp"))
    root.chmod(0o755)
    for name in ("exchange", "scratch"):
        (root / name).mkdir()
        os.chown(root / name, owner.pw_uid, owner.pw_gid)
    (root / "shared").mkdir()
    (root / "shared").chmod(0o1777)
    token = secrets.token_hex(4)
    yield root, token
    for planted in Path(owner.pw_dir).glob(f"pwned-{token}-*"):
        planted.unlink()
    shutil.rmtree(root, ignore_errors=True)
    intruder = security_users[1].pw_uid
    deadline = time.monotonic() + 10
    while user_processes(intruder) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not user_processes(intruder), f"the intruder's processes outlived the test: {user_processes(intruder)}"


def owner_options(backend: str, security: str, work_dir: str) -> dict:
    options = dict(backend=backend, nodes=1, work_dir=work_dir, db_command=NX_MONGOD, startup_timeout=START_PATIENCE)
    # Other clusters (other tests on this machine and the shared test bed) hold the default port and the
    # next ones; a port of this case's own avoids a race for them.
    options["db_port"] = random.randint(27100, 27999)
    if backend == "slurm":
        options["walltime"] = "15"
    if security == "off":
        options["security"] = False
    return options


# --------------------------------------------------------------------------- the owner's cluster


class Owner:
    """The owner's ``security_owner.py``: started by this test, ended by it, leaving nothing."""

    def __init__(self, mode: str, options: dict, root: Path, secret: str = "", flags=()):
        self.exchange = root / "exchange"
        self.slurm = options["backend"] == "slurm"
        argv = [sys.executable, OWNER_SCRIPT, mode, json.dumps(options), str(self.exchange), "--wait", "300", *flags]
        self.log = open(root / "owner.log", "w+")
        self.proc = subprocess.Popen(
            as_user(OWNER, argv),
            cwd=root / "scratch",  # Slurm jobs start in the submitter's directory
            env=clean_env(OWNER_SECRET=secret),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.outcome: dict = {}
        self.leftovers: list[str] = []

    def targets(self) -> dict:
        """``targets.json`` once the cluster runs (fails the test with the owner's log if it never does)."""
        path = self.exchange / "targets.json"
        deadline = time.monotonic() + START_PATIENCE + 30
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the owner's cluster did not start; owner.json: {self.read_outcome()}\n{self.output()}")
            time.sleep(0.2)
        return json.loads(path.read_text())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def read_outcome(self) -> dict:
        path = self.exchange / "owner.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def finish(self) -> None:
        """Let the owner close its cluster; then anything it left is cancelled, killed and reported."""
        (self.exchange / "done").touch()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.leftovers.append(f"the owner's script (pid {self.proc.pid}) did not end within 120 s; killed")
            os.killpg(self.proc.pid, 9)  # its own session, started by this test
            self.proc.wait(timeout=30)
        self.outcome = self.read_outcome()
        if self.proc.returncode != 0:
            self.leftovers.append(f"the owner's script exited with {self.proc.returncode}:\n{self.output()}")
        self.leftovers += nothing_of_the_owner_left(self.outcome.get("job_ids", []), self.slurm)
        self.log.close()


def nothing_of_the_owner_left(job_ids, slurm: bool) -> list[str]:
    """What the owner still has (jobs, processes), after a grace period; the jobs of ``job_ids`` are then cancelled."""
    uid = pwd.getpwnam(OWNER).pw_uid
    deadline = time.monotonic() + 40  # a job's processes end after the script (Slurm's epilogue, KillWait)
    while True:
        jobs = owner_jobs() if slurm else []
        processes = user_processes(uid)
        if not jobs and not processes:
            return []
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ids = [line.split()[0] for line in jobs]
    mine = [j for j in ids if j in set(job_ids)]
    if mine:
        subprocess.run(["scancel", *mine], timeout=30)
    return [f"owner's jobs still queued: {jobs}", f"owner's processes still alive: {processes}"]


@contextmanager
def owner_cluster(mode: str, options: dict, root: Path, secret: str = "", flags=()):
    owner = Owner(mode, options, root, secret, flags)
    try:
        yield owner
    finally:
        owner.finish()


# --------------------------------------------------------------------------- the intruder


def intrude(argv: list[str], netns: str | None = None, timeout: float = 150) -> dict:
    """Run ``security_intruder.py argv`` as the intruder; its JSON report."""
    out = subprocess.run(
        as_user(INTRUDER, [sys.executable, INTRUDER_SCRIPT, *argv], netns),
        cwd="/",
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"the intruder's script failed ({out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(out.stdout)


def verdicts(report: dict, expected: set[str], succeed: bool) -> list[str]:
    """The attacks whose outcome is not ``succeed``, or that are missing, with their evidence."""
    problems = [f"{name}: not tried" for name in sorted(expected - set(report))]
    problems += [f"{name}: tried, but not expected here" for name in sorted(set(report) - expected)]
    for name in sorted(expected & set(report)):
        if report[name]["succeeded"] != succeed:
            word = "succeeded" if report[name]["succeeded"] else "failed"
            problems.append(f"{name} {word}: {report[name]['evidence']}")
    return problems


def planted_files(home: str, token: str, attack: str) -> list[os.stat_result]:
    return [p.stat() for p in Path(home).glob(f"pwned-{token}-{attack}-*")]


# --------------------------------------------------------------------------- the tests

WHERE = [
    pytest.param("slurm", "login", marks=pytest.mark.slurm, id="slurm-from-login-host"),
    pytest.param("slurm", "node", marks=pytest.mark.slurm, id="slurm-from-a-node"),
    pytest.param("local", "login", id="local-from-login-host"),
]
SECURITY = [pytest.param("default", id="secure-by-default"), pytest.param("off", id="control-security-off")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("security", SECURITY)
@pytest.mark.parametrize("backend,where", WHERE)
def test_every_attack_on_a_running_cluster(request, base, security_users, backend, where, security):
    """One owner cluster per case; every attack in one intruder process (plus listeners on the worker nodes)."""
    if backend == "slurm":
        request.getfixturevalue("slurm_testbed")
    owner_user, _ = security_users
    root, token = base
    secret = f"owner-secret-{secrets.token_hex(8)}"
    options = owner_options(backend, security, str(root / "scratch" / "run"))
    started = time.monotonic()
    with owner_cluster("attack", options, root, secret) as owner:
        targets = owner.targets()
        for key in ("workers", "nannies"):
            assert targets[key], f"the owner's cluster reports no {key}: nothing to attack"
        for kind in ("scripts", "logs", "heartbeat", "db_files"):
            assert targets["files"][kind], f"the owner's cluster wrote no file of kind {kind}: nothing to read"
        targets_path = str(owner.exchange / "targets.json")
        argv = ["attack", targets_path, "--token", token]
        if where == "login":
            report = intrude([*argv, "--where", "login"])
            expected = set(ATTACKS) | set(LOGIN_ONLY)
        else:
            node = targets["db"]["node"]
            report = intrude([*argv, "--where", f"node:{node}"], netns=node)
            worker_nodes = [n for n in targets["worker_nodes"] if n != node]
            assert worker_nodes, f"no worker node apart from the database's ({node}): {targets['worker_nodes']}"
            found = {
                n: intrude([*argv, "--where", f"node:{n}", "--only", "plain_tcp_listeners"], netns=n)
                for n in worker_nodes
            }
            report["plain_tcp_listeners_on_worker_nodes"] = {
                "succeeded": any(r["plain_tcp_listeners"]["succeeded"] for r in found.values()),
                "evidence": "; ".join(f"{n}: {r['plain_tcp_listeners']['evidence']}" for n, r in found.items()),
            }
            expected = set(ATTACKS) | set(NODE_ONLY)
    elapsed = time.monotonic() - started
    print(f"{backend} from {where}, security {security}: {elapsed:.1f} s\n{json.dumps(report, indent=1)}")

    if security == "off":
        problems = verdicts(report, expected, succeed=True)
        assert not problems, "the control failed: with security=False these attacks should work:\n" + "\n".join(
            problems
        )
        # The control's evidence, checked from outside the intruder's report.
        for attack in PLANTING:
            files = planted_files(owner_user.pw_dir, token, attack)
            assert files and all(f.st_uid == owner_user.pw_uid for f in files), f"{attack}: no file of the owner"
        assert secret in report["scheduler_run_on_scheduler"]["evidence"]
        assert secret in report["db_read"]["evidence"]
        assert owner.outcome["secret_document_intact"] is False
        assert owner.outcome["planted_documents"] >= 1
    else:
        problems = verdicts(report, expected, succeed=False)
        assert not problems, "attacks on a cluster with the default security that succeeded:\n" + "\n".join(problems)
        for attack in PLANTING:
            assert not planted_files(owner_user.pw_dir, token, attack), f"{attack} planted a file in the owner's home"
        assert owner.outcome["secret_document_intact"] is True
        assert owner.outcome["planted_documents"] == 0
    assert not owner.leftovers, "\n".join(owner.leftovers)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("security", SECURITY)
@pytest.mark.parametrize("backend", [pytest.param("slurm", marks=pytest.mark.slurm), "local"])
def test_script_swap_race_in_a_shared_work_dir(request, base, security_users, backend, security):
    """The intruder pre-creates a world-writable ``logs/`` in a shared work_dir and swaps every new job script.

    Succeeded (the control) when a marker the swapped script touches exists and
    belongs to the owner: the owner's job ran the intruder's script. A secure
    cluster may refuse to start in such a directory; then nothing runs at all.
    """
    if backend == "slurm":
        request.getfixturevalue("slurm_testbed")
    owner_user, _ = security_users
    root, token = base
    shared = root / "shared"
    marker, stop = shared / f"swap-marker-{token}", root / "stop-watching"
    watcher = subprocess.Popen(
        as_user(
            INTRUDER,
            [sys.executable, INTRUDER_SCRIPT, "swap", str(shared), "--marker", str(marker), "--stop", str(stop)],
        ),
        cwd="/",
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        ready, _, _ = select.select([watcher.stdout], [], [], 30)
        assert ready and watcher.stdout.readline().strip() == "ready", "the intruder's watcher did not start"
        with owner_cluster("start-and-close", owner_options(backend, security, str(shared)), root) as owner:
            owner.proc.wait(timeout=START_PATIENCE + 60)
    finally:
        stop.touch()
        try:
            out, err = watcher.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(watcher.pid, 9)  # its own session, started by this test
            out, err = watcher.communicate()
    assert watcher.returncode == 0, f"the watcher failed:\n{err[-3000:]}"
    report = json.loads(out)["script_swap"]
    print(f"{backend}, security {security}: {report}; owner: {owner.outcome}")
    if security == "off":
        assert owner.outcome.get("started"), f"the control's cluster did not start: {owner.outcome}"
        assert report["succeeded"], f"the control failed: the owner's job did not run the swapped script: {report}"
        assert marker.stat().st_uid == owner_user.pw_uid
    else:
        assert not report["succeeded"], f"a secure cluster ran the intruder's script: {report}; owner: {owner.outcome}"
        assert not marker.exists()
    assert not owner.leftovers, "\n".join(owner.leftovers)


INJECTIONS = {
    "partition": lambda marker, root: f"debug\ntouch {marker}",
    "account": lambda marker, root: f"mine\ntouch {marker}",
    "qos": lambda marker, root: f"normal\ntouch {marker}",
    "job_extra_directives": lambda marker, root: [f"--comment=x\ntouch {marker}"],
    "work_dir": lambda marker, root: f"{root}/scratch/run\ntouch {marker}",
}


@pytest.mark.parametrize("security", SECURITY)
@pytest.mark.parametrize("field", sorted(INJECTIONS))
def test_a_newline_cannot_add_a_line_to_the_job_script(base, security_users, field, security):
    """A newline in a value that lands in an ``#SBATCH`` line would start a shell line of its own.

    The owner starts a local cluster (whose job scripts are the Slurm ones, run
    with bash) with the injected value; had it reached a script, the marker
    would exist. There is no negative control: input validation refuses the
    value before anything is written, whatever ``security`` says (input hygiene
    is not switchable), so no cluster exists on which the injection works.
    """
    root, _ = base
    marker = root / "shared" / "injected-marker"
    value = INJECTIONS[field](marker, root)
    options = owner_options("local", security, str(root / "scratch" / "run"))
    options[field] = value
    with owner_cluster("start-and-close", options, root) as owner:
        owner.proc.wait(timeout=120)
    assert not owner.outcome.get("started"), f"a cluster started with {field}={value!r}"
    assert owner.outcome.get("error", "").startswith("ConfigError") and field in owner.outcome["error"], owner.outcome
    assert not marker.exists(), f"{field}={value!r} ran the injected line"
    assert not owner.leftovers, "\n".join(owner.leftovers)


TLS_ATTACKS = ("scheduler_run_on_workers", "scheduler_run_on_scheduler", "worker_rpc_run", "nanny_rpc_run")


@pytest.mark.parametrize("credentials", ["readable", "private"])
def test_the_tls_attacks_are_real(base, security_users, credentials):
    """The control for the attacks' TLS paths, which no ``security=False`` cluster takes.

    The owner runs a plain Dask cluster on mutual TLS (``security_owner.py tls-dask``):
    with its CA and certificate readable by everyone, the intruder, using them, runs
    code as the owner through the scheduler, a worker and a nanny; with them private
    (0600 in a 0700 directory), the same attacks, without and with a certificate of the
    intruder's own, fail. Either way the listener check sees TLS, not plain TCP.
    """
    owner_user, _ = security_users
    root, token = base
    readable = credentials == "readable"
    flags = ["--readable-credentials"] if readable else []
    with owner_cluster("tls-dask", {"backend": "tls-dask"}, root, "tls-secret", flags) as owner:
        owner.targets()
        report = intrude(
            ["attack", str(owner.exchange / "targets.json"), "--token", token, "--where", "login"]
            + ["--only", ",".join((*TLS_ATTACKS, "plain_tcp_listeners"))]
        )
    print(json.dumps(report, indent=1))
    listeners = report.pop("plain_tcp_listeners")
    problems = verdicts(report, set(TLS_ATTACKS), succeed=readable)
    assert not problems, "\n".join(problems)
    if readable:
        assert all("the owner's credentials" in report[a]["evidence"] for a in TLS_ATTACKS), report
        assert "tls-secret" in report["scheduler_run_on_scheduler"]["evidence"]
        for attack in ("scheduler_run_on_workers", "worker_rpc_run", "nanny_rpc_run"):
            assert planted_files(owner_user.pw_dir, token, attack), attack
    assert not listeners["succeeded"] and "TLS, client certificate required" in listeners["evidence"], listeners
    assert not owner.leftovers, "\n".join(owner.leftovers)
