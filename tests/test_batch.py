"""Batch notebooks: `mspass-cluster submit` on the Slurm test bed, and the pieces it is made of."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import nbformat
import pytest
from conftest import queued, slurm_output

from mspass_cluster.cli import main as cli_main
from mspass_cluster.cli import render_submit_script
from mspass_cluster.notebook import inject_parameters, parse_params

EMBEDDED_DB = repr([sys.executable, "-m", "mspass_cluster.embedded_db"])
CLI = [os.path.join(os.path.dirname(sys.executable), "mspass-cluster")]


def test_params_are_python_literals_or_strings():
    assert parse_params(["n=3", "name=TA", "band=(0.5, 5)", "flag=True"]) == {
        "n": 3,
        "name": "TA",
        "band": (0.5, 5),
        "flag": True,
    }
    with pytest.raises(ValueError, match="name=value"):
        parse_params(["3=n"])


def test_parameters_are_injected_after_the_tagged_cell():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("import x"),
            nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("print(n)"),
        ]
    )
    inject_parameters(nb, {"n": 5, "label": "a b"})
    assert nb.cells[2].source == "# Parameters\nn = 5\nlabel = 'a b'"
    assert nb.cells[2].metadata["tags"] == ["injected-parameters"]


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path, capsys):
    notebook = tmp_path / "flow.ipynb"
    nbformat.write(
        nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("year = 2000", metadata={"tags": ["parameters"]})]),
        notebook,
    )
    assert (
        cli_main(
            [
                "submit",
                str(notebook),
                "--nodes",
                "3",
                "--walltime",
                "02:00:00",
                "--partition",
                "normal",
                "--param",
                "year=2012",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out == render_submit_script(
        str(notebook), nodes=3, walltime="02:00:00", partition="normal", params=["year=2012"]
    )
    assert "#SBATCH --nodes=3" in out and "#SBATCH --partition=normal" in out and "--param year=2012" in out
    assert not (tmp_path / "flow.sbatch").exists()


def test_bad_submit_input_is_refused(tmp_path, capsys):
    notebook = tmp_path / "flow.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), notebook)
    assert cli_main(["submit", str(notebook), "--walltime", "2h", "--dry-run"]) == 2
    assert "walltime" in capsys.readouterr().err
    assert cli_main(["submit", str(tmp_path / "missing.ipynb"), "--dry-run"]) == 2


WORKFLOW = """\
import os, socket
from mspass_cluster import MsPASSCluster
with MsPASSCluster() as cluster:
    client = cluster.get_client()
    db = cluster.get_db_client()
    hosts = sorted(set(client.run(socket.gethostname).values()))
    client.gather(client.map(lambda i, c: c.batch.docs.insert_one({"i": i}).acknowledged, range(count), c=db))
    stored = sorted(d["i"] for d in db.batch.docs.find())
    assert stored == list(range(count))
    print("RESULT", label, count, "workers on", hosts, "database on", cluster.db_job.node, "notebook on", socket.gethostname())
"""


def make_notebook(path, body):
    nbformat.write(
        nbformat.v4.new_notebook(
            cells=[
                nbformat.v4.new_code_cell("label = 'default'\ncount = 5", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body),
            ],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        ),
        path,
    )


def submit_and_wait(tmp_path, notebook, *args):
    env = {**os.environ, "MSPASS_WORK_DIR": str(tmp_path), "DASK_MSPASS_CLUSTER__DB_COMMAND": EMBEDDED_DB}
    out = subprocess.run(
        [*CLI, "submit", str(notebook), "--walltime", "10", *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split(" as job ")[1].split(";")[0]
    deadline = time.monotonic() + 240
    while queued([job_id]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert queued([job_id]) == []
    info = slurm_output("scontrol", "--oneliner", "show", "job", job_id)
    fields = dict(item.split("=", 1) for item in info.split() if "=" in item)
    executed = nbformat.read(tmp_path / f"{notebook.stem}-{job_id}.ipynb", as_version=4)
    text = "\n".join(
        str(o.get("text", "")) + "\n".join(o.get("traceback", []))
        for c in executed.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    return fields, text, job_id


def job_nodes(fields) -> list[str]:
    """The job's nodes in order, whichever the shared test bed had free: the first runs database and notebook."""
    return slurm_output("scontrol", "show", "hostnames", fields["NodeList"]).split()


