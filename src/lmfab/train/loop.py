"""The training loop and the four run modes (train, eval, train_and_eval, eval_all).

Kept plain on purpose: one function builds the run, one function does a step. The global
batch of the params file is split over the devices and micro-batches with gradient
accumulation (``lmfab.config.micro_batching``); each device sees its contiguous slice of the
same global batch, so the result does not depend on the device count. The newest complete
checkpoint in ``model_dir`` resumes automatically; ``init_from`` loads weights only.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmfab import checkpoint as ckpt
from lmfab.config.load import (
    ConfigError,
    config_notes,
    micro_batching,
    resolved_precision,
    train_stages,
)
from lmfab.config.schema import Config
from lmfab.data.loader import TokenDataset
from lmfab.dist import World, all_reduce_mean, init_world, parallelize, shutdown
from lmfab.dist.launch import record_rank_code
from lmfab.dist.parallel import is_fsdp, no_sync, resolve_strategy, sharded_fill
from lmfab.models.gpt import GPT, build_model, materialize
from lmfab.train.data import make_loader, open_dataset, stage_at
from lmfab.train.graph import WARMUP_STEPS, WARMUP_STEPS_DDP, StepGraph
from lmfab.train.metrics import MetricsLogger, console, format_duration, peak_flops
from lmfab.train.optim import build_optimizer, clip_and_step, make_capturable, set_lr
from lmfab.train.plan import format_plan, plan_run
from lmfab.train.profile import StepProfiler, format_summary
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


def open_eval_split(cfg: Config) -> TokenDataset:
    """eval_input's shards (default: the first training source), at eval_input.seq_len."""
    e, t = cfg.eval_input, cfg.train_input
    return open_dataset(cfg, _eval_dir(cfg), e.split, e.seq_len or t.seq_len)


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
    world = init_world(cfg.runconfig.device, cfg.runconfig.dist_backend)
    torch.manual_seed(cfg.runconfig.seed + world.rank)
    model_dir = Path(model_dir)
    bf16 = precision_of(cfg, world.device) == "bf16"
    t = cfg.train_input  # accumulation is the same in every seq_len stage (tokens fixed)
    try:
        _, accum = micro_batching(t.batch_size, t.micro_batch_size, world.world_size)
    except ConfigError:  # an eval-only run need not divide the training batch; train() says so
        accum = 1
    model = build_model(cfg.model)  # meta device
    if world.distributed and resolve_strategy(cfg.runconfig, world, model.num_params()) == "fsdp":
        # Shard first, then allocate and initialise only this rank's shards (FSDP2 on meta):
        # no rank ever holds the whole model.
        wrapped = parallelize(model, world, cfg.runconfig, bf16=bf16, grad_accum=accum)
        model.to_empty(device=world.device)
        gen = torch.Generator(device=world.device).manual_seed(cfg.runconfig.seed)
        model.init_weights(gen, fill=sharded_fill)
    else:
        model = materialize(model, world.device, seed=cfg.runconfig.seed)
        wrapped = parallelize(model, world, cfg.runconfig, bf16=bf16, grad_accum=accum)
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


def _train_step(run: Run, optimizer, rows: torch.Tensor, micro: int, accum: int):
    """One optimizer step over this rank's rows (micro*accum, T+1). Returns (loss, grad-norm)."""
    loss_sum = torch.zeros((), device=rows.device)
    for k, mb in enumerate(rows.split(micro)):
        x, y = mb[:, :-1], mb[:, 1:]
        with no_sync(run.wrapped, skip=k < accum - 1):
            with run.autocast:
                loss = run.wrapped(x, y)
            (loss / accum).backward()
        loss_sum += loss.detach()
    grad_norm = clip_and_step(optimizer, list(run.model.parameters()),
                              run.cfg.optimizer.max_grad_norm)
    if isinstance(grad_norm, DTensor):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm


