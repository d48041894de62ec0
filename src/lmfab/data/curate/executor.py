"""Executors: run a list of independent tasks on local processes or on a Ray cluster.

Both have one method, ``map(fn, tasks, desc)``, that returns the results in task order
whatever order they finish in, and shows each stage's progress on stderr
(:mod:`lmfab.data.prep.progress`: a bar with ETA on a terminal, plain lines in logs). The pipeline
decides *what* the tasks are (from file sizes and the recipe, never from the number of
workers), so the output is the same for any executor and worker count; the executor only
decides *where* they run (the pattern of datatrove's LocalPipelineExecutor / RayPipeline
executor, written for lmfab's task functions).

Tasks read and write files under the output folder, so on a multi-node Ray cluster that
folder must be on a shared file system (NFS, Lustre, a FUSE-mounted bucket).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from lmfab.data.prep.progress import Progress
from lmfab.faultpoint import fault


def _progress(desc: str, total: int, enabled: bool) -> Progress:
    bar = Progress("curate", enabled, docs=False)
    bar.start(desc, total, unit="tasks")
    return bar


class LocalExecutor:
    """A process pool (``workers`` processes; all cores by default), inline for one worker."""

    name = "local"

    def __init__(self, workers: int | None = None, progress: bool = True):
        self.workers = workers or os.cpu_count() or 1
        self.progress = progress

    def map(self, fn: Callable, tasks: Sequence[tuple], desc: str) -> list[Any]:
        bar = _progress(desc, len(tasks), self.progress)
        if self.workers == 1 or len(tasks) <= 1:
            out = []
            for args in tasks:
                out.append(fn(*args))
                bar.tick(files=1)
                fault("curate.task", stage=fn.__name__)  # tests: killed between two tasks
            bar.done()
            return out
        results: list[Any] = [None] * len(tasks)
        # spawn: workers start clean (no inherited threads or locks); the pipeline is light.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(self.workers, len(tasks)), mp_context=ctx) as pool:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(tasks)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    results[futures[f]] = f.result()
                    bar.tick(files=1)
                    fault("curate.task", stage=fn.__name__)
        bar.done()
        return results

    def close(self) -> None:
        pass


class RayExecutor:
    """Tasks as Ray remote functions (one CPU each). Joins a running Ray if there is one.

    ``address`` is a cluster address (``ray://host:10001`` or ``host:6379``) or None for a
    local instance with ``workers`` CPUs. Ray is shut down on ``close`` only if we started it.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None,
                 progress: bool = True):
        try:
            import ray
        except ImportError as err:
            raise RuntimeError("--executor ray needs ray: pip install 'lmfab[curate]'") from err
        self._ray = ray
        self.progress = progress
        self._owned = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = workers
            ray.init(**kwargs)
            self._owned = True
        self.workers = int(ray.cluster_resources().get("CPU", 1))

    def map(self, fn: Callable, tasks: Sequence[tuple], desc: str) -> list[Any]:
        ray = self._ray
        bar = _progress(desc, len(tasks), self.progress)
        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        refs = [remote.remote(*args) for args in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                bar.tick(files=1)
        bar.done()
        return results

    def close(self) -> None:
        if self._owned:
            self._ray.shutdown()
            self._owned = False


def make_executor(kind: str = "local", workers: int | None = None, address: str | None = None,
                  progress: bool = True) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(workers, progress)
    if kind == "ray":
        return RayExecutor(address, workers, progress)
    raise ValueError(f"unknown executor {kind!r}; choose local or ray")
