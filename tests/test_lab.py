"""From a laptop to a notebook on the cluster: ``mspass-cluster lab`` through a real OpenSSH login node.

All real: Debian's sshd on the test bed's login namespace (``ci/sshbed``), the Slurm test bed's
nodes, a laptop namespace whose only link goes to the login node, JupyterLab in a Slurm job,
chromium (headless, driven through the DevTools protocol by ``tests/lab_laptop.py``, which runs
in the laptop namespace). The user on both ends is ``mspass-owner`` (made by ``ci/setup``); the
laptop's home (``~/.ssh``: a key, config, known_hosts) is a directory of the test's.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import queued

from mspass_cluster.tunnel import parse_target

ROOT = Path(__file__).resolve().parent.parent
SSHBED = ROOT / "ci" / "sshbed"
DRIVER = Path(__file__).resolve().parent / "lab_laptop.py"
OWNER = "mspass-owner"
LOGIN = "10.78.0.1"
HOST_KEY = Path("/etc/mspass-sshbed/ssh_host_ed25519_key.pub")
AUTHORIZED = Path("/etc/mspass-sshbed/authorized_keys") / OWNER
SSHD_PIDFILE = Path("/run/mspass-sshbed/sshd.pid")
DB_PORT = 28301


def _fail_or_skip(message: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def sshbed(slurm_testbed):
    """The login and laptop namespaces with sshd (``ci/sshbed up``, idempotent); root only."""
    if os.geteuid() != 0:
        _fail_or_skip("the lab tests run as root (they build network namespaces and become mspass-owner)")
    try:
        import pwd

        pwd.getpwnam(OWNER)
    except KeyError:
        _fail_or_skip(f"user {OWNER} does not exist; ci/setup creates it")
    if shutil.which("chromium") is None:
        _fail_or_skip("chromium is not installed (ci/setup installs it)")
    out = subprocess.run([str(SSHBED), "up"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return True


class Laptop:
    """A home on the laptop (``~/.ssh``) for mspass-owner, and commands run in the laptop namespace."""

    def __init__(self, home: Path):
        self.home = home

    def argv(self, *argv: str, env: dict | None = None) -> list[str]:
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return [
            "nsenter",
            "--net=/run/netns/laptop",
            "runuser",
            "-u",
            OWNER,
            "--",
            "env",
            "-i",
            f"HOME={self.home}",
            "PATH=/usr/bin:/bin",
            "LANG=C.UTF-8",
            f"USER={OWNER}",
            *extra,
            *argv,
        ]

    def lab(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``mspass-cluster lab ARGS`` on the laptop, to completion."""
        command = self.argv(sys.executable, "-m", "mspass_cluster.cli", "lab", *args)
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd="/")

    def ssh_dir(self) -> Path:
        return self.home / ".ssh"

    def write(self, name: str, text: str, mode: int = 0o600) -> None:
        path = self.ssh_dir() / name
        path.write_text(text)
        os.chmod(path, mode)
        shutil.chown(path, OWNER, OWNER)

    def new_key(self, name: str) -> str:
        path = self.ssh_dir() / name
        subprocess.run(
            ["runuser", "-u", OWNER, "--", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)],
            check=True,
            timeout=30,
        )
        return (self.ssh_dir() / f"{name}.pub").read_text()


def _host_key_line() -> str:
    kind, key = HOST_KEY.read_text().split()[:2]
    return f"login,{LOGIN} {kind} {key}\n"


def _fingerprint() -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(HOST_KEY)], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