@contextlib.contextmanager
def manual_gc(every: int):
    """``runconfig.gc_steps``: Python's garbage collector runs at fixed steps instead of
    whenever allocations trigger it. At start, what exists is collected and frozen (later
    collections skip it); then the young generations are collected every ``every`` steps, at
    the same step on every rank, so no rank pauses while the others wait at an all-reduce;
    every 10th time all generations, so that cycles which grew old are freed too. 0 leaves
    Python's automatic collection alone. Restored on exit, also on an error."""
    if not every:
        yield lambda step: None
        return
    was_enabled = gc.isenabled()
    gc.collect()
    froze = gc.get_freeze_count() == 0  # leave a caller's own frozen objects as they are
    if froze:
        gc.freeze()
    gc.disable()

    def tick(step: int) -> None:
        if step % (10 * every) == 0:
            gc.collect()
        elif step % every == 0:
            gc.collect(1)

    try:
        yield tick
    finally:
        if froze:
            gc.unfreeze()
        if was_enabled:
            gc.enable()


def _write_profile(run: Run, summary: dict, first: int, last: int) -> None:
    """Each rank's kernel table and summary beside its trace; rank 0 prints the categories."""
    out = run.model_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)
    text = format_summary(summary)
    rank = run.world.rank
    (out / f"kernels_rank{rank}.txt").write_text(text + "\n")
    (out / f"kernels_rank{rank}.json").write_text(json.dumps({"steps": [first, last], **summary},
                                                             indent=1))
    run.say(f"profile, steps {first}-{last} (rank 0; each rank's table and trace in {out}):\n"
            + format_summary(summary, kernels=False))


def oom_advice(run: Run, micro: int, step: int) -> str:
    """What to change when a training step runs out of device memory."""
    r, n = run.cfg.runconfig, run.model.num_params()
    sharded = is_fsdp(run.model)
    per_gpu = 16 * n / (run.world.world_size if sharded else 1) / 2**30
    tips = []
    if not sharded:
        tips.append("runconfig.strategy: fsdp (shards that state over the GPUs; needs more "
                    "than one)")
    if not r.activation_checkpointing:
        tips.append("runconfig.activation_checkpointing: true")
    if micro > 1:
        tips.append(f"a smaller train_input.micro_batch_size than {micro} (the global batch "
                    "stays, through accumulation)")
    if r.loss != "standard" and not r.loss_chunk:
        tips.append("runconfig.loss_chunk (e.g. 4096) for long sequences")
    return (f"lmfab: out of device memory in training step {step + 1}: {n / 1e9:.2f}B "
            f"parameters hold ~{per_gpu:.0f} GiB per device in weights, gradients and AdamW "
            f"state (16 bytes/parameter{', sharded' if sharded else ''}) before activations. "
            f"Try: {'; '.join(tips) or 'more devices'}.")


