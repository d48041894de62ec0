"""What a run will do, before it does it: batch split, parameters, FLOPs, memory.

The batch split (:func:`micro_batching`, with gradient accumulation) and the sequence-length
stages (:func:`train_stages`) are derived here from a checked config. Used by
``lmfab run --dry-run`` and printed at the start of every run; :func:`oom_advice`
turns the same figures into what to change when a step runs out of memory, and
:func:`config_notes` says which settings have no effect in this combination. The memory figure is
an estimate, not a measurement: fp32 weights, gradients and AdamW moments (16 bytes per
parameter, divided over the devices under FSDP) plus activations of one micro-batch (with
activation checkpointing: each block's input plus one block's activations), using the per-layer
count of Korthikanti et al. 2022 (arXiv 2205.05198, "34·s·b·h" bytes in 16-bit precision
with fused attention, which never stores the T×T scores) and the logits: 10 bytes per logit
with the standard loss (bf16 logits, their fp32 copy and its gradient), 2 with the fused loss,
whose bf16 logits become their own gradient, over ``loss_chunk`` rows at a time if set
(then also the output weight's fp32 gradient and the hidden states' gradient, made in
forward and kept for backward). Under FSDP2 without resharding after forward, the gathered
bf16 parameters are added to the weights' share.
Against peaks measured on H200s (docs/benchmarks.md, shipped configs): 124M 14.5 GiB
estimated, 14.4 measured; 1.3B 60.2 and 57.0; 13B on 2 GPUs under FSDP2 102 and 99.6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmfab.config.check import micro_batching, stage_batches
from lmfab.config.schema import Config, RunConfig
from lmfab.dist.parallel import split_ddp_graph
from lmfab.models.execution import uses_fused_loss
from lmfab.models.gpt import build_model


@dataclass(frozen=True)
class TrainStage:
    """One stretch of training at one sequence length, derived from train_input."""

    index: int
    at_step: int
    seq_len: int
    sources: tuple[tuple[str, float], ...]  # (data_dir, weight)
    mixture: bool  # sources came from a mixture list (weighted loader)
    batch_size: int  # global sequences per step
    micro_batch: int  # per device
    grad_accum: int


def train_stages(cfg: Config, world_size: int = 1) -> list[TrainStage]:
    """The sequence-length stages of a run (one unless train_input.seq_len_schedule is set):
    tokens per step stay fixed, so batch and micro-batch scale by seq_len / the stage's."""
    return [TrainStage(i, *shape) for i, shape in enumerate(stage_batches(cfg, world_size))]


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    tokens_per_step: int
    n_params: int
    n_params_no_pos: int
    flops_per_token: float
    flops_per_step: float
    state_bytes: int
    activation_bytes: int
    strategy: str
    activation_checkpointing: bool
    checkpoint_every: int = 1
    logit_bytes: int = 0  # part of activation_bytes
    fused_loss: bool = False
    loss_chunked: bool = False  # fused loss over loss_chunk rows at a time
    ddp_graph: str = ""  # how DDP meets torch.compile here ("" where it does not apply)

    @property
    def memory_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "memory_bytes": self.memory_bytes}


