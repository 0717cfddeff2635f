"""Option resolution: argument > dask config (ours, then jobqueue.slurm) > legacy MsPASS environment > default, and bad input."""

import os

import dask.config
import pytest

from mspass_cluster.config import OPTIONS, parse_walltime, prepare_directories, render_config_yaml, resolve_options
from mspass_cluster.errors import ConfigError


def test_defaults_follow_the_work_dir(tmp_path):
    opts = resolve_options(environ={}, work_dir=str(tmp_path))
    assert opts.nodes == 1
    assert opts.db_dir == str(tmp_path / "db")
    assert opts.log_dir == str(tmp_path / "logs")
    assert opts.worker_dir == str(tmp_path / "work")
    assert opts.db_partition is None and opts.db_walltime == opts.walltime


def test_argument_beats_dask_config_beats_legacy_environment_beats_default(tmp_path):
    env = {
        "MSPASS_WORK_DIR": str(tmp_path / "env"),
        "MSPASS_LOG_DIR": str(tmp_path / "envlogs"),
        "MSPASS_DB_DIR": str(tmp_path / "envdb"),
    }
    with dask.config.set(
        {"mspass_cluster.work-dir": str(tmp_path / "cfg"), "mspass_cluster.db-dir": str(tmp_path / "cfgdb")}
    ):
        opts = resolve_options(environ=env, work_dir=str(tmp_path / "arg"))
    assert opts.work_dir == str(tmp_path / "arg")
    assert opts.sources["work_dir"] == "argument"
    assert opts.db_dir == str(tmp_path / "cfgdb") and opts.sources["db_dir"] == "dask config"
    assert opts.log_dir == str(tmp_path / "envlogs") and opts.sources["log_dir"] == "MSPASS_LOG_DIR"
    assert opts.sources["walltime"] == "default"


def test_legacy_hostname_base_and_worker_dir_are_read():
    opts = resolve_options(environ={"HOSTNAME_BASE": "cluster.example.edu", "MSPASS_WORKER_DIR": "/scratch/w"})
    assert opts.hostname_base == "cluster.example.edu"
    assert opts.worker_dir == "/scratch/w"


@pytest.mark.parametrize("nodes", [0, -2, "three", 1.5])
def test_bad_node_counts_are_refused_with_the_value(nodes):
    with pytest.raises(ConfigError, match="nodes="):
        resolve_options(environ={}, nodes=nodes)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        resolve_options(environ={}, nodez=3)
    assert "nodez" in str(info.value) and "partition" in str(info.value) and "walltime" in str(info.value)


def test_unknown_key_in_dask_config_is_refused():
    with dask.config.set({"mspass_cluster.partion": "x"}):
        with pytest.raises(ConfigError, match="partion"):
            resolve_options(environ={})


@pytest.mark.parametrize("memory", ["lots", "-1GB", "0"])
def test_bad_memory_says_how_to_write_it(memory):
    with pytest.raises(ConfigError, match="memory="):
        resolve_options(environ={}, memory=memory)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800),
        ("10:30", 630),
        ("01:00:00", 3600),
        ("2-00", 172800),
        ("1-02:03", 93780),
        ("1-00:00:05", 86405),
    ],
)
def test_slurm_walltime_formats(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["1h", "25:00:00:00", "", "00:00:00", "ab:cd"])
def test_malformed_walltime_is_refused_with_the_formats(text):
    with pytest.raises(ConfigError, match="walltime"):
        resolve_options(environ={}, walltime=text)


def test_cores_must_cover_processes():
    with pytest.raises(ConfigError, match="processes"):
        resolve_options(environ={}, cores=2, processes=4)
    with pytest.raises(ConfigError, match="evenly"):
        resolve_options(environ={}, cores=6, processes=4)


def test_a_single_string_list_option_becomes_a_list():
    opts = resolve_options(environ={}, job_script_prologue="module load mongodb")
    assert opts.job_script_prologue == ["module load mongodb"]


def test_uncreatable_work_dir_is_named_with_the_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    opts = resolve_options(environ={}, work_dir=str(blocker / "sub"))
    with pytest.raises(ConfigError) as info:
        prepare_directories(opts)
    assert str(blocker / "sub") in str(info.value) and "work_dir" in str(info.value)
    assert not os.path.exists(blocker / "sub")


def test_packaged_config_file_declares_every_option_and_only_those():
    from importlib import resources

    import yaml

    text = resources.files("mspass_cluster").joinpath("mspass_cluster.yaml").read_text()
    keys = set(yaml.safe_load(text)["mspass_cluster"])
    assert keys == {o.name.replace("_", "-") for o in OPTIONS}
    assert text == render_config_yaml()  # regenerate with: python -m mspass_cluster.config


# ---- dask-jobqueue's jobqueue.slurm section: a site's settings, below our own section

