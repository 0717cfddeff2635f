"""Pure Slurm builders and parsers."""

import pytest

from mspass_cluster.slurm import (
    JobState,
    build_batch_directives,
    build_directives,
    build_scancel_argv,
    build_squeue_argv,
    build_squeue_mine_argv,
    controller_unreachable,
    directive_option,
    parse_sacct,
    parse_sbatch_job_id,
    parse_scontrol_job,
    parse_squeue,
    parse_squeue_mine,
)


def test_directives_for_a_whole_exclusive_node():
    assert build_directives(
        job_name="w",
        output="/l/w-%j.out",
        walltime="01:00:00",
        exclusive=True,
        partition="normal",
        account="proj",
        qos="debug",
        extra=["--constraint=ib"],
    ) == [
        "#SBATCH --job-name=w",
        "#SBATCH --output=/l/w-%j.out",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --mem=0",
        "#SBATCH --exclusive",
        "#SBATCH --time=01:00:00",
        "#SBATCH --partition=normal",
        "#SBATCH --account=proj",
        "#SBATCH --qos=debug",
        "#SBATCH --constraint=ib",
    ]


def test_directives_for_a_batch_job_of_whole_nodes_one_task_each():
    assert build_batch_directives(
        job_name="mspass-nb-flow",
        output="/my runs/50%/flow-%j.log",
        nodes=4,
        walltime="02:00:00",
        partition="normal",
        qos="long",
        extra=["--constraint=ib", "-C x"],
    ) == [
        "#SBATCH --job-name=mspass-nb-flow",
        '#SBATCH --output="/my runs/50%%/flow-%j.log"',
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
        "#SBATCH --time=02:00:00",
        "#SBATCH --partition=normal",
        "#SBATCH --qos=long",
        "#SBATCH --constraint=ib",
        "#SBATCH -C x",
    ]


@pytest.mark.parametrize(
    "directive, option",
    [
        ("--constraint=ib", "--constraint"),
        ("--time 10", "--time"),
        ("--exclusive", "--exclusive"),
        ("-N2", "-N"),
        ("-t 5", "-t"),
    ],
)
def test_the_option_a_directive_sets(directive, option):
    assert directive_option(directive) == option


def test_memory_is_rounded_up_to_a_unit_slurm_accepts():
    lines = build_directives(job_name="d", output="o", walltime="5", cores=1, memory="1.5GiB")
    assert "#SBATCH --mem=2G" in lines and "#SBATCH --cpus-per-task=1" in lines


@pytest.mark.parametrize(
    "out, job_id", [("123\n", "123"), ("4567;cluster\n", "4567"), ("sbatch: warning: x\n89\n", "89")]
)
def test_parsable_sbatch_output(out, job_id):
    assert parse_sbatch_job_id(out) == job_id


def test_sbatch_output_without_id_is_an_error():
    with pytest.raises(ValueError):
        parse_sbatch_job_id("Submitted nothing")


def test_one_squeue_call_for_all_jobs():
    argv = build_squeue_argv(["1", "2", "3"])
    assert argv[0] == "squeue" and "--jobs=1,2,3" in argv and "--states=all" in argv


def test_squeue_parsing_keeps_state_reason_node_and_time_left():
    out = "12|PENDING|Resources||1-00:00:00\n13|RUNNING|None|n2|59:48\n14|FAILED|NonZeroExitCode|n3|0:00\n15|RUNNING|None|n4|UNLIMITED\n"
    statuses = parse_squeue(out)
    assert statuses["12"].state is JobState.PENDING and statuses["12"].reason == "Resources"
    assert statuses["13"].kind == "running" and statuses["13"].nodes == "n2" and statuses["13"].reason == ""
    assert statuses["14"].kind == "ended"
    assert [statuses[j].time_left for j in ("12", "13", "14", "15")] == [86400, 3588, 0, None]


def test_the_users_queue_with_names_nodes_and_pending_reasons():
    assert build_squeue_mine_argv() == ["squeue", "--me", "--noheader", "--format=%i|%j|%T|%R"]
    jobs = parse_squeue_mine(
        "21|t-a-0123abcd-db|RUNNING|n1\n22|mspass-nb-x|PENDING|(Resources)\n"
        "23|other|PENDING|(None)\n\nsqueue: warning: noise\n"
    )
    assert [(j.job_id, j.name, j.state, j.nodes, j.reason) for j in jobs] == [
        ("21", "t-a-0123abcd-db", JobState.RUNNING, "n1", ""),
        ("22", "mspass-nb-x", JobState.PENDING, "", "Resources"),
        ("23", "other", JobState.PENDING, "", "None"),
    ]


def test_scontrol_parsing_gives_exit_code():
    out = (
        "JobId=30 JobName=w UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) "
        "ExitCode=127:0 NodeList=n1 StdOut=/l/w-30.out\n"
    )
    status = parse_scontrol_job(out)
    assert (status.job_id, status.state, status.exit_code, status.nodes) == ("30", JobState.FAILED, "127:0", "n1")
    assert parse_scontrol_job("slurm_load_jobs error: Invalid job id specified") is None


def test_sacct_parsing_and_cancelled_by_user():
    status = parse_sacct("40|CANCELLED by 0|0:15|n4\n40.batch|CANCELLED|0:15|n4\n")["40"]
    assert status.state is JobState.CANCELLED and status.exit_code == "0:15"


def test_every_state_has_a_kind():
    assert {s.kind for s in JobState} == {"pending", "running", "ended"}
    assert JobState.parse("NOT_A_STATE") is JobState.UNKNOWN


def test_scancel_with_signal_reaches_every_process():
    assert build_scancel_argv(["5"], "TERM") == ["scancel", "--signal=TERM", "--full", "5"]
    assert build_scancel_argv(["5", "6"]) == ["scancel", "5", "6"]


@pytest.mark.parametrize(
    ("stderr", "down"),
    [
        ("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)", True),
        ("squeue: error: slurm_receive_msg: Socket timed out on send/recv operation", True),
        ("slurm_load_jobs error: Zero Bytes were transmitted or received", True),
        ("sbatch: error: Batch job submission failed: Invalid partition name specified", False),
        (
            "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
            False,
        ),
    ],
)
def test_controller_outage_is_told_apart_from_a_refusal(stderr, down):
    assert controller_unreachable(stderr) is down


def test_importing_the_package_leaves_ctrl_c_alone():
    import subprocess
    import sys

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    # dask-jobqueue 0.9.0 alone turns Ctrl-C into a silent sys.exit() (dask/dask-jobqueue#696): the reason for the guard.
    kept = run(
        "import signal; h = signal.getsignal(signal.SIGINT); import mspass_cluster; "
        "assert signal.getsignal(signal.SIGINT) is h"
    )
    assert kept.returncode == 0, kept.stderr
    restored = run(
        "import signal, dask_jobqueue, mspass_cluster; "
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    )
    assert restored.returncode == 0, restored.stderr


def test_the_examples_in_the_docstrings_hold():
    import doctest

    from mspass_cluster import slurm

    result = doctest.testmod(slurm)
    assert result.attempted > 0 and result.failed == 0