@pytest.fixture
def laptop(sshbed):
    """mspass-owner's laptop home: a key the login node accepts, ``Host login`` in ~/.ssh/config, known_hosts."""
    home = Path(f"/tmp/mspass-laptop-{secrets.token_hex(4)}")
    home.mkdir(mode=0o700)
    (home / ".ssh").mkdir(mode=0o700)
    shutil.chown(home, OWNER, OWNER)
    shutil.chown(home / ".ssh", OWNER, OWNER)
    laptop = Laptop(home)
    public = laptop.new_key("id_ed25519")
    laptop.write("config", f"Host login\n    HostName {LOGIN}\n    User {OWNER}\n", 0o644)
    laptop.write("known_hosts", _host_key_line(), 0o644)
    AUTHORIZED.write_text(public)
    os.chmod(AUTHORIZED, 0o644)
    yield laptop
    AUTHORIZED.unlink(missing_ok=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def cluster_dir():
    """A notebook directory of mspass-owner's on the cluster (0700, in its home)."""
    path = Path(f"/home/{OWNER}/lab-test-{secrets.token_hex(4)}")
    path.mkdir(mode=0o700)
    shutil.chown(path, OWNER, OWNER)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _frontend_jobs() -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-u", OWNER, "-o", "%i %j"], capture_output=True, text=True, timeout=30, check=True
    )
    return [line.split()[0] for line in out.stdout.splitlines() if line.split()[1].endswith("-frontend")]


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _driver(laptop_args: list[str], timeout: float = 700) -> dict:
    """tests/lab_laptop.py in the laptop namespace (as root: chromium's profile is the driver's)."""
    print(f"{time.strftime('%H:%M:%S')} laptop: {laptop_args[0]}", flush=True)
    command = ["nsenter", "--net=/run/netns/laptop", sys.executable, str(DRIVER), *laptop_args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd="/")
    assert out.returncode == 0, f"{laptop_args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


