"""`mspass-cluster` as a user types it: wrong input is refused before a node is used, `down` cancels only
what it is named, the help is plain text, and --work-dir/--backend reach the notebook's cluster.

The `down` tests on the test bed create their own held jobs, named as a cluster's jobs are named, and
cancel only those: the test bed is shared with other tests and other people's jobs.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time

import nbformat
import pytest
from conftest import queued, slurm_output

from mspass_cluster.cli import ENV_BACKEND, ENV_WORK_DIR, render_submit_script
from mspass_cluster.cli import main as cli_main
from mspass_cluster.commands import CommandResult, CommandRunner
from mspass_cluster.errors import ConfigError
from mspass_cluster.notebook import parameter_names

CLI = [os.path.join(os.path.dirname(sys.executable), "mspass-cluster")]
EMBEDDED_DB = repr([sys.executable, "-m", "mspass_cluster.embedded_db"])
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def make_notebook(path, body="print('ran')", parameters="label = 'default'\ncount = 5", metadata=KERNEL):
    cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})] if parameters else []
    nbformat.write(nbformat.v4.new_notebook(cells=[*cells, nbformat.v4.new_code_cell(body)], metadata=metadata), path)
    return path


def run_cli(*args, input=None, env=None, timeout=60):
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        env=env,
    )


def my_queued_names(token: str) -> list[str]:
    """Names of this user's queued jobs that contain ``token`` (unique to one test)."""
    return [
        line for line in slurm_output("squeue", "--me", "--noheader", "--format=%i %j").splitlines() if token in line
    ]


def cancel_named(token: str) -> None:
    """Cancel this user's jobs whose name holds ``token``: only jobs this test submitted carry it."""
    ids = [line.split()[0] for line in my_queued_names(token)]
    if ids:
        subprocess.run(["scancel", *ids], check=False, timeout=20)


# ---- submit: the notebook and its parameters are checked before anything is queued


@pytest.mark.slurm
@pytest.mark.parametrize("kind", ["text file", "json that is not a notebook", "misspelt parameter"])
def test_submit_refuses_what_would_fail_in_the_job_and_queues_nothing(slurm_testbed, tmp_path, kind):
    token = f"t{secrets.token_hex(4)}"
    if kind == "text file":
        notebook, extra = tmp_path / f"{token}.txt", []
        notebook.write_text("print('hello')\n")
        expected = "is not a notebook: it is not JSON"
    elif kind == "json that is not a notebook":
        notebook, extra = tmp_path / f"{token}.json", []
        notebook.write_text('{"station": "TA.034A", "band": [0.5, 5]}\n')
        expected = "is not a valid Jupyter notebook"
    else:
        notebook, extra = make_notebook(tmp_path / f"{token}.ipynb"), ["--param", "count=7", "--param", "lable=x"]
        expected = "--param lable: not assigned in the 'parameters' cell"
    try:
        out = run_cli("submit", str(notebook), "--nodes", "1", "--walltime", "5", *extra)
        assert out.returncode == 2, out.stdout + out.stderr
        assert expected in out.stderr and str(notebook.name) in out.stderr
        if kind == "misspelt parameter":
            assert "which assigns label, count" in out.stderr
        assert my_queued_names(token) == [], "a job was queued"
        assert list(tmp_path.glob("*.sbatch")) == []
    finally:
        cancel_named(token)


def test_a_parameter_needs_a_cell_tagged_parameters(tmp_path, capsys):
    notebook = make_notebook(tmp_path / "flow.ipynb", parameters=None)
    assert cli_main(["submit", str(notebook), "--param", "year=2012", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "has no cell tagged 'parameters'" in err and "tag 'parameters'" in err
    assert cli_main(["submit", str(notebook), "--dry-run"]) == 0  # without --param the cell is not needed


def test_a_parameter_given_twice_is_refused(tmp_path, capsys):
    notebook = make_notebook(tmp_path / "flow.ipynb")
    assert cli_main(["submit", str(notebook), "--param", "count=1", "--param", "count=2", "--dry-run"]) == 2
    assert "--param count given more than once" in capsys.readouterr().err


def test_parameter_names_are_what_the_parameters_cell_assigns():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "%matplotlib inline\nyear = 2012\nlo, hi = 0.5, 5\nstation: str = 'TA'\n# n = 1\nimport os\n",
                metadata={"tags": ["parameters"]},
            )
        ]
    )
    assert parameter_names(nb) == ["year", "lo", "hi", "station"]
    assert parameter_names(nbformat.v4.new_notebook()) is None


