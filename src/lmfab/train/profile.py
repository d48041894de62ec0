"""GPU kernel time per step, by category: where a training step's time goes.

Used by ``runconfig.profile.steps`` (every rank of ``lmfab run`` profiles the same steps and
writes a table and a Chrome/Perfetto trace under ``model_dir/profile/``) and by
``benchmarks/train_throughput.py --profile``. Kernel times are summed per category; on a
GPU that overlaps communication with compute the sum can exceed the wall time, and the
``communication`` row says how much of it was NCCL. The timeline line measures what the sums
cannot: how long some kernel was running (the GPU's active time; wall minus that is idle),
and how much NCCL time no compute kernel ran beside (exposed communication: what a
data-parallel step loses to its all-reduces). The launch lead says who sets the pace: how
long before it started each kernel was launched by the host. A GPU-bound step keeps a deep
queue (leads of milliseconds); a host-bound one starts kernels as soon as they are launched.
"""

from __future__ import annotations

import gzip
import json
import statistics
import tempfile
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
        summary = summarize(self.prof, n, wall_ms)
        if self.trace is not None:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.trace))
        if self.device.type == "cuda":  # launch-to-start pairs come from the trace
            with tempfile.TemporaryDirectory() as tmp:
                path = self.trace or Path(tmp) / "trace.json"
                try:
                    if self.trace is None:
                        self.prof.export_chrome_trace(str(path))
                    summary.update(launch_lead(read_trace(path)))
                except (OSError, ValueError, KeyError, TypeError, MemoryError):
                    pass  # a diagnostic: the run goes on without the line
        return summary


def cuda_time_ms(fn, reps: int = 30, inner: int = 1) -> float:
    """Median ms per call of ``fn`` on the current GPU, CUDA events, after 5 warm-up calls;
    each of the ``reps`` timings is the mean of ``inner`` calls in a row (inner > 1 lets the
    host's per-call dispatch overlap the GPU's work, as in a training step)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return sorted(times)[reps // 2]


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) spans."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(spans):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def timeline(kernels: list[tuple[float, float, bool]], n: int) -> dict:
    """Per-step ms from kernel spans (start µs, end µs, is communication): ``active_ms``, the
    time any kernel ran; ``comm_ms``, the time an NCCL kernel ran; ``comm_exposed_ms``, the
    part of that with no compute kernel running beside it."""
    comm = [(s, e) for s, e, c in kernels if c]
    compute = [(s, e) for s, e, c in kernels if not c]
    active, m, c = _union_us(comm + compute), _union_us(comm), _union_us(compute)
    both = m + c - active  # |comm ∩ compute|
    return {"active_ms": active / 1e3 / n, "comm_ms": m / 1e3 / n,
            "comm_exposed_ms": (m - both) / 1e3 / n}


def read_trace(path: Path) -> list[dict]:
    """The events of a Chrome trace written by the profiler (``.json`` or ``.json.gz``)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_BEHIND_US = 100.0  # a kernel that starts within this of its launch waited for the host


def launch_lead(events: list[dict]) -> dict:
    """How far the host ran ahead of the GPU: for every kernel, the time from its launch call
    (CUDA runtime or driver API, matched by correlation id) to its start on the GPU.
    ``lead_median_ms``; ``host_behind``, the share of kernels that started within 0.1 ms of
    their launch, i.e. the GPU was waiting for the host. A GPU-bound step has a median lead
    of milliseconds and a share near 0; a host-bound one the reverse. Kernels replayed from
    a CUDA graph are not counted (empty result when all are)."""
    launched: dict = {}
    for e in events:
        corr = (e.get("args") or {}).get("correlation")
        # a CUDA graph's kernels all carry its launch's id: their lead is their place in the
        # graph, not the host's head start, so they are left out
        if e.get("cat") in LAUNCH_CATEGORIES and corr is not None \
                and "GraphLaunch" not in e.get("name", ""):
            launched[corr] = float(e["ts"])
    leads = [float(e["ts"]) - launched[corr] for e in events
             if e.get("cat") == "kernel"
             and (corr := (e.get("args") or {}).get("correlation")) in launched]
    if not leads:
        return {}
    return {"lead_median_ms": statistics.median(leads) / 1e3,
            "host_behind": sum(x < HOST_BEHIND_US for x in leads) / len(leads)}


