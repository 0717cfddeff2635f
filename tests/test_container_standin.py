"""Pin the behaviour of the Apptainer/Singularity STAND-IN in ``tests/bin``.

No apptainer or singularity binary exists on the test machines; the container
tests put ``tests/bin`` first on PATH, where ``apptainer`` and ``singularity``
run ``tests/bin/container_standin.py``. These tests check that the stand-in
behaves like the real runtimes (Apptainer 1.3.4, SingularityCE 4.1.5) on what
the package relies on - command line and its errors, the container
environment and its precedence rules, real bind mounts, exit status, signal
forwarding - so that tests run through it mean something. Every test starts
the stand-in as a separate process, through its wrapper on PATH.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BIN = Path(__file__).resolve().parent / "bin"
VENV_BIN = os.path.dirname(sys.executable)
IMAGE_PATH = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"
HOME = pwd.getpwuid(os.getuid()).pw_dir
PREFIX = {"apptainer": "APPTAINERENV_", "singularity": "SINGULARITYENV_"}
RUNTIMES = ["apptainer", "singularity"]
ENV_DUMP = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def _bwrap_works() -> bool:
    path = shutil.which("bwrap")
    return (
        bool(path)
        and subprocess.run([path, "--bind", "/", "/", "--", "/bin/true"], capture_output=True).returncode == 0
    )


needs_bwrap = pytest.mark.skipif(not _bwrap_works(), reason="bubblewrap cannot create mount namespaces here")


@pytest.fixture
def sandbox(tmp_path):
    """A sandbox image: a directory whose environment is .singularity.d/env/90-environment.sh."""
    root = tmp_path / "mspass_sandbox"
    (root / ".singularity.d" / "env").mkdir(parents=True)
    (root / ".singularity.d" / "env" / "90-environment.sh").write_text(
        "#!/bin/sh\n"
        f"export PATH={IMAGE_PATH}\n"
        "export MSPASS_HOME=/mspass\n"
        "export MONGODB_PORT=27017\n"
        "IMAGE_ONLY='from the image'\n"
        "export IMAGE_ONLY\n"
    )
    return str(root)


@pytest.fixture
def sif(tmp_path):
    """A .sif stand-in image (any content) with its Docker ENV in the sidecar <image>.env."""
    image = tmp_path / "mspass_latest.sif"
    image.write_text("stand-in image (tests/bin/container_standin.py)\n")
    (tmp_path / "mspass_latest.sif.env").write_text(
        f"PATH={IMAGE_PATH}\nMSPASS_HOME=\"/mspass\"\nMONGODB_PORT=27017\nIMAGE_ONLY='from the image'\n"
    )
    return str(image)


@pytest.fixture(params=["sandbox", "sif"])
def image(request):
    return request.getfixturevalue(request.param)


def environment(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("APPTAINER", "SINGULARITY")) and k != "MSPASS_STANDIN_NO_BWRAP"
    }
    env.update(PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", MSPASS_STANDIN_PYTHON=sys.executable)
    env.update(extra)
    return env


def run(runtime, *args, env=None, cwd=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [runtime, *args], env=env or environment(), cwd=cwd, capture_output=True, text=True, timeout=30, **kw
    )


def inside(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_for(path: Path, proc: subprocess.Popen, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# --- command line -----------------------------------------------------------


@pytest.mark.parametrize(
    "runtime, line",
    [("apptainer", "apptainer version 1.3.4-standin"), ("singularity", "singularity-ce version 4.1.5-standin")],
)
def test_version(runtime, line):
    result = run(runtime, "--version")
    assert (result.returncode, result.stdout) == (0, line + "\n")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_unknown_flag_fails_like_cobra(runtime, sif):
    # ExecuteApptainer/ExecuteSingularity: "Error for command" on stderr, usage on stdout, os.Exit(1).
    result = run(runtime, "exec", "--no-such-flag", sif, "true")
    assert result.returncode == 1
    assert 'Error for command "exec": unknown flag: --no-such-flag' in result.stderr
    assert f"Run '{runtime} --help' for more detailed usage information." in result.stdout
    short = run(runtime, "exec", "-x", sif, "true")
    assert short.returncode == 1 and "unknown shorthand flag: 'x' in -x" in short.stderr


def test_unknown_global_option_and_command(sif):
    result = run("apptainer", "--no-such-option", "exec", sif, "true")
    assert result.returncode == 1 and "unknown flag: --no-such-option" in result.stderr
    result = run("apptainer", "frobnicate")
    assert result.returncode == 1
    assert result.stderr.startswith('Error: unknown command "frobnicate" for "apptainer"')
    assert "Run 'apptainer --help' for more detailed usage information." in result.stdout


def test_global_options_before_the_command_and_options_stop_at_the_image(sif):
    result = run(
        "apptainer",
        "-q",
        "--silent",
        "-d",
        "exec",
        "-eB",
        f"{os.path.dirname(sif)}",
        "--env=X=1",
        sif,
        "echo",
        "--cleanenv",
        "-B",
        "x",
        "--no-such-flag",
    )
    assert (result.returncode, result.stdout) == (0, "--cleanenv -B x --no-such-flag\n")


def test_options_the_stand_in_does_not_emulate_are_refused_not_ignored(sif):
    result = run("apptainer", "exec", "--fakeroot", sif, "true")
    assert result.returncode == 255 and "not emulated by this stand-in" in result.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_missing_image(runtime, tmp_path):
    missing = tmp_path / "missing.sif"
    result = run(runtime, "exec", str(missing), "true")
    assert result.returncode == 255
    assert result.stderr == (
        f"FATAL:   could not open image {missing}: failed to retrieve path for {missing}: "
        f"lstat {missing}: no such file or directory\n"
    )


# --- environment ------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_image_env_beats_host_and_prefixed_beats_image(runtime, image):
    env = environment(
        MSPASS_HOME="/host", MONGODB_PORT="1", HOST_ONLY="leak", **{PREFIX[runtime] + "MONGODB_PORT": "27311"}
    )
    result = run(runtime, "exec", image, *ENV_DUMP, env=env)
    values = inside(result)
    assert values["MONGODB_PORT"] == "27311"  # APPTAINERENV_/SINGULARITYENV_ over the image
    assert values["MSPASS_HOME"] == "/mspass"  # the image's ENV over the host's value
    assert values["IMAGE_ONLY"] == "from the image"
    assert values["HOST_ONLY"] == "leak"  # inherited without --cleanenv
    assert values["HOME"] == HOME
    assert values["PATH"].startswith(IMAGE_PATH)
    assert not [k for k in values if k.startswith(("APPTAINERENV_", "SINGULARITYENV_"))]
    assert values["SINGULARITY_CONTAINER"] == image
    assert values.get("APPTAINER_CONTAINER") == (image if runtime == "apptainer" else None)
    if runtime == "apptainer":  # SetContainerEnv's warning for a host value that differs from the override
        assert "Environment variable MONGODB_PORT already has value [27311]" in result.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cleanenv_keeps_only_the_prefixed_variables(runtime, sandbox):
    env = environment(
        HOST_ONLY="leak", TERM="xterm-standin", LANG="en_US.UTF-8", **{PREFIX[runtime] + "MSPASS_ROLE": "db"}
    )
    values = inside(run(runtime, "exec", "--cleanenv", sandbox, *ENV_DUMP, env=env))
    assert "HOST_ONLY" not in values
    assert values["MSPASS_ROLE"] == "db"
    assert values["TERM"] == "xterm-standin"  # always passed
    assert values["LANG"] == "C"  # set by --cleanenv
    assert values["PATH"] == IMAGE_PATH  # the image's, never the host's
    assert values["HOME"] == HOME


def test_apptainer_honours_singularityenv_with_a_notice(sif):
    result = run("apptainer", "exec", "--cleanenv", sif, *ENV_DUMP, env=environment(SINGULARITYENV_FOO="legacy"))
    assert inside(result)["FOO"] == "legacy"
    assert "INFO:    Environment variable SINGULARITYENV_FOO is set, but APPTAINERENV_FOO is preferred" in result.stderr
    both = run(
        "apptainer",
        "exec",
        "--cleanenv",
        sif,
        *ENV_DUMP,
        env=environment(SINGULARITYENV_FOO="legacy", APPTAINERENV_FOO="new"),
    )
    assert inside(both)["FOO"] == "new"
    assert "WARNING: SINGULARITYENV_FOO and APPTAINERENV_FOO have different values, using the latter" in both.stderr


def test_singularity_knows_only_its_own_prefix(sif):
    values = inside(
        run(
            "singularity",
            "exec",
            "--cleanenv",
            sif,
            *ENV_DUMP,
            env=environment(APPTAINERENV_FOO="x", SINGULARITYENV_BAR="y"),
        )
    )
    assert "FOO" not in values and "APPTAINERENV_FOO" not in values and values["BAR"] == "y"


def test_env_option_splits_on_commas_and_wins(sif, tmp_path):
    env_file = tmp_path / "vars.env"
    env_file.write_text('D="from file"\nA=from-file\n')
    values = inside(
        run(
            "apptainer",
            "exec",
            "--env",
            "A=1,B=2",
            "--env",
            "C=x,y",
            "--env-file",
            str(env_file),
            sif,
            *ENV_DUMP,
            env=environment(APPTAINERENV_A="prefixed"),
        )
    )
    assert (values["A"], values["B"], values["C"], values["D"]) == ("1", "2", "x,y", "from file")


def test_path_overrides_and_forbidden_home(sif):
    result = run(
        "apptainer",
        "exec",
        "--cleanenv",
        sif,
        *ENV_DUMP,
        env=environment(APPTAINERENV_PREPEND_PATH="/opt/pre", APPTAINERENV_HOME="/elsewhere"),
    )
    values = inside(result)
    assert values["PATH"].startswith("/opt/pre:" + IMAGE_PATH) and values["HOME"] == HOME
    assert "Overriding HOME environment variable with APPTAINERENV_HOME is not permitted" in result.stderr


def test_pwd_and_home(sif, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "myhome").mkdir()
    code = "import os; print(os.getcwd(), os.environ['HOME'], os.environ['PWD'])"
    result = run(
        "apptainer",
        "exec",
        "--pwd",
        str(tmp_path / "work"),
        "--home",
        str(tmp_path / "myhome"),
        sif,
        sys.executable,
        "-c",
        code,
    )
    assert result.stdout.split() == [str(tmp_path / "work"), str(tmp_path / "myhome"), str(tmp_path / "work")]
    missing = run("apptainer", "exec", "--pwd", str(tmp_path / "nope"), sif, "true")
    assert missing.returncode == 255
    assert (
        f"FATAL:   failed to set working directory: chdir {tmp_path / 'nope'}: no such file or directory"
        in missing.stderr
    )


# --- mounts -----------------------------------------------------------------


@needs_bwrap
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_bind_is_a_real_mount(runtime, sif, tmp_path):
    src, dst = tmp_path / "data", tmp_path / "elsewhere" / "data"
    src.mkdir()
    (src / "in.txt").write_text("from the host")
    code = (
        "import os, sys; d = sys.argv[1]; print(open(os.path.join(d, 'in.txt')).read(), os.environ['SINGULARITY_BIND']);"
        "open(os.path.join(d, 'out.txt'), 'w').write('from the container')"
    )
    result = run(runtime, "exec", "--bind", f"{src}:{dst}", sif, sys.executable, "-c", code, str(dst), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected_bind = str(dst) if runtime == "apptainer" else f"{src}:{dst}"
    assert result.stdout == f"from the host {expected_bind}\n"
    assert (src / "out.txt").read_text() == "from the container"
    assert not (dst / "in.txt").exists(), "the mount must be private to the container"


@needs_bwrap
@pytest.mark.parametrize("variable", ["APPTAINER_BIND", "SINGULARITY_BIND"])
def test_bind_variables_of_the_calling_environment_add_binds(variable, sif, tmp_path):
    # Why the job scripts unset APPTAINER_BIND and SINGULARITY_BIND: the runtime reads them as --bind.
    src, dst = tmp_path / "data", tmp_path / "view"
    src.mkdir()
    (src / "in.txt").write_text("x")
    result = run("apptainer", "exec", sif, "ls", str(dst), env=environment(**{variable: f"{src}:{dst}"}))
    assert result.stdout == "in.txt\n"
    if variable == "SINGULARITY_BIND":
        assert "Environment variable SINGULARITY_BIND is set, but APPTAINER_BIND is preferred" in result.stderr


@pytest.mark.parametrize("runtime, hook", [("apptainer", "mount hook function failure: "), ("singularity", "")])
def test_missing_bind_source(runtime, hook, sif, tmp_path):
    result = run(runtime, "exec", "-B", "/nonexistent/data:/data", sif, "touch", str(tmp_path / "ran"))
    assert result.returncode == 255
    assert result.stderr.endswith(
        f"FATAL:   container creation failed: {hook}mount /nonexistent/data->/data error: "
        "while mounting /nonexistent/data: mount source /nonexistent/data doesn't exist\n"
    )
    assert not (tmp_path / "ran").exists()


@needs_bwrap
def test_read_only_bind_refuses_writes(sif, tmp_path):
    src = tmp_path / "ro"
    src.mkdir()
    code = (
        "import errno, sys\ntry:\n    open(sys.argv[1], 'w')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
    )
    result = run(
        "apptainer",
        "exec",
        "--bind",
        f"{src}:{tmp_path / 'view'}:ro",
        sif,
        sys.executable,
        "-c",
        code,
        str(tmp_path / "view" / "x"),
        cwd=tmp_path,
    )
    assert result.stdout.strip() == "EROFS" and not (src / "x").exists()


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="root could write there if the image root were not read-only")
def test_the_image_root_is_read_only(sif, tmp_path):
    probe = f"/var/lib/mspass-standin-probe-{uuid.uuid4().hex}"
    code = (
        "import errno, sys\ntry:\n    open(sys.argv[1], 'w')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
    )
    try:
        result = run("apptainer", "exec", sif, sys.executable, "-c", code, probe, cwd=tmp_path)
        assert result.stdout.strip() == "EROFS"
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


@needs_bwrap
def test_contain_gives_an_empty_tmp_and_home(sif, tmp_path):
    (tmp_path / "host-file").write_text("x")
    script = 'test -e "$1" && echo visible || echo hidden; ls -A "$HOME" | wc -l; ls /dev | wc -l'
    result = run("apptainer", "exec", "--contain", sif, "sh", "-c", script, "sh", str(tmp_path / "host-file"))
    hidden, home_entries, dev_entries = result.stdout.split()
    assert (hidden, home_entries) == ("hidden", "0") and int(dev_entries) < 30, result.stderr


# --- processes --------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exit_status_of_the_command(runtime, sandbox):
    assert run(runtime, "exec", sandbox, "sh", "-c", "exit 3").returncode == 3


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_command_not_found(runtime, sandbox):
    result = run(runtime, "exec", sandbox, "no-such-command-xyz")
    assert result.returncode == 255
    assert result.stderr == 'FATAL:   "no-such-command-xyz": executable file not found in $PATH\n'


TRAP_TERM = """
import os, signal, sys, time
marker, ready = sys.argv[1], sys.argv[2]
def stop(signum, frame):
    # Like mongod: a second SIGTERM (the group's and the forwarded copy) must not interrupt the exit.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(marker, "w").write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(ready, "w").write(str(os.getpid()))
