"""Hundreds of worker nodes (issue 13): one job array per scale-up, site limits, load refusals, partial readiness.

The live tests run on the real Slurm test bed with small worker nodes (one
core, 512 MiB, not exclusive) so that several fit on a test-bed node; the
database is the fake mongod of the other Slurm tests, on this file's ports
(28200-28299). Two stand-ins, named where they are used: an ``sbatch`` that
is refused for load before the real one runs (a busy controller cannot be
had on an idle bed), and an ``scontrol show config`` that reports a small
``MaxJobCount`` (changing the shared bed's controller would cancel every
other test's jobs).
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time

import pytest
from conftest import FAKE_MONGOD, assert_nothing_left, queued, slurm_output

from mspass_cluster import CommandRunner, MsPASSCluster
from mspass_cluster.backends.slurm import SlurmBackend
from mspass_cluster.config import resolve_options
from mspass_cluster.errors import ConfigError, SubmitError
from mspass_cluster.guardrails import connect_timeout, open_files_needed
from mspass_cluster.roles import build_worker_array_script
from mspass_cluster.slurm import (
    explain_reason,
    format_array_indices,
    parse_site_limits,
    refused_for_load,
)

SMALL = dict(cores=1, memory="512MiB", exclusive=False, walltime="10", db_command=FAKE_MONGOD, db_memory="512MiB")


# ------------------------------------------------------------------ pure parts
def test_array_indices_are_written_as_slurm_reads_them():
    assert format_array_indices([4]) == "4"
    assert format_array_indices([0, 1, 2, 3]) == "0-3"
    assert format_array_indices([9, 3, 4, 5, 12, 13]) == "3-5,9,12-13"
    with pytest.raises(ValueError):
        format_array_indices([])


def test_site_limits_are_read_from_scontrol_show_config_of_the_bed(slurm_testbed):
    limits = parse_site_limits(slurm_output("scontrol", "show", "config"))
    assert limits.max_array_size and limits.max_array_size > 1 and limits.arrays
    assert limits.max_job_count and limits.max_job_count >= 10
    assert not parse_site_limits("MaxArraySize = 0\n").arrays


@pytest.mark.parametrize(
    ("stderr", "load"),
    [
        ("sbatch: error: Batch job submission failed: Resource temporarily unavailable", True),
        ("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying", True),
        ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", True),
        ("sbatch: error: RPC rate limit exceeded, try again", True),
        ("sbatch: error: Batch job submission failed: Invalid partition name specified", False),
        ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy", False),
    ],
)
def test_a_refusal_for_load_is_told_apart_from_a_refusal_of_the_job(stderr, load):
    assert refused_for_load(stderr) is load


def test_pending_reasons_that_are_limits_are_said_in_words_with_what_to_do():
    words = explain_reason("QOSMaxJobsPerUserLimit")
    assert "MaxJobsPerUser" in words and "sacctmgr" in words and "worker_submission='steps'" in words
    assert "sacctmgr show assoc" in explain_reason("AssocMaxJobsLimit")
    assert explain_reason("(JobHeldUser)").startswith("it is held")
    assert explain_reason("SomethingNewInSlurm25") == "SomethingNewInSlurm25"


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0), (12, 12), ("12", 12), (0.9, 0.9), ("0.5", 0.5), ("75%", 0.75), (None, None)]
)
def test_ready_workers_takes_a_count_or_a_share(value, expected):
    assert resolve_options(ready_workers=value).ready_workers == expected


@pytest.mark.parametrize("value", [-1, 1.5, "150%", "most", True])
def test_ready_workers_that_is_neither_a_count_nor_a_share_is_refused_with_the_fix(value):
    with pytest.raises(ConfigError, match=r"ready_workers=.*ready_workers=0\.9"):
        resolve_options(ready_workers=value)


def test_guardrails_grow_with_the_number_of_workers():
    assert connect_timeout(64) == 30  # Dask's own default while it suffices
    assert 30 < connect_timeout(1000) < connect_timeout(3000) <= 300
    assert open_files_needed(1000) > 1024 > open_files_needed(128)


def test_the_open_files_limit_of_this_process_is_raised_for_many_workers(tmp_path):
    """In a process started with a soft limit of 600 (hard 4096): 1000 workers need more, up to the hard limit."""
    code = (
        "import resource; from mspass_cluster.guardrails import raise_open_files; "
        "print(raise_open_files(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        ["bash", "-c", 'ulimit -Sn 600 && ulimit -Hn 4096 && exec "$0" -c "$1"', sys.executable, code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(open_files_needed(1000))] * 2
    low = subprocess.run(
        ["bash", "-c", 'ulimit -Sn 600 && ulimit -Hn 800 && exec "$0" -c "$1"', sys.executable, code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert low.stdout.split() == ["800", "800"]
    assert "hard limit is 800" in low.stderr and "ulimit -Hn" in low.stderr


def test_the_array_script_runs_each_task_s_own_worker_script(tmp_path):
    """Executed under bash: task i runs <cluster>-worker-<i>.sh beside it; outside an array it says why it stops."""
    options = resolve_options(log_dir=str(tmp_path), walltime="10", security=False)
    script, name, output = build_worker_array_script(options, "c", [3, 5])
    assert name == "c-workers" and output == str(tmp_path / "c-worker-%a-%A_%a.out")
    assert "#SBATCH --array=3,5" in script and "#SBATCH --job-name=c-workers" in script
    for i in (3, 5):
        (tmp_path / f"c-worker-{i}.sh").write_text(f"echo node {i} ran with task $SLURM_ARRAY_TASK_ID\n")
    path = tmp_path / "c-workers-3-5.sh"
    path.write_text(script)
    ran = subprocess.run(
        ["bash", str(path)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "5"}, capture_output=True, text=True
    )
    assert ran.stdout == "node 5 ran with task 5\n"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    alone = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert alone.returncode != 0 and "runs as a Slurm job array" in alone.stderr


# ------------------------------------------------------------------ live, on the test bed
def _array_of(job_id: str) -> str:
    return job_id.split("_")[0]


def test_worker_nodes_are_one_job_array_scaled_and_replaced_task_by_task(slurm_testbed, shared_dir, caplog):
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    runner = CommandRunner()
    with MsPASSCluster(nodes=3, work_dir=str(shared_dir), db_port=28201, command_runner=runner, **SMALL) as cluster:
        assert runner.calls["sbatch"] == 2  # the database's job, and one array for the three worker nodes
        workers = [j for j in cluster._launcher.jobs.values() if j.role == "worker"]
        assert len({_array_of(j.job_id) for j in workers}) == 1 and all("_" in j.job_id for j in workers)
        for job in workers:
            # Each task has its own log, named after its node, and ran that node's own script.
            assert os.path.basename(job.log_path) == f"{job.name}-{job.job_id}.out"
            assert os.path.exists(job.script_path)

        cluster.scale(5)
        cluster.wait_for_workers()
        assert runner.calls["sbatch"] == 3  # two more nodes, one more sbatch
        assert len(cluster.scheduler.workers) == 5

        cluster.scale(2)
        deadline = time.monotonic() + 60
        live = []
        while time.monotonic() < deadline:
            live = queued([j.job_id for j in cluster._launcher.jobs.values() if j.role == "worker"])
            if len(live) == 2 and len(cluster.scheduler.workers) == 2:
                break
            time.sleep(0.2)
        assert len(live) == 2, f"tasks still queued after scale(2): {live}"

        # A node lost after its workers ran (here: its task cancelled from outside) is replaced on its own.
        lost = next(j for j in cluster._launcher.jobs.values() if j.role == "worker" and j.job_id in live)
        known = set(cluster._launcher.jobs)
        subprocess.run(["scancel", lost.job_id], check=True, timeout=30)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            replaced = [j for j in cluster._launcher.jobs.values() if j.job_id not in known]
            if (
                replaced
                and len(cluster.scheduler.workers) == 2
                and all(j.ready for j in cluster.workers_service.jobs())
            ):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no replacement for {lost.job_id}: {cluster}")
        assert runner.calls["sbatch"] == 4
        assert any("submitting a replacement" in r.getMessage() for r in caplog.records)
    assert_nothing_left(cluster)


class _HoldOneTask(CommandRunner):
    """The real commands; the worker array is submitted held (``sbatch --hold``) and every task but ``index`` released."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.held: str | None = None

    async def arun(self, argv, **kwargs):
        argv = [str(a) for a in argv]
        workers = os.path.basename(argv[0]) == "sbatch" and "-workers-" in argv[-1]
        if workers:
            argv = [argv[0], "--hold", *argv[1:]]
        result = await super().arun(argv, **kwargs)
        if workers:
            array = result.stdout.strip().split(";")[0]
            self.held = f"{array}_{self.index}"
            others = [f"{array}_{i}" for i in range(self.index)]
            subprocess.run(["scontrol", "release", *others], check=True, timeout=30)
        return result