def _is_kernel(evt, name: str) -> bool:
    """A GPU kernel: not a CPU op (those carry their kernels' time too), not a range."""
    return (evt.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(evt, "is_user_annotation", False) and "#" not in name)


def summarize(prof, n: int, wall_ms: float, top: int = 40) -> dict:
    """Per-step GPU kernel time per category and per kernel from a finished profiler."""
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        if not _is_kernel(evt, evt.key):
            continue
        dev_us = getattr(evt, "self_device_time_total", 0.0)
        if dev_us > 0:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + dev_us / 1e3 / n
    by_cat: dict[str, float] = {}
    for name, ms in kernels.items():
        cat = categorize(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    spans = [(e.time_range.start, e.time_range.end, categorize(e.name) == "communication")
             for e in prof.events()
             if _is_kernel(e, e.name) and e.time_range.end > e.time_range.start]
    return {"wall_ms": wall_ms, "busy_ms": sum(kernels.values()), "categories_ms": by_cat,
            "top_kernels_ms": dict(ranked), **timeline(spans, n)}


def format_summary(s: dict, kernels: bool = True) -> str:
    """The summary as text: totals, the timeline, the categories; then (``kernels``) the
    top kernels."""
    busy = s["busy_ms"]
    lines = [f"  GPU kernels {busy:.1f} ms per step, wall {s['wall_ms']:.1f} ms (profiled)"]
    if s.get("active_ms"):
        lines.append(f"  timeline: GPU active {s['active_ms']:.1f} ms (idle "
                     f"{max(0.0, s['wall_ms'] - s['active_ms']):.1f}); NCCL {s['comm_ms']:.1f} ms, "
                     f"exposed {s['comm_exposed_ms']:.1f} ms (no compute beside it)")
    if "lead_median_ms" in s:
        lines.append(f"  launch lead: median {s['lead_median_ms']:.2f} ms from launch to start; "
                     f"{100 * s['host_behind']:.0f}% of kernels started within "
                     f"{HOST_BEHIND_US / 1e3:.1f} ms of their launch (the GPU waited for the host)")
    lines += [f"  {cat:18s} {ms:8.2f} ms {100 * ms / busy if busy else 0.0:5.1f}%"
              for cat, ms in sorted(s["categories_ms"].items(), key=lambda kv: -kv[1])]
    if kernels:
        lines += [f"    {ms:7.3f} ms  {name[:110]}" for name, ms in s["top_kernels_ms"].items()]
    return "\n".join(lines)


class ProfileWindow:
    """``runconfig.profile.steps`` in the loop: steps ``profile_start+1 ..
    profile_start+profile_steps`` run under :class:`StepProfiler`, once per run. ``before(step)``
    opens the window (also when a resumed run starts inside it), ``after(step, end)`` closes
    it at its last step or at the end of the run and writes each rank's kernel table and
    summary beside its trace in ``out``; rank 0's categories are printed. Used as a context
    manager, so an error inside the window stops the profiler."""

    def __init__(self, start: int, steps: int, device: torch.device, rank: int, out: Path,
                 say) -> None:
        self.first, self.last = start, start + steps
        self.device, self.rank, self.out, self.say = device, rank, Path(out), say
        self.profiler: StepProfiler | None = None

    def __enter__(self) -> ProfileWindow:
        return self

    def __exit__(self, *exc) -> None:
        if self.profiler is not None:
            self.profiler.abort()

    def before(self, step: int) -> None:
        if self.profiler is None and self.first <= step < self.last:
            self.profiler = StepProfiler(self.device, self.out / f"trace_rank{self.rank}.json.gz")
            self.first = step
            self.profiler.start()

    def after(self, step: int, end: int) -> None:
        if self.profiler is None or step not in (self.last, end):
            return
        summary = self.profiler.stop(step - self.first)
        self.profiler, self.last = None, -1  # once per run
        self.out.mkdir(parents=True, exist_ok=True)
        first = self.first + 1
        (self.out / f"kernels_rank{self.rank}.txt").write_text(format_summary(summary) + "\n")
        (self.out / f"kernels_rank{self.rank}.json").write_text(
            json.dumps({"steps": [first, step], **summary}, indent=1))
        self.say(f"profile, steps {first}-{step} (rank 0; each rank's table and trace in "
                 f"{self.out}):\n" + format_summary(summary, kernels=False))
