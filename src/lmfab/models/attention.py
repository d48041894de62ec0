"""Causal self-attention with the position schemes of the model families lmfab trains.

- learned / rope: PyTorch's ``scaled_dot_product_attention`` (flash or cuDNN kernels on
  GPUs). RoPE (Su et al. 2021) rotates the first ``rope_fraction`` of each head's dims
  (GPT-NeoX rotates a quarter), in the "rotate half" layout that GPT-NeoX and LLaMA use.
- alibi (Press et al. 2022, arXiv 2108.12409): a per-head linear bias slope x (j - i) added
  to the scores. It never materialises a T x T bias: the bias is a FlexAttention
  ``score_mod`` fused into the attention kernel, with a causal block mask so that fully
  masked tiles are skipped. CPUs (tests, small evals) take a reference path instead:
  SDPA with an explicit bias, computed for blocks of 512 queries at a time so memory stays
  O(512 x T) per head (FlexAttention has no CPU backward).
- grouped-query attention: ``n_kv_head`` key/value heads shared by groups of query heads.

Shapes: x (B, T, C); q (B, H, T, Dh); k, v (B, Hkv, T, Dh).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from lmfab.config.schema import ModelConfig

# FlexAttention kernel options for ALiBi on CUDA, tuned on an H200 with
# benchmarks/alibi_attention.py (docs/benchmarks.md): forward tiles 128 x 64, backward
# 64 x 128 / 128 x 64, 8 warps, 3 stages. fwd+bwd at B=4 H=16 D=128: 1.49x causal SDPA at
# T=2048 (defaults 1.68x in the same run) and 1.50x at T=8192.
ALIBI_KERNEL_OPTIONS: dict | None = {
    "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128,
    "BLOCK_N2": 64, "num_warps": 8, "num_stages": 3,
}


_SDPA_NAMES = ("cudnn", "flash", "efficient", "math")


def sdpa_priority(name: str, device: torch.device) -> list | None:
    """The SDPA backends, in priority order, for ``runconfig.attention_backend`` ``name`` on
    ``device``; None leaves PyTorch's own order (``torch``, CPUs, ``auto`` off Hopper).

    ``auto`` puts cuDNN first on Hopper (compute capability 9.x) where cuDNN is available: its
    fused attention is 1.5-1.8x the flash backend there (benchmarks/sdpa_backends.py). Every
    other backend stays enabled after the chosen one, so a shape or feature the first does
    not support (dropout, grouped-query attention) falls back instead of failing.
    """
    from torch.nn.attention import SDPBackend

    if name == "torch" or device.type != "cuda":
        return None
    if name == "auto":
        hopper = torch.cuda.get_device_capability(device)[0] == 9
        if not (hopper and torch.backends.cudnn.is_available()):
            return None
        name = "cudnn"
    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name not in table:
        raise ValueError(f"attention backend {name!r}: expected auto, torch or one of {_SDPA_NAMES}")
    return [table[name]] + [table[n] for n in _SDPA_NAMES if n != name]


def set_attention_backend(model: nn.Module, name: str, device: torch.device) -> list | None:
    """Give every :class:`Attention` of ``model`` the SDPA priority of ``name`` (see
    :func:`sdpa_priority`); call before compiling. Returns the priority list."""
    order = sdpa_priority(name, device)
    for module in model.modules():
        if isinstance(module, Attention):
            module.sdpa_backends = order
    return order


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, T, Dh); the rest pass through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


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
    return _alibi_reference(q, k, v, slopes, scale)


def _alibi_reference(q, k, v, slopes: torch.Tensor, scale: float, block: int = 512):
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv, self.d_head = cfg.n_head, cfg.kv_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.d_head, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.scale = 1.0 / self.d_head if cfg.attn_score_scale == "inv_d_head" else self.d_head**-0.5
        self.rot_dims = int(self.d_head * cfg.rope_fraction) if cfg.pos == "rope" else 0
        self.sdpa_backends: list | None = None  # set_attention_backend(); None: PyTorch's order
        if cfg.pos == "alibi":
            # A buffer (not a parameter): derived from n_head, rebuilt by init_weights().
            self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)

    def reset_buffers(self) -> None:
        if self.cfg.pos == "alibi":
            self.slopes.copy_(alibi_slopes(self.cfg.n_head))

    def forward(self, x: torch.Tensor, block_mask=None) -> torch.Tensor:
        """x (B, T, C); ``block_mask``: the ALiBi path's causal BlockMask (see GPT)."""
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
            with sdpa_kernel(self.sdpa_backends, set_priority=True):
                y = self._sdpa(q, k, v)
        else:
            y = self._sdpa(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _sdpa(self, q, k, v) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1],
            dropout_p=self.cfg.dropout if self.training else 0.0,
        )  # (B, H, T, Dh)
