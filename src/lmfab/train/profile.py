"""GPU kernel time per step, by category: where a training step's time goes.

Used by ``runconfig.profile_steps`` (every rank of ``lmfab run`` profiles the same steps and
writes a table and a Chrome/Perfetto trace under ``model_dir/profile/``) and by
``benchmarks/train_throughput.py --profile``. Kernel times are summed per category; on a
GPU that overlaps communication with compute the sum can exceed the wall time, and the
``communication`` row says how much of it was NCCL.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

# First match wins (kernel names as the CUDA profiler reports them).
CATEGORIES = (
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated", "flex")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "matmul", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused (inductor)", ("triton_",)),
    ("copy / memset", ("memcpy", "memset", "copy", "fill")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "other"


class StepProfiler:
    """``start()`` before the first profiled step, ``stop(n)`` after the n-th: returns the
    summary dict (``format_summary`` prints it). Synchronises the GPU at both ends so the wall
    time per step is the steps' own."""

    def __init__(self, device: torch.device, trace: Path | None = None):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.device, self.trace = device, trace
        self.prof = profile(activities=acts)
        self.t0, self.running = 0.0, False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.prof.start()
        self.t0 = time.perf_counter()
        self.running = True

    def abort(self) -> None:
        """Stop without a summary (the run failed inside the window)."""
        if self.running:
            self.running = False
            self.prof.stop()

    def stop(self, n: int) -> dict:
        self._sync()
        wall_ms = 1e3 * (time.perf_counter() - self.t0) / n
        self.running = False
        self.prof.stop()
        if self.trace is not None:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.trace))
        return summarize(self.prof, n, wall_ms)


def summarize(prof, n: int, wall_ms: float, top: int = 40) -> dict:
    """Per-step GPU kernel time per category and per kernel from a finished profiler."""
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:  # CPU ops carry their kernels' time too
            continue
        if getattr(evt, "is_user_annotation", False) or "#" in evt.key:  # ranges, not kernels
            continue
        dev_us = getattr(evt, "self_device_time_total", 0.0)
        if dev_us > 0:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + dev_us / 1e3 / n
    by_cat: dict[str, float] = {}
    for name, ms in kernels.items():
        cat = categorize(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms": wall_ms, "busy_ms": sum(kernels.values()), "categories_ms": by_cat,
            "top_kernels_ms": dict(ranked)}


def format_summary(s: dict) -> str:
    busy = s["busy_ms"]
    lines = [f"  GPU kernels {busy:.1f} ms per step, wall {s['wall_ms']:.1f} ms (profiled)"]
    lines += [f"  {cat:18s} {ms:8.2f} ms {100 * ms / busy if busy else 0.0:5.1f}%"
              for cat, ms in sorted(s["categories_ms"].items(), key=lambda kv: -kv[1])]
    lines += [f"    {ms:7.3f} ms  {name[:110]}" for name, ms in s["top_kernels_ms"].items()]
    return "\n".join(lines)
