"""parallelize(): apply activation checkpointing, compile and data parallelism from outside.

Order (DESIGN.md, as torchtitan): activation checkpointing -> torch.compile -> DDP or FSDP2.

- Activation checkpointing wraps each transformer block (torch's ``checkpoint_wrapper``,
  non-reentrant): its activations are recomputed in backward, so memory per layer is one
  (B, T, C) tensor and long sequences fit. State-dict keys are unchanged.
- Compile happens in place (``Module.compile``): the whole model under DDP, each block
  under FSDP2 (so the collectives stay outside the compiled graphs). Parameter names and
  the module object the loop saves do not change.
- DDP replicates (``runconfig.parallel.ddp_bucket_mb`` per all-reduce; ``ddp_split_graph``: whether
  dynamo cuts the compiled graph at the buckets so the all-reduces overlap backward). FSDP2
  (``fully_shard``) shards parameters, gradients and optimizer state per block, with bf16
  parameters on GPUs (``fsdp_reshard_after_forward``: free each block's gathered parameters
  after forward, or keep them for backward). Both reduce gradients in fp32, or in bf16 with
  ``grad_reduce_dtype: bf16``.

It returns :class:`Parallel`: the module the loop calls and what was chosen. The model object
itself is what checkpoints save (FSDP2 turns it into a sharded module in place). Nothing
here sets attributes on the model: its kernels were chosen when it was built
(:mod:`lmfab.models.execution`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP

from lmfab.config.errors import ConfigError
from lmfab.config.schema import ParallelConfig
from lmfab.dist.world import World


@dataclass(frozen=True)
class Parallel:
    """What :func:`parallelize` built: the module the loop calls and the choices it made."""

    module: nn.Module  # DDP, the FSDP2-sharded model itself, or the (compiled) model
    strategy: str  # ddp or fsdp (ddp on one device: no wrapper)
    compiled: bool
    checkpointed_blocks: int = 0
    float8_layers: int = 0
    split_graph: bool | None = None  # DDP under compile on several devices: cut at buckets


def split_ddp_graph(r: ParallelConfig, grad_accum: int) -> bool:
    """``runconfig.parallel.ddp_split_graph``, with auto resolved: cut the compiled graph at DDP's
    buckets (overlap each all-reduce with backward) only when every micro-batch reduces.
    With accumulation the cut graph runs on every micro-batch and its lost fusion costs more
    than the overlap wins (2 H200s, 1.3B shape, 4 micro-batches: 96.4% scaling cut, 98.3%
    whole; docs/benchmarks.md)."""
    if r.ddp_split_graph == "auto":
        return grad_accum < 2
    return bool(r.ddp_split_graph)


def resolve_strategy(par: ParallelConfig, world: World, n_params: int) -> str:
    """ddp or fsdp (``auto``: fsdp when AdamW training state would fill half the GPU)."""
    if par.strategy != "auto":
        return par.strategy
    if world.device.type == "cuda":
        total = torch.cuda.get_device_properties(world.device).total_memory
        if 16 * n_params > 0.5 * total:
            return "fsdp"
    return "ddp"


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Recompute blocks 0, every, 2*every, ... in backward; returns how many are wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped = 0
    for i, block in enumerate(model.blocks):
        if i % every == 0:
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
            wrapped += 1
    return wrapped


def apply_float8(model: nn.Module, recipe: str, device: torch.device) -> int:
    """Swap the blocks' ``nn.Linear`` layers for torchao's ``Float8Linear`` (fp8 matmuls with
    dynamic scaling, fp32 master weights). Layers whose sizes are not multiples of 16 (the
    fp8 GEMM's rule) stay in bf16. Parameter names and shapes do not change, so checkpoints
    load into a model with or without float8. Returns the number of layers converted."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ConfigError(f"runconfig.parallel.float8={recipe} needs torchao: pip install 'lmfab[fp8]' "
                          f"({e})") from None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"runconfig.parallel.float8={recipe}: {name} has no fp8 tensor cores (compute "
                          "capability 8.9+ needed: H100, H200, L40S, RTX 4090); set float8: off")

    def blocks_only(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and fqn.startswith("blocks.")
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    before = sum(isinstance(m, nn.Linear) for m in model.blocks.modules())
    convert_to_float8_training(model, module_filter_fn=blocks_only,
                               config=Float8LinearConfig.from_recipe_name(recipe))
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.blocks.modules())
    if converted == 0 and before:
        raise ConfigError(f"runconfig.parallel.float8={recipe}: no block linear layer has sizes that are "
                          "multiples of 16; float8 would change nothing")
    return converted


