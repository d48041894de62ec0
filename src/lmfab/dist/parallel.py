"""parallelize(): apply compile and data parallelism to a single-device model from outside.

Order (DESIGN.md): activation checkpointing -> torch.compile -> DDP (FSDP2 joins later).
The returned module is what the loop calls; the original module stays the one whose
state_dict is saved, so checkpoints carry no wrapper prefixes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lmfab.config.schema import RunConfig
from lmfab.dist.world import World


def parallelize(model: nn.Module, world: World, run: RunConfig) -> nn.Module:
    wrapped: nn.Module = model
    if run.compile:
        wrapped = torch.compile(wrapped)
    if world.distributed:
        wrapped = DDP(
            wrapped,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    return wrapped
