"""Dask execution for the batch jobs: an embedded local cluster, an existing scheduler, or in process.

Tasks are plain functions over picklable arguments (slide refs, shard boxes, paths); results are
small dicts, so the client never holds pixels. GPU tasks carry the Dask resource ``{"GPU": 1}``
and run only on workers started with ``--resources GPU=1``.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..coding.policy import usable_cores
from ..errors import ClusterError

log = logging.getLogger("wsi_idf")

IN_PROCESS = "synchronous"


@dataclass(frozen=True)
class Runner:
    """Where tasks run: a distributed client, or this process (``client is None``)."""
    client: Any
    resources: dict[str, float] | None  # tasks run only on workers declaring these (e.g. {"GPU": 1})
    torch_threads: int

    def map(self, fn: Callable, items: Iterable, *args, progress: bool = False, desc: str = "",
            unit: str = "shard") -> Iterator[Any]:
        """Run ``fn(item, *args)`` for every item, yielding results as they finish, with a progress bar."""
        from tqdm import tqdm
        items = list(items)
        bar = tqdm(total=len(items), desc=desc, unit=unit, disable=None if progress and items else True, leave=False)  # None: off when stderr is no terminal
        try:
            if self.client is None:
                for item in items:
                    yield fn(item, *args)
                    bar.update()
                return
            from distributed import as_completed
            futures = [self.client.submit(fn, item, *args, pure=False, resources=self.resources) for item in items]
            try:
                for future in as_completed(futures):
                    yield future.result()
                    bar.update()
            finally:
                for future in futures:
                    if not future.done():
                        future.cancel()
        finally:
            bar.close()




def default_workers(cores: int | None = None) -> int:
    """Worker processes of an embedded CPU cluster: half the cores (each runs torch on the rest), at most 4."""
    cores = cores or usable_cores()
    return max(1, min(4, cores // 2) if cores >= 4 else cores)


@contextmanager
def runner(scheduler: str | None = None, workers: int | None = None, device: str = "auto",
           resources: dict[str, float] | None = None) -> Iterator[Runner]:
    """A task runner for ``scheduler``: None starts an embedded local cluster, ``tcp://host:port``
    joins an existing one, ``synchronous`` runs every task in this process."""
    import torch
    gpu_here = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if scheduler == IN_PROCESS:
        yield Runner(None, None, torch.get_num_threads())
        return
    from distributed import Client
    if scheduler:
        wanted = resources or ({"GPU": 1} if device.startswith("cuda") else None)
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        with client:
            if wanted and not any(all(w.get("resources", {}).get(k, 0) >= v for k, v in wanted.items())
                                  for w in client.scheduler_info()["workers"].values()):
                raise ClusterError(f"no worker of the cluster at {scheduler} has resources {wanted}; start "
                                   "workers with e.g. `dask worker ADDRESS --resources GPU=1`")
            yield Runner(client, wanted, 0)  # remote workers keep their own thread settings
        return
    cores = usable_cores()
    if gpu_here:
        # Several processes share the GPU: the network is fast there, and each process's entropy coder
        # (one CPU core, ~2-4 Mpx/s measured) would otherwise be the bottleneck. Several GPUs: dask-cuda.
        n_workers, threads = workers or max(1, min(8, cores - 1)), 1
    else:
        n_workers = workers or default_workers(cores)
        threads = max(1, cores // n_workers)
    log.info("starting a local Dask cluster: %d worker process(es), %d torch thread(s) each%s",
             n_workers, threads, ", GPU" if gpu_here else "")
    cluster = start_local_cluster(n_workers, resources or ({"GPU": 1} if gpu_here else None))
    try:
        with Client(cluster) as client:
            yield Runner(client, resources or ({"GPU": 1} if gpu_here else None), threads)
    finally:
        cluster.close()


def start_local_cluster(n_workers: int, resources: dict[str, float] | None = None):
    """A local cluster of ``n_workers`` processes of one task thread each, whose processes start with
    wsi-idf's allocator setting (``coding.threads.allocator_environ``) instead of Dask's
    MALLOC_TRIM_THRESHOLD_=65536, which unmaps and faults in every large tensor afresh."""
    import dask
    from distributed import LocalCluster

    from ..coding.threads import allocator_environ
    ours = allocator_environ()
    # Dask lets os.environ override this config, and its nannies write it into os.environ: a cluster
    # started earlier in this process has left its value there. The nannies would write ours anyway.
    os.environ.update(ours)
    spawn_env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ours}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}), workers_ignore_ctrl_c():
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                            resources=resources, silence_logs=logging.CRITICAL)  # task errors reach the client as one exception


@contextmanager
def workers_ignore_ctrl_c():
    """Processes started inside ignore SIGINT (Python keeps an inherited SIG_IGN): a Ctrl-C in the
    terminal reaches the whole process group, and only the client should answer it (it closes the
    cluster, which stops the workers), not every worker with its own traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def set_torch_threads(threads: int) -> None:
    """Called at the start of each task: worker processes start with torch's default thread count."""
    if threads > 0:
        import torch
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