def compile_module(module: nn.Module, par: ParallelConfig) -> None:
    """``torch.compile`` in place with ``runconfig.parallel.compile_mode``."""
    if par.compile_mode == "default":
        module.compile()
    elif par.compile_mode == "tuned":
        module.compile(options={"coordinate_descent_tuning": True})
    else:
        module.compile(mode=par.compile_mode)


def parallelize(model: nn.Module, world: World, par: ParallelConfig, *, bf16: bool = False,
                grad_accum: int = 1) -> Parallel:
    """Wrap ``model`` for training as ``par`` (``runconfig.parallel``) says: float8 layers, activation checkpointing,
    compile, DDP or FSDP2, in that order. The kernels are the model's own, chosen when it
    was built. ``grad_accum``: micro-batches per optimizer step on each device, for
    ``ddp_split_graph: auto``."""
    f8 = apply_float8(model, par.float8, world.device) if par.float8 != "off" else 0
    ac = apply_activation_checkpointing(model, par.checkpoint_every) \
        if par.activation_checkpointing else 0
    strategy = resolve_strategy(par, world, sum(p.numel() for p in model.parameters()))
    if strategy == "fsdp" and world.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if par.compile and par.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(
                f"runconfig.parallel.compile_mode={par.compile_mode} uses CUDA graphs, which FSDP2's "
                "per-block compile does not support; use default, tuned or "
                "max-autotune-no-cudagraphs with strategy fsdp")

        reduce = torch.bfloat16 if par.grad_reduce_dtype == "bf16" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=reduce)
        for block in model.blocks:
            if par.compile:
                compile_module(block, par)
            fully_shard(block, mp_policy=mp, reshard_after_forward=par.fsdp_reshard_after_forward)
        fully_shard(model, mp_policy=mp)  # FSDP2 keeps the root gathered after forward itself
        return Parallel(model, "fsdp", par.compile, ac, f8)
    if par.compile:
        compile_module(model, par)
    if world.distributed:
        # Read by dynamo when it first compiles the forward (lazily, inside DDP's forward):
        # cut the graph at the gradient buckets, or keep it whole. One model per process.
        split = split_ddp_graph(par, grad_accum)
        torch._dynamo.config.optimize_ddp = split
        ddp = DDP(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            bucket_cap_mb=par.ddp_bucket_mb,
        )
        if par.grad_reduce_dtype == "bf16":
            ddp.register_comm_hook(None, bf16_reduce_hook)
        return Parallel(ddp, "ddp", par.compile, ac, f8, split if par.compile else None)
    return Parallel(model, "ddp", par.compile, ac, f8)


def bf16_reduce_hook(group, bucket):
    """DDP comm hook for ``grad_reduce_dtype: bf16``: the bucket's mean all-reduced in bf16
    and written back into the fp32 bucket. Like PyTorch's ``bf16_compress_hook``, which
    refuses backends other than NCCL; this one also runs on gloo (CPU tests)."""
    group = group if group is not None else torch.distributed.group.WORLD
    buffer = bucket.buffer()
    half = buffer.to(torch.bfloat16).div_(group.size())
    fut = torch.distributed.all_reduce(half, group=group, async_op=True).get_future()

    def write_back(done):
        return buffer.copy_(done.value()[0])

    return fut.then(write_back)


@torch.no_grad()
def sharded_fill(param: torch.Tensor, fn) -> None:
    """``init_weights`` fill for FSDP2: run ``fn`` on the full tensor (every rank draws the
    same numbers from the same seed), then keep this rank's shard. Memory: one parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        fn(param)
        return
    full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
    fn(full)
    param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements).to_local())


def is_fsdp(model: nn.Module) -> bool:
    """Sharded by FSDP2 (``fully_shard`` makes the module an ``FSDPModule``)."""
    return isinstance(model, FSDPModule)


def no_sync(wrapped: nn.Module, skip: bool):
    """Context for a micro-batch whose gradients must not be reduced yet (accumulation)."""
    if not skip:
        return contextlib.nullcontext()
    if isinstance(wrapped, DDP):
        return wrapped.no_sync()
    if is_fsdp(wrapped):
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
