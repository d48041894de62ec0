"""ALiBi attention as a fused kernel: FlexAttention on CUDA, with its reference beside it.

ALiBi (Press et al. 2022, arXiv 2108.12409) adds a per-head linear bias slope x (j - i) to
the attention scores. :func:`alibi_attention` never materialises a T x T bias: the bias is a
FlexAttention ``score_mod`` fused into the attention kernel, with a causal block mask so
that fully masked tiles are skipped, and kernel options tuned on an H200. CPUs (tests,
small evals) take :func:`alibi_reference` instead: SDPA with an explicit bias, computed for
blocks of 512 queries at a time so memory stays O(512 x T) per head (FlexAttention has no
CPU backward). The slopes come from the model (:func:`lmfab.models.attention.alibi_slopes`).

Shapes: q (B, H, T, Dh); k, v (B, Hkv, T, Dh).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# FlexAttention kernel options for ALiBi on CUDA, tuned on an H200 with
# benchmarks/alibi_attention.py (docs/benchmarks.md): forward tiles 128 x 64, backward
# 64 x 128 / 128 x 64, 8 warps, 3 stages. fwd+bwd at B=4 H=16 D=128: 1.49x causal SDPA at
# T=2048 (defaults 1.68x in the same run) and 1.50x at T=8192.
ALIBI_KERNEL_OPTIONS: dict | None = {
    "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128,
    "BLOCK_N2": 64, "num_warps": 8, "num_stages": 3,
}


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=16)
def _causal_block_mask(T: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


@torch.compiler.disable
def causal_block_mask(T: int, device: torch.device):
    """The causal BlockMask for FlexAttention on CUDA (None elsewhere), built once per length.

    Called by the model once per forward, outside any compiled region (compile would trace
    through the cache and rebuild the mask in every layer), and handed to each layer.
    """
    return _causal_block_mask(T, str(device)) if device.type == "cuda" else None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def alibi_attention(q, k, v, slopes: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    """Causal attention with ALiBi through FlexAttention. q (B,H,T,D), k/v (B,Hkv,T,D);
    ``mask``: :func:`causal_block_mask` of T (built here when not given)."""
    from torch.nn.attention.flex_attention import flex_attention

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cuda":
        mask = mask if mask is not None else causal_block_mask(q.shape[-2], q.device)
        fn = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        return fn(q, k, v, score_mod=alibi, block_mask=mask, scale=scale, enable_gqa=gqa,
                  kernel_options=ALIBI_KERNEL_OPTIONS)
    return alibi_reference(q, k, v, slopes, scale)


def alibi_reference(q, k, v, slopes: torch.Tensor, scale: float, block: int = 512):
    """ALiBi by explicit bias, ``block`` queries at a time (CPU path and test reference)."""
    T = q.shape[-2]
    kv_pos = torch.arange(T, device=q.device)
    out = []
    for start in range(0, T, block):
        q_pos = torch.arange(start, min(start + block, T), device=q.device)
        rel = (kv_pos[None, :] - q_pos[:, None]).to(q.dtype)  # (Tq, T): j - i
        bias = slopes.to(q.dtype)[:, None, None] * rel  # (H, Tq, T)
        bias = bias.masked_fill(rel > 0, float("-inf"))  # causal
        out.append(F.scaled_dot_product_attention(
            q[..., start:start + block, :], k, v, attn_mask=bias, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1]))
    return torch.cat(out, dim=-2)
