"""Optimizer construction: AdamW with decoupled weight decay by parameter group.

Matrices of the transformer blocks decay; norms, biases and embeddings do not (the usual
GPT practice; embeddings are a lookup whose rows see sparse gradients, and with tied
embeddings decay would also shrink the output layer).
"""

from __future__ import annotations

import torch
from torch import nn

from lmfab.config.schema import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embeddings:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device):
    use_fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type == "cuda")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=0.0,  # set every step from the schedule
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=use_fused or None,
    )
