"""A preallocated key/value cache for incremental decoding.

Every layer's keys and values live in one (B, Hkv, L, Dh) buffer allocated up front, so a
one-token decode step has the same tensor shapes at every position: it compiles once
(``torch.compile``, CUDA graphs) instead of once per length. Rows of a batch share slot
numbers; a shorter prompt is left-padded, ``pad[b]`` slots, which no real query attends to
(the mask is built in :meth:`lmfab.models.attention.Attention._attend_cached`), and its
positions start at 0 after the padding, so learned and rotary positions are those of the
prompt alone (ALiBi is relative and needs no offset).

``slot`` is a 0-d tensor updated in place, so a compiled step reads it as data rather than
specialising on its value.
"""

from __future__ import annotations

import torch

from lmfab.config.schema import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, length: int, *, device, dtype):
        shape = (batch, cfg.kv_heads, length, cfg.d_head)
        self.length = length
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)

    def reset(self, pad: torch.Tensor | list[int]) -> None:
        """Start a new batch whose rows are left-padded by ``pad`` slots. The buffers keep
        their addresses (a captured CUDA graph stays valid); stale entries beyond the new
        rows' slots are never attended to."""
        self.pad.copy_(torch.as_tensor(pad, dtype=torch.long))
        self.slot.zero_()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """Store k, v (B, Hkv, T, Dh) at ``slots`` (T,); return the layer's whole buffers."""
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        self.slot.add_(n)

    def mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses (CUDA graphs reuse them)."""
        for t in (*self.k, *self.v, self.pad, self.slot):
            torch._dynamo.mark_static_address(t)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
