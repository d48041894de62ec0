"""The run folder: atomic checkpoints, the resolved config, the tokenizer; shared by train,
eval, infer and export.

A run folder (``model_dir``) holds ``config.yaml`` (the resolved config of the run, every
default filled in), ``tokenizer.json`` (copied from the first training source) and
``checkpoints/``. Layout of one checkpoint, ``<model_dir>/checkpoints/step_00000200/``::

    model.safetensors   full weights, names of the unwrapped model (no DDP/compile/FSDP
                        prefixes): what eval, generate and export read
    optimizer.pt        DDP / one device: the full optimizer state, keyed by parameter name
    dcp/                FSDP2: model and optimizer state as torch.distributed.checkpoint
                        shards, written by every rank; resharded on load, so a run resumes
                        on a different number of GPUs
    state.json          layout format, step, tokens seen, data-loader state, wall time
    rng_rank<R>.pt      torch CPU (and CUDA) RNG state of each rank
    config.yaml         the resolved config the run used

It is written into ``.step_00000200.tmp`` and renamed into place when every file is on
disk, so a directory named ``step_*`` is always complete: a run killed mid-write leaves only
a temp directory, which the next save removes. (Files are not fsync'ed: a power loss, as
opposed to a killed process, can still lose the newest checkpoint.) Resume picks the newest complete one.
State dicts go through ``torch.distributed.checkpoint.state_dict``, which names parameters
by their fully qualified names whatever the wrapping, so DDP and FSDP checkpoints load into
either.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmfab.atomic import atomic_path
from lmfab.config.load import ConfigError, config_from_dict, config_to_dict, read_yaml, write_config
from lmfab.config.schema import Config, ModelConfig
from lmfab.dist.parallel import is_fsdp
from lmfab.dist.world import World, barrier
from lmfab.faultpoint import fault

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(model_dir: str | Path) -> Path:
    return Path(model_dir) / "checkpoints"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); nothing half-written stays."""


def check_writable(model_dir: str | Path, rank: int | str = 0) -> None:
    """Fail before any work when ``model_dir`` cannot hold the run: create it and its
    ``checkpoints/`` folder and write and remove a small file there. Raises ConfigError
    naming the folder and the reason (a file in the way, no permission, a full disk)."""
    root = checkpoint_root(model_dir)
    probe = root / f".write-probe-rank{rank}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        if root.is_dir():
            probe.unlink(missing_ok=True)
        raise ConfigError(f"--model_dir {model_dir}: cannot write the run there "
                          f"({e.strerror or e}: {e.filename or root}); choose a writable "
                          "folder") from None


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


# Version of the checkpoint layout (state.json "format"). Bump it when a change makes older
# checkpoints unreadable; resume then refuses them with a clear message (weights stay usable
# through --init_from, which reads model.safetensors only).
FORMAT = 1


def checkpoint_format(state: dict) -> int:
    """The layout version of a checkpoint's state.json. Checkpoints from before the field
    existed are format 1 when their loader state names its stage (the layout FORMAT 1
    describes), else 0 (early development builds, unreadable now)."""
    if "format" in state:
        return int(state["format"])
    return 1 if isinstance(state.get("loader"), dict) and "stage" in state["loader"] else 0


