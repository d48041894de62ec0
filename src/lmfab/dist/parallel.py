"""parallelize(): apply activation checkpointing, compile and data parallelism from outside.

Order (DESIGN.md, as torchtitan): activation checkpointing -> torch.compile -> DDP or FSDP2.

- Activation checkpointing wraps each transformer block (torch's ``checkpoint_wrapper``,
  non-reentrant): its activations are recomputed in backward, so memory per layer is one
  (B, T, C) tensor and long sequences fit. State-dict keys are unchanged.
- Compile happens in place (``Module.compile``): the whole model under DDP, each block
  under FSDP2 (so the collectives stay outside the compiled graphs). Parameter names and
  the module object the loop saves do not change.
- DDP replicates; FSDP2 (``fully_shard``) shards parameters, gradients and optimizer state
  per block, with bf16 parameters and fp32 gradient reduction on GPUs.

The module returned is what the loop calls; the model object itself is what checkpoints
save (FSDP2 turns it into a sharded module in place).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lmfab.config.load import ConfigError
from lmfab.config.schema import RunConfig
from lmfab.dist.world import World
from lmfab.models.attention import set_attention_backend


def resolve_strategy(run: RunConfig, world: World, n_params: int) -> str:
    """ddp or fsdp (``auto``: fsdp when AdamW training state would fill half the GPU)."""
    if run.strategy != "auto":
        return run.strategy
    if world.device.type == "cuda":
        total = torch.cuda.get_device_properties(world.device).total_memory
        if 16 * n_params > 0.5 * total:
            return "fsdp"
    return "ddp"


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def compile_module(module: nn.Module, run: RunConfig) -> None:
    """``torch.compile`` in place with ``runconfig.compile_mode``."""
    if run.compile_mode == "default":
        module.compile()
    elif run.compile_mode == "tuned":
        module.compile(options={"coordinate_descent_tuning": True})
    else:
        module.compile(mode=run.compile_mode)


def parallelize(model: nn.Module, world: World, run: RunConfig, *, bf16: bool = False) -> nn.Module:
    set_attention_backend(model, run.attention_backend, world.device)
    model.fused_loss = run.loss == "fused" or (run.loss == "auto" and world.device.type == "cuda")
    model.loss_chunk = run.loss_chunk
    model.residual_dtype = torch.bfloat16 if bf16 and run.residual_dtype == "bf16" else None
    if run.activation_checkpointing:
        apply_activation_checkpointing(model)
    strategy = resolve_strategy(run, world, sum(p.numel() for p in model.parameters()))
    if strategy == "fsdp" and world.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if run.compile and run.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(
                f"runconfig.compile_mode={run.compile_mode} uses CUDA graphs, which FSDP2's "
                "per-block compile does not support; use default, tuned or "
                "max-autotune-no-cudagraphs with strategy fsdp")

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if bf16 else MixedPrecisionPolicy()
        for block in model.blocks:
            if run.compile:
                compile_module(block, run)
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.lmfab_strategy = "fsdp"
        return model
    if run.compile:
        compile_module(model, run)
    model.lmfab_strategy = "ddp"
    if world.distributed:
        return DDP(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    return model


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
    return getattr(model, "lmfab_strategy", "ddp") == "fsdp"


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