SITE = {
    "jobqueue.slurm.queue": "normal",
    "jobqueue.slurm.account": "EAR12345",
    "jobqueue.slurm.walltime": "04:00:00",
    "jobqueue.slurm.cores": 48,
    "jobqueue.slurm.memory": "180GiB",
    "jobqueue.slurm.processes": 8,
    "jobqueue.slurm.interface": "ib0",
    "jobqueue.slurm.job-script-prologue": ["module load mongodb"],
    "jobqueue.slurm.job-extra-directives": ["--constraint=ib"],
    "jobqueue.slurm.worker-extra-args": ["--nthreads", "6"],
    "jobqueue.slurm.death-timeout": 120,
    "jobqueue.slurm.python": "/opt/site/bin/python",
}


def test_a_sites_jobqueue_slurm_settings_are_used_when_ours_are_unset():
    with dask.config.set(SITE):
        opts = resolve_options(environ={})
    assert (opts.partition, opts.db_partition, opts.account) == ("normal", "normal", "EAR12345")
    assert (opts.walltime, opts.db_walltime) == ("04:00:00", "04:00:00")
    assert (opts.cores, opts.memory, opts.processes, opts.interface) == (48, "180GiB", 8, "ib0")
    assert opts.job_script_prologue == ["module load mongodb"] and opts.job_extra_directives == ["--constraint=ib"]
    assert opts.worker_extra_args == ["--nthreads", "6"] and opts.death_timeout == 120
    assert opts.python == "/opt/site/bin/python"
    assert {
        opts.sources[name]
        for name in (
            "partition",
            "account",
            "walltime",
            "cores",
            "memory",
            "processes",
            "interface",
            "job_script_prologue",
            "job_extra_directives",
            "worker_extra_args",
            "death_timeout",
            "python",
        )
    } == {"jobqueue.slurm config"}
    # Nothing of dask-jobqueue's means our nodes, job names, directories or database.
    assert opts.sources["nodes"] == opts.sources["job_name"] == opts.sources["worker_dir"] == "default"


def test_our_section_and_arguments_win_over_jobqueue_slurm():
    with dask.config.set({**SITE, "mspass_cluster.partition": "ours", "mspass_cluster.job-script-prologue": []}):
        opts = resolve_options(environ={}, account="mine")
    assert opts.partition == "ours" and opts.sources["partition"] == "dask config"
    assert opts.account == "mine" and opts.sources["account"] == "argument"
    # An empty list of ours is not "unset": the user's section says "no prologue".
    assert opts.job_script_prologue == [] and opts.sources["job_script_prologue"] == "dask config"


def test_dask_jobqueues_own_defaults_change_nothing():
    import dask_jobqueue  # noqa: F401  (its import installs its defaults into dask's config)

    assert dask.config.get("jobqueue.slurm.walltime") == "00:30:00"
    opts = resolve_options(environ={})
    assert opts.walltime == "01:00:00" and opts.sources["walltime"] == "default"
    assert all(source != "jobqueue.slurm config" for source in opts.sources.values())
    # A site file that repeats a packaged default is indistinguishable from it: still our default.
    with dask.config.set({"jobqueue.slurm.walltime": "00:30:00", "jobqueue.slurm.death-timeout": 60}):
        assert resolve_options(environ={}).sources["walltime"] == "default"


def test_deprecated_jobqueue_names_are_read_when_the_current_ones_are_unset():
    with dask.config.set({"jobqueue.slurm.project": "old-proj", "jobqueue.slurm.env-extra": ["module load x"]}):
        opts = resolve_options(environ={})
        assert (opts.account, opts.job_script_prologue) == ("old-proj", ["module load x"])
        with dask.config.set({"jobqueue.slurm.account": "new-proj"}):
            assert resolve_options(environ={}).account == "new-proj"


def test_jobqueue_slurm_is_not_read_for_the_local_backend():
    with dask.config.set(SITE):
        opts = resolve_options(environ={}, backend="local")
    assert opts.cores is None and opts.partition is None and opts.job_script_prologue == []
    assert opts.sources["cores"] == "default"


def test_a_bad_value_from_jobqueue_slurm_names_its_key_and_file(tmp_path, monkeypatch):
    (tmp_path / "site-jobqueue.yaml").write_text("jobqueue:\n  slurm:\n    memory: '4000'\n    queue: normal\n")
    monkeypatch.setattr(dask.config, "paths", [str(tmp_path)])
    with dask.config.set(dask.config.collect(paths=[str(tmp_path)], env={})):
        with pytest.raises(ConfigError) as info:
            resolve_options(environ={})
    assert str(info.value).startswith(
        f"From 'jobqueue.slurm.memory' in {tmp_path / 'site-jobqueue.yaml'} (dask-jobqueue's configuration): "
        "memory='4000' has no unit"
    )
    with dask.config.set({"jobqueue.slurm.cores": "many"}):
        with pytest.raises(
            ConfigError,
            match=r"^From dask config key jobqueue.slurm.cores \(dask-jobqueue's "
            r"configuration\): cores='many' is not a whole number",
        ):
            resolve_options(environ={})