def train(run: Run, *, num_steps: int | None, init_from: str | None, eval_at_end: bool) -> dict:
    cfg, world = run.cfg, run.world
    r = cfg.runconfig
    plan = plan_run(cfg, world.world_size, device_type=world.device.type)
    optimizer = build_optimizer(run.model, cfg.optimizer, world.device, cfg.model)
    schedule = LRSchedule(cfg.optimizer.learning_rate)
    stages = train_stages(cfg, world.world_size)
    eval_set = open_eval_split(cfg) if (r.eval_steps or eval_at_end) else None

    step, tokens_seen = 0, 0
    newest = ckpt.latest_checkpoint(run.model_dir)
    if newest is not None:
        ckpt.check_resumable(newest, cfg)
        state = ckpt.load_checkpoint(newest, model=run.model, optimizer=optimizer, world=world)
        step, tokens_seen = state["step"], state.get("tokens", 0)
        run.say(f"resumed from {newest} (step {step})")
        if init_from:
            run.say(f"note: --init_from {init_from} ignored; resuming the run in {run.model_dir}")
    elif init_from:
        src = ckpt.load_weights(run.model, init_from)
        run.say(f"initialised weights from {src} (weights only; optimizer and step start fresh)")

    stage = stage_at(stages, step)
    loader = make_loader(cfg, stage, world)
    if newest is not None and state["loader"]["stage"] == stage.index:
        saved_kind = state["loader"]["state"].get("kind", "single")
        if (saved_kind == "mixture") != stage.mixture:
            raise ConfigError(
                f"{newest}: the checkpoint's data was {'a' if saved_kind == 'mixture' else 'no'} "
                "mixture but train_input now says otherwise; the data order cannot continue "
                "(use a new --model_dir, or --init_from)")
        loader.load_state_dict(state["loader"]["state"])
    if world.is_main:
        ckpt.write_run_files(cfg, run.model_dir)
    run.say(format_plan(plan))
    for note in config_notes(cfg, world.device.type):
        run.say(f"note: {note}")

    end = r.max_steps if num_steps is None else min(r.max_steps, step + num_steps)
    peak = peak_flops(world.device, r.peak_flops_per_device)
    run.say(f"training steps {step} -> {end} on {world.world_size} x {world.device.type}")

    def save(at: int) -> None:
        state = {"loader": {"stage": stage.index, "state": loader.state_dict()},
                 "tokens": tokens_seen}
        path = ckpt.save_checkpoint(run.model_dir, step=at, model=run.model, optimizer=optimizer,
                                    state=state, cfg=cfg, world=world, keep=r.keep_checkpoints)
        run.say(f"checkpoint {path}")

    for group in optimizer.param_groups:  # as built; a cuda_graph run's checkpoint says True
        group["capturable"] = False
    graphed = r.cuda_graph and world.device.type == "cuda" and bool(optimizer.defaults.get("fused"))
    if graphed and is_fsdp(run.wrapped):
        graphed = False
        run.say("note: runconfig.cuda_graph is off under FSDP2 (its all-gathers and "
                "reduce-scatters are scheduled by host code a graph replay would not run)")
    stepper = StepGraph(lambda rows: _train_step(run, optimizer, rows, stage.micro_batch,
                                                 stage.grad_accum),
                        world.device, prepare=lambda: make_capturable(optimizer, world.device),
                        warmup=WARMUP_STEPS_DDP if world.distributed else WARMUP_STEPS,
                        stream=getattr(run.wrapped, "lmfab_graph_stream", None)) \
        if graphed else None

    fpt = run.model.flops_per_token(stage.seq_len)
    run.wrapped.train()
    last_time, last_step, t_start = time.perf_counter(), step, time.perf_counter()
    result: dict = {}
    profiler: StepProfiler | None = None
    profile_from, profile_to = r.profile_start, r.profile_start + r.profile_steps
    with manual_gc(r.gc_steps) as gc_tick, contextlib.ExitStack() as on_exit:
        while step < end:
            if stage_at(stages, step) is not stage:
                stage = stage_at(stages, step)
                loader = make_loader(cfg, stage, world)
                fpt = run.model.flops_per_token(stage.seq_len)
                run.say(f"step {step}: seq_len {stage.seq_len}, global batch {stage.batch_size} "
                        f"(micro {stage.micro_batch} x {stage.grad_accum}), same tokens per step")
            if profiler is None and profile_from <= step < profile_to \
                    and stepper is not None and stepper.graph is None:
                # runconfig.cuda_graph: profile replayed steps, not the warm-up or the capture
                profile_from, profile_to = step + 1, step + 1 + r.profile_steps
            if profiler is None and profile_from <= step < profile_to:  # a resume may start inside
                profiler, profile_from = StepProfiler(
                    world.device, run.model_dir / "profile" / f"trace_rank{world.rank}.json.gz"), step
                on_exit.callback(profiler.abort)  # an error inside the window stops it
                profiler.start()
            lr = schedule(step)
            set_lr(optimizer, lr)
            rows = to_device(loader.next_batch(), world.device)
            try:
                if stepper is not None:
                    captures = stepper.captures
                    loss, grad_norm = stepper(rows)
                    if stepper.captures != captures:
                        run.say(f"step {step + 1}: the training step is captured as a CUDA "
                                "graph and replayed from here (runconfig.cuda_graph)")
                else:
                    loss, grad_norm = _train_step(run, optimizer, rows, stage.micro_batch,
                                                  stage.grad_accum)
            except torch.OutOfMemoryError as e:
                e.args = (f"{e.args[0] if e.args else e}\n{oom_advice(run, stage.micro_batch, step)}",)
                raise
            step += 1
            tokens_seen += plan.tokens_per_step
            if profiler is not None and step in (profile_to, end):
                _write_profile(run, profiler.stop(step - profile_from), profile_from + 1, step)
                profiler, profile_to = None, -1  # once per run

            if step % r.log_steps == 0 or step == end:
                loss_v, gn = all_reduce_mean([loss.item(), grad_norm.item()], world)
                now = time.perf_counter()
                dt = (now - last_time) / max(step - last_step, 1)
                tok_s = plan.tokens_per_step / dt
                mfu = tok_s * fpt / (peak * world.world_size) if peak else None
                eta = format_duration(dt * (end - step))
                run.say(
                    f"step {step:>6}/{end} | loss {loss_v:.4f} | lr {lr:.3e} | grad-norm {gn:.3f} | "
                    f"{tok_s:,.0f} tok/s | MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'} | ETA {eta}"
                )
                if not math.isfinite(loss_v):
                    raise FloatingPointError(f"loss is {loss_v} at step {step}; stopping")
                result = {"loss": loss_v, "lr": lr, "grad_norm": gn, "tokens_per_s": tok_s,
                          "mfu": mfu, "tokens": tokens_seen, "step_time_s": dt}
                if world.device.type == "cuda":
                    result["max_memory_gib"] = torch.cuda.max_memory_allocated(world.device) / 2**30
                run.log.log(step, result)
                last_time, last_step = time.perf_counter(), step
            if r.eval_steps and step % r.eval_steps == 0 and not (step == end and eval_at_end):
                _eval_and_log(run, eval_set, step)
            if r.checkpoint_steps and step % r.checkpoint_steps == 0 and step != end:
                save(step)
            gc_tick(step)

    if stepper is not None:
        stepper.release()  # the graph's memory pool, before the final checkpoint and eval
    newest = ckpt.latest_checkpoint(run.model_dir)
    if r.checkpoint_at_end and (newest is None or newest.name != f"step_{step:08d}"):
        save(step)
    run.say(f"trained {step} steps in {format_duration(time.perf_counter() - t_start)}")
    if eval_at_end:
        result["eval"] = _eval_and_log(run, eval_set, step)
    return result


