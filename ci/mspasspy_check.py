"""Manual check: MsPASS's own code (the real ``mspasspy``) against a local MsPASSCluster.

Not part of CI: ``mspasspy`` is a C++ build (Boost, GSL, LAPACK, yaml-cpp,
pybind11, libmseed) with heavy dependencies (obspy, dask[complete], boto3),
too slow for CI on this machine. Run it in a virtual environment that has
both ``mspasspy`` and this package::

    python ci/mspasspy_check.py [WORK_DIR]

It exits 0 only when every step passed. Last run: 2026-11-22, mspasspy
2.4.3 built from its PyPI sdist (see the README, "Testing honestly").
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import traceback

import numpy as np

from mspass_cluster import MsPASSCluster

FAILED: list[str] = []


def step(name, fn):
    try:
        print(f"[OK]   {name}: {fn()}", flush=True)
    except Exception:
        FAILED.append(name)
        print(f"[FAIL] {name}\n{traceback.format_exc()}", flush=True)


def time_series(i):
    from mspasspy.ccore.seismic import DoubleVector, TimeSeries
    ts = TimeSeries(1000)
    ts.set_live()
    ts.dt, ts.t0 = 0.01, 1000.0 + i
    ts.data = DoubleVector(np.sin(np.arange(1000) * 0.01 + i))
    for key, value in {"sta": f"S{i:02d}", "net": "XX", "chan": "BHZ", "delta": 0.01, "starttime": ts.t0,
                       "npts": 1000, "sampling_rate": 100.0}.items():
        ts[key] = value
    return ts


def main(work_dir: str) -> int:
    from mspasspy.client import Client
    from mspasspy.db.client import DBClient as MsPASSDBClient

    with MsPASSCluster(backend="local", nodes=1, work_dir=work_dir, cores=1, memory="2GiB") as cluster:
        db_client = cluster.get_db_client()
        step("get_db_client() is mspasspy's DBClient", lambda: isinstance(db_client, MsPASSDBClient) or 1 / 0)
        client = Client()  # MsPASS reads MSPASS_DB_ADDRESS, MONGODB_PORT, MSPASS_SCHEDULER_ADDRESS, DASK_SCHEDULER_PORT
        scheduler = client.get_scheduler()
        step("Client() uses the cluster's scheduler",
             lambda: scheduler.scheduler.address == cluster.scheduler_address or 1 / 0)
        db = client.get_database("mspasspy_check")

        def round_trip(storage):
            ts = time_series(1)
            extra = {"dir": os.path.join(work_dir, "files"), "dfile": "ts.dat"} if storage == "file" else {}
            saved = db.save_data(ts, storage_mode=storage, return_data=True, **extra)
            back = db.read_data(saved["_id"], collection="wf_TimeSeries")
            assert back.live and np.allclose(np.array(back.data), np.array(ts.data))
            return back["storage_mode"]

        step("TimeSeries save_data/read_data, GridFS", lambda: round_trip("gridfs"))
        step("TimeSeries save_data/read_data, file", lambda: round_trip("file"))

        def distributed():
            from mspasspy.algorithms.signals import detrend
            from mspasspy.io.distributed import read_distributed_data, write_distributed_data
            for i in range(10, 15):
                db.save_data(time_series(i), storage_mode="gridfs")
            bag = read_distributed_data(db, collection="wf_TimeSeries", scheduler="dask", npartitions=2)
            out = write_distributed_data(bag.map(detrend, type="constant"), db, data_are_atomic=True,
                                         collection="wf_TimeSeries", storage_mode="gridfs", data_tag="detrended",
                                         scheduler="dask")
            return f"{len(out)} written, {db.wf_TimeSeries.count_documents({'data_tag': 'detrended'})} tagged"

        step("read_distributed_data -> detrend -> write_distributed_data on the workers", distributed)
        step("a Database pickled to a worker queries there",
             lambda: scheduler.submit(lambda d: d.wf_TimeSeries.count_documents({}), db).result())
        step("the DB client pickles", lambda: type(pickle.loads(pickle.dumps(db_client))).__name__)
        db_client.drop_database("mspasspy_check")
        scheduler.close()
    print("failed:", FAILED or "nothing")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mspasspy-check-")))
