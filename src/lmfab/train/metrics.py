"""Training metrics: the console line, a JSONL file and TensorBoard, from rank 0 only.

Each console line carries step, loss, lr, grad-norm, tokens/s, MFU and ETA. MFU is
tokens/s x FLOPs/token over the devices' peak dense bf16 rate (known GPUs are detected;
``runconfig.peak_flops_per_device`` overrides; unknown devices, e.g. CPUs, print "-").
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from lmfab.dist.world import World, all_reduce_mean

# Dense bf16 peak FLOP/s by device-name fragment (vendor datasheets).
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


class MetricsLogger:
    """Writes metrics on the main rank; a no-op elsewhere."""

    def __init__(self, model_dir: str | Path, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / "metrics.jsonl"
        self.jsonl = open(path, "a", buffering=1)  # noqa: SIM115
        if path.stat().st_size and _last_byte(path) != b"\n":
            self.jsonl.write("\n")  # a run killed mid-line: end that line, keep the next whole
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training without it
                print("lmfab: tensorboard not installed; writing metrics.jsonl only", file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(model_dir / "tb"))

    def log(self, step: int, values: dict[str, float], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def event(self, step: int, record: dict) -> None:
        """A line ``{"step", "split": "event", "time", ...record}`` in metrics.jsonl only (an
        interruption, a non-finite step): readers of the training curve skip it."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, "split": "event", "time": time.time(),
                                         **record}) + "\n")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def console(msg: str, world_main: bool = True) -> None:
    if world_main:
        print(msg, flush=True)


class StepMeter:
    """The training log line, every ``runconfig.log_steps`` and at the last step: loss and
    grad-norm averaged over the ranks, tokens/s and MFU since the previous line, ETA. A loss
    that is not finite stops the run. Returns the logged values (the run's result)."""

    def __init__(self, world: World, log: MetricsLogger, *, tokens_per_step: int, end: int, step: int,
                 flops_per_token, peak: float | None, say) -> None:
        self.world, self.log, self.tokens_per_step, self.end = world, log, tokens_per_step, end
        self.flops_per_token, self.peak, self.say = flops_per_token, peak, say
        self.last_time, self.last_step = time.perf_counter(), step

    def __call__(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                 tokens: int, seq_len: int) -> dict:
        world = self.world
        loss_v, gn = all_reduce_mean([loss.item(), grad_norm.item()], world)
        now = time.perf_counter()
        dt = (now - self.last_time) / max(step - self.last_step, 1)
        tok_s = self.tokens_per_step / dt
        fpt = self.flops_per_token(seq_len)
        mfu = tok_s * fpt / (self.peak * world.world_size) if self.peak else None
        eta = format_duration(dt * (self.end - step))
        self.say(
            f"step {step:>6}/{self.end} | loss {loss_v:.4f} | lr {lr:.3e} | grad-norm {gn:.3f} | "
            f"{tok_s:,.0f} tok/s | MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'} | ETA {eta}"
        )
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"loss is {loss_v} at step {step}; stopping")
        result = {"loss": loss_v, "lr": lr, "grad_norm": gn, "tokens_per_s": tok_s,
                  "mfu": mfu, "tokens": tokens, "step_time_s": dt}
        if world.device.type == "cuda":
            result["max_memory_gib"] = torch.cuda.max_memory_allocated(world.device) / 2**30
        self.log.log(step, result)
        self.last_time, self.last_step = time.perf_counter(), step
        return result