def test_ready_with_most_workers_the_rest_join_and_the_log_says_what_they_wait_for(slurm_testbed, shared_dir, caplog):
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    runner = _HoldOneTask(index=2)
    try:
        with MsPASSCluster(
            nodes=3,
            ready_workers="60%",
            work_dir=str(shared_dir),
            db_port=28202,
            command_runner=runner,
            poll_interval=1,
            **SMALL,
        ) as cluster:
            assert runner.held is not None
            assert len(cluster.scheduler.workers) == 2  # ready with 2 of 3 (60 % of 3, rounded up)
            messages = [r.getMessage() for r in caplog.records]
            ready_line = next(m for m in messages if m.startswith("Ready with 2 of 3 worker node(s)"))
            assert "PENDING (JobHeldUser)" in ready_line and "it is held (scontrol release" in ready_line, ready_line
            subprocess.run(["scontrol", "release", runner.held], check=True, timeout=30)
            cluster.wait_for_workers(timeout=60)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if any("Every worker node is ready now: 3 of 3" in r.getMessage() for r in caplog.records):
                    break
                time.sleep(0.2)
            else:
                pytest.fail("the log never said that the last worker node joined")
    finally:
        if runner.held:
            subprocess.run(["scancel", runner.held], timeout=30)
    assert_nothing_left(cluster)


