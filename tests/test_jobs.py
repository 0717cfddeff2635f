"""What a failed job's error tells the user."""

from mspass_cluster.jobs import TrackedJob
from mspass_cluster.slurm import JobState, JobStatus


def test_failure_names_job_state_exit_code_log_and_the_error_above_a_long_usage_text(tmp_path):
    log = tmp_path / "w-7.out"
    log.write_text(
        'mspass_cluster: worker starting on n2\nError for command "exec": unknown flag: --nv2\n'
        + "".join(f"      --option-{i} string\n" for i in range(60))
        + "mspass_cluster: worker exited with status 1\n"
    )
    job = TrackedJob(
        "worker",
        "mspass-ab-worker-0",
        "7",
        str(log),
        str(tmp_path / "w.sh"),
        status=JobStatus("7", JobState.FAILED, "NonZeroExitCode", "n2", "1:0"),
    )
    error = job.failure("ended before its Dask workers connected", "Fix it.")
    text = str(error)
    assert "worker job 7 (mspass-ab-worker-0) ended before its Dask workers connected" in text
    assert "Slurm state: FAILED, exit code 1:0 on node n2, reason: NonZeroExitCode" in text
    assert f"Log: {log}" in text and 'Error in the log: Error for command "exec": unknown flag: --nv2' in text
    assert "    | mspass_cluster: worker exited with status 1" in text and text.endswith("Fix it.")
    assert (error.role, error.job_id, error.state, error.exit_code) == ("worker", "7", "FAILED", "1:0")


def test_missing_log_is_said_not_raised(tmp_path):
    job = TrackedJob("db", "d", "8", str(tmp_path / "none.out"), "s", status=JobStatus("8", JobState.FAILED))
    assert "(no log: No such file or directory)" in str(job.failure("ended", "Fix."))
