"""Files and input hygiene (issue 10, items 3 and 4): what the cluster writes is yours alone, and what runs is what was written.

Real files, real processes: local clusters (the fake mongod as the
database), directories given to another user with ``chown`` (the tests run
as root on the test bed), symlinks planted where a script is about to be
written, and a job submitted to the Slurm test bed to see where Slurm really
puts its log. Each test fails without the part of the fix it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import stat
import subprocess
import time

import pytest
from conftest import FAKE_MONGOD, cluster_processes, queued

from mspass_cluster import ConfigError, MsPASSCluster
from mspass_cluster.config import OPTIONS, prepare_directories, resolve_options
from mspass_cluster.files import PRIVATE_PARENT, create_private_dir, remove_private_dir, write_file
from mspass_cluster.slurm import build_directives

#: Every option whose value is text that can land in a job script (an ``#SBATCH`` line or a shell line).
TEXT_KINDS = ("str", "path", "list", "memory", "walltime", "lifetime", "choice")
CONTROL = ["\n", "\r", "\0", "\x1b", "\x7f", "\t"]


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def give_away(path, mode_bits: int) -> None:
    """Make ``path`` another user's (``nobody``), with ``mode_bits``: the intruder's directory."""
    nobody = pwd.getpwnam("nobody")
    try:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    except PermissionError:
        pytest.skip("giving a directory to another user needs root (the test bed runs the tests as root)")
    os.chmod(path, mode_bits)


def local_cluster(work_dir, **options) -> MsPASSCluster:
    return MsPASSCluster(backend="local", nodes=1, work_dir=str(work_dir), db_command=FAKE_MONGOD, **options)


# ---------------------------------------------------------------- modes, end to end
def test_a_default_cluster_keeps_every_directory_and_file_to_you(tmp_path):
    work = tmp_path / "new" / "run"  # two directories the cluster creates
    victim = tmp_path / "victim"
    victim.write_text("precious")
    with umask(0o022), local_cluster(work) as cluster:
        logs = work / "logs"
        for directory in (tmp_path / "new", work, logs, work / "db", work / "work", work / "db" / "data"):
            assert mode(directory) == 0o700, directory
        scripts, outs = sorted(logs.glob("*.sh")), sorted(logs.glob("*.out"))
        assert len(scripts) == 2 and len(outs) == 2
        heartbeat = logs / f"{cluster.name}.heartbeat"
        for path in [*scripts, *outs, heartbeat, work / "db" / "mspass-cluster.json"]:
            assert mode(path) == 0o600, path
        assert all("\numask 077" in p.read_text() for p in scripts)
        private = work / PRIVATE_PARENT / cluster.name
        assert cluster.private_dir == str(private) and mode(private) == mode(private.parent) == 0o700
        # What the job's server creates follows the script's umask: the worker's own scratch directory.
        made = [
            p for p in (work / "work" / "dask-scratch-space").iterdir() if p.name.startswith("worker-") and p.is_dir()
        ]
        assert made and {mode(p) for p in made} == {0o700}

        # A symlink planted where the next worker's script goes is replaced, not written through.
        planted = logs / f"{cluster.name}-worker-1.sh"
        planted.symlink_to(victim)
        cluster.scale(2)
        cluster.wait_for_workers(timeout=60)
        assert victim.read_text() == "precious"
        assert not planted.is_symlink() and mode(planted) == 0o600 and "dask_worker" in planted.read_text()
    assert not private.exists(), "the credentials' directory outlived the cluster"
    assert cluster_processes(cluster.cluster_id) == []


def test_group_access_opens_the_directories_and_files_to_the_group_whatever_the_umask(tmp_path):
    work = tmp_path / "run"
    with umask(0o077), local_cluster(work, group_access=True) as cluster:
        for directory in (work, work / "logs", work / "db", work / "work"):
            assert mode(directory) == 0o750, directory
        for path in [
            *(work / "logs").glob("*.sh"),
            *(work / "logs").glob("*.out"),
            work / "db" / "mspass-cluster.json",
        ]:
            assert mode(path) == 0o640, path
        assert "\numask 027" in next((work / "logs").glob("*.sh")).read_text()
        assert mode(cluster.private_dir) == 0o700  # credentials are never the group's


def test_security_off_keeps_the_old_open_behaviour(tmp_path):
    # The intruder's world-writable logs/ is used as before, and everything gets the user's umask.
    (tmp_path / "logs").mkdir()
    give_away(tmp_path / "logs", 0o777)
    with umask(0o022), local_cluster(tmp_path, security=False) as cluster:
        assert mode(tmp_path / "db") == mode(tmp_path / "work") == mode(tmp_path / "db" / "data") == 0o755
        logs = tmp_path / "logs"
        for path in [*logs.glob("*.sh"), *logs.glob("*.out"), logs / f"{cluster.name}.heartbeat"]:
            assert mode(path) == 0o644, path
        assert mode(tmp_path / "db" / "mspass-cluster.json") == 0o644
        assert "umask" not in next((tmp_path / "logs").glob("*.sh")).read_text()
        assert cluster.private_dir is None and not (tmp_path / PRIVATE_PARENT).exists()


# ----------------------------------------------------- refusals, before anything runs
def _nothing_started(*directories) -> None:
    for directory in directories:
        assert not list(directory.glob("**/*.sh")), "a job script was written, so something was submitted"


def test_a_shared_sticky_directory_with_the_intruders_logs_is_refused(tmp_path):
    shared = tmp_path / "shared"  # like /srv/shared or /tmp: 1777
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "logs").mkdir()
    give_away(shared / "logs", 0o777)  # pre-created by the intruder
    # As work_dir: anyone can drop a module where the jobs start (python -m puts it first on the path).
    with pytest.raises(ConfigError) as info:
        local_cluster(shared)
    text = str(info.value)
    assert f"work_dir={str(shared)!r}" in text and "mode 1777" in text and "can be written by every user" in text
    assert "distributed.py" in text and f"work_dir={str(shared / 'root')!r}" in text
    # With a work_dir of one's own, the intruder's logs/ as log_dir is not taken either.
    with pytest.raises(ConfigError) as info:
        local_cluster(tmp_path / "mine", log_dir=str(shared / "logs"))
    text = str(info.value)
    assert f"log_dir={str(shared / 'logs')!r}" in text and "owned by nobody" in text and "mode 0777" in text
    assert "another log_dir=" in text
    _nothing_started(shared, tmp_path / "mine")
    assert not (tmp_path / "mine" / PRIVATE_PARENT).exists()


def test_a_directory_another_user_made_where_anyone_can_is_refused_but_a_project_directory_is_not(tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "run").mkdir()
    give_away(shared / "run", 0o755)  # the intruder made the run directory before the user did
    for work_dir in (shared / "run", shared / "run" / "mine"):
        with pytest.raises(ConfigError) as info:
            local_cluster(work_dir)
        text = str(info.value)
        assert f"{shared / 'run'} (owned by nobody" in text and f"made in {shared}, where every user can" in text
        assert f"work_dir={str(shared / 'root' / 'run')!r}" in text
    assert list((shared / "run").iterdir()) == []
    # A project directory the site made for a group (here: owned by another user, in a directory not every
    # user can write) is its owner's to control, and used; that the group can write it is a warning.
    project = tmp_path / "project"
    project.mkdir()
    give_away(project, 0o2770)
    with caplog.at_level(logging.WARNING, logger="mspass_cluster"):
        prepare_directories(resolve_options(environ={}, work_dir=str(project / "run")))
    assert mode(project / "run" / "logs") == 0o2700
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [str(project)]


def test_a_directory_under_a_world_writable_parent_without_sticky_bit_is_refused(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError) as info:
        local_cluster(open_dir / "me" / "run")
    text = str(info.value)
    assert f"lies in {open_dir} (owned by root" in text and "mode 0777" in text and "no sticky bit" in text
    assert f"chmod +t {open_dir}" in text
    assert not (open_dir / "me").exists()


@pytest.mark.parametrize("name, sub", [("log_dir", "logs"), ("db_dir", "db"), ("worker_dir", "work")])
def test_an_existing_directory_others_can_write_or_own_is_refused_with_the_fix(tmp_path, name, sub):
    (tmp_path / sub).mkdir()
    (tmp_path / sub).chmod(0o775)
    opts = resolve_options(environ={}, work_dir=str(tmp_path))
    with pytest.raises(ConfigError) as info:
        prepare_directories(opts)
    text = str(info.value)
    assert f"{name}={str(tmp_path / sub)!r}" in text and "mode 0775" in text and "the members of group" in text
    assert f"chmod go-w {tmp_path / sub}" in text and f"another {name}=" in text
    give_away(tmp_path / sub, 0o700)
    with pytest.raises(ConfigError, match=rf"{name}=.*owned by nobody.*is not yours"):
        prepare_directories(opts)


def test_an_existing_directory_others_can_read_gets_a_warning_with_the_fix(tmp_path, caplog):
    (tmp_path / "db").mkdir()
    (tmp_path / "db").chmod(0o755)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs").chmod(0o750)
    with caplog.at_level(logging.WARNING, logger="mspass_cluster"):
        prepare_directories(resolve_options(environ={}, work_dir=str(tmp_path)))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    db, logs = sorted(warnings)
    assert "can be read by every user of this machine: the database's files" in db
    assert f"chmod go-rwx {tmp_path / 'db'}" in db
    assert "can be read by the members of group 'root': the job scripts" in logs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mspass_cluster"):
        prepare_directories(resolve_options(environ={}, work_dir=str(tmp_path), group_access=True))
    assert [f"chmod o-rwx {tmp_path / 'db'}" in r.getMessage() for r in caplog.records] == [True]


def test_a_group_writable_work_dir_works_with_a_warning_unless_the_group_is_trusted(tmp_path, caplog):
    project = tmp_path / "project"  # a project directory shared by a group: 2770
    project.mkdir()
    project.chmod(0o2770)
    with caplog.at_level(logging.WARNING, logger="mspass_cluster"):
        prepare_directories(resolve_options(environ={}, work_dir=str(project)))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"{project} (owned by root, group root, mode 2770) can be written by the members of group" in warning
    assert "group_access=True" in warning
    assert mode(project / "logs") == 0o2700  # the group's setgid bit is kept for what is made below
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mspass_cluster"):
        prepare_directories(resolve_options(environ={}, work_dir=str(project / "run"), group_access=True))
    assert caplog.records == []


# ---------------------------------------------------------------- the private directory
def test_the_private_directory_is_made_fresh_0700_whatever_the_umask_and_removed(tmp_path):
    with umask(0o777):  # mkdir(0o700) alone would give 0000
        path = create_private_dir(str(tmp_path), "mspass-0123abcd")
    assert path == str(tmp_path / PRIVATE_PARENT / "mspass-0123abcd")
    assert mode(path) == mode(tmp_path / PRIVATE_PARENT) == 0o700
    (tmp_path / PRIVATE_PARENT / "mspass-0123abcd" / "ca.pem").write_text("x")
    remove_private_dir(path)
    assert not os.path.exists(path) and (tmp_path / PRIVATE_PARENT).is_dir()


def test_the_private_directory_is_refused_when_it_already_exists(tmp_path):
    create_private_dir(str(tmp_path), "mspass-0123abcd")
    with pytest.raises(ConfigError) as info:
        create_private_dir(str(tmp_path), "mspass-0123abcd")
    assert "already exists" in str(info.value) and "rm -r" in str(info.value)


def test_the_private_directory_is_refused_in_a_parent_that_is_not_yours_alone(tmp_path):
    parent = tmp_path / PRIVATE_PARENT
    parent.mkdir(mode=0o700)
    parent.chmod(0o770)
    with pytest.raises(ConfigError, match=r"mode 0770\) can be written by the members of group.*chmod 700"):
        create_private_dir(str(tmp_path), "mspass-0123abcd")
    give_away(parent, 0o700)
    with pytest.raises(ConfigError, match=r"owned by nobody.*is not yours"):
        create_private_dir(str(tmp_path), "mspass-0123abcd")
    parent.rmdir()
    (tmp_path / "elsewhere").mkdir()
    parent.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="is not a directory \\(a symlink\\)"):
        create_private_dir(str(tmp_path), "mspass-0123abcd")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_the_private_directory_is_refused_below_a_world_writable_parent_without_sticky_bit(tmp_path):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(ConfigError, match="which every user can write and which has no sticky bit"):
        create_private_dir(str(tmp_path / "open"), "mspass-0123abcd")
    assert not (tmp_path / "open" / PRIVATE_PARENT).exists()


# ---------------------------------------------------------------- writing files
def test_a_file_is_written_whole_under_a_new_name_never_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "job.sh"
    target.symlink_to(victim)
    with umask(0o000):
        write_file(str(target), "echo mine\n", 0o600)
    assert victim.read_text() == "precious" and not target.is_symlink()
    assert target.read_text() == "echo mine\n" and mode(target) == 0o600
    inode = os.stat(target).st_ino
    write_file(str(target), "echo again\n", 0o600)  # a re-submission: a new file renamed over the old one
    assert target.read_text() == "echo again\n" and os.stat(target).st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sh", "victim"]


# ---------------------------------------------------------------- input hygiene
def _text_options():
    return [o for o in OPTIONS if o.kind in TEXT_KINDS]


@pytest.mark.parametrize("char", CONTROL, ids=repr)
@pytest.mark.parametrize("option", _text_options(), ids=lambda o: o.name)
def test_a_control_character_is_refused_in_every_option_that_reaches_a_script(option, char):
    if char == "\t" and option.name == "job_script_prologue":
        assert resolve_options(environ={}, job_script_prologue=["\tmodule load x"]).job_script_prologue
        return
    value = f"/x{char}y"
    with pytest.raises(ConfigError) as info:
        resolve_options(environ={}, **{option.name: [value] if option.kind == "list" else value})
    text = str(info.value)
    shown = f"{option.name}[0]" if option.kind == "list" else option.name
    assert text.startswith(f"{shown}={value!r} holds ") and "at position 2" in text and f"Give {shown} without" in text


def test_a_control_character_from_the_environment_names_its_variable_also_once_expanded(monkeypatch):
    with pytest.raises(ConfigError, match=r"^From the environment variable MSPASS_WORK_DIR: work_dir='/a\\x1bb'"):
        resolve_options(environ={"MSPASS_WORK_DIR": "/a\x1bb"})
    monkeypatch.setenv("MSPASS_TEST_EVIL", "x\ny")
    with pytest.raises(ConfigError, match=r"work_dir='/s/x\\ny' holds a line break"):
        resolve_options(environ={}, work_dir="/s/$MSPASS_TEST_EVIL")


def test_a_path_the_container_runtime_cannot_bind_is_refused(tmp_path):
    image = tmp_path / "mspass.sif"
    image.write_text("")
    with pytest.raises(ConfigError, match=r"work_dir='.*a:b' holds a ',' or ':'"):
        resolve_options(environ={}, container=str(image), work_dir=str(tmp_path / "a:b"))
    # Covered by a bind of the user's, it needs no bind of its own.
    resolve_options(environ={}, container=str(image), work_dir=str(tmp_path / "a:b"), binds=[str(tmp_path)])


def test_a_backslash_in_log_dir_is_refused_on_slurm():
    from mspass_cluster.backends import finalise_options

    with pytest.raises(ConfigError, match=r"log_dir='/s/a\\\\b' holds a backslash"):
        finalise_options(resolve_options(environ={}, log_dir="/s/a\\b"), "slurm", None)


#: Quotes, a command substitution both ways, a comment sign and Slurm's %j: nothing of it may be interpreted.
#: (``$NAME`` would be expanded: path options expand variables, as in ``work_dir='$SCRATCH/run'``.)
WEIRD = 'it\'s a "run" $(id) `id` #1 100%j'


def test_a_work_dir_with_quotes_dollar_and_backtick_works_end_to_end(tmp_path):
    work = tmp_path / WEIRD
    with local_cluster(work) as cluster:
        client = cluster.get_client()
        assert client.submit(lambda x: x + 1, 41).result() == 42
        assert set(client.run(os.getcwd).values()) == {str(work)}
        assert set(client.run(lambda: os.environ["MSPASS_WORK_DIR"]).values()) == {str(work)}
        db_log = next((work / "logs").glob(f"{cluster.name}-db-[0-9]*.out"))
        assert "Waiting for connections" in db_log.read_text()
        assert (work / "db" / "data" / "mongod.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIRD]  # nothing at a mangled path
    assert sorted(p.name for p in work.iterdir()) == [PRIVATE_PARENT, "db", "logs", "work"]


@pytest.mark.slurm
def test_slurm_writes_the_log_where_the_quoted_directive_says_with_the_clusters_umask(slurm_testbed, shared_dir):
    from mspass_cluster.backends.slurm import SlurmBackend
    from mspass_cluster.commands import CommandRunner

    logs = shared_dir / 'it\'s "quoted" #1 $x'
    logs.mkdir(mode=0o700)
    directives = build_directives(job_name="mspass-files-test", output=str(logs / "x-%j.out"), walltime="1")
    script = shared_dir / "job.sh"
    write_file(str(script), "#!/bin/bash\n" + "\n".join(directives) + "\necho written by the job\n", 0o600)
    job_id = asyncio.run(SlurmBackend(CommandRunner(), umask=0o077).submit(str(script), "test job"))
    log = logs / f"x-{job_id}.out"
    deadline = time.monotonic() + 60
    while (queued([job_id]) or not log.exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if queued([job_id]):
        subprocess.run(["scancel", job_id], check=False)
    assert log.read_text() == "written by the job\n", sorted(p.name for p in shared_dir.rglob("*"))
    assert mode(log) == 0o600
