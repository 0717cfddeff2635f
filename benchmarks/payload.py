"""The tasks of the transfer benchmark, run on the Dask workers.

Workers cannot import ``benchmarks``, and Dask pickles a task by reference
whenever plain ``pickle`` can (a worker then dies on "No module named
'benchmarks'"). The functions are therefore made inside :func:`tasks`:
plain pickle refuses local functions, so Dask sends them with cloudpickle,
by value.
"""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["tasks"]


def tasks() -> SimpleNamespace:
    """``make_block``, ``consume_block``, ``held_keys``, ``incoming_log``, ``compression``, ``hostname``."""

    def make_block(seed: int, nbytes: int):
        """``nbytes`` of random bytes as a uint8 array: nothing to compress, whatever the comm does."""
        import numpy as np

        return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)

    def consume_block(block) -> int:
        """Its size: the data had to arrive, nothing else is computed."""
        return int(block.nbytes)

    def held_keys(mark: str, dask_worker) -> int:
        """How many keys with ``mark`` in their name a worker holds (in memory or spilled).

        Not all keys: MsPASS's worker plugin keeps its database client there.
        """
        return sum(1 for key in dask_worker.data if mark in str(key))

    def incoming_log(dask_worker) -> list[dict]:
        """The worker's record of the data it fetched from other workers (key sizes, source, start and stop)."""
        return [
            {
                "who": entry["who"],
                "keys": {str(k): v for k, v in entry["keys"].items()},
                "total": entry["total"],
                "start": entry["start"],
                "stop": entry["stop"],
            }
            for entry in dask_worker.transfer_incoming_log
        ]

    def compression() -> str:
        """The worker's ``distributed.comm.compression`` setting."""
        import dask

        return str(dask.config.get("distributed.comm.compression"))

    def hostname() -> str:
        import socket

        return socket.gethostname()

    return SimpleNamespace(
        make_block=make_block,
        consume_block=consume_block,
        held_keys=held_keys,
        incoming_log=incoming_log,
        compression=compression,
        hostname=hostname,
    )