def test_a_kernel_that_is_not_installed_is_refused(tmp_path, capsys):
    notebook = make_notebook(
        tmp_path / "flow.ipynb", metadata={"kernelspec": {"name": "mspass-nosuch", "display_name": "x"}}
    )
    assert cli_main(["submit", str(notebook), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Jupyter kernel 'mspass-nosuch'" in err and "python3" in err and "ipykernel install" in err


@pytest.mark.slurm
def test_the_sbatch_file_is_removed_when_slurm_refuses_the_job(slurm_testbed, tmp_path):
    notebook = make_notebook(tmp_path / "flow.ipynb")
    out = run_cli("submit", str(notebook), "--nodes", "1", "--walltime", "5", "--partition", "nosuchpartition")
    assert out.returncode == 1
    assert "Slurm refused the job" in out.stderr and "partition" in out.stderr.lower()
    assert not (tmp_path / "flow.sbatch").exists()


@pytest.mark.slurm
def test_a_notebook_in_a_directory_with_spaces_runs(slurm_testbed, tmp_path):
    folder = tmp_path / "my runs 100%"
    folder.mkdir()
    notebook = make_notebook(folder / "flow.ipynb", body="print('ran', label)")
    out = run_cli("submit", str(notebook), "--nodes", "1", "--walltime", "5", "--param", "label=ok")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split(" as job ")[1].split(";")[0]
    try:
        deadline = time.monotonic() + 120
        while queued([job_id]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert queued([job_id]) == []
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert (folder / f"flow-{job_id}.log").exists()
    executed = nbformat.read(folder / f"flow-{job_id}.ipynb", as_version=4)
    assert executed.cells[-1].outputs[0]["text"] == "ran ok\n"


# ---- nothing typed can add a line to the job script


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--partition", "normal\nrm -rf ~"),
        ("--account", "ear 123"),
        ("--qos", "long\n#SBATCH --nodes=100"),
        ("--directive", "--comment=a\necho x"),
        ("--directive", "constraint=ib"),
        ("--directive", "-N3"),
        ("--directive", "--time 10"),
        ("--directive", "--output=x.log"),
    ],
)
def test_values_that_would_break_the_script_are_refused(tmp_path, capsys, flag, value):
    notebook = make_notebook(tmp_path / "flow.ipynb")
    assert cli_main(["submit", str(notebook), f"{flag}={value}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value!r}" in err and ("e.g." in err or "instead" in err or "leave it out" in err)
    assert capsys.readouterr().out == ""


def test_the_script_quotes_work_dir_and_backend_and_runs_under_bash(tmp_path):
    notebook = make_notebook(tmp_path / "flow.ipynb")
    stub = tmp_path / "python-stub"
    stub.write_text(f'#!/bin/sh\nprintf "%s|%s|%s" "${ENV_WORK_DIR}" "${ENV_BACKEND}" "$PWD"\n')
    stub.chmod(0o755)
    evil = str(tmp_path / "a dir'; touch pwned; echo '$(touch pwned2) `touch pwned3` \"#x")
    script = render_submit_script(
        str(notebook), nodes=1, walltime="10\n", work_dir=evil, backend="local", python=str(stub)
    )
    header = script.split("set -u")[0].splitlines()
    assert all(line.startswith("#") for line in header), header
    assert "#SBATCH --time=10" in header
    (tmp_path / "job.sh").write_text(script)
    out = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, cwd=tmp_path, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{evil}|local|{tmp_path}"
    assert not any((tmp_path / name).exists() for name in ("pwned", "pwned2", "pwned3"))
    with pytest.raises(ConfigError, match="no spaces, newlines"):
        render_submit_script(str(notebook), nodes=1, walltime="10", partition="a\nb")
    # A line break is refused, quoted or not: nothing typed adds a line to the script.
    for value in ("a\nb", "a\x00b", "a\x1bb"):
        with pytest.raises(ConfigError, match=r"--work-dir '.*' holds .* at position 1"):
            render_submit_script(str(notebook), nodes=1, walltime="10", work_dir=value)


@pytest.mark.parametrize(
    "value, why", [("{file}/sub", "is a file, not a directory"), ("/proc/mspass-run", "cannot be created in '/proc'")]
)
def test_an_unusable_work_dir_is_refused(tmp_path, capsys, value, why):
    notebook = make_notebook(tmp_path / "flow.ipynb")
    value = value.format(file=notebook)
    assert cli_main(["submit", str(notebook), "--work-dir", value, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"--work-dir {value!r}" in err and why in err and "--work-dir $SCRATCH" in err


def test_a_backend_that_would_leave_nodes_idle_is_refused(tmp_path, capsys):
    notebook = make_notebook(tmp_path / "flow.ipynb")
    assert cli_main(["submit", str(notebook), "--backend", "slurm", "--nodes", "3", "--dry-run"]) == 2
    assert "would sit idle" in capsys.readouterr().err
    assert cli_main(["submit", str(notebook), "--backend", "local", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=1" in script and f"export {ENV_BACKEND}=local" in script
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["submit", str(notebook), "--backend", "sturm", "--dry-run"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sturm'" in capsys.readouterr().err


@pytest.mark.slurm
def test_work_dir_and_backend_override_the_users_dask_config(slurm_testbed, tmp_path):
    config = tmp_path / "dask-config"
    config.mkdir()
    (config / "mspass_cluster.yaml").write_text(
        f"mspass_cluster:\n  backend: slurm\n  work-dir: {tmp_path / 'from-yaml'}\n  db-command: {EMBEDDED_DB}\n"
    )
    notebook = make_notebook(
        tmp_path / "where.ipynb",
        body=(
            "from mspass_cluster import MsPASSCluster\n"
            "with MsPASSCluster() as cluster:\n"
            "    cluster.get_client().submit(sum, [1, 2]).result()\n"
            "    print('RESULT', cluster.options.backend, cluster.options.work_dir)\n"
        ),
    )
    work_dir = tmp_path / "run 1"
    env = {**os.environ, "DASK_CONFIG": str(config)}
    out = run_cli(
        "submit",
        str(notebook),
        "--nodes",
        "1",
        "--walltime",
        "5",
        "--backend",
        "local",
        "--work-dir",
        str(work_dir),
        env=env,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split(" as job ")[1].split(";")[0]
    try:
        deadline = time.monotonic() + 240
        while queued([job_id]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert queued([job_id]) == []
    finally:
        subprocess.run(["scancel", job_id], check=False)
    executed = nbformat.read(tmp_path / f"where-{job_id}.ipynb", as_version=4)
    text = "".join(o.get("text", "") + "\n".join(o.get("traceback", [])) for o in executed.cells[-1].outputs)
    assert f"RESULT local {work_dir}\n" in text, text
    assert (work_dir / "logs").is_dir() and not (tmp_path / "from-yaml").exists()


# ---- help


def test_help_is_plain_text_with_examples_and_defaults():
    top = run_cli("--help")
    assert top.returncode == 0
    assert "``" not in top.stdout and "::" not in top.stdout
    assert "examples:" in top.stdout and "mspass-cluster down --all" in top.stdout
    submit = run_cli("submit", "--help").stdout
    flat = " ".join(submit.split())
    for text in (
        "--walltime TIME time limit of the job",
        "(default: 01:00:00)",
        "--partition NAME Slurm partition",
        "--account NAME Slurm account",
        "--qos NAME Slurm quality of service",
        "--work-dir DIR",
        "--backend {auto,slurm,allocation,local}",
        "examples:",
    ):
        assert text in flat, text
    assert "--all" in run_cli("down", "--help").stdout


# ---- down: exact ids, unique prefixes or job ids; everything only with --all


@pytest.fixture
def held_clusters(slurm_testbed):
    """Two held 'clusters' of this test (db and worker-array jobs named as MsPASSCluster names them).

    The ids share their first four characters; the name prefix holds a word unique to this test.
    """
    word = f"w{secrets.token_hex(3)}"
    first = secrets.token_hex(4)
    second = first[:4] + secrets.token_hex(2)
    while second == first:
        second = first[:4] + secrets.token_hex(2)
    jobs = {}
    for cluster in (first, second):
        for role in ("db", "workers"):
            name = f"t-{word}-{cluster}-{role}"
            out = subprocess.run(
                [
                    "sbatch",
                    "--parsable",
                    "--hold",
                    f"--job-name={name}",
                    "--time=5",
                    "--output=/dev/null",
                    "--wrap",
                    "sleep 1",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            jobs[(cluster, role)] = out.stdout.strip().split(";")[0]
    try:
        yield word, first, second, jobs
    finally:
        subprocess.run(["scancel", *jobs.values()], check=False, timeout=30)


def wait_gone(job_ids, seconds=30):
    deadline = time.monotonic() + seconds
    while queued(job_ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return queued(job_ids)


@pytest.mark.slurm
def test_down_does_not_match_parts_of_names(held_clusters):
    word, first, second, jobs = held_clusters
    out = run_cli("down", word, "--yes")
    assert out.returncode == 2
    assert f"{word!r} is not the id of a cluster or job of yours" in out.stderr
    assert first in out.stderr and second in out.stderr  # the ids that do exist
    out = run_cli("down", "worker")  # (no --yes: if it matched, it would only ask)
    assert out.returncode == 2 and "'worker' is not the id" in out.stderr
    time.sleep(1)
    assert sorted(queued(list(jobs.values()))) == sorted(jobs.values())


@pytest.mark.slurm
def test_down_with_an_unknown_id_fails_and_names_the_known_ones(held_clusters):
    _, first, second, jobs = held_clusters
    out = run_cli("down", "0123456789abcdef", "--yes")
    assert out.returncode == 2
    assert "'0123456789abcdef' is not the id" in out.stderr and first in out.stderr and second in out.stderr
    assert sorted(queued(list(jobs.values()))) == sorted(jobs.values())


@pytest.mark.slurm
def test_down_refuses_an_ambiguous_prefix_and_cancels_by_a_unique_one(held_clusters):
    _, first, second, jobs = held_clusters
    out = run_cli("down", first[:4], "--yes")
    assert out.returncode == 2
    assert f"{first[:4]!r} is ambiguous" in out.stderr and f"cluster {first}" in out.stderr
    assert f"cluster {second}" in out.stderr
    assert sorted(queued(list(jobs.values()))) == sorted(jobs.values())

    out = run_cli("down", first[:6] if first[:6] != second[:6] else first, "--yes")
    assert out.returncode == 0, out.stderr
    assert "Cancelled 2 job(s)." in out.stdout
    mine = [jobs[(first, "db")], jobs[(first, "workers")]]
    assert wait_gone(mine) == []
    assert sorted(queued([jobs[(second, "db")], jobs[(second, "workers")]])) == sorted(
        [jobs[(second, "db")], jobs[(second, "workers")]]
    )


@pytest.mark.slurm
def test_down_by_job_id_cancels_that_job_only(held_clusters):
    _, first, second, jobs = held_clusters
    target = jobs[(second, "workers")]
    out = run_cli("down", target, "--yes")
    assert out.returncode == 0, out.stderr
    assert wait_gone([target]) == []
    others = [j for j in jobs.values() if j != target]
    assert sorted(queued(others)) == sorted(others)


def scancel_refused(tmp_path):
    """An environment whose ``scancel`` records that it was called and cancels nothing.

    For the ``down`` runs that must cancel nothing: ``--all`` lists every
    mspass_cluster job on the shared test bed, other people's included, so a
    defect in asking first must fail this test, not cancel their jobs.
    """
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {str(guard / "called")!r}\nexit 1\n')
    (guard / "scancel").chmod(0o755)
    return {**os.environ, "PATH": f"{guard}{os.pathsep}{os.environ['PATH']}"}, guard / "called"


@pytest.mark.slurm
def test_down_without_ids_needs_all_and_all_asks_first(held_clusters, tmp_path):
    _, first, second, jobs = held_clusters
    env, called = scancel_refused(tmp_path)
    out = run_cli("down", input="n\n", env=env)
    assert out.returncode == 2
    assert "--all" in out.stderr and "cluster ids or job ids" in out.stderr
    assert "Cancel these" not in out.stdout

    out = run_cli("down", "--all", input="n\n", env=env)  # answered no: lists everything, cancels nothing
    assert out.returncode == 1
    assert all(job_id in out.stdout for job_id in jobs.values()) and "Nothing cancelled." in out.stdout

    out = run_cli("down", first, env=env)  # no terminal to answer: says so, cancels nothing
    assert out.returncode == 1 and "Add --yes" in out.stderr
    assert not called.exists(), f"down ran scancel {called.read_text()!r} without a yes"
    assert sorted(queued(list(jobs.values()))) == sorted(jobs.values())


@pytest.mark.slurm
def test_status_shows_cluster_ids(held_clusters):
    _, first, second, jobs = held_clusters
    out = run_cli("status")
    assert out.returncode == 0
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert rows[jobs[(first, "db")]][1] == first and rows[jobs[(second, "workers")]][1] == second


def test_a_submitted_notebook_runs_its_cluster_on_the_jobs_own_nodes_by_default(tmp_path, capsys):
    # backend='auto' would choose new jobs in a one-node job; a submitted notebook's nodes are for its cluster.
    notebook = make_notebook(tmp_path / "flow.ipynb")
    assert cli_main(["submit", str(notebook), "--nodes", "1", "--dry-run"]) == 0
    assert f"export {ENV_BACKEND}=allocation" in capsys.readouterr().out


class RecordingSbatch(CommandRunner):
    """Stands in for sbatch only: records what the submitted file is when sbatch would read it."""

    def run(self, argv, **kwargs):
        path = argv[-1]
        with open(path) as f:
            self.seen = (os.path.islink(path), stat.S_IMODE(os.stat(path).st_mode), f.read())
        return CommandResult(tuple(argv), 0, "4242\n", "")


def test_the_sbatch_file_is_written_new_0600_and_never_through_a_planted_symlink(tmp_path):
    notebook = make_notebook(tmp_path / "flow.ipynb")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "flow.sbatch").symlink_to(victim)
    runner = RecordingSbatch()
    old = os.umask(0o022)
    try:
        assert cli_main(["submit", str(notebook), "--nodes", "1"], runner=runner) == 0
    finally:
        os.umask(old)
    is_link, mode, text = runner.seen
    assert not is_link and mode == 0o600 and text.startswith("#!/usr/bin/env bash\n#SBATCH")
    assert victim.read_text() == "precious"