class LabProcess:
    """``mspass-cluster lab`` running on the laptop; its output read line by line."""

    def __init__(self, laptop: Laptop, *args: str):
        command = laptop.argv(sys.executable, "-u", "-m", "mspass_cluster.cli", "lab", *args)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        for line in self.lines:
            if regex.search(line):
                return regex.search(line)
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            match = regex.search(line)
            if match:
                return match
        raise AssertionError(f"{pattern!r} not printed within {timeout:g} s; lab printed:\n" + "\n".join(self.lines))

    def python_pid(self) -> int:
        for pid in _descendants(self.process.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mspass_cluster.cli" in command:
                return pid
        raise AssertionError("the lab process is gone")

    def interrupt(self) -> str:
        os.kill(self.python_pid(), signal.SIGINT)
        rest, _ = self.process.communicate(timeout=30)
        self.lines += rest.splitlines()
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            for pid in _descendants(self.process.pid):
                with_suppress_kill(pid)
            self.process.kill()
            self.process.wait(10)


def with_suppress_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _sshd_sessions() -> list[int]:
    """PIDs of the login node's sshd session processes (children of the sshd we started)."""
    return _children(int(SSHD_PIDFILE.read_text().strip()))


CELL = """\
import sys
from mspass_cluster import MsPASSCluster
cluster = MsPASSCluster(
    nodes=2, processes=1, cores=1, memory="1GiB", exclusive=False, walltime="10",
    db_memory="1GiB", db_port={db_port}, db_command=[sys.executable, "-m", "mspass_cluster.embedded_db"],
    work_dir={work_dir!r},
)
db = cluster.get_db_client()
notes = db["lab_e2e"]["notes"]
notes.insert_one({{"written_from": "the laptop's browser", "through": "ssh"}})
print("DOCUMENTS", notes.count_documents({{"through": "ssh"}}))
print("LINK", cluster.dashboard_link)
print("JOBS", " ".join(cluster.job_ids))
"""

COMPUTE = """\
import time
client = cluster.get_client()
def slow(i):
    time.sleep(0.2)
    return i
print("SUM", sum(client.gather(client.map(slow, range(80)))))
"""


@pytest.mark.slurm
@pytest.mark.timeout(1200)
def test_a_laptop_opens_jupyterlab_on_a_compute_node_runs_a_cluster_and_sees_its_dashboard(laptop, cluster_dir):
    lab = LabProcess(
        laptop,
        "--via",
        "login",
        "--port",
        "0",
        "--python",
        sys.executable,
        "--cores",
        "1",
        "--memory",
        "1500MB",
        "--walltime",
        "15",
        "--work-dir",
        str(cluster_dir),
    )
    jobs: list[str] = []
    try:
        found = lab.wait_for(
            r"Jupyter is running on (\S+), job (\d+); open (http://127\.0\.0\.1:\d+/lab\?token=\w+)", 240
        )
        node, frontend, url = found.groups()
        jobs.append(frontend)
        assert node.startswith("n")
        # The token is Jupyter's gate: without it, the tunnel's port answers 403.
        assert _driver(["status", url])["code"] == 200

        shown = _driver(["page", url])
        assert "JupyterLab" in shown["title"] and shown["location"].endswith("/lab")

        kernel = _driver(["kernel", url])["kernel"]
        result = _driver(["run", url, kernel, CELL.format(db_port=DB_PORT, work_dir=str(cluster_dir))])
        assert result["status"] == "ok", result
        assert "DOCUMENTS 1" in result["stdout"], result
        jobs += re.search(r"JOBS (.*)", result["stdout"]).group(1).split()
        link = re.search(r"LINK (\S+)", result["stdout"]).group(1)

        seen = _driver(["dashboard", url, kernel, link, COMPUTE])
        assert seen["tasks"] > 0, seen
        assert "bokeh" not in seen["text"].lower() or "needs" not in seen["text"].lower(), seen["text"]
        assert seen["computation"]["status"] == "ok" and f"SUM {sum(range(80))}" in seen["computation"]["stdout"]

        # The SSH connection dies (its sshd session process is killed): the tunnel comes back by itself.
        before = _sshd_sessions()
        assert before, "no sshd session for the tunnel"
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        lab.wait_for(r"SSH connection to login lost", 30)
        lab.wait_for(r"SSH connection to login back \(reconnect 1\)", 60)
        assert set(_sshd_sessions()).isdisjoint(before)
        assert _driver(["status", url])["code"] == 200
        closed = _driver(["run", url, kernel, "cluster.close(); print('CLOSED', cluster.status.name)"])
        assert "CLOSED closed" in closed["stdout"], closed

        said = lab.interrupt()
        assert "Tunnel closed. Jupyter keeps running in job" in said
        assert queued([frontend]) == [frontend], "Ctrl-C must close the tunnel only"

        stop = laptop.lab("--via", "login", "--stop")
        assert stop.returncode == 0 and f"Stopped the frontend job(s) {frontend}" in stop.stdout, stop
        assert queued(jobs) == []
    finally:
        lab.kill()
        leftover = queued(jobs)
        if leftover:
            subprocess.run(["scancel", *leftover], timeout=30)


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_with_container_jupyter_runs_in_the_image(laptop, cluster_dir):
    """--container: Jupyter runs through `apptainer exec` (the STAND-IN of tests/bin: no apptainer exists here)."""
    image = cluster_dir / "mspass_standin.sif"
    image.write_text("stand-in image (tests/bin/container_standin.py)\n")
    (cluster_dir / "mspass_standin.sif.env").write_text("PATH=/usr/local/bin:/usr/bin:/bin\n")
    for path in (image, cluster_dir / "mspass_standin.sif.env"):
        shutil.chown(path, OWNER, OWNER)
    lab = LabProcess(
        laptop,
        *("--via", "login", "--port", "0", "--python", sys.executable, "--cores", "1", "--memory", "1000MB"),
        *("--walltime", "5", "--work-dir", str(cluster_dir), "--container", str(image)),
        *("--prologue", f"export PATH={ROOT / 'tests' / 'bin'}:$PATH"),
    )
    frontend = None
    try:
        found = lab.wait_for(r"Jupyter is running on (\S+), job (\d+); open (http://\S+)", 400)
        frontend, url = found.group(2), found.group(3)
        assert _driver(["status", url])["code"] == 200
        in_image = [
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit()
            and _cmdline(pid).startswith("python3 -I -S")
            and "container_standin.py --as apptainer exec" in _cmdline(pid)
            and str(image) in _cmdline(pid)
        ]
        assert in_image, "Jupyter is not running through the apptainer stand-in"
        assert "Tunnel closed" in lab.interrupt()
        stop = laptop.lab("--via", "login", "--stop")
        assert stop.returncode == 0 and frontend in stop.stdout, stop
        assert queued([frontend]) == []
    finally:
        lab.kill()
        if frontend and queued([frontend]):
            subprocess.run(["scancel", frontend], timeout=30)


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------- errors a user can meet


@pytest.mark.slurm
def test_a_changed_host_key_is_refused_with_both_fingerprints_told(laptop):
    laptop.write(
        "known_hosts",
        f"login,{LOGIN} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDJAPUBxhhn/Fx80gZwCTdOVrQeAeSEBVGMnGnpqXusw\n",
    )
    before = _frontend_jobs()
    out = laptop.lab("--via", "login")
    assert out.returncode == 1
    assert "is NOT the one in" in out.stderr and _fingerprint() in out.stderr, out.stderr
    assert "ssh-keygen -R 10.78.0.1" in out.stderr
    assert "Traceback" not in out.stderr
    assert _frontend_jobs() == before


@pytest.mark.slurm
def test_an_unknown_host_key_shows_its_fingerprint_and_the_line_to_add(laptop):
    laptop.write("known_hosts", "")
    out = laptop.lab("--via", "login")
    assert out.returncode == 1
    assert "is unknown here" in out.stderr and _fingerprint() in out.stderr, out.stderr
    assert HOST_KEY.read_text().split()[1] in out.stderr


@pytest.mark.slurm
def test_a_key_the_login_node_refuses_is_reported_as_authentication(laptop):
    laptop.new_key("other")
    laptop.write(
        "config",
        f"Host login\n    HostName {LOGIN}\n    User {OWNER}\n    IdentityFile ~/.ssh/other\n    IdentitiesOnly yes\n",
        0o644,
    )
    (laptop.ssh_dir() / "id_ed25519").unlink()
    out = laptop.lab("--via", "login")
    assert out.returncode == 1
    assert "refused to let you in" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.slurm
def test_an_unreachable_login_node_and_a_missing_sbatch_are_told(laptop):
    out = laptop.lab("--via", "login:2222")
    assert out.returncode == 1 and "Cannot reach the login node login:2222" in out.stderr, out.stderr
    out = laptop.lab("--via", "login", "--prologue", "PATH=/nonexistent")
    assert out.returncode == 1, out
    assert "sbatch and squeue and scancel not found on the login node login" in out.stderr, out.stderr
    assert "module load slurm" in out.stderr


@pytest.mark.slurm
def test_a_taken_local_port_is_refused_before_any_job(laptop):
    holder = subprocess.Popen(
        laptop.argv(
            sys.executable,
            "-c",
            "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)",
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = holder.stdout.readline().strip()
        before = _frontend_jobs()
        out = laptop.lab("--via", "login", "--port", port)
        assert out.returncode == 2 or out.returncode == 1, out
        assert f"local port {port} on 127.0.0.1 is taken" in out.stderr and "--port 0" in out.stderr, out.stderr
        assert _frontend_jobs() == before
    finally:
        for pid in [*_descendants(holder.pid), holder.pid]:
            with_suppress_kill(pid)
        holder.wait(10)


@pytest.mark.slurm
def test_a_frontend_job_that_fails_is_reported_with_its_log_and_leaves_nothing(laptop, cluster_dir):
    out = laptop.lab(
        "--via",
        "login",
        "--port",
        "0",
        "--python",
        "/nonexistent/python3",
        "--cores",
        "1",
        "--memory",
        "500MB",
        "--walltime",
        "5",
        "--work-dir",
        str(cluster_dir),
        timeout=240,
    )
    assert out.returncode == 1, out
    job = re.search(r"The frontend job (\d+) \(JupyterLab\) ended before Jupyter answered", out.stderr)
    assert job, out.stderr
    assert "/nonexistent/python3" in out.stderr and "No such file or directory" in out.stderr, out.stderr
    assert queued([job.group(1)]) == []


# ---------------------------------------------------------------------- pure parts


def test_via_takes_jump_hosts_user_and_port():
    target, jumps = parse_target("me@gateway:2222,login")
    assert str(target) == "login" and [str(j) for j in jumps] == ["me@gateway:2222"]
    with pytest.raises(Exception, match="is not an SSH host"):
        parse_target("login,")


def test_job_script_frontend_previews_the_lab_job():
    from mspass_cluster import MsPASSCluster

    script = MsPASSCluster.job_script("frontend", partition="normal", python="python3", walltime="02:00:00")
    assert "#SBATCH --job-name=mspass-<id>-frontend" in script and "#SBATCH --time=02:00:00" in script
    assert "python3 -m jupyter lab --no-browser" in script


def test_lab_dry_run_prints_a_job_that_keeps_its_token_off_the_command_line():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mspass_cluster.cli",
            "lab",
            "--dry-run",
            "--partition",
            "normal",
            "--container",
            "/x.sif",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    script = out.stdout
    assert "#SBATCH --partition=normal" in script and "umask 077" in script
    run_line = next(line for line in script.splitlines() if "jupyter lab" in line)
    assert "exec" in run_line and "/x.sif" in run_line and "token" not in run_line.lower()
    assert "JUPYTER_TOKEN=$(od -An -tx1 -N24 /dev/urandom" in script


def test_status_and_down_on_the_cluster_know_the_frontend_job():
    from mspass_cluster.cli import OWN_JOB
    from mspass_cluster.lab import FRONTEND_JOB

    match = OWN_JOB.match("mspass-3f2a9c01-frontend")
    assert match and match.group("cluster") == "3f2a9c01"
    assert FRONTEND_JOB.match("mspass-3f2a9c01-frontend") and not FRONTEND_JOB.match("mspass-3f2a9c01-db")


@pytest.mark.slurm
def test_tunnel_forwards_a_loopback_port_to_a_service_on_a_compute_node(laptop, tmp_path):
    (tmp_path / "hello.txt").write_text("from n1\n")
    server = subprocess.Popen(
        ["nsenter", "--net=/run/netns/n1", sys.executable, "-m", "http.server", "0", "--bind", "10.77.0.11"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tunnel = None
    try:
        port = re.search(r"port (\d+)", server.stdout.readline()).group(1)
        command = laptop.argv(
            sys.executable, "-u", "-m", "mspass_cluster.cli", "tunnel", "--via", "login", f"10.77.0.11:{port}"
        )
        tunnel = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
        line = tunnel.stdout.readline()
        local = re.match(r"127\.0\.0\.1:(\d+) -> 10\.77\.0\.11:\d+ through login", line)
        assert local, line
        fetch = laptop.argv(
            sys.executable,
            "-c",
            f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{local.group(1)}/hello.txt').read().decode())",
        )
        assert subprocess.run(fetch, capture_output=True, text=True, timeout=30).stdout.strip() == "from n1"
        direct = laptop.argv(
            sys.executable, "-c", f"import socket; socket.create_connection(('10.77.0.11', {port}), 3)"
        )
        assert subprocess.run(direct, capture_output=True, timeout=30).returncode != 0, "the laptop reaches n1 directly"
    finally:
        for process in (tunnel, server):
            if process is not None:
                for pid in [*_descendants(process.pid), process.pid]:
                    with_suppress_kill(pid)
                process.wait(10)


@pytest.mark.slurm
def test_a_proxyjump_chain_from_ssh_config_reaches_a_host_the_laptop_cannot(laptop):
    """``ProxyJump login`` in ~/.ssh/config: the login node's cluster-side address (10.77.0.2), through login."""
    kind, key = HOST_KEY.read_text().split()[:2]
    laptop.write("known_hosts", _host_key_line() + f"10.77.0.2 {kind} {key}\n", 0o644)
    laptop.write(
        "config",
        f"Host login\n    HostName {LOGIN}\n    User {OWNER}\nHost inner\n    HostName 10.77.0.2\n    User {OWNER}\n"
        "    ProxyJump login\n",
        0o644,
    )
    # Logged in through the jump (then told, harmlessly, that this shell has no Slurm on its PATH).
    out = laptop.lab("--via", "inner", "--prologue", "PATH=/nonexistent")
    assert out.returncode == 1 and "not found on the login node inner" in out.stderr, out
    direct = laptop.lab("--via", f"{OWNER}@10.77.0.2", "--prologue", "PATH=/nonexistent")
    assert direct.returncode == 1 and "Cannot reach the login node" in direct.stderr, direct
