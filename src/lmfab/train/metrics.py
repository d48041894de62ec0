"""Training metrics: the console line, a JSONL file and TensorBoard, from rank 0 only.

Each console line carries step, loss, lr, grad-norm, tokens/s, MFU and ETA. MFU is
tokens/s x FLOPs/token over the devices' peak dense bf16 rate (known GPUs are detected;
``runconfig.peak_flops_per_device`` overrides; unknown devices, e.g. CPUs, print "-").
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

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
        self.jsonl = open(model_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
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

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def console(msg: str, world_main: bool = True) -> None:
    if world_main:
        print(msg, flush=True)
