"""How many cores one coding call may use, so that concurrent calls never oversubscribe them.

zarr decodes chunks in a thread pool, a DataLoader or a Dask worker may call the codec from several
threads at once, and each call's convolutions run on torch's OpenMP threads. Measured on 2 cores:
256 patches decoded at 0.97 Mpx/s on a quiet machine and at 0.09-0.12 Mpx/s when the cores were
oversubscribed, because OpenMP threads spin-wait for each other. Two rules keep that from happening:

- ``shared_cores``: before each batch, a call takes an equal share of the cores among the calls in
  flight in this process (never more than the caller's own ``torch.set_num_threads``), and gives
  it back after. torch keeps the thread count per calling thread: other threads are not disturbed.
- ``OMP_WAIT_POLICY=PASSIVE`` (set by ``wsi_idf/__init__`` unless the environment says otherwise,
  effective when wsi_idf is imported before torch): a waiting OpenMP thread sleeps instead of
  spinning, so another process using a core costs a share of speed, not nine tenths of it.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_in_flight = 0


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a batch scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class CoreShare:
    """One call's share of the cores; ``fit`` re-takes it before each batch, as calls come and go."""

    def __init__(self, cap: int):
        self.cap = cap  # the caller's own torch.set_num_threads: never more
        self.threads = cap

    def fit(self) -> int:
        threads = max(1, min(self.cap, usable_cores() // max(1, _in_flight)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.threads = threads
        return threads


@contextmanager
def shared_cores() -> Iterator[CoreShare]:
    """Run one coding call on its share of the cores (call ``fit()`` before each batch)."""
    global _in_flight
    with _lock:
        _in_flight += 1
    before = torch.get_num_threads()
    share = CoreShare(before)
    share.fit()
    try:
        yield share
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        with _lock:
            _in_flight -= 1
