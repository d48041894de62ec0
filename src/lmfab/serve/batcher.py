"""Groups concurrent requests into batched decodes on one worker thread.

Requests wait in a queue; the worker takes every request that is waiting (up to
``max_batch_size``) and decodes them together with :func:`lmfab.infer.generate.run_batch`;
requests that arrive meanwhile form the next batch. One thread owns the model, so nothing
runs two forwards at once. Text reaches the asyncio side through the event loop's
``call_soon_threadsafe``; a request whose client went away is dropped from its batch at the
next decode step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from lmfab.infer.generate import Completion, Request, run_batch


@dataclass
class Job:
    request: Request
    loop: asyncio.AbstractEventLoop
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)  # str pieces, then a result
    cancel: threading.Event = field(default_factory=threading.Event)


class Batcher:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, compile: bool | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.compile = max_batch_size, compile
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # batches decoded so far
        self.largest_batch = 0
        self._open = threading.Event()  # cleared by hold(): requests queue up, none run
        self._open.set()
        self._taken = 0  # requests taken off the queue and not yet decoded
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
        """Requests waiting for a batch."""
        return self.waiting.qsize() + self._taken

    def close(self) -> None:
        self._open.set()
        self.waiting.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self.waiting.get()
            if job is None:
                return
            self._taken = 1
            self._open.wait()
            batch = [job]
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.waiting.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self._taken = 0
            batch = [j for j in batch if not j.cancel.is_set()]
            if not batch:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results: list[Completion | BaseException] = list(run_batch(
                    self.model, self.tokenizer, [j.request for j in batch], compile=self.compile))
            except Exception as e:  # reported to every request of the batch
                results = [e] * len(batch)
            for j, r in zip(batch, results, strict=True):
                _post(j, r)


def _post(job: Job, item) -> None:
    try:
        job.loop.call_soon_threadsafe(job.pieces.put_nowait, item)
    except RuntimeError:  # the event loop has closed (server shutting down)
        job.cancel.set()
