"""muTransfer: carry a tuned proxy's hyperparameters to a wider target through muP.

Under muP the optimum of the width-independent hyperparameters (peak learning rate, init
std, embedding and output multipliers, weight decay) stays put as the model widens (Yang et
al. 2022; Cerebras-GPT App. G tunes them once at width 256). So the target keeps its own
shape and schedule length, takes the proxy's tuned values, and records the proxy's width as
its muP base; per-layer scaling then follows from the config (:mod:`lmfab.models.mup`).
"""

from __future__ import annotations

import dataclasses

from lmfab.config.check import check_config
from lmfab.config.errors import ConfigError
from lmfab.config.schema import Config, LRSegment
from lmfab.train.schedule import LRSchedule

TRANSFERRED = ("init_std", "embedding_mult", "output_mult")


def _rescale(lr: float | list[LRSegment], factor: float) -> float | list[LRSegment]:
    if isinstance(lr, int | float):
        return lr * factor
    return [dataclasses.replace(s, start=s.start * factor,
                                end=None if s.end is None else s.end * factor) for s in lr]


def transfer(proxy: Config, target: Config) -> tuple[Config, list[str]]:
    """The target config with the proxy's tuned hyperparameters; and a list of changes."""
    p, t = proxy.model, target.model
    base_d = p.mup_base_d_model or p.d_model
    base_ff = p.mup_base_d_ff or (p.ffn_dim if p.mup_base_d_model is None else None)
    model = dataclasses.replace(
        t, **{k: getattr(p, k) for k in TRANSFERRED},
        attn_score_scale="inv_d_head", mup_base_d_model=base_d, mup_base_d_ff=base_ff,
    )
    target_peak = LRSchedule(target.optimizer.learning_rate).peak
    if target_peak <= 0:
        raise ConfigError("target optimizer.learning_rate: a schedule whose peak is 0 cannot be "
                          "rescaled to the proxy's peak")
    factor = LRSchedule(proxy.optimizer.learning_rate).peak / target_peak
    optimizer = dataclasses.replace(
        target.optimizer,
        learning_rate=_rescale(target.optimizer.learning_rate, factor),
        weight_decay=proxy.optimizer.weight_decay,
    )
    out = dataclasses.replace(target, model=model, optimizer=optimizer)
    check_config(out)
    changes = [f"model.{k}: {getattr(t, k)} -> {getattr(model, k)}"
               for k in (*TRANSFERRED, "attn_score_scale", "mup_base_d_model", "mup_base_d_ff")
               if getattr(t, k) != getattr(model, k)]
    changes.append(f"optimizer.learning_rate: peak {LRSchedule(target.optimizer.learning_rate).peak:g}"
                   f" -> {LRSchedule(optimizer.learning_rate).peak:g} (schedule shape kept)")
    if target.optimizer.weight_decay != optimizer.weight_decay:
        changes.append(f"optimizer.weight_decay: {target.optimizer.weight_decay} -> "
                       f"{optimizer.weight_decay}")
    return out, changes
