"""Held-out loss and perplexity over packed token shards, on 1 or N devices.

Every rank evaluates a disjoint slice of the same consecutive batches; the summed losses
and token counts are reduced, so the figure does not depend on the device count.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmfab.data.loader import TokenDataset, iterate_eval
from lmfab.dist.world import World


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: TokenDataset,
    *,
    batch_size: int,
    micro_batch: int,
    max_batches: int | None,
    world: World,
    autocast: AbstractContextManager,
) -> dict:
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=world.device)  # (loss sum, tokens)
    for rows in iterate_eval(
        dataset, batch=batch_size, max_batches=max_batches, rank=world.rank,
        world_size=world.world_size,
    ):
        tokens = torch.from_numpy(rows).to(world.device)
        for mb in tokens.split(micro_batch):
            x, y = mb[:, :-1], mb[:, 1:]
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            total[0] += loss.double()
            total[1] += y.numel()
    if world.distributed:
        dist.all_reduce(total)
    model.train(was_training)
    loss_sum, n_tokens = total.tolist()
    if n_tokens == 0:
        raise ValueError(
            f"evaluation saw no tokens: the split has {len(dataset)} windows, "
            f"fewer than eval_input.batch_size={batch_size}"
        )
    loss = loss_sum / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(n_tokens)}
