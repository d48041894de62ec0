"""Checkpoints: atomic, complete, resumable.

Layout of one checkpoint, ``<model_dir>/checkpoints/step_00000200/``::

    model.safetensors   weights of the unwrapped model (no DDP/compile prefixes)
    optimizer.pt        optimizer state (AdamW moments, step counts)
    state.json          step, tokens seen, data-loader state, wall time
    rng_rank<R>.pt      torch CPU (and CUDA) RNG state of each rank
    config.yaml         the resolved config the run used (eval/export read only this)

It is written into ``.step_00000200.tmp`` and renamed into place when every file is on
disk, so a directory named ``step_*`` is always complete: a run killed mid-write leaves only
a temp directory, which the next save or resume removes. Resume picks the newest complete one.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmfab.config.load import write_config
from lmfab.config.schema import Config
from lmfab.dist.world import World, barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(model_dir: str | Path) -> Path:
    return Path(model_dir) / "checkpoints"


def list_checkpoints(model_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(model_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(model_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(model_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a model_dir (its newest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"{path}: no checkpoint (expected model.safetensors or checkpoints/step_*)")
    return newest


def save_checkpoint(
    model_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    cfg: Config,
    world: World,
    keep: int = 0,
) -> Path | None:
    """Write a checkpoint collectively (every rank calls this); returns its path on rank 0."""
    root = checkpoint_root(model_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(world)
    rng = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(world.device)
    torch.save(rng, tmp / f"rng_rank{world.rank}.pt")
    if world.is_main:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        meta = {"step": step, "world_size": world.world_size, "time": time.time(), **state}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        write_config(cfg, tmp / "config.yaml")
    barrier(world)
    if world.is_main:
        if final.exists():  # re-saving the same step (e.g. eval-only re-run): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for old in list_checkpoints(model_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final if world.is_main else None


def load_weights(model: nn.Module, path: str | Path) -> Path:
    """Load weights only (``--init_from``, eval): strict key and shape match."""
    ckpt = resolve_checkpoint(path)
    weights = load_file(str(ckpt / "model.safetensors"))
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{ckpt}: weights do not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(weights[k])
    return ckpt


def load_checkpoint(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> dict:
    """Restore model, optimizer and this rank's RNG; return state.json's contents."""
    ckpt = resolve_checkpoint(path)
    load_weights(model, ckpt)
    optimizer.load_state_dict(
        torch.load(ckpt / "optimizer.pt", map_location=world.device, weights_only=True)
    )
    rng_file = ckpt / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and world.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], world.device)
    return json.loads((ckpt / "state.json").read_text())
