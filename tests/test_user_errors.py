"""Bad input from a new user: our own error, naming the value, where it came from and the fix, before anything runs.

Each case here once cost a user an allocation or a hang (issue 9): a bare
number taken as bytes, out-of-range ports, a malformed YAML file crashing
``import mspass_cluster``, values from the environment or YAML whose error did
not say where they came from.
"""

from __future__ import annotations

import os
import subprocess
import sys

import dask.config
import pytest

from mspass_cluster.backends import auto_backend
from mspass_cluster.config import resolve_options
from mspass_cluster.errors import ConfigError


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


@pytest.mark.parametrize("name", ["memory", "db_memory"])
@pytest.mark.parametrize("value", ["4000", 4000, " 180000 "])
def test_a_bare_number_for_memory_is_refused_with_the_unit_to_write(name, value):
    with pytest.raises(ConfigError) as info:
        resolve_options(environ={}, **{name: value})
    text = str(info.value)
    assert f"{name}={value!r}" in text and "no unit" in text and f"'{str(value).strip()}MB'" in text


@pytest.mark.parametrize("name", ["memory", "db_memory"])
@pytest.mark.parametrize("value", ["1KB", "100MB", "0.1GiB"])
def test_too_little_memory_is_refused_before_anything_is_submitted(name, value):
    with pytest.raises(ConfigError, match=rf"{name}={value!r} is too little.*256MiB"):
        resolve_options(environ={}, **{name: value})


def test_memory_split_over_too_many_processes_is_refused():
    with pytest.raises(ConfigError, match=r"processes=16 leaves each Dask worker process 128 MiB"):
        resolve_options(environ={}, memory="2GiB", processes=16)


@pytest.mark.parametrize(
    "name, value", [("db_port", 70000), ("scheduler_port", 70000), ("db_port", 0), ("scheduler_port", -1)]
)
def test_ports_out_of_range_are_refused(name, value):
    with pytest.raises(ConfigError, match=rf"{name}={value}"):
        resolve_options(environ={}, **{name: value})


@pytest.mark.parametrize("name", ["partition", "account", "qos", "work_dir", "job_name"])
def test_a_line_break_in_a_value_is_refused(name):
    with pytest.raises(ConfigError, match=rf"{name}="):
        resolve_options(environ={}, **{name: "normal\nrm -rf ~"})
    with pytest.raises(ConfigError, match="job_extra_directives"):
        resolve_options(environ={}, job_extra_directives=["--constraint=ib\ntouch /tmp/x"])


def test_a_bad_value_from_the_legacy_environment_names_the_variable():
    with pytest.raises(ConfigError, match=r"^From the environment variable MSPASS_CLUSTER_BACKEND: backend='lcoal'"):
        resolve_options(environ={"MSPASS_CLUSTER_BACKEND": "lcoal"})


def test_a_bad_value_from_a_dask_variable_names_the_variable():
    out = _python(
        "from mspass_cluster import resolve_options; resolve_options()", {"DASK_MSPASS_CLUSTER__DB_PORT": "70000"}
    )
    assert "ConfigError: From the environment variable DASK_MSPASS_CLUSTER__DB_PORT: db_port=70000" in out.stderr


def test_a_bad_value_from_a_yaml_file_names_the_file(tmp_path):
    (tmp_path / "mspass_cluster.yaml").write_text("mspass_cluster:\n  memory: 4000\n")
    out = _python("from mspass_cluster import resolve_options; resolve_options()", {"DASK_CONFIG": str(tmp_path)})
    assert f"ConfigError: From 'memory' in {tmp_path / 'mspass_cluster.yaml'}: memory=4000 has no unit" in out.stderr


def test_a_malformed_yaml_file_is_our_error_naming_the_file(tmp_path):
    (tmp_path / "mspass_cluster.yaml").write_text("mspass_cluster:\n  backend: [local\n")
    out = _python("import mspass_cluster", {"DASK_CONFIG": str(tmp_path)})
    last = out.stderr.strip().splitlines()
    assert out.returncode == 1
    assert any(line.startswith("mspass_cluster.errors.ConfigError: A dask config file at") for line in last)
    assert str(tmp_path / "mspass_cluster.yaml") in out.stderr and "Fix its YAML" in out.stderr


def test_a_section_that_is_not_a_mapping_says_how_to_write_it():
    with dask.config.set({"mspass_cluster": "local"}):
        with pytest.raises(ConfigError, match=r"(?s)'mspass_cluster' is 'local', not a mapping.*backend: local"):
            resolve_options(environ={})


JOB = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1"}


@pytest.mark.parametrize(
    "environ, has_sbatch, expected",
    [
        ({}, True, "slurm"),
        ({}, False, "local"),
        ({**JOB, "SLURM_JOB_NUM_NODES": "1"}, True, "slurm"),  # Open OnDemand Jupyter, srun --pty
        ({**JOB, "SLURM_JOB_NUM_NODES": "1"}, False, "allocation"),  # no sbatch on the node: this job's node
        ({**JOB, "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_NUM_NODES": "3"}, True, "allocation"),  # batch for this
    ],
)
def test_backend_auto_inside_a_slurm_job_fits_what_the_job_is_for(environ, has_sbatch, expected):
    backend, why = auto_backend(has_sbatch, environ)
    assert backend == expected
    # The log line says what was chosen and what to set for the other choice.
    if environ:
        other = "slurm" if backend == "allocation" else "allocation"
        assert "Slurm job 77" in why and f"backend='{other}'" in why
