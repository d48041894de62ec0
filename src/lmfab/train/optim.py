"""Optimizer construction: AdamW with decoupled weight decay and muP LR multipliers by group.

Matrices of the transformer blocks decay; norms, biases and embeddings do not (the usual
GPT practice; embeddings are a lookup whose rows see sparse gradients, and with tied
embeddings decay would also shrink the output layer). Under muP each hidden matrix's
learning rate is divided by its fan-in width multiplier (:mod:`lmfab.mup`): every group
carries ``lr_mult`` and the loop sets ``lr = schedule(step) * lr_mult``.
"""

from __future__ import annotations

import torch
from torch import nn

from lmfab.config.schema import ModelConfig, OptimizerConfig
from lmfab.mup import fan_in_multiplier


def param_groups(model: nn.Module, weight_decay: float, model_cfg: ModelConfig) -> list[dict]:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and id(p) not in embeddings
        lr_mult = 1.0 / fan_in_multiplier(name, model_cfg) if decay else 1.0
        groups.setdefault((decay, lr_mult), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_mult": lr_mult,
         "name": f"{'decay' if decay else 'no_decay'}@lr*{lr_mult:g}"}
        for (decay, lr_mult), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device,
                    model_cfg: ModelConfig):
    use_fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type == "cuda")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, model_cfg),
        lr=0.0,  # set every step from the schedule
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=use_fused or None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