@pytest.mark.slurm
def test_submitted_notebook_computes_stores_keeps_outputs_and_leaves_nothing(slurm_testbed, tmp_path):
    notebook = tmp_path / "flow.ipynb"
    make_notebook(notebook, WORKFLOW)
    fields, text, job_id = submit_and_wait(tmp_path, notebook, "--nodes", "3")
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0"
    result = next(line for line in text.splitlines() if line.startswith("RESULT"))
    first, *others = job_nodes(fields)
    assert f"RESULT default 5 workers on {others} database on {first} notebook on {first}" in result
    assert len(others) == 2
    assert nbformat.read(notebook, as_version=4).cells[1].outputs == []  # the input is untouched


@pytest.mark.slurm
def test_notebook_raising_in_the_with_block_ends_the_job_at_once_with_its_traceback(slurm_testbed, tmp_path):
    notebook = tmp_path / "broken.ipynb"
    make_notebook(
        notebook,
        WORKFLOW.replace('    print("RESULT"', '    raise ValueError("boom in the workflow")\n    print("RESULT"'),
    )
    fields, text, job_id = submit_and_wait(tmp_path, notebook, "--nodes", "2")
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "1:0"
    assert "ValueError" in text and "boom in the workflow" in text
    assert fields["RunTime"] < "00:01:00", "the job idled after the error"


@pytest.mark.slurm
def test_parameterised_run_receives_its_parameters(slurm_testbed, tmp_path):
    notebook = tmp_path / "params.ipynb"
    make_notebook(notebook, WORKFLOW)
    fields, text, _ = submit_and_wait(
        tmp_path, notebook, "--nodes", "2", "--param", "label=usarray2012", "--param", "count=7"
    )
    assert fields["ExitCode"] == "0:0"
    assert f"RESULT usarray2012 7 workers on {job_nodes(fields)[1:]}" in text


@pytest.mark.slurm
def test_status_lists_and_down_cancels_this_users_cluster_jobs(slurm_testbed, tmp_path, capsys):
    notebook = tmp_path / "held.ipynb"
    make_notebook(notebook, "print('never runs')")
    assert cli_main(["submit", str(notebook), "--nodes", "1", "--walltime", "5", "--directive=--hold"]) == 0
    job_id = capsys.readouterr().out.split(" as job ")[1].split(";")[0]
    try:
        assert cli_main(["status"]) == 0
        listing = capsys.readouterr().out
        assert job_id in listing and "mspass-nb-held" in listing and "JobHeldUser" in listing
        assert cli_main(["down", job_id, "--yes"]) == 0  # this job only: the test bed is shared
        assert job_id in capsys.readouterr().out
        deadline = time.monotonic() + 30
        while queued([job_id]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queued([job_id]) == []
    finally:
        subprocess.run(["scancel", job_id], check=False)


@pytest.mark.slurm
def test_a_notebook_stopped_by_slurm_keeps_the_outputs_it_had(slurm_testbed, tmp_path):
    notebook = tmp_path / "long.ipynb"
    marker = tmp_path / "first-cell-done"
    nbformat.write(
        nbformat.v4.new_notebook(
            cells=[
                nbformat.v4.new_code_cell(f"print('computed 42 things')\nopen({str(marker)!r}, 'w').close()"),
                nbformat.v4.new_code_cell("import time\ntime.sleep(600)"),
            ],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        ),
        notebook,
    )
    out = subprocess.run(
        [*CLI, "submit", str(notebook), "--walltime", "10", "--nodes", "1"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split(" as job ")[1].split(";")[0]
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the first cell never ran"
    finally:
        subprocess.run(["scancel", job_id], check=True)  # what Slurm does at walltime: SIGTERM, then SIGKILL
    deadline = time.monotonic() + 120
    while queued([job_id]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert queued([job_id]) == []
    executed = nbformat.read(tmp_path / f"long-{job_id}.ipynb", as_version=4)
    assert "computed 42 things" in executed.cells[0].outputs[0]["text"]
    assert executed.cells[-1].cell_type == "markdown" and "stopped by" in executed.cells[-1].source
