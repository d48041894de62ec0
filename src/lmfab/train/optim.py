"""Optimizer construction: AdamW with decoupled weight decay and muP LR multipliers by group.

Matrices of the transformer blocks decay; norms, biases and embeddings do not (the usual
GPT practice; embeddings are a lookup whose rows see sparse gradients, and with tied
embeddings decay would also shrink the output layer). Under muP each hidden matrix's
learning rate is divided by its fan-in width multiplier (:mod:`lmfab.models.mup`): every group
carries ``lr_mult`` and the loop sets ``lr = schedule(step) * lr_mult``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmfab.config.schema import ModelConfig, OptimizerConfig
from lmfab.models.mup import fan_in_multiplier


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
    """Each group's learning rate: the schedule's value times the group's muP multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                  max_norm: float | None, check=None) -> torch.Tensor:
    """Clip the gradients' global L2 norm to ``max_norm`` (None: no clipping), step the
    optimizer, and return the norm before clipping (a DTensor under FSDP2). ``check(norm)``,
    if given, runs first: when it returns False the update is not applied (a non-finite step,
    :mod:`lmfab.train.nonfinite`).

    The clip is ``grad *= min(1, max_norm / (norm + 1e-6))``, as ``clip_grad_norm_``. With
    fused AdamW on plain tensors it is folded into the optimizer's own kernel: fused Adam
    divides each gradient by ``optimizer.grad_scale`` as it reads it (the hook AMP's gradient
    scaler uses), so the separate pass that reads and writes every gradient goes. The fused
    kernel then writes the scaled gradient back, so the net saving is smaller than that pass:
    on an H200 at the 1.3B shape 1.0 ms per step (a 2.9 ms multiply gone, Adam's kernel 1.9
    ms longer), at 124M 0.1 ms (dev/LOG.md). DTensor gradients (FSDP2) and unfused
    optimizers clip in place first, as ``clip_grad_norm_`` does.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    if check is not None and not check(norm):
        return norm
    if max_norm is not None and grads:
        fold = (optimizer.defaults.get("fused")
                and not any(isinstance(g, DTensor) for g in grads))
        if fold:
            optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = None
    return norm