def plan_run(cfg: Config, world_size: int = 1, *, bytes_per_activation: int = 2,
             device_type: str = "cuda") -> RunPlan:
    """``device_type`` decides ``loss: auto`` (fused on CUDA) for the logits' memory."""
    t, m = cfg.train_input, cfg.model
    micro, accum = micro_batching(t.batch_size, t.micro_batch_size, world_size)
    model = build_model(m)  # meta device: no memory
    n = model.num_params()
    n_no_pos = model.num_params(exclude_positions=True)
    fpt = model.flops_per_token(t.seq_len)
    tokens = t.batch_size * t.seq_len
    act_per_layer = 34 * t.seq_len * micro * m.d_model * bytes_per_activation // 2
    r = cfg.runconfig
    rows = micro * t.seq_len
    fused = uses_fused_loss(r.kernels, device_type)
    chunked = fused and 0 < r.kernels.loss_chunk < rows
    if fused:
        logits = min(rows, r.kernels.loss_chunk or rows) * m.vocab_size * bytes_per_activation
        if chunked:  # gradients made in forward, kept for backward: the output weight's
            # in fp32, plus one block's bf16 product and its fp32 copy; the hidden states'
            logits += m.vocab_size * m.d_model * (8 + bytes_per_activation)
            logits += rows * m.d_model * bytes_per_activation
    else:
        logits = rows * m.vocab_size * (bytes_per_activation + 8)
    if r.parallel.activation_checkpointing:  # a recomputed block keeps its input; one is live at a time
        ckpt = -(-m.n_layer // r.parallel.checkpoint_every)  # blocks 0, every, 2*every, ...
        acts = (ckpt * micro * t.seq_len * m.d_model * bytes_per_activation
                + (m.n_layer - ckpt) * act_per_layer + act_per_layer)
    else:
        acts = act_per_layer * m.n_layer
    sharded = r.parallel.strategy == "fsdp" and world_size > 1
    # FSDP2 keeps the root module's parameters (embeddings, final norm: those outside the
    # blocks) gathered from forward to backward, as its root never reshards after forward.
    # Without resharding after forward every block's gathered bf16 parameters stay too: the
    # whole model at 2 bytes a parameter (FSDP2 gathers into a full buffer; the local shard
    # is a separate one).
    root = n - sum(p.numel() for p in model.blocks.parameters())
    gathered = (2 * (n if not r.parallel.fsdp_reshard_after_forward else root)) if sharded else 0
    ddp_graph = ""
    if world_size > 1 and r.parallel.strategy != "fsdp" and r.parallel.compile:
        ddp_graph = ("compiled graph cut at the gradient buckets (all-reduce overlaps backward)"
                     if split_ddp_graph(r.parallel, accum) else
                     "one compiled graph (all-reduce after backward)")
    return RunPlan(
        world_size=world_size,
        global_batch=t.batch_size,
        micro_batch=micro,
        grad_accum=accum,
        seq_len=t.seq_len,
        tokens_per_step=tokens,
        n_params=n,
        n_params_no_pos=n_no_pos,
        flops_per_token=fpt,
        flops_per_step=fpt * tokens,
        state_bytes=16 * n // (world_size if sharded else 1) + gathered,
        activation_bytes=acts + logits,
        strategy=r.parallel.strategy,
        activation_checkpointing=r.parallel.activation_checkpointing,
        checkpoint_every=r.parallel.checkpoint_every,
        logit_bytes=logits,
        fused_loss=fused,
        loss_chunked=chunked,
        ddp_graph=ddp_graph,
    )


def resolved_precision(r: RunConfig, device_type: str) -> str:
    """``runconfig.precision`` on this device: bf16 or fp32 (auto: bf16 on CUDA)."""
    if r.precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return r.precision


def planned_device(r: RunConfig) -> tuple[str, str]:
    """(device type, why) a run of ``runconfig`` would use on this machine."""
    if r.device != "auto":
        return r.device, "runconfig.device"
    import torch

    if torch.cuda.is_available():
        return "cuda", "runconfig.device auto, a GPU is here"
    return "cpu", ("runconfig.device auto and no GPU here; --set runconfig.device=cuda plans "
                   "for a GPU")


def config_notes(cfg: Config, device_type: str) -> list[str]:
    """Settings that are valid but have no effect in this combination (said, not refused)."""
    r, notes = cfg.runconfig, []
    fused = uses_fused_loss(r.kernels, device_type)
    if r.kernels.loss_chunk and not fused:
        notes.append(f"runconfig.kernels.loss_chunk={r.kernels.loss_chunk} has no effect: the loss is the "
                     "standard one here (runconfig.kernels.loss=fused to use it)")
    if r.kernels.mlp_kernel == "fused" and (cfg.model.mlp not in ("gelu", "gelu_tanh")
                                    or not cfg.model.bias):
        notes.append(f"runconfig.kernels.mlp_kernel=fused has no effect: it fuses bias + GELU, and "
                     f"this model has mlp={cfg.model.mlp}, bias={cfg.model.bias}")
    elif r.kernels.mlp_kernel == "fused" and r.parallel.float8 != "off":
        notes.append("runconfig.kernels.mlp_kernel=fused has no effect with runconfig.parallel.float8: the "
                     "float8 layer adds its bias itself")
    if r.parallel.compile_mode != "default" and not r.parallel.compile:
        notes.append(f"runconfig.parallel.compile_mode={r.parallel.compile_mode} has no effect without "
                     "runconfig.parallel.compile: true")
    if r.kernels.residual_dtype == "bf16" and resolved_precision(r, device_type) != "bf16":
        notes.append("runconfig.kernels.residual_dtype=bf16 has no effect: precision is fp32 here")
    if r.parallel.checkpoint_every != 1 and not r.parallel.activation_checkpointing:
        notes.append(f"runconfig.parallel.checkpoint_every={r.parallel.checkpoint_every} has no effect without "
                     "runconfig.parallel.activation_checkpointing: true")
    if r.parallel.float8 != "off" and not r.parallel.compile:
        notes.append(f"runconfig.parallel.float8={r.parallel.float8} without runconfig.parallel.compile: the scaling "
                     "casts run as separate kernels, usually slower than bf16")
    if r.parallel.ddp_split_graph is False and (not r.parallel.compile or r.parallel.strategy == "fsdp"):
        notes.append("runconfig.parallel.ddp_split_graph=false has no effect: it concerns DDP under "
                     "torch.compile")
    if not r.parallel.fsdp_reshard_after_forward and r.parallel.strategy == "ddp":
        notes.append("runconfig.parallel.fsdp_reshard_after_forward=false has no effect with "
                     "runconfig.parallel.strategy=ddp")
    if r.profile.steps and r.profile.start >= r.max_steps:
        notes.append(f"runconfig.profile.steps has no effect: profile_start={r.profile.start} "
                     f"is not before max_steps={r.max_steps}")
    elif r.profile.steps and device_type != "cuda":
        notes.append("runconfig.profile.steps on a CPU: the trace holds CPU ops only, and the "
                     "kernel table is empty")
    lr = cfg.optimizer.learning_rate
    if isinstance(lr, list) and r.max_steps < (total := sum(seg.steps for seg in lr)):
        from lmfab.train.schedule import LRSchedule

        notes.append(f"runconfig.max_steps={r.max_steps} ends the run inside the learning-rate "
                     f"schedule ({total} steps): the schedule is not shortened, the last step "
                     f"trains at lr {LRSchedule(lr)(r.max_steps - 1):.3g} (its end is "
                     f"{LRSchedule(lr)(total):.3g}); scale optimizer.learning_rate's steps to "
                     "change that")
    return notes


def oom_advice(r: RunConfig, n_params: int, world_size: int, sharded: bool, micro: int,
               step: int) -> str:
    """What to change when a training step runs out of device memory (``sharded``: FSDP2)."""
    per_gpu = 16 * n_params / (world_size if sharded else 1) / 2**30
    tips = []
    if not sharded:
        tips.append("runconfig.parallel.strategy: fsdp (shards that state over the GPUs; needs more "
                    "than one)")
    if not r.parallel.activation_checkpointing:
        tips.append("runconfig.parallel.activation_checkpointing: true")
    if micro > 1:
        tips.append(f"a smaller train_input.micro_batch_size than {micro} (the global batch "
                    "stays, through accumulation)")
    if r.kernels.loss != "standard" and not r.kernels.loss_chunk:
        tips.append("runconfig.kernels.loss_chunk (e.g. 4096) for long sequences")
    return (f"lmfab: out of device memory in training step {step + 1}: {n_params / 1e9:.2f}B "
            f"parameters hold ~{per_gpu:.0f} GiB per device in weights, gradients and AdamW "
            f"state (16 bytes/parameter{', sharded' if sharded else ''}) before activations. "
            f"Try: {'; '.join(tips) or 'more devices'}.")


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}Z{unit}"