def _shim(directory, name: str, body: str):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class _Through(CommandRunner):
    """The real commands, but ``program`` runs ``shim`` instead (a stand-in named in each test)."""

    def __init__(self, program: str, shim):
        super().__init__()
        self.program, self.shim = program, str(shim)

    async def arun(self, argv, **kwargs):
        argv = [self.shim if str(a) == self.program and i == 0 else a for i, a in enumerate(argv)]
        return await super().arun(argv, **kwargs)


def test_sbatch_refused_for_load_is_tried_again_with_a_log_line_and_never_queued_twice(
    slurm_testbed, shared_dir, caplog, monkeypatch
):
    """Stand-in for a busy controller: the first sbatch is refused ("Resource temporarily unavailable"); the second
    queues the job but answers "Socket timed out", as a controller that took too long does. The cluster tries again
    after a pause, finds the job the second one queued instead of submitting it again, and starts."""
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    monkeypatch.setattr(SlurmBackend, "backoff", (0.2, 0.4, 0.8))
    counter = shared_dir / "sbatch-calls"
    shim = _shim(
        shared_dir,
        "sbatch",
        f"""case "$*" in *-workers-*) ;; *) exec sbatch "$@" ;; esac
n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter}
if [ "$n" -le 2 ]; then echo "sbatch: error: Batch job submission failed: Resource temporarily unavailable" >&2; exit 1; fi
if [ "$n" -eq 3 ]; then sbatch "$@" >/dev/null; echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2; exit 1; fi
exec sbatch "$@"
""",
    )
    runner = _Through("sbatch", shim)
    with MsPASSCluster(nodes=2, work_dir=str(shared_dir), db_port=28203, command_runner=runner, **SMALL) as cluster:
        workers = cluster.workers_service.jobs()
        assert len(workers) == 2 and len({_array_of(j.job_id) for j in workers}) == 1
        name = f"{cluster._name}-workers"
        arrays = slurm_output("squeue", "--noheader", f"--name={name}", "--format=%F").split()
        assert len(set(arrays)) == 1, f"the worker array was queued more than once: {arrays}"
    messages = [r.getMessage() for r in caplog.records]
    retries = [m for m in messages if "refused the worker job array" in m and "trying again in" in m]
    assert len(retries) == 2 and "Resource temporarily unavailable" in retries[0]
    assert any("but Slurm had queued it" in m for m in messages)
    assert_nothing_left(cluster)


