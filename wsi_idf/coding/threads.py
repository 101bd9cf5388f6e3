"""How many cores one coding call may use, so that concurrent calls never oversubscribe them.

zarr decodes chunks in a thread pool, a DataLoader or a Dask worker may call the codec from several
threads at once, and each call's convolutions run on torch's OpenMP threads. Measured on 2 cores:
256 patches decoded at 0.97 Mpx/s on a quiet machine and at 0.09-0.12 Mpx/s when the cores were
oversubscribed, because OpenMP threads spin-wait for each other. Two rules keep that from happening:

- ``shared_cores``: before each batch, a call takes an equal share of the cores among the calls in
  flight in this process (never more than the caller's own ``torch.set_num_threads``), and gives
  it back after. torch keeps the thread count per calling thread: other threads are not disturbed.
- ``run_batches``: a call with two or more cores runs its batches side by side, one core each,
  rather than one at a time across all of them: the small convolutions of the flow (6 and 32
  channels) spread poorly over OpenMP threads, and a batch's entropy decoding (compiled, without
  the GIL) then overlaps another's network. Measured on 2 cores, 196 patches of a region: 0.84 s
  one batch on 2 threads, 0.73-0.76 s as 2-4 batches side by side.
- ``keep_freed_memory``: glibc returns each freed tensor of more than a few hundred kB to the
  system and page-faults a fresh one in for the next layer; keeping them in the heap for reuse
  (``mallopt``: mmap threshold 64 MB, trim threshold 256 MB, set on the first coding call unless
  the process started with ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``; worker
  processes wsi-idf starts get them as environment variables, ``allocator_environ``) made one-thread
  decoding 1.44-1.51 -> 1.14-1.19 s for a region's 196 patches and encoding 0.82 -> 1.03-1.10
  Mpx/s, with system time 1.19 -> 0.16 s and a second decode of 32 patches faulting 0 pages
  instead of ~23,000; a first region read's peak RSS rose 450 -> 500 MB.
- ``OMP_WAIT_POLICY=PASSIVE`` (``coding.runtime``: set as the coding package is first imported,
  unless the environment says otherwise, effective when that comes before torch): a waiting OpenMP
  thread sleeps instead of spinning, so another process using a core costs a share of speed, not
  nine tenths of it.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from .policy import usable_cores
from .runtime import torch

T = TypeVar("T")
R = TypeVar("R")
_lock = threading.Lock()
_in_flight = 0




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


MMAP_THRESHOLD = 64 << 20  # above the largest activation of a CPU batch (256 patches: 52 MB)
TRIM_THRESHOLD = 256 << 20
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_allocator_tuned: bool | None = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Once per process, on glibc: serve tensors from the heap and keep freed ones for reuse instead of
    unmapping them (see the module docstring). Returns whether the allocator is tuned."""
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = _tune_allocator()
    return _allocator_tuned



def allocator_chosen_at_start() -> bool:
    """Whether this process started with MALLOC_* set: glibc applied those, and that choice stands.
    Read from /proc/self/environ, the environment at start: Dask's nanny later writes its own
    MALLOC_TRIM_THRESHOLD_ into ``os.environ`` of the process that starts workers."""
    try:
        with open("/proc/self/environ", "rb") as f:
            names = {item.split(b"=", 1)[0].decode(errors="replace") for item in f.read().split(b"\0")}
    except OSError:
        names = set(os.environ)
    return any(k in names for k in ALLOCATOR_ENV)


def allocator_environ() -> dict[str, str]:
    """The same setting as environment variables, for worker processes wsi-idf starts itself (Dask's
    nanny would otherwise give them MALLOC_TRIM_THRESHOLD_=65536, the slowest choice for the flow);
    empty when this process started with its own choice (the workers inherit it)."""
    if allocator_chosen_at_start():
        return {}
    return dict(zip(ALLOCATOR_ENV, (str(MMAP_THRESHOLD), str(TRIM_THRESHOLD))))


def _tune_allocator() -> bool:
    if allocator_chosen_at_start():
        return False  # the user's (or their platform's) choice stands
    try:
        import ctypes
        import platform
        if platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim_threshold,
                                                                                           TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


@contextmanager
def shared_cores() -> Iterator[CoreShare]:
    """Run one coding call on its share of the cores (call ``fit()`` before each batch)."""
    global _in_flight
    with _lock:
        keep_freed_memory()
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


def split_batches(count: int, batch_size: int, workers: int) -> list[range]:
    """Cut ``count`` items into near-equal batches, at least one per worker. ``batch_size`` bounds the
    items in the network at once, so side by side each of the ``workers`` batches holds its share:
    memory stays what one batch of ``batch_size`` needs (a region's 196 patches at 64 on 2 cores:
    8 batches of 24-25, two at a time)."""
    if count <= 0:
        return []
    batches = -(-count // max(1, batch_size // max(1, workers)))
    batches = -(-batches // workers) * workers if workers > 1 else batches
    batches = min(batches, count)
    bounds = [count * k // batches for k in range(batches + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def run_batches(run: Callable[[T], R], batches: Sequence[T], cores: CoreShare, side_by_side: bool = True) -> list[R]:
    """``run`` on each batch, in order of the result list. With ``side_by_side`` (the network runs on
    the CPU) and a share of two or more cores, the batches run that many at a time, one core each;
    else one at a time on the whole share, re-fitted before each (``shared_cores``)."""
    workers = min(len(batches), cores.fit()) if side_by_side else 1
    if workers <= 1:
        results = []
        for batch in batches:
            cores.fit()
            results.append(run(batch))
        return results
    threads = max(1, cores.threads // workers)

    def on_own_core(batch: T) -> R:
        if torch.get_num_threads() != threads:  # per calling thread: the caller's count is untouched
            torch.set_num_threads(threads)
        return run(batch)

    with ThreadPoolExecutor(workers, thread_name_prefix="wsi-idf-batch") as pool:
        return list(pool.map(on_own_core, batches))
