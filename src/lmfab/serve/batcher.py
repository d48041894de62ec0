"""Groups concurrent requests into batched decodes on one worker thread, continuously.

Requests wait in a queue; the worker takes every request that is waiting (up to
``max_batch_size``) and starts a :class:`lmfab.infer.generate.DecodeBatch` with them. Between
decode steps, requests that arrived meanwhile join the running batch in the rows that
finished requests left free (continuous batching: a short request is not held behind a
long one, and each request gets its completion the step it finishes); one that does not
fit yet (no free row, a prompt longer than the slots filled so far, or more new tokens than
the cache has left) waits, in order, for a row or for the next batch. One thread owns the
model, so nothing runs two forwards at once. Text reaches the asyncio side through the event
loop's ``call_soon_threadsafe``; a request whose client went away is dropped from its batch
at the next decode step.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from dataclasses import dataclass, field

from lmfab.infer.generate import DecodeBatch, Request, batch_bucket

HEADROOM = 2.0  # cache slots per batch, as a multiple of what its first requests need


@dataclass
class Job:
    request: Request
    loop: asyncio.AbstractEventLoop
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)  # str pieces, then a result
    cancel: threading.Event = field(default_factory=threading.Event)


class Batcher:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, compile: bool | None = None,
                 continuous: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.compile = max_batch_size, compile
        self.continuous = continuous  # False: a batch runs to its end, arrivals wait for the next
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # batches started so far
        self.joined = 0  # requests that joined a batch already running
        self.largest_batch = 0  # most requests decoding at once
        self._open = threading.Event()  # cleared by hold(): requests queue up, none run
        self._open.set()
        self._held: collections.deque[Job] = collections.deque()  # taken, not yet decoding
        self._closing = False
        self._live: dict[int, Job] = {}  # row -> job of the batch decoding now
        self._thread = threading.Thread(target=self._run, name="lmfab-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Job:
        """Queue ``request``; its text pieces and then its :class:`Completion` (or an
        exception) arrive on ``job.pieces``."""
        job = Job(request, asyncio.get_running_loop())
        request.on_text = lambda piece: _post(job, piece)
        request.cancelled = job.cancel.is_set
        self.waiting.put(job)
        return job

    def hold(self) -> None:
        """Let requests queue without decoding them (until :meth:`release`)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def pending(self) -> int:
        """Requests waiting for a batch or a free row."""
        return self.waiting.qsize() + len(self._held)

    def close(self) -> None:
        self._open.set()
        self.waiting.put(None)
        self._thread.join(timeout=30)

    def _take(self, block: bool) -> None:
        """Move what is waiting into the ordered ``_held`` line (blocking for the first when
        ``block`` and nothing is held)."""
        while True:
            try:
                job = self.waiting.get(block=block and not self._held)
            except queue.Empty:
                return
            if job is None:
                self._closing = True
                return
            self._held.append(job)
            block = False

    def _run(self) -> None:
        while True:
            if not self._closing:
                self._take(block=True)
            if not self._held:
                if self._closing:
                    return
                continue
            self._open.wait()
            self._take(block=False)
            batch_jobs = []
            while self._held and len(batch_jobs) < self.max_batch_size:
                job = self._held.popleft()
                if not job.cancel.is_set():
                    batch_jobs.append(job)
            if not batch_jobs:
                continue
            self.batches += 1
            self._live = dict(enumerate(batch_jobs))
            try:
                self._decode(batch_jobs)
            except Exception as e:  # noqa: BLE001  reported to every request still decoding
                for j in self._live.values():
                    _post(j, e)

    def _rows(self, n: int) -> int:
        """Rows of a batch that starts with ``n`` requests. On a GPU a decode step reads the
        weights whatever the batch, so every batch gets ``max_batch_size`` rows (one CUDA
        graph); on a CPU, where rows cost compute, twice the next power of two, at most
        ``max_batch_size``: room for as many joiners as it started with."""
        if next(self.model.parameters()).device.type == "cuda":
            return max(n, self.max_batch_size)
        return max(n, min(self.max_batch_size, 2 * batch_bucket(n)))

    def _decode(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` (``self._live``: row -> job) and whatever joins them."""
        batch = DecodeBatch(self.model, self.tokenizer, [j.request for j in jobs],
                            compile=self.compile, headroom=HEADROOM, rows=self._rows(len(jobs)))
        for b, c in batch.results.items():  # nothing to generate (no room after the prompt)
            _post(self._live.pop(b), c)
        while not batch.finished or self._held or not self.waiting.empty():
            self.largest_batch = max(self.largest_batch, len(self._live))
            if not batch.finished:
                for b, c in batch.step():
                    _post(self._live.pop(b), c)
            self._take(block=False)
            if not self._open.is_set() or not self.continuous:  # nothing joins
                if batch.finished:
                    return
                continue
            admitted = 0
            while self._held and len(self._live) < self.max_batch_size and batch.free_rows():
                job = self._held[0]
                if job.cancel.is_set():
                    self._held.popleft()
                    continue
                row = batch.admit(job.request)
                if row is None:
                    break  # in order: the first that does not fit waits for the next batch
                self._held.popleft()
                self._live[row] = job
                self.joined += 1
                admitted += 1
                if row in batch.results:  # joined with nothing to generate
                    _post(self._live.pop(row), batch.results[row])
            if batch.finished and not admitted:
                return  # what waits needs a fresh batch


def _post(job: Job, item) -> None:
    try:
        job.loop.call_soon_threadsafe(job.pieces.put_nowait, item)
    except RuntimeError:  # the event loop has closed (server shutting down)
        job.cancel.set()