def test_more_worker_nodes_than_the_controller_holds_are_refused_before_anything_is_queued(slurm_testbed, shared_dir):
    """Stand-in for a site's small MaxJobCount: `scontrol show config` as the bed's, with MaxJobCount=<held + 3>."""
    held = len(slurm_output("squeue", "--noheader", "--array", "--states=all", "--format=%i").split())
    shim = _shim(
        shared_dir,
        "scontrol",
        f"""if [ "$*" = "show config" ]; then
    scontrol show config | sed 's/^MaxJobCount .*/MaxJobCount             = {held + 3}/'
else exec scontrol "$@"; fi
""",
    )
    runner = _Through("scontrol", shim)
    with pytest.raises(SubmitError, match=r"holds at most \d+ jobs \(MaxJobCount.*worker_submission='steps'") as info:
        MsPASSCluster(nodes=40, work_dir=str(shared_dir), db_port=28204, command_runner=runner, **SMALL)
    assert "40 worker node(s) asked for" in str(info.value)
    assert not list((shared_dir / "logs").glob("*-workers-*.sh")), "a worker array was written, so maybe submitted"
    # The way out the message gives: every worker node in one job, which the same limit holds.
    before = runner.calls["sbatch"]
    with MsPASSCluster(
        nodes=4, worker_submission="steps", work_dir=str(shared_dir), db_port=28205, command_runner=runner, **SMALL
    ) as cluster:
        assert len(cluster.scheduler.workers) == 4
        assert runner.calls["sbatch"] == before + 2  # the database's job, one job for the four worker nodes
    assert_nothing_left(cluster)


