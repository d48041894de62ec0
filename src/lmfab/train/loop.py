"""The training loop and the four run modes (train, eval, train_and_eval, eval_all).

Kept plain on purpose: one function builds the run, one function does a step, and
:func:`train` reads in one sitting: each concern is one object called once per step (the
sequence-length stages, :class:`~lmfab.train.data.StagedData`; the profiler window,
:class:`~lmfab.train.profile.ProfileWindow`; resume and save,
:class:`~lmfab.train.resume.Checkpointer`; the log line, :class:`~lmfab.train.metrics.StepMeter`),
as in torchtitan's ``Trainer.train``. The global
batch of the params file is split over the devices and micro-batches with gradient
accumulation (``lmfab.train.plan.micro_batching``); each device sees its contiguous slice of the
same global batch, so the result does not depend on the device count. The newest complete
checkpoint in ``model_dir`` resumes automatically; ``init_from`` loads weights only.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmfab import checkpoint as ckpt
from lmfab.config.errors import ConfigError
from lmfab.config.schema import Config
from lmfab.data.loader import TokenDataset
from lmfab.dist import World, all_reduce_mean, init_world, parallelize, shutdown
from lmfab.dist.launch import record_rank_code
from lmfab.dist.parallel import is_fsdp, no_sync, resolve_strategy, sharded_fill
from lmfab.dist.world import peer_lost
from lmfab.faultpoint import fault
from lmfab.models.execution import choose_kernels
from lmfab.models.gpt import GPT, build_model, materialize
from lmfab.train.data import StagedData, open_dataset, trained_tokenizer
from lmfab.train.interrupt import StopOnSignal
from lmfab.train.metrics import MetricsLogger, StepMeter, console, format_duration, peak_flops
from lmfab.train.nonfinite import NonFiniteGuard
from lmfab.train.optim import build_optimizer, clip_and_step, set_lr
from lmfab.train.plan import (
    config_notes,
    format_plan,
    micro_batching,
    oom_advice,
    plan_run,
    resolved_precision,
)
from lmfab.train.profile import ProfileWindow
from lmfab.train.resume import Checkpointer
from lmfab.train.schedule import LRSchedule
from lmfab.train.validate import evaluate_loss

MODES = ("train", "eval", "train_and_eval", "eval_all")


@dataclass
class Run:
    """Everything one process needs, built once."""

    cfg: Config
    world: World
    model_dir: Path
    model: GPT  # the unwrapped module: its state_dict is what checkpoints hold
    wrapped: nn.Module  # what the loop calls (compiled / DDP)
    autocast: contextlib.AbstractContextManager
    log: MetricsLogger
    # Downstream tasks at each eval: model -> {"<task>/<metric>": value}, injected by the
    # caller (lmfab.eval sits above train); None: held-out loss only.
    downstream: Callable[[nn.Module], dict] | None = None

    def say(self, msg: str) -> None:
        console(msg, self.world.is_main)


def precision_of(cfg: Config, device: torch.device) -> str:
    """runconfig.precision resolved for device: bf16 or fp32."""
    return resolved_precision(cfg.runconfig, device.type)


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA, none (fp32) on CPU, per runconfig.precision."""
    if precision_of(cfg, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _eval_dir(cfg: Config) -> str:
    e, t = cfg.eval_input, cfg.train_input
    return e.data_dir or t.data_dir or t.mixture[0].data_dir


def open_eval_split(cfg: Config, trained_with: Path | None = None) -> TokenDataset:
    """eval_input's shards (default: the first training source), at eval_input.seq_len;
    ``trained_with``: the weights' tokenizer.json, which the shards must come from."""
    e, t = cfg.eval_input, cfg.train_input
    return open_dataset(cfg, _eval_dir(cfg), e.split, e.seq_len or t.seq_len, trained_with)


def bytes_per_token(cfg: Config) -> float | None:
    """UTF-8 text bytes per token of the eval split, from its meta.json (None if unknown)."""
    meta = Path(_eval_dir(cfg)) / "meta.json"
    if not meta.is_file():
        return None
    split = json.loads(meta.read_text()).get("splits", {}).get(cfg.eval_input.split, {})
    if not split.get("tokens") or not split.get("text_bytes"):
        return None
    return split["text_bytes"] / split["tokens"]


def setup(cfg: Config, model_dir: str | Path) -> Run:
    world = init_world(cfg.runconfig.device, cfg.runconfig.parallel.dist_backend)
    torch.manual_seed(cfg.runconfig.seed + world.rank)
    model_dir = Path(model_dir)
    bf16 = precision_of(cfg, world.device) == "bf16"
    t = cfg.train_input  # accumulation is the same in every seq_len stage (tokens fixed)
    try:
        _, accum = micro_batching(t.batch_size, t.micro_batch_size, world.world_size)
    except ConfigError:  # an eval-only run need not divide the training batch; train() says so
        accum = 1
    kernels = choose_kernels(cfg.runconfig.kernels, world.device, bf16=bf16)
    model = build_model(cfg.model, kernels=kernels)  # meta device
    if world.distributed and resolve_strategy(cfg.runconfig.parallel, world, model.num_params()) == "fsdp":
        # Shard first, then allocate and initialise only this rank's shards (FSDP2 on meta):
        # no rank ever holds the whole model.
        wrapped = parallelize(model, world, cfg.runconfig.parallel, bf16=bf16, grad_accum=accum).module
        model.to_empty(device=world.device)
        gen = torch.Generator(device=world.device).manual_seed(cfg.runconfig.seed)
        model.init_weights(gen, fill=sharded_fill)
    else:
        model = materialize(model, world.device, seed=cfg.runconfig.seed)
        wrapped = parallelize(model, world, cfg.runconfig.parallel, bf16=bf16, grad_accum=accum).module
    log = MetricsLogger(model_dir, enabled=world.is_main, tensorboard=cfg.runconfig.tensorboard)
    return Run(cfg, world, model_dir, model, wrapped, autocast_for(cfg, world.device), log)


def evaluate(run: Run, dataset: TokenDataset) -> dict:
    e = run.cfg.eval_input
    micro, _ = micro_batching(e.batch_size, e.micro_batch_size, run.world.world_size)
    metrics = evaluate_loss(
        run.model, dataset, batch_size=e.batch_size, micro_batch=micro,
        max_batches=e.max_batches, world=run.world, autocast=run.autocast,
    )
    bpt = bytes_per_token(run.cfg)
    # Bits per byte: tokenizer-independent. The split's bytes/token ratio stands in for that
    # of the evaluated windows (exact when max_batches covers the split).
    metrics["bits_per_byte"] = metrics["loss"] / math.log(2) / bpt if bpt else None
    return metrics


def to_device(batch, device: torch.device) -> torch.Tensor:
    """A loader batch on the training device without stalling the host. A copy from pageable
    memory may wait for the GPU's stream to drain (CUDA's API sync rules), which would stop
    the host from queueing the next step while the GPU runs this one: the GPU then idles for
    the host's launch latency every step, and on several GPUs every rank's host jitter turns
    into waiting at the all-reduce. A pinned copy (PyTorch's caching host allocator keeps the
    block until the copy is done) is queued and returns at once."""
    rows = torch.from_numpy(batch)
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def _train_step(run: Run, optimizer, rows: torch.Tensor, micro: int, accum: int, step: int,
                guard: NonFiniteGuard):
    """Optimizer step ``step`` over this rank's rows (micro*accum, T+1). Returns (loss,
    grad-norm, finite); a non-finite step's update is not applied (``guard``)."""
    poison = fault("train.step", step=step, rank=run.world.rank) == "nan"  # tests only
    loss_sum = torch.zeros((), device=rows.device)
    for k, mb in enumerate(rows.split(micro)):
        x, y = mb[:, :-1], mb[:, 1:]
        with no_sync(run.wrapped, skip=k < accum - 1):
            with run.autocast:
                loss = run.wrapped(x, y)
            if poison and k == 0:
                loss = loss * float("nan")
            (loss / accum).backward()
        loss_sum += loss.detach()
    verdict = {}

    def check(norm):  # before the update: a non-finite step never reaches the weights
        verdict["finite"] = guard.finite(loss_sum, norm)
        return verdict["finite"]

    grad_norm = clip_and_step(optimizer, list(run.model.parameters()),
                              run.cfg.optimizer.max_grad_norm, check=check)
    if isinstance(grad_norm, DTensor):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm, verdict["finite"]


def train(run: Run, *, num_steps: int | None, init_from: str | None, eval_at_end: bool) -> dict:
    """Train to ``runconfig.max_steps`` (at most ``num_steps`` more), resuming the newest
    checkpoint in model_dir; each concern is one object, called once per step."""
    cfg, world = run.cfg, run.world
    r = cfg.runconfig
    plan = plan_run(cfg, world.world_size, device_type=world.device.type)
    optimizer = build_optimizer(run.model, cfg.optimizer, world.device, cfg.model)
    schedule = LRSchedule(cfg.optimizer.learning_rate)
    trained_with = trained_tokenizer(run.model_dir)  # resuming: the data must match it
    eval_set = open_eval_split(cfg, trained_with) if (r.eval_steps or eval_at_end) else None
    saver = Checkpointer(cfg, run.model_dir, run.model, optimizer, world, run.say)
    step, tokens_seen, saved_loader = saver.resume(init_from)
    first_step = step
    data = StagedData(cfg, world, run.say, trained_with)
    data.start(step, saved_loader)
    guard = NonFiniteGuard(r.on_nonfinite, world, run.log, run.say)
    if world.is_main:
        ckpt.write_run_files(cfg, run.model_dir)
    run.say(format_plan(plan))
    for note in config_notes(cfg, world.device.type):
        run.say(f"note: {note}")

    end = r.max_steps if num_steps is None else min(r.max_steps, step + num_steps)
    run.say(f"training steps {step} -> {end} on {world.world_size} x {world.device.type}")
    run.wrapped.train()
    meter = StepMeter(world, run.log, tokens_per_step=plan.tokens_per_step, end=end, step=step,
                      flops_per_token=run.model.flops_per_token,
                      peak=peak_flops(world.device, r.peak_flops_per_device), say=run.say)
    profile = ProfileWindow(r.profile.start, r.profile.steps, world.device, world.rank,
                            run.model_dir / "profile", run.say)
    t_start, result = time.perf_counter(), {}
    with profile, StopOnSignal(world, run.say, run.log) as stop:
        while step < end:
            data.switch(step)
            profile.before(step)
            lr = schedule(step)
            set_lr(optimizer, lr)
            for _ in range(guard.batches_to_drop(step + 1)):  # they made step + 1 non-finite
                data.loader.next_batch()
            rows = to_device(data.loader.next_batch(), world.device)
            try:
                loss, grad_norm, finite = _train_step(run, optimizer, rows, data.stage.micro_batch,
                                                      data.stage.grad_accum, step + 1, guard)
            except torch.OutOfMemoryError as e:
                advice = oom_advice(r, run.model.num_params(), world.world_size,
                                    is_fsdp(run.model), data.stage.micro_batch, step)
                e.args = (f"{e.args[0] if e.args else e}\n{advice}",)
                raise
            step += 1
            tokens_seen += plan.tokens_per_step
            profile.after(step, end)
            if not finite and guard.handle(step, loss, grad_norm, saver.newest()) == "rollback":
                step, tokens_seen, saved_loader = saver.resume(None)
                data.start(step, saved_loader)
                continue
            if finite and (step % r.log_steps == 0 or step == end):
                result = meter(step, loss, grad_norm, lr, tokens_seen, data.stage.seq_len)
            if r.eval_steps and step % r.eval_steps == 0 and not (step == end and eval_at_end):
                _eval_and_log(run, eval_set, step)
            saver.maybe_save(step, end, data, tokens_seen)
            if step < end and stop.requested():
                raise stop.interrupted(step, end, saver.save_now(step, data, tokens_seen))

    saver.save_at_end(step, data, tokens_seen)
    run.say(f"trained {step - first_step} steps ({first_step} -> {step}) in "
            f"{format_duration(time.perf_counter() - t_start)}")
    if eval_at_end:
        result["eval"] = _eval_and_log(run, eval_set, step)
    return result


def _eval_and_log(run: Run, dataset: TokenDataset, step: int) -> dict:
    metrics = evaluate(run, dataset)
    bpb = metrics.get("bits_per_byte")
    run.say(f"eval step {step} | loss {metrics['loss']:.4f} | ppl {metrics['perplexity']:.2f} "
            f"| bpb {'-' if bpb is None else f'{bpb:.4f}'} | {metrics['tokens']:,} tokens")
    if run.downstream is not None:  # every rank runs it (FSDP shards need them all)
        scores = run.downstream(run.model)
        run.say(f"eval step {step} | " + " | ".join(
            f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in scores.items()))
        metrics.update(scores)
    run.log.log(step, metrics, prefix="eval")
    return metrics


def eval_checkpoints(run: Run, *, all_checkpoints: bool, init_from: str | None) -> list[dict]:
    dataset = open_eval_split(run.cfg, trained_tokenizer(run.model_dir))
    if all_checkpoints:
        paths = ckpt.list_checkpoints(run.model_dir)
    else:
        newest = ckpt.latest_checkpoint(run.model_dir)
        paths = [newest] if newest else ([Path(init_from)] if init_from else [])
    if not paths:
        raise FileNotFoundError(f"{run.model_dir}: no checkpoint to evaluate (train first)")
    results = []
    for path in paths:
        src = ckpt.load_weights(run.model, path)
        step = ckpt.read_state(src).get("step", 0) if (src / "state.json").is_file() else 0
        results.append({"checkpoint": str(src), "step": step, **_eval_and_log(run, dataset, step)})
    if run.world.is_main:
        (run.model_dir / "eval_results.json").write_text(json.dumps(results, indent=1))
    return results


def _all_done(world: World) -> bool:
    try:
        return all_reduce_mean([1.0], world)[0] == 1.0
    except RuntimeError:  # a peer failed while this rank finished
        return False


def run_mode(
    cfg: Config,
    *,
    mode: str,
    model_dir: str | Path,
    num_steps: int | None = None,
    init_from: str | None = None,
    downstream: Callable[[nn.Module], dict] | None = None,
) -> dict | list[dict]:
    """Entry point of ``lmfab run``: set up the world, run the mode, tear down.
    ``downstream``: scores downstream tasks at each eval (:attr:`Run.downstream`)."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    ckpt.check_writable(model_dir, os.environ.get("RANK") or os.environ.get("SLURM_PROCID", "0"))  # before any work
    run = setup(cfg, model_dir)
    run.downstream = downstream
    done = False
    try:
        if mode in ("train", "train_and_eval"):
            result = train(run, num_steps=num_steps, init_from=init_from,
                           eval_at_end=mode == "train_and_eval")
        else:
            result = eval_checkpoints(run, all_checkpoints=mode == "eval_all",
                                      init_from=init_from)
        done = True
        return result
    except RuntimeError as e:  # a collective failed: say that a peer stopped, not gloo's words
        if (lost := peer_lost(e, run.world)) is None:
            raise
        raise lost from None
    finally:
        run.log.close()
        # One collective, also the barrier before teardown: the mean of the ranks' done flags
        # is 1 only when every rank (on every node) finished; only then is 0 recorded, and a
        # crash while tearing down loses nothing (dist.launch). A rank that failed skips it
        # (its exit ends the others' wait).
        if done and _all_done(run.world):
            record_rank_code(0)
        world = run.world
        # DDP's reducer and FSDP2's state hold the process group. Free them now, while every
        # rank is past the barrier: left to the garbage collector, the group's destructor
        # ran after a peer had exited and could wait forever (gloo, seen on a loaded CPU).
        run.wrapped = run.model = None
        gc.collect()
        shutdown(world)
