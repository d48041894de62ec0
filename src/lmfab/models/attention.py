"""Causal self-attention with the position schemes of the model families lmfab trains.

- learned / rope: PyTorch's ``scaled_dot_product_attention`` (flash or cuDNN kernels on
  GPUs). RoPE (Su et al. 2021) rotates the first ``rope_fraction`` of each head's dims
  (GPT-NeoX rotates a quarter), in the "rotate half" layout that GPT-NeoX and LLaMA use.
- alibi (Press et al. 2022, arXiv 2108.12409): a per-head linear bias slope x (j - i) added
  to the scores, computed by :func:`lmfab.kernels.alibi.alibi_attention` (a FlexAttention
  kernel on CUDA, its reference beside it elsewhere); the slopes are the model's, here.
- grouped-query attention: ``n_kv_head`` key/value heads shared by groups of query heads.

Incremental decoding (generation) passes a key/value cache: the new tokens' keys and values
are written into its preallocated (B, Hkv, L, Dh) buffers and the queries attend over the
whole buffer through an explicit mask, so a one-token decode step has the same shapes at
every position and compiles once. The cache (:class:`lmfab.infer.cache.KVCache`) provides
``pad`` (B,) (left-padding slots of each row), ``slot`` (a 0-d tensor: the first slot the
new tokens take) and ``write(layer, k, v, slots) -> (K, V)``. Training never passes one.

Shapes: x (B, T, C); q (B, H, T, Dh); k, v (B, Hkv, T, Dh).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from lmfab.config.schema import ModelConfig
from lmfab.kernels.alibi import alibi_attention
from lmfab.models.execution import PLAIN, Kernels


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head ALiBi slopes: the geometric sequence 2^(-8/n * i), i = 1..n; for a head count
    that is not a power of two, the closest power's slopes plus every other slope of the
    next power (the reference implementation's rule)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_two(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def rope_tables(T: int, rot_dims: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, rot_dims) for positions 0..T-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dims, 2, device=device, dtype=torch.float32) / rot_dims)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, r/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, r)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_at(positions: torch.Tensor, rot_dims: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, rot_dims) for per-row positions (B, T): the values
    :func:`rope_tables` gives for those positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dims, 2, device=positions.device,
                                            dtype=torch.float32) / rot_dims)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, r/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, r)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, T, Dh); the rest pass through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels = PLAIN):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv, self.d_head = cfg.n_head, cfg.kv_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.d_head, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.scale = 1.0 / self.d_head if cfg.attn_score_scale == "inv_d_head" else self.d_head**-0.5
        self.rot_dims = int(self.d_head * cfg.rope_fraction) if cfg.pos == "rope" else 0
        self.sdpa_backends = kernels.sdpa_backends  # None: PyTorch's order
        if cfg.pos == "alibi":
            # A buffer (not a parameter): derived from n_head, rebuilt by init_weights().
            self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)

    def reset_buffers(self) -> None:
        if self.cfg.pos == "alibi":
            self.slopes.copy_(alibi_slopes(self.cfg.n_head))

    def forward(self, x: torch.Tensor, block_mask=None, kv=None) -> torch.Tensor:
        """x (B, T, C); ``block_mask``: the ALiBi path's causal BlockMask (see GPT);
        ``kv``: (cache, layer index, positions (B, T)) when decoding incrementally."""
        if kv is not None:
            return self._forward_cached(x, *kv)
        B, T, C = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv, self.d_head
        q, k, v = self.qkv(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        q = q.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = v.view(B, T, Hkv, Dh).transpose(1, 2)
        if self.rot_dims:
            cos, sin = rope_tables(T, self.rot_dims, self.cfg.rope_theta, x.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cfg.pos == "alibi":
            y = alibi_attention(q, k, v, self.slopes, self.scale, block_mask)
        elif self.sdpa_backends is not None:
            with sdpa_kernel(list(self.sdpa_backends), set_priority=True):
                y = self._sdpa(q, k, v)
        else:
            y = self._sdpa(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _sdpa(self, q, k, v) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1],
            dropout_p=self.cfg.dropout if self.training else 0.0,
        )  # (B, H, T, Dh)

    # ---- incremental decoding ------------------------------------------------------------
    QUERY_BLOCK = 512  # queries per attention call while prefilling: O(512 x L) mask memory

    def _forward_cached(self, x: torch.Tensor, cache, layer: int, positions: torch.Tensor):
        B, T, C = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv, self.d_head
        q, k, v = self.qkv(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        q = q.view(B, T, H, Dh).transpose(1, 2)
        k = k.view(B, T, Hkv, Dh).transpose(1, 2)
        v = v.view(B, T, Hkv, Dh).transpose(1, 2)
        if self.rot_dims:
            cos, sin = rope_at(positions, self.rot_dims, self.cfg.rope_theta, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q_slots = cache.slot + torch.arange(T, device=x.device)  # (T,)
        K, V = cache.write(layer, k, v, q_slots)  # (B, Hkv, L, Dh)
        k_slots = torch.arange(K.shape[2], device=x.device)  # (L,)
        out = []
        for start in range(0, T, self.QUERY_BLOCK):
            qs = q_slots[start:start + self.QUERY_BLOCK]
            out.append(self._attend_cached(q[:, :, start:start + self.QUERY_BLOCK], K, V,
                                           qs, k_slots, cache.pad))
        y = out[0] if len(out) == 1 else torch.cat(out, dim=2)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _attend_cached(self, q, K, V, q_slots, k_slots, pad) -> torch.Tensor:
        """q (B, H, Tq, Dh) at cache slots ``q_slots`` over the whole cache K, V. A query sees
        the keys of its row from the row's first real token up to itself; a padding query
        sees only itself (so nothing is NaN), and no real query sees a padding key."""
        rel = k_slots[None, :] - q_slots[:, None]  # (Tq, L): j - i
        allowed = (rel <= 0) & (k_slots[None, None, :] >= pad[:, None, None])  # (B, Tq, L)
        allowed = (allowed | (rel == 0)).unsqueeze(1)  # (B, 1, Tq, L)
        if self.cfg.pos == "alibi":
            bias = self.slopes.to(q.dtype)[:, None, None] * rel.to(q.dtype)  # (H, Tq, L)
            mask = bias.masked_fill(~allowed, float("-inf"))  # (B, H, Tq, L)
        else:
            mask = allowed
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=self.scale,
                                              enable_gqa=q.shape[1] != K.shape[1])