def read_state(path: str | Path) -> dict:
    """state.json of a checkpoint directory (a damaged one is a ValueError naming it)."""
    file = Path(path) / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not a readable state.json ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: not a checkpoint state (a JSON object expected)")
    return state


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
        for stale in [*root.glob(".step_*.tmp"), *root.glob(".step_*.old")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir()
    barrier(world)
    try:
        _write_checkpoint_files(tmp, step=step, model=model, optimizer=optimizer, state=state,
                                cfg=cfg, world=world)
    except OSError as e:  # a full disk, a folder made read-only: drop the partial step
        shutil.rmtree(tmp, ignore_errors=True)
        newest = latest_checkpoint(model_dir)
        raise CheckpointWriteError(
            e.errno, f"could not write the checkpoint of step {step} ({e.strerror or e}: "
            f"{e.filename or tmp}); nothing of it was kept, and the newest complete checkpoint "
            f"is {newest or 'none'}; free space (or fix the folder) and run again to resume"
        ) from None
    barrier(world)
    if world.is_main:
        if final.exists():  # the same step saved again: swap, never leave the step missing
            old = root / f".step_{step:08d}.old"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        if keep > 0:  # hidden first (one rename), then deleted: a kill while deleting
            for old in list_checkpoints(model_dir)[:-keep]:  # never leaves a listed half
                hidden = root / f".{old.name}.old"
                old.rename(hidden)
                shutil.rmtree(hidden, ignore_errors=True)
    barrier(world)
    return final if world.is_main else None


def _write_checkpoint_files(tmp: Path, *, step: int, model: nn.Module,
                            optimizer: torch.optim.Optimizer, state: dict, cfg: Config,
                            world: World) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(world.device)
    torch.save(rng, tmp / f"rng_rank{world.rank}.pt")
    weights = get_model_state_dict(model, options=_FULL)  # collective under FSDP
    if is_fsdp(model):
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp / "dcp")
    else:
        optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
        if world.is_main:
            torch.save(optim_state, tmp / "optimizer.pt")
    if world.is_main:
        weights = {k: v.detach().contiguous() for k, v in weights.items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fault("checkpoint.write", step=step)  # tests: kill / pause / ENOSPC mid-write
        meta = {"format": FORMAT, "step": step, "world_size": world.world_size,
                "time": time.time(), **state}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        write_config(cfg, tmp / "config.yaml")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no code runs on load: the format is a JSON header
    and raw bytes); a file that is not one is a ValueError naming it."""
    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as err:  # safetensors' SafetensorError (header or size wrong), ...
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def load_weights(model: nn.Module, path: str | Path) -> Path:
    """Load weights only (``--init_from``, eval): strict key and shape match."""
    ckpt = resolve_checkpoint(path)
    weights = read_weights(ckpt / "model.safetensors")
    own = get_model_state_dict(model)  # parameter names; global shapes under FSDP
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    shapes += [k for k in own if k in weights and k not in shapes
               and not weights[k].dtype.is_floating_point]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{ckpt}: weights do not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape or dtype mismatch {shapes[:5]}"
        )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    return ckpt


def load_checkpoint(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> dict:
    """Restore model, optimizer and this rank's RNG; return state.json's contents."""
    ckpt = resolve_checkpoint(path)
    if (ckpt / "dcp").is_dir():  # sharded (FSDP) checkpoint: resharded to this world
        state = {"model": get_model_state_dict(model),
                 "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=ckpt / "dcp")
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
    else:
        load_weights(model, ckpt)
        optim_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True))
    rng_file = ckpt / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and world.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], world.device)
    return read_state(ckpt)


# ---- the run folder around the checkpoints ----------------------------------------------

def run_tokenizer(cfg: Config) -> Path | None:
    """The tokenizer.json of the run: the first training source's."""
    first = cfg.train_input.data_dir or cfg.train_input.mixture[0].data_dir
    tok = Path(first) / "tokenizer.json"
    return tok if tok.is_file() else None


def write_run_files(cfg: Config, model_dir: str | Path) -> None:
    """``config.yaml`` and ``tokenizer.json`` of a run folder (rank 0 calls this)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, model_dir / "config.yaml")
    tok = run_tokenizer(cfg)
    if tok is not None:
        with atomic_path(model_dir / "tokenizer.json") as tmp:  # a kill mid-copy leaves no
            shutil.copyfile(tok, tmp)  # short tokenizer.json


def read_run_config(ckpt: str | Path) -> Config:
    """The resolved config written beside a checkpoint."""
    path = Path(ckpt) / "config.yaml"
    return config_from_dict(read_yaml(path), source=str(path), resolved=True)


def find_tokenizer(ckpt: str | Path, cfg: Config) -> Path:
    """tokenizer.json beside a checkpoint, in its run folder, or in the run's data."""
    ckpt = Path(ckpt)
    candidates = [ckpt / "tokenizer.json", ckpt.parent.parent / "tokenizer.json",
                  run_tokenizer(cfg)]
    tok_file = next((p for p in candidates if p is not None and p.is_file()), None)
    if tok_file is None:
        raise FileNotFoundError(f"no tokenizer.json beside {ckpt} or in its data_dir")
    return tok_file


def check_resumable(saved: Path, cfg: Config) -> None:
    """Refuse to resume from ``saved`` when its layout format or its model section differs."""
    fmt = checkpoint_format(read_state(saved))
    if fmt != FORMAT:
        raise ConfigError(
            f"{saved}: cannot resume, the checkpoint's layout is format {fmt} and this lmfab "
            f"reads format {FORMAT}; use a new --model_dir, or --init_from {saved} to "
            "start a new run from its weights"
        )

    saved_model = yaml.safe_load((saved / "config.yaml").read_text())["model"]
    now = config_to_dict(cfg)["model"]
    # A key the checkpoint lacks was added to ModelConfig after it was written; its default
    # keeps the old behaviour, so that default matches.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING}
    missing = object()
    diff = {k: (saved_model.get(k), v) for k, v in now.items()
            if saved_model.get(k, defaults.get(k, missing)) != v}
    # A key only the checkpoint has (a field since renamed or removed) is a difference too.
    diff.update({k: (v, None) for k, v in saved_model.items() if k not in now})
    if diff:
        raise ConfigError(
            f"{saved}: cannot resume, the model section differs from the checkpoint's "
            f"(key: (checkpoint, now)) {diff}; use a new --model_dir, or --init_from to "
            "start a new run from these weights"
        )
