"""MsPASS's own code (the real ``mspasspy``, built by ci/mspasspy-build) on the clusters this package starts.

A MsPASS user follows the README: ``cluster.get_client()`` and
``cluster.get_db_client()``, then MsPASS's readers, writers and algorithms.
The same workflow runs on the desktop backend, on the Slurm test bed, and on
the test bed through the Apptainer stand-in. The database is the nx-27017
stand-in (no mongod exists here).

``ci/setup`` installs mspasspy into ``.venv``; without it these tests skip,
except under ``CI=true``, where a missing mspasspy is a failure.
"""

from __future__ import annotations

import logging
import time
import zlib

import numpy as np
import pytest
from conftest import BIN, NX_MONGOD, assert_nothing_left, require_mspasspy

from mspass_cluster import MsPASSCluster

STATIONS = ("AAK", "BRVK", "KURK")
CHANNELS = ("BHE", "BHN", "BHZ")
NPTS = 2000
DT = 0.02


@pytest.fixture(scope="module", autouse=True)
def mspasspy():
    require_mspasspy()


def synthetic_timeseries(sta, chan, i):
    """A TimeSeries as a MsPASS reader would make it: a wavelet on a linear trend, with the usual Metadata."""
    from mspasspy.ccore.seismic import TimeSeries

    ts = TimeSeries(NPTS)
    ts.set_live()
    ts.dt, ts.t0 = DT, 1262304000.0 + 3600.0 * i
    t = np.arange(NPTS) * DT
    rng = np.random.default_rng(zlib.crc32(f"{sta}.{chan}".encode()))
    ts.data = type(ts.data)(
        np.exp(-((t - 15.0) ** 2)) * np.sin(2 * np.pi * 2.0 * t) + 0.05 * t + 0.3 + 0.01 * rng.standard_normal(NPTS)
    )
    for key, value in {
        "net": "XX",
        "sta": sta,
        "chan": chan,
        "delta": DT,
        "sampling_rate": 1 / DT,
        "starttime": ts.t0,
        "npts": NPTS,
    }.items():
        ts[key] = value
    return ts


def process_locally(ts):
    from mspasspy.algorithms.signals import detrend, filter

    return filter(detrend(ts, type="linear"), "bandpass", freqmin=0.5, freqmax=5.0, corners=4)


def run_mspass_workflow(cluster, work_dir):
    """A station-by-station MsPASS workflow with only what ``cluster`` hands out; returns a summary."""
    from mspasspy.algorithms.signals import detrend, filter
    from mspasspy.ccore.seismic import Seismogram, TimeSeriesEnsemble
    from mspasspy.db.client import DBClient
    from mspasspy.db.database import Database
    from mspasspy.io.distributed import read_distributed_data, write_distributed_data

    client = cluster.get_client()
    db_client = cluster.get_db_client()
    assert isinstance(db_client, DBClient)
    db = Database(db_client, "mspass_ci")

    # save_data / read_data through GridFS and through files.
    originals = {}
    for i, sta in enumerate(STATIONS):
        for chan in CHANNELS:
            ts = synthetic_timeseries(sta, chan, i)
            saved = db.save_data(ts, storage_mode="gridfs", return_data=True)
            originals[saved["_id"]] = ts
    for wf_id, ts in originals.items():
        back = db.read_data(wf_id, collection="wf_TimeSeries")
        assert back.live and back["sta"] == ts["sta"]
        np.testing.assert_array_equal(np.array(back.data), np.array(ts.data))
    in_file = synthetic_timeseries("FILE", "BHZ", 0)
    saved = db.save_data(
        in_file, storage_mode="file", dir=str(work_dir / "wf"), dfile="file.dat", data_tag="file_copy", return_data=True
    )
    back = db.read_data(saved["_id"], collection="wf_TimeSeries")
    assert back["storage_mode"] == "file" and (work_dir / "wf" / "file.dat").stat().st_size > 0
    np.testing.assert_array_equal(np.array(back.data), np.array(in_file.data))
    seismogram = Seismogram(NPTS)
    seismogram.set_live()
    seismogram.dt, seismogram.t0 = DT, 1262304000.0
    seismogram["sta"], seismogram["net"] = "AAK", "XX"
    for k in range(3):
        for j in range(NPTS):
            seismogram.data[k, j] = np.sin(0.01 * j + k)
    seismogram_id = db.save_data(seismogram, storage_mode="gridfs", return_data=True)["_id"]
    back = db.read_data(seismogram_id, collection="wf_Seismogram")
    np.testing.assert_array_equal(np.array(back.data), np.array(seismogram.data))

    # Atomic: read_distributed_data -> detrend -> filter -> write_distributed_data on the workers.
    bag = read_distributed_data(db, collection="wf_TimeSeries", query={"data_tag": {"$exists": False}}, npartitions=3)
    bag = bag.map(detrend, type="linear").map(filter, "bandpass", freqmin=0.5, freqmax=5.0, corners=4)
    write_distributed_data(
        bag, db, data_are_atomic=True, collection="wf_TimeSeries", storage_mode="gridfs", data_tag="filtered"
    )
    assert db.wf_TimeSeries.count_documents({"data_tag": "filtered"}) == len(originals)
    for doc in db.wf_TimeSeries.find({"data_tag": "filtered"}):
        done = db.read_data(doc, collection="wf_TimeSeries")
        (expected,) = [
            process_locally(ts) for ts in originals.values() if ts["sta"] == done["sta"] and ts["chan"] == done["chan"]
        ]
        np.testing.assert_array_equal(np.array(done.data), np.array(expected.data))  # the same, bit for bit

    # Ensembles by station, with get_client() alone: the workers need MsPASS's "dbclient" plugin.
    queries = [{"sta": sta, "data_tag": "filtered"} for sta in STATIONS]
    ensembles = read_distributed_data(queries, db=db, collection="wf_TimeSeries", npartitions=3).compute()
    assert [type(e) for e in ensembles] == [TimeSeriesEnsemble] * 3
    assert sorted((e.member[0]["sta"], len(e.member)) for e in ensembles) == [(s, 3) for s in sorted(STATIONS)]
    assert all(e.live and all(m.live for m in e.member) for e in ensembles)

    # A Database pickled to a worker queries there.
    assert client.submit(lambda d: d.wf_TimeSeries.count_documents({"data_tag": "filtered"}), db).result() == 9

    workers_with_dbclient = client.run(lambda dask_worker: type(dask_worker.data.get("dbclient")).__name__)
    return {"ensembles": len(ensembles), "dbclient on workers": set(workers_with_dbclient.values())}


