"""Fold lmfab's multipliers into the weights: the same function with standard parametrization.

lmfab models may scale three things at run time that standard architectures (Hugging Face
GPT-2 / Llama / GPT-NeoX, llama.cpp) do not have fields for:

- ``embedding_mult`` e: the input embeddings (token + learned position) times e;
- the logit scale s = ``output_mult`` x muP's 1/m (m = d_model / ``mup_base_d_model``,
  :mod:`lmfab.models.mup`): the logits times s;
- ``attn_score_scale: inv_d_head``: attention scores q.k / d_head instead of q.k / sqrt(d_head).

:func:`fold_state_dict` rewrites an lmfab state dict so that a model built from
:func:`folded_config` (the same config with e = 1, s = 1, scores / sqrt(d_head)) computes the
same logits, exactly in real arithmetic and to fp32 rounding in practice:

- token and position embeddings x e (the residual stream then starts as before);
- a tied head would also be scaled by e, so the final norm's weight and bias are scaled by
  s / e (an untied head: by s). The final norm's output is affine in its weight and bias,
  and the head is linear, so logits = ln_f(h) W^T s = (ln_f scaled) (e W)^T. **The head
  stays tied**: no second vocabulary matrix, in the file or in memory;
- the query rows of each attention's fused ``qkv`` weight (and bias) x sqrt(d_head) / d_head
  = 1/sqrt(d_head): scores (q'.k) / sqrt(d_head) = (q.k) / d_head. RoPE is a rotation per
  position, linear in q, and ALiBi's bias is added after the scaled product, so both commute
  with the factor.

Names, shapes and layout stay lmfab's (``wte.weight``, ``blocks.0.attn.qkv.weight`` = [q | k |
v] rows, ``blocks.0.mlp.fc.weight`` = [gate | up] rows for SwiGLU, ...): each exporter renames
and permutes afterwards. The result is fp32 (cast to the file's dtype at the very end, so
the folding itself is not rounded twice). Pure function, no I/O::

    from lmfab.export.fold import fold_state_dict, folded_config
    sd = fold_state_dict(model.state_dict(), cfg.model)
    plain = folded_config(cfg.model)   # build_model(plain) + load_state_dict(sd): same logits
"""

from __future__ import annotations

import dataclasses
import math

import torch

from lmfab.config.schema import ModelConfig
from lmfab.models.mup import multipliers


def logit_scale(cfg: ModelConfig) -> float:
    """The factor lmfab multiplies the logits by: output_mult / m (m: muP width multiplier)."""
    return cfg.output_mult * multipliers(cfg).logits


def folded_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the multipliers that :func:`fold_state_dict` moves into the weights reset:
    embedding_mult 1, output_mult 1, no muP width scaling, scores / sqrt(d_head)."""
    return dataclasses.replace(cfg, embedding_mult=1.0, output_mult=1.0,
                               attn_score_scale="rsqrt_d_head", mup_base_d_model=None,
                               mup_base_d_ff=None)


def is_folded(cfg: ModelConfig) -> bool:
    """True when folding changes nothing (a standard-parametrization model)."""
    return (cfg.embedding_mult == 1.0 and logit_scale(cfg) == 1.0
            and cfg.attn_score_scale == "rsqrt_d_head")


def fold_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A new fp32 state dict (lmfab names) for :func:`folded_config` ``(cfg)``; see the module
    docstring for what changes. ``state`` is not modified. Buffers that are not weights (none
    are saved by lmfab today) pass through."""
    out = {k: v.detach().to(torch.float32).clone() for k, v in state.items()}
    e, s = float(cfg.embedding_mult), logit_scale(cfg)
    if e != 1.0:
        out["wte.weight"] *= e
        if "wpe.weight" in out:
            out["wpe.weight"] *= e
    norm_scale = s / e if cfg.tied_embeddings else s
    if norm_scale != 1.0:
        out["ln_f.weight"] *= norm_scale
        if "ln_f.bias" in out:
            out["ln_f.bias"] *= norm_scale
    if cfg.attn_score_scale == "inv_d_head":
        q_rows = cfg.n_head * cfg.d_head
        factor = 1.0 / math.sqrt(cfg.d_head)  # (1/d) / (1/sqrt(d))
        for i in range(cfg.n_layer):
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.attn.qkv.{kind}"
                if key in out:
                    out[key][:q_rows] *= factor
    return out