def test_a_full_controller_is_named_as_such_not_as_a_busy_one(slurm_testbed, shared_dir):
    """Stand-ins: `scontrol show config` says MaxJobCount is what the bed holds now, and `sbatch` answers as
    Slurm does then ("temporarily unable to accept job"), which alone reads as load and would be retried."""
    # One held job of this test, so that the controller holds at least one (MaxJobCount=0 means no limit).
    filler = subprocess.run(
        ["sbatch", "--parsable", "--hold", "--time=1", "--output=/dev/null", "--wrap", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    try:
        _refused_as_full(shared_dir)
    finally:
        subprocess.run(["scancel", filler], check=False, timeout=30)


def _refused_as_full(shared_dir):
    held = len(slurm_output("squeue", "--noheader", "--array", "--states=all", "--format=%i").split())
    shims = {
        "scontrol": _shim(
            shared_dir,
            "scontrol",
            f"""if [ "$*" = "show config" ]; then
    scontrol show config | sed 's/^MaxJobCount .*/MaxJobCount             = {held}/'
else exec scontrol "$@"; fi
""",
        ),
        "sbatch": _shim(
            shared_dir,
            "sbatch",
            "echo 'sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying' >&2\n"
            "echo 'sbatch: error: Batch job submission failed: Resource temporarily unavailable' >&2\nexit 1\n",
        ),
    }

    class Both(CommandRunner):
        async def arun(self, argv, **kwargs):
            argv = [str(shims.get(str(a), a)) if i == 0 else a for i, a in enumerate(argv)]
            return await super().arun(argv, **kwargs)

    started = time.monotonic()
    with pytest.raises(SubmitError, match=rf"its controller holds {held} jobs, as many as it may") as info:
        MsPASSCluster(nodes=1, work_dir=str(shared_dir), db_port=28206, command_runner=Both(), **SMALL)
    assert "worker_submission='steps'" in str(info.value)
    assert time.monotonic() - started < 20, "retried as if the controller were only busy"


# ------------------------------------------- worker_submission="steps": one job, nodes as srun steps
def _steps_of(job_id: str) -> list[str]:
    """Names of the running steps of job ``job_id`` (``squeue --steps``), Slurm's own batch/extern ones left out."""
    out = slurm_output("squeue", "--steps", "--noheader", "--format=%i|%j", f"--jobs={job_id}")
    pairs = (line.split("|", 1) for line in out.splitlines() if "|" in line)
    return sorted(name for step, name in pairs if not step.endswith((".batch", ".extern")))


def test_the_holder_script_asks_for_every_node_and_ends_when_the_notebook_is_gone(tmp_path):
    from mspass_cluster.roles import build_worker_holder_script

    options = resolve_options(log_dir=str(tmp_path), orphan_timeout=2, **SMALL)
    script, name, output = build_worker_holder_script(options, "c", [0, 1, 2], str(tmp_path / "hb"))
    assert "#SBATCH --nodes=3" in script and "#SBATCH --nodes=1" not in script and "#SBATCH --ntasks=1" not in script
    (tmp_path / "hb").touch()
    path = tmp_path / "holder.sh"
    path.write_text(script)
    started = time.monotonic()
    # Run by hand (bash this-file): with no fresh heartbeat it gives the nodes back by itself.
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "no heartbeat from the notebook" in result.stdout
    assert time.monotonic() - started < 25


def test_worker_nodes_as_steps_of_one_job_are_ready_scaled_and_given_back(slurm_testbed, shared_dir, caplog):
    caplog.set_level(logging.INFO, logger="mspass_cluster")
    runner = CommandRunner()
    with MsPASSCluster(
        nodes=3, worker_submission="steps", work_dir=str(shared_dir), db_port=28211, command_runner=runner, **SMALL
    ) as cluster:
        assert runner.calls["sbatch"] == 2  # the database's job and one job holding the three worker nodes
        workers = [j for j in cluster._launcher.jobs.values() if j.role == "worker"]
        holders = {j.job_id.split(".w")[0] for j in workers}
        assert len(holders) == 1
        (holder,) = holders
        # One queued job for all three nodes, each node's own script an srun step of it, on three nodes.
        assert queued([holder]) == [holder]
        assert _steps_of(holder) == sorted(j.name for j in workers)
        hosts = cluster.get_client().run(lambda: __import__("socket").gethostname())
        assert len(set(hosts.values())) == 3
        for job in workers:
            assert os.path.basename(job.log_path) == f"{job.name}-{job.job_id}.out"
            assert "worker starting on" in open(job.log_path).read()
        assert any("srun step" in r.getMessage() for r in caplog.records)

        cluster.scale(5)
        cluster.wait_for_workers()
        assert runner.calls["sbatch"] == 3  # two more nodes: one more job
        assert len(cluster.scheduler.workers) == 5
        second = {j.job_id.split(".w")[0] for j in cluster._launcher.jobs.values() if j.role == "worker"} - holders
        assert len(second) == 1

        # Scaled down to 2: the stopped nodes' steps end cleanly; a holder left with no worker is cancelled.
        cluster.scale(2)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            steps = _steps_of(holder) + (_steps_of(next(iter(second))) if queued(second) else [])
            if len(cluster.scheduler.workers) == 2 and len(steps) == 2 and not queued(second):
                break
            time.sleep(0.5)
        else:
            pytest.fail(
                f"after scale(2): workers {list(cluster.scheduler.workers)}, queued {queued([holder, *second])}"
            )
        stopped = [j for j in cluster._launcher.jobs.values() if j.role == "worker" and j.ended]
        assert len(stopped) == 3 and all(j.state.value in ("CANCELLED", "COMPLETED") for j in stopped), stopped
        assert any("has no worker left" in r.getMessage() for r in caplog.records)
    assert_nothing_left(cluster)
    assert queued([holder]) == []