def mspass_client_from_the_published_variables(cluster):
    """An unmodified mspasspy.client.Client(): scheduler and database from MSPASS_* / DASK_* / MONGODB_PORT."""
    from mspasspy.client import Client

    mspass_client = Client(database_name="mspass_ci")
    dask_client = mspass_client.get_scheduler()
    assert dask_client.scheduler_info()["address"] == cluster.scheduler_address
    host, port = mspass_client.get_database_client().address
    assert f"mongodb://{host}:{port}/" == cluster.database.address
    return mspass_client


BACKENDS = [
    pytest.param("local", id="local"),
    pytest.param("slurm", id="slurm", marks=pytest.mark.slurm),
    pytest.param("apptainer", id="slurm-apptainer", marks=pytest.mark.slurm),
]


def cluster_options(backend, work_dir, request):
    options = dict(nodes=2, work_dir=str(work_dir))
    if backend == "local":
        return dict(options, backend="local", cores=1, memory="3GiB")
    request.getfixturevalue("slurm_testbed")
    options.update(backend="slurm", db_command=NX_MONGOD, walltime="15", db_port=27320)
    if backend == "apptainer":
        from test_cluster_slurm import stand_in_image

        options.update(
            container=stand_in_image(work_dir),
            container_runtime="apptainer",
            job_script_prologue=[f"export PATH={BIN}:$PATH"],
        )
    return options


@pytest.mark.parametrize("backend", BACKENDS)
def test_mspass_workflow_with_only_the_clusters_clients(backend, tmp_path, request, caplog):
    caplog.set_level(logging.WARNING, logger="mspass_cluster")
    with MsPASSCluster(**cluster_options(backend, tmp_path, request)) as cluster:
        summary = run_mspass_workflow(cluster, tmp_path)
        assert summary == {"ensembles": 3, "dbclient on workers": {"DBClient"}}

        mspass_client = mspass_client_from_the_published_variables(cluster)
        db = mspass_client.get_database()
        assert db.wf_TimeSeries.count_documents({"data_tag": "filtered"}) == 9
    # The MsPASS client's Dask client is closed with the cluster, and the log says so.
    assert mspass_client.get_scheduler().status == "closed"
    assert any("mspasspy.client.Client()" in r.getMessage() for r in caplog.records)
    if backend != "local":
        assert_nothing_left(cluster)


def test_a_mspass_client_on_top_keeps_one_plugin_per_worker(tmp_path):
    with MsPASSCluster(backend="local", nodes=2, cores=1, memory="2GiB", work_dir=str(tmp_path)) as cluster:
        client = cluster.get_client()

        def mspass_plugins(dask_worker):
            return sorted(type(p).__name__ for p in dask_worker.plugins.values() if type(p).__name__ == "MongoDBWorker")

        assert set(map(tuple, client.run(mspass_plugins).values())) == {("MongoDBWorker",)}
        mspass_client = mspass_client_from_the_published_variables(cluster)
        assert set(map(tuple, client.run(mspass_plugins).values())) == {("MongoDBWorker",)}
        names = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.worker_plugins))
        assert names.count("mongodb_worker") == 1

        # Workers that join later get it too.
        cluster.scale(3)
        cluster.wait_for_workers()
        assert set(map(tuple, client.run(mspass_plugins).values())) == {("MongoDBWorker",)}
        assert len(client.scheduler_info()["workers"]) == 3

        started = time.monotonic()
    # Closing does not wait for the MsPASS client to give up reconnecting.
    assert time.monotonic() - started < 30
    assert mspass_client.get_scheduler().status == "closed"
    with pytest.raises(Exception):
        mspass_client.get_scheduler().submit(sum, [1, 2]).result(timeout=10)