def human_bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {suffix}"
        n /= 1024
    return f"{n:.3g} PiB"


def format_plan(plan: RunPlan) -> str:
    rows = [
        ("devices", f"{plan.world_size}"),
        ("global batch", f"{plan.global_batch} sequences x {plan.seq_len} tokens = "
                         f"{plan.tokens_per_step:,} tokens/step"),
        ("per device", f"micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation step(s)"),
        ("strategy", f"{plan.strategy}" + (" (fsdp if AdamW state > half a GPU)"
                                           if plan.strategy == "auto" else "")
         + (", activation checkpointing" if plan.activation_checkpointing else "")
         + (f" (1 block in {plan.checkpoint_every})"
            if plan.activation_checkpointing and plan.checkpoint_every > 1 else "")
         + (f"; DDP: {plan.ddp_graph}" if plan.ddp_graph else "")),
        ("parameters", f"{plan.n_params:,} ({human(plan.n_params)}; "
                       f"{plan.n_params_no_pos:,} without position embeddings)"),
        ("FLOPs/token", f"{human(plan.flops_per_token)} (6N + 12·L·d·T, forward+backward)"),
        ("FLOPs/step", human(plan.flops_per_step)),
        ("memory/device", f"~{human_bytes(plan.memory_bytes)} (estimate: "
                          f"{human_bytes(plan.state_bytes)} weights+grads+AdamW, "
                          f"{human_bytes(plan.activation_bytes)} activations, of which "
                          f"{human_bytes(plan.logit_bytes)} in the "
                          f"{'fused' if plan.fused_loss else 'standard'} loss's logits"
                          f"{' and gradients' if plan.fused_loss and plan.loss_chunked else ''})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