def _eval_and_log(run: Run, dataset: TokenDataset, step: int) -> dict:
    metrics = evaluate(run, dataset)
    bpb = metrics.get("bits_per_byte")
    run.say(f"eval step {step} | loss {metrics['loss']:.4f} | ppl {metrics['perplexity']:.2f} "
            f"| bpb {'-' if bpb is None else f'{bpb:.4f}'} | {metrics['tokens']:,} tokens")
    run.log.log(step, metrics, prefix="eval")
    return metrics


def eval_checkpoints(run: Run, *, all_checkpoints: bool, init_from: str | None) -> list[dict]:
    dataset = open_eval_split(run.cfg)
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
        step = json.loads((src / "state.json").read_text())["step"] if (src / "state.json").is_file() else 0
        results.append({"checkpoint": str(src), "step": step, **_eval_and_log(run, dataset, step)})
    if run.world.is_main:
        (run.model_dir / "eval_results.json").write_text(json.dumps(results, indent=1))
    return results


def run_mode(
    cfg: Config,
    *,
    mode: str,
    model_dir: str | Path,
    num_steps: int | None = None,
    init_from: str | None = None,
) -> dict | list[dict]:
    """Entry point of ``lmfab run``: set up the world, run the mode, tear down."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    run = setup(cfg, model_dir)
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
    finally:
        run.log.close()
        # One collective, also the barrier before teardown: the mean of the ranks' done flags
        # is 1 only when every rank (on every node) finished; only then is 0 recorded, and a
        # crash while tearing down loses nothing (dist.launch)
        if all_reduce_mean([float(done)], run.world)[0] == 1.0:
            record_rank_code(0)
        world = run.world
        # DDP's reducer and FSDP2's state hold the process group. Free them now, while every
        # rank is past the barrier: left to the garbage collector, the group's destructor
        # ran after a peer had exited and could wait forever (gloo, seen on a loaded CPU).
        run.wrapped = run.model = None
        gc.collect()
        shutdown(world)
