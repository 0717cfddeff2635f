"""Container command lines (pure) and errors before submission."""

from __future__ import annotations

import pytest

from mspass_cluster import MsPASSCluster
from mspass_cluster.config import resolve_options
from mspass_cluster.containers import all_binds, join, parse_bind, wrap
from mspass_cluster.errors import ConfigError
from mspass_cluster.roles import build_job_script


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "mspass_latest.sif"
    path.write_text("stand-in image")
    return str(path)


def script(image, role, **kw):
    opts = resolve_options(environ={}, work_dir="/scratch/run", container=image, **kw)
    return build_job_script(
        opts, role, cluster_id="c1", job_name=f"mspass-c1-{role}", scheduler_address="tcp://10.0.0.1:8786", db_host="n2"
    )[0]


@pytest.mark.parametrize(
    "runtime, candidates",
    [
        ("auto", "apptainer singularity"),
        ("apptainer", "apptainer"),
        ("singularity", "singularity"),
    ],
)
def test_worker_runs_the_images_python_through_the_runtime(image, runtime, candidates):
    text = script(image, "worker", container_runtime=runtime, binds=["/var/tmp:/data:ro"])
    assert f"for candidate in {candidates}; do" in text
    assert (
        f'"$container_runtime" exec --cleanenv --bind /var/tmp:/data:ro,/scratch/run {image} '
        "python -m distributed.cli.dask_worker tcp://10.0.0.1:8786 --name mspass-c1-worker"
    ) in text
    assert "apptainer) env_prefix=APPTAINERENV_ ;;" in text and "singularity) env_prefix=SINGULARITYENV_ ;;" in text
    assert (
        "for name in MSPASS_ROLE MSPASS_CLUSTER_ID" in text
        and "MSPASS_DB_ADDRESS MONGODB_PORT" not in text.split("for name in")[0]
    )
    assert "unset APPTAINER_BIND SINGULARITY_BIND" in text


def test_db_runs_mongod_from_the_image_with_gpu_and_extra_args(image):
    text = script(image, "db", gpu=True, container_args=["--contain"], binds=["/tmp"])
    assert (
        f'"$container_runtime" exec --cleanenv --nv --bind /tmp,/scratch/run --contain {image} '
        "mongod --port 27017 --dbpath /scratch/run/db/data"
    ) in text


def test_no_runtime_means_host_programs(image):
    text = script(image, "worker", container_runtime="none")
    assert "container_runtime" not in text and "--cleanenv" not in text


def test_directories_under_an_existing_bind_are_not_bound_again():
    assert [b.spec() for b in all_binds(["/scratch"], ["/scratch/run", "/home/me"])] == ["/scratch", "/home/me"]
    assert [b.spec() for b in all_binds(["/scratch:/data"], ["/scratch/run"])] == ["/scratch:/data", "/scratch/run"]


@pytest.mark.parametrize(
    "spec, error", [("/a,/b", "comma"), ("/a:/b:rx", "'ro' or 'rw'"), (":/b", "src"), ("/a:/b:ro:x", "src")]
)
def test_bad_bind_specs(spec, error):
    with pytest.raises(ConfigError, match=error):
        parse_bind(spec)


def test_missing_image_is_refused_before_anything_is_queued(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as info:
        MsPASSCluster(nodes=1, container=str(tmp_path / "missing.sif"), work_dir=str(tmp_path))
    assert "apptainer build" in str(info.value)
    assert not (tmp_path / "logs").exists()


def test_missing_bind_source_is_refused(tmp_path, image):
    with pytest.raises(ConfigError, match="/nonexistent/data"):
        resolve_options(environ={}, container=image, binds=["/nonexistent/data:/data"])


def test_legacy_environment_gives_image_and_binds(image):
    opts = resolve_options(environ={"MSPASS_CONTAINER": image, "SINGULARITY_BIND": "/tmp,/var/tmp:/scratch"})
    assert opts.container == image and opts.binds == ["/tmp", "/var/tmp:/scratch"] and opts.python == "python"


def test_runtime_must_be_known(image):
    with pytest.raises(ConfigError, match="docker"):
        resolve_options(environ={}, container=image, container_runtime="docker")


def test_wrap_keeps_argv_words_quoted():
    setup, argv = wrap(
        ["echo", "a b"],
        container="/i.sif",
        runtime="apptainer",
        user_binds=[],
        directories=[],
        env_names=["X"],
        cleanenv=False,
    )
    assert join(argv) == "\"$container_runtime\" exec /i.sif echo 'a b'"