time.sleep(30)
sys.exit(9)
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigterm_to_the_stand_in_reaches_the_command(runtime, sif, tmp_path):
    # What scancel does to the process our job script started: SIGTERM to the runtime's PID.
    marker, ready = tmp_path / "marker", tmp_path / "ready"
    proc = subprocess.Popen(
        [runtime, "exec", "--cleanenv", sif, sys.executable, "-c", TRAP_TERM, str(marker), str(ready)],
        env=environment(),
        cwd=tmp_path,
    )
    try:
        wait_for(ready, proc)
        assert int(ready.read_text()) != proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    assert marker.read_text() == "SIGTERM"


def test_sigterm_to_the_whole_process_group_still_lets_the_command_stop_cleanly(sif, tmp_path):
    # Slurm signals every process of the job: bwrap must not die and take the command with it.
    marker, ready = tmp_path / "marker", tmp_path / "ready"
    proc = subprocess.Popen(
        ["apptainer", "exec", sif, sys.executable, "-c", TRAP_TERM, str(marker), str(ready)],
        env=environment(),
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        wait_for(ready, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    assert marker.read_text() == "SIGTERM"


def test_a_command_killed_by_the_forwarded_signal_kills_the_stand_in_likewise(sif, tmp_path):
    ready = tmp_path / "ready"
    code = "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(30)"
    proc = subprocess.Popen(
        ["apptainer", "exec", sif, sys.executable, "-c", code, str(ready)], env=environment(), cwd=tmp_path
    )
    try:
        wait_for(ready, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()


def test_nv_without_a_driver_warns_and_runs(sif):
    if shutil.which("nvidia-smi"):
        pytest.skip("an NVIDIA driver is installed here")
    result = run("apptainer", "exec", "--nv", sif, "true")
    assert result.returncode == 0
    assert "WARNING: Could not find any nv files on this host!" in result.stderr


def test_without_bubblewrap_the_command_still_runs_with_a_notice(sif):
    result = run(
        "apptainer",
        "exec",
        "--cleanenv",
        sif,
        *ENV_DUMP,
        env=environment(MSPASS_STANDIN_NO_BWRAP="1", HOST_ONLY="leak", APPTAINERENV_X="1"),
    )
    values = inside(result)
    assert "HOST_ONLY" not in values and values["X"] == "1"
    assert "NOT emulated" in result.stderr
    assert (
        run("apptainer", "exec", sif, "sh", "-c", "exit 4", env=environment(MSPASS_STANDIN_NO_BWRAP="1")).returncode
        == 4
    )
