"""The benchmark harness (benchmarks/run) in its smoke mode, on the Slurm test bed.

Benchmarks are not tests: nothing here checks how fast anything is, only that
the harness measures every figure, writes its three files, and leaves no job
behind. ``--smoke`` needs 3 test-bed nodes (scale 1->2 plus the database).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import queued, queued_names

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("mspass", "jobqueue")


@pytest.fixture(scope="module")
def smoke_run(slurm_testbed, tmp_path_factory):
    """One ``python -m benchmarks.bench --smoke`` run; its output directory and results.json."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"benchmarks.bench --smoke failed:\n{proc.stderr[-4000:]}"
    return out, json.loads((out / "results.json").read_text()), proc.stderr


def test_smoke_run_writes_json_markdown_and_png(smoke_run):
    out, _, stderr = smoke_run
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    for heading in (
        "## Time to ready",
        "## Scaling",
        "## Failure detection",
        "## Teardown",
        "## Load on the Slurm controller",
        "## Reference: the MsPASS job scripts' fixed sleeps",
    ):
        assert heading in markdown
    assert "time to ready" in stderr, "progress is logged to stderr as the run goes"


def test_results_json_has_machine_info_and_every_measurement(smoke_run):
    _, results, _ = smoke_run
    meta = results["meta"]
    assert {"date", "uname", "cpu_count", "python", "versions", "testbed_nodes"} <= meta.keys()
    assert {"dask", "distributed", "dask-jobqueue", "mspass-cluster"} <= meta["versions"].keys()
    assert {
        "startup_non_sharded_s",
        "startup_sharded_s",
        "shutdown_non_sharded_s",
        "shutdown_sharded_4_shards_s",
        "source",
    } <= results["reference_sleeps"].keys()

    ready = results["time_to_ready"]
    assert ready["sizes"] == [1]
    for tool in TOOLS:
        assert len(ready["samples"][tool]["1"]) == 1
        assert ready["median"][tool]["1"] is not None, f"{tool} never became ready"
    assert ready["ratio"]["1"] is not None

    scale = results["scale"]
    assert (scale["from"], scale["to"]) == (1, 2)
    for part in ("up", "down"):
        assert {"samples", "median", "ratio"} <= scale[part].keys()
        assert all(scale[part]["median"][tool] is not None for tool in TOOLS)

    teardown = results["teardown"]
    assert teardown["nodes"] == 1
    assert {"samples", "close_returned", "median", "ratio"} <= teardown.keys()
    assert all(teardown["median"][tool] is not None for tool in TOOLS), "something was left after close()"


def test_failure_errors_are_recorded_and_mspass_names_the_job(smoke_run):
    _, results, _ = smoke_run
    failure = results["failure"]
    assert failure["cap_s"] == 20
    assert {"samples", "median", "ratio", "errors"} <= failure.keys()
    mspass = failure["errors"]["mspass"][0]
    assert mspass["error_type"] == "JobFailedError"
    assert mspass["job_id"] and mspass["names_job_id"]
    assert mspass["exit_code"]
    jobqueue = failure["errors"]["jobqueue"][0]
    assert {"error_type", "message", "job_ids", "hit_cap", "names_job_id", "names_exit_code"} <= jobqueue.keys()
    assert jobqueue["job_ids"], "the jobqueue cluster's job ids were found for cleanup"


def test_controller_load_counts_calls_for_both_tools(smoke_run):
    _, results, _ = smoke_run
    load = results["controller_load"]
    for tool in TOOLS:
        record = load[tool]
        assert {
            "startup_s",
            "startup_calls",
            "startup_status_calls",
            "startup_status_per_min",
            "steady_s",
            "steady_status_per_min",
        } <= record.keys()
    assert load["mspass"]["startup_calls"].get("squeue", 0) >= 1
    # The PATH shims saw dask-jobqueue's sbatch, so they were on the path its commands use.
    assert load["jobqueue"]["startup_calls"].get("sbatch", 0) >= 1


def test_smoke_run_leaves_no_job(smoke_run):
    _, results, _ = smoke_run
    ids = [job for part in results["failure"]["errors"]["jobqueue"] for job in part["job_ids"]]
    ids += [part["job_id"] for part in results["failure"]["errors"]["mspass"] if part["job_id"]]
    assert queued(ids) == []
    # This run's jobs only: other benchmark runs may share the test bed.
    tags = results["tags"]
    assert tags and not [n for n in queued_names() if any(n == t or n.startswith(f"{t}-") for t in tags)]


# ------------------------------------------------------------- security (issue 10)
@pytest.fixture(scope="module")
def security_smoke_run(slurm_testbed, tmp_path_factory):
    """One ``python -m benchmarks.security --smoke`` run: its output directory, security.json and stderr."""
    out = tmp_path_factory.mktemp("security")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.security", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"benchmarks.security --smoke failed:\n{proc.stderr[-4000:]}"
    return out, json.loads((out / "security.json").read_text()), proc.stderr


def test_security_smoke_measures_secure_and_open_side_by_side(security_smoke_run):
    out, results, stderr = security_smoke_run
    assert (out / "security.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "security.md").read_text()
    for heading in ("## Time to ready", "## Where the time goes", "## Transfer throughput", "## Parts of the cost"):
        assert heading in markdown
    assert "slurm" in stderr and "ready in" in stderr, "progress is logged to stderr as the run goes"
    assert {"date", "uname", "cpu_count", "openssl", "cpu_aes", "versions", "testbed_nodes"} <= results["meta"].keys()
    for backend in ("slurm", "local"):
        ready = results[backend]["ready"]
        for variant in ("secure", "open"):
            assert len(ready["samples"][variant]) == 1 and ready["median"][variant] is not None, (backend, variant)
            (marks,) = ready["milestones"][variant]
            assert marks["db_ready"] is not None and marks["last_worker_connected"] is not None, marks
        assert ready["ratio"] is not None
    # Interleaved: both variants ran on both backends.
    assert {line.rsplit(": ", 1)[1] for line in results["sequence"]} == {"secure", "open"}


def test_security_smoke_transfer_crossed_nodes_over_tls_and_tcp(security_smoke_run):
    _, results, _ = security_smoke_run
    transfer = results["slurm"]["transfer"]
    for variant, scheme in (("secure", "tls"), ("open", "tcp")):
        (sample,) = transfer["samples"][variant]
        checks = sample["checks"]
        assert checks["scheme"] == scheme
        assert checks["crossed_nodes"] and checks["sources"] == [checks["producer"]]
        assert len(set(checks["hostnames"].values())) == 2, checks["hostnames"]
        assert checks["bytes_fetched_by_consumer"] == sample["bytes"] == transfer["bytes"]
        assert sample["gib_per_s"] > 0
    assert transfer["ratio"] is not None
    parts = results["parts"]
    assert parts["credentials"]["median_create_s"] > 0
    assert set(parts["dask_connection"]["median_s"]) == {"tls", "tcp"}
    assert parts["database"]["median"]["secure"]["user_created_s"] is not None
    assert set(parts["worker_start"]["median_s"]) == {"secure", "open", "open_no_dashboard"}
    assert parts["first_user_steps"]["median"]["verified_s"] is not None


def test_security_smoke_leaves_no_job_and_no_error(security_smoke_run):
    _, results, _ = security_smoke_run
    assert results["leftovers"] == [] and results["errors"] == [] and not results["cancelled_at_end"]
    tags = results["tags"]
    assert tags and not [n for n in queued_names() if any(n == t or n.startswith(f"{t}-") for t in tags)]
