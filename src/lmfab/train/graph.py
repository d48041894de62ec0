"""``runconfig.cuda_graph``: the whole training step as one CUDA graph.

A step launches thousands of kernels (every micro-batch's forward and backward, the
gradient norm, AdamW). When they are short (small models, fast GPUs), the host may not
launch them as fast as the GPU runs them, and the GPU waits; the profile's launch-lead line
says when. (On an H200 the GPT-2-124M shape is not such a case: the host runs 16-40 ms
ahead, and the graph gains 0.6%.) ``compile_mode: reduce-overhead`` graphs only
torch.compile's regions; the loss, the clip and the optimizer still launch one by one. Here
the step is captured once, after a few eager warm-up steps (compilation, lazy optimizer
state), and then replayed: one launch per step. The replay runs the captured kernels on the
same memory, so the batch is copied into a fixed input buffer first, the learning rate
lives in a device tensor that the loop fills each step (``set_lr``), and the outputs (loss,
grad-norm) are fixed tensors that each replay overwrites.

Under DDP the capture holds each bucket's all-reduce too (NCCL operations can be captured;
every rank captures at the same step and replays once per step). DDP is built on the
capture stream, and 11 eager steps come first: DDP rebuilds its buckets after the first and
gathers its logging data, with host synchronisation, up to the tenth (PyTorch's notes on
whole-network capture with DDP). FSDP2 is not captured: its per-block all-gathers and
reduce-scatters are scheduled by host code. A new batch shape (a new seq_len stage) warms
up and captures again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

WARMUP_STEPS = 3
WARMUP_STEPS_DDP = 11


class StepGraph:
    """``step(rows)`` (the loop's returns ``(loss, grad_norm)``) run eagerly for ``warmup``
    steps on a side stream (``stream``: the one DDP was built on), then captured and
    replayed; each replay returns the same output tensors, overwritten. ``prepare`` runs
    once before capture (the optimizer made capturable)."""

    def __init__(self, step: Callable, device: torch.device, prepare: Callable[[], None],
                 warmup: int = WARMUP_STEPS, stream: torch.cuda.Stream | None = None):
        self.step, self.device, self.prepare, self.warmup = step, device, prepare, warmup
        self.stream = stream if stream is not None else torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.rows: torch.Tensor | None = None
        self.out: Any = None
        self.shape: tuple | None = None
        self.eager_steps = 0
        self.captures = 0

    def __call__(self, rows: torch.Tensor):
        if self.graph is not None and tuple(rows.shape) == self.shape:
            self.rows.copy_(rows, non_blocking=True)
            self.graph.replay()
            return self.out
        if tuple(rows.shape) != self.shape:  # the first step, or a new seq_len stage
            self.release()
            self.shape, self.eager_steps = tuple(rows.shape), 0
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            if self.eager_steps < self.warmup:
                out = self.step(rows)
                self.eager_steps += 1
            else:
                self.prepare()
                self.rows = rows.clone()
                # torch.cuda.graph empties the allocator's cache first: the warm-up's blocks,
                # which the graph's private pool could not reuse, go back to the device
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.out = self.step(self.rows)
                self.graph = graph
                self.captures += 1
                graph.replay()  # capture records the step without running it
                out = self.out
        current.wait_stream(self.stream)
        return out

    def release(self) -> None:
        """Drop the graph and its memory pool (the next step warms up again)."""
        self.graph, self.rows, self.out = None, None, None
