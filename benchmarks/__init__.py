"""Benchmarks of ``MsPASSCluster`` against bare ``dask_jobqueue.SLURMCluster`` on the Slurm test bed.

Run them with ``benchmarks/run`` (see ``benchmarks/README.md``); the entry
point is :func:`benchmarks.bench.main`.
"""
