"""A small MsPASS-style workflow on an all-in-one local cluster (the README's first command).

Synthetic three-component seismograms are processed in parallel on the Dask
workers (linear detrend, cosine taper, Butterworth band-pass), each stored
by the worker that processed it through the database client: a metadata
document plus the waveform samples in GridFS. The notebook side then reads
every record back, checks it bit for bit against an independent computation,
summarises, and closes the cluster. Exit status 0 means every record
round-tripped intact and nothing was left running.

Run: ``python -m mspass_cluster.demo [--nodes 2] [--records 48]``
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time

import gridfs
import numpy as np
from scipy import signal

from .cluster import MsPASSCluster

SAMPLING_RATE = 20.0  # Hz
DURATION = 120.0  # s
BAND = (0.5, 5.0)  # Hz
STATIONS = ("ANMO", "COR", "HRV", "KEV", "PAB", "TATO")
DATABASE = "mspass_demo"


def synthetic_seismogram(record: int) -> np.ndarray:
    """A deterministic 3 x npts seismogram: noise, a trend, and a P and an S arrival."""
    rng = np.random.default_rng(record)
    npts = int(DURATION * SAMPLING_RATE)
    t = np.arange(npts) / SAMPLING_RATE
    data = 0.05 * rng.standard_normal((3, npts)) + np.linspace(0, 0.3, npts)
    p_time, s_time = 20 + 10 * rng.random(), 45 + 20 * rng.random()
    for arrival, freq, amplitude in ((p_time, 2.0, 1.0), (s_time, 1.0, 2.5)):
        wavelet = (1 - 2 * (np.pi * freq * (t - arrival)) ** 2) * np.exp(-((np.pi * freq * (t - arrival)) ** 2))
        data += amplitude * wavelet * rng.uniform(0.3, 1.0, size=(3, 1))
    return data


def process(data: np.ndarray) -> np.ndarray:
    """Detrend, taper (5 % cosine) and band-pass filter each component."""
    data = signal.detrend(data, axis=1, type="linear")
    data = data * signal.windows.tukey(data.shape[1], alpha=0.05)
    sos = signal.butter(4, BAND, btype="bandpass", fs=SAMPLING_RATE, output="sos")
    return signal.sosfiltfilt(sos, data, axis=1)


def process_and_store(record: int, db_client) -> dict:
    """Runs on a worker: make, process and save one seismogram; return its document."""
    data = process(synthetic_seismogram(record))
    payload = np.ascontiguousarray(data, dtype="<f8").tobytes()
    db = db_client[DATABASE]
    file_id = gridfs.GridFS(db).put(payload)
    doc = {
        "record": record,
        "sta": STATIONS[record % len(STATIONS)],
        "chan": ["BHE", "BHN", "BHZ"],
        "sampling_rate": SAMPLING_RATE,
        "npts": data.shape[1],
        "peak": float(np.abs(data).max()),
        "gridfs_id": file_id,
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    db.wf_Seismogram.insert_one(dict(doc))
    return {"record": record, "sha256": doc["sha256"]}


def verify(db_client, records: int) -> tuple[list[str], dict]:
    """Read every record back and compare it with an independent computation; return problems and a summary."""
    db = db_client[DATABASE]
    fs = gridfs.GridFS(db)
    problems, peaks = [], {}
    docs = {d["record"]: d for d in db.wf_Seismogram.find()}
    for record in range(records):
        doc = docs.get(record)
        if doc is None:
            problems.append(f"record {record}: no document")
            continue
        payload = fs.get(doc["gridfs_id"]).read()
        expected = np.ascontiguousarray(process(synthetic_seismogram(record)), dtype="<f8")
        stored = np.frombuffer(payload, dtype="<f8").reshape(3, doc["npts"])
        if hashlib.sha256(payload).hexdigest() != doc["sha256"]:
            problems.append(f"record {record}: stored samples do not match their checksum")
        elif not np.array_equal(stored, expected):
            problems.append(f"record {record}: samples differ from an independent computation")
        peaks.setdefault(doc["sta"], []).append(doc["peak"])
    extra = set(docs) - set(range(records))
    if extra:
        problems.append(f"unexpected records {sorted(extra)}")
    return problems, {sta: (len(v), float(np.mean(v))) for sta, v in sorted(peaks.items())}


def run(nodes: int, records: int, backend: str, work_dir: str | None) -> int:
    from distributed import as_completed

    started = time.monotonic()
    options = {"work_dir": work_dir} if work_dir else {}
    with MsPASSCluster(nodes=nodes, backend=backend, walltime="30", **options) as cluster:
        client = cluster.get_client()
        db_client = cluster.get_db_client()
        db_client.drop_database(DATABASE)
        print(
            f"cluster ready in {time.monotonic() - started:.1f} s: {len(client.scheduler_info()['workers'])} "
            f"workers, database {cluster.database.address}, dashboard {cluster.dashboard_link}",
            flush=True,
        )
        futures = client.map(process_and_store, range(records), db_client=db_client, pure=False)
        for done, _future in enumerate(as_completed(futures), start=1):
            if done % max(1, records // 8) == 0 or done == records:
                print(f"  processed and stored {done}/{records} seismograms", flush=True)
        client.gather(futures)
        problems, summary = verify(db_client, records)
        jobs = cluster.job_ids
    leftover = [job for job, (_, _, state) in cluster.job_ids.items() if state in ("PENDING", "RUNNING")]
    print(f"\n{'station':8} {'records':>7} {'mean peak':>10}")
    for sta, (count, peak) in summary.items():
        print(f"{sta:8} {count:7d} {peak:10.3f}")
    print(
        f"\n{records - len(problems)}/{records} records round-tripped intact; "
        f"{len(jobs)} jobs started, {len(leftover)} left running; {time.monotonic() - started:.1f} s in all."
    )
    for problem in problems:
        print("PROBLEM:", problem)
    return 0 if not problems and not leftover else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mspass_cluster.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--records", type=int, default=48, help="seismograms to process (default 48)")
    parser.add_argument("--backend", default="local", help="local (default), slurm or auto")
    parser.add_argument("--work-dir", default=None, help="run directory (default: the current directory)")
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return run(args.nodes, args.records, args.backend, args.work_dir)


if __name__ == "__main__":
    sys.exit(main())
