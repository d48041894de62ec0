"""The one GPT module of lmfab.

Behaviour follows from :class:`lmfab.config.ModelConfig` fields, never from a preset's name.
The fields cover the families lmfab ships presets for: GPT-2 / Cerebras-GPT (learned
positions, LayerNorm, GELU, tied embeddings), GPT-NeoX (rotary on a fraction of each head,
parallel residual, untied), BTLM and Jais (ALiBi, SwiGLU, muP multipliers) and LLaMA-style
models (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases). Attention lives in
:mod:`lmfab.models.attention`; the fused kernels in :mod:`lmfab.kernels`, chosen by the
frozen :class:`~lmfab.models.execution.Kernels` given at construction.

Construction is cheap and allocation-free on the meta device; :meth:`GPT.init_weights`
fills the parameters explicitly: normal(0, init_std), residual output projections scaled by
1/sqrt(2 * n_layer) as in GPT-2, and muP's 1/sqrt(fan-in multiplier) on hidden matrices
(:mod:`lmfab.models.mup`). Model code is written for one device: parallelism is applied from
outside (:mod:`lmfab.dist`). No torch.distributed here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmfab.config.schema import ModelConfig
from lmfab.kernels.alibi import causal_block_mask
from lmfab.kernels.bias_gelu import bias_gelu
from lmfab.kernels.cross_entropy import fused_linear_cross_entropy
from lmfab.models.attention import Attention
from lmfab.models.execution import PLAIN, Kernels
from lmfab.models.mup import fan_in_multiplier, multipliers


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels = PLAIN):
        super().__init__()
        self.kind = cfg.mlp
        d_in = 2 * cfg.ffn_dim if cfg.mlp == "swiglu" else cfg.ffn_dim  # swiglu: [gate | up]
        self.fc = nn.Linear(cfg.d_model, d_in, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        # bias + GELU as one op with its bias gradient (kernels/bias_gelu.py), as
        # Kernels.fused_mlp says. A plain nn.Linear only: float8 swaps fc for torchao's
        # Float8Linear, which then adds the bias itself.
        self.fused_act = kernels.fused_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fused_act and self.kind in ("gelu", "gelu_tanh") and self.fc.bias is not None
                and type(self.fc) is nn.Linear):
            approximate = "tanh" if self.kind == "gelu_tanh" else "none"
            return self.proj(bias_gelu(F.linear(x, self.fc.weight), self.fc.bias, approximate))
        h = self.fc(x)  # (B, T, d_in)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")  # GPT-2's gelu_new
        else:
            h = F.relu(h)
        return self.proj(h)


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels = PLAIN):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln_1, self.attn = _norm(cfg), Attention(cfg, kernels)
        self.ln_2, self.mlp = _norm(cfg), MLP(cfg, kernels)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, block_mask=None, kv=None) -> torch.Tensor:
        if self.parallel:
            return (x + self.drop(self.attn(self.ln_1(x), block_mask, kv))
                    + self.drop(self.mlp(self.ln_2(x))))
        x = x + self.drop(self.attn(self.ln_1(x), block_mask, kv))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels = PLAIN):
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Only learned positions have a table; alibi and rope act inside attention.
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_layer))
        self.ln_f = _norm(cfg)
        # Tied: logits use wte.weight directly, so there is no second tensor to keep tied
        # through meta-device construction, to_empty(), DDP/FSDP or safetensors.
        self.lm_head = (
            None if cfg.tied_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        self.logit_scale = cfg.output_mult * multipliers(cfg).logits

    # ---- initialisation -------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, fill=None) -> None:
        """Fill every parameter. Call after ``to_empty(device=...)`` on a meta-built model.

        ``fill(param, fn)`` applies an in-place initialiser ``fn`` to a parameter; the default
        calls it directly. A sharded model passes one that runs ``fn`` on the full tensor and
        keeps its shard (``lmfab.dist.parallel.sharded_fill``), so weights do not depend on
        the number of devices.
        """
        fill = fill or (lambda p, fn: fn(p))
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim == 1:  # norm weights and biases
                value = 1.0 if name.endswith("weight") else 0.0
                fill(p, lambda t, value=value: t.fill_(value))
                continue
            s = std / math.sqrt(fan_in_multiplier(name, self.cfg))
            if name.endswith("proj.weight"):  # residual-branch outputs
                s /= math.sqrt(2 * self.cfg.n_layer)
            fill(p, lambda t, s=s: t.normal_(0.0, s, generator=generator))
        for block in self.blocks:
            block.attn.reset_buffers()

    # ---- forward ----------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d_model) final-normed hidden states.

        ``cache``: a key/value cache (:class:`lmfab.infer.cache.KVCache`) when decoding
        incrementally: ``idx`` are the tokens after those already cached, placed from
        ``cache.slot`` on; each row's positions start after its left padding
        (``cache.pad``). The cache's slot advances by T.
        """
        if cache is not None:
            return self._hidden_states_cached(idx, cache)
        T = idx.shape[1]
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            if T > self.cfg.max_seq_len:
                raise ValueError(
                    f"sequence length {T} > model.max_seq_len={self.cfg.max_seq_len} "
                    "(learned positions end there)"
                )
            x = x + self.wpe(torch.arange(T, device=idx.device))
        if self.cfg.embedding_mult != 1.0:
            x = x * self.cfg.embedding_mult
        x = self.drop(x)
        if self.kernels.residual_dtype is not None:
            x = x.to(self.kernels.residual_dtype)
        mask = causal_block_mask(T, idx.device) if self.cfg.pos == "alibi" else None
        for block in self.blocks:
            x = block(x, mask) if mask is not None else block(x)
        return self.ln_f(x)

    def _hidden_states_cached(self, idx: torch.Tensor, cache) -> torch.Tensor:
        T = idx.shape[1]
        slots = cache.slot + torch.arange(T, device=idx.device)  # (T,)
        positions = (slots[None, :] - cache.pad[:, None]).clamp_min(0)  # (B, T)
        x = self.wte(idx)
        if self.wpe is not None:  # the caller keeps positions below max_seq_len
            x = x + self.wpe(positions)
        if self.cfg.embedding_mult != 1.0:
            x = x * self.cfg.embedding_mult
        if self.kernels.residual_dtype is not None:
            x = x.to(self.kernels.residual_dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, None, (cache, i, positions))
        cache.advance(T)
        return self.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # an untied head through its module, so that a quantized replacement runs its own
        # forward (lmfab.infer.quantize); the same F.linear for a plain nn.Linear
        out = F.linear(h, self.wte.weight) if self.lm_head is None else self.lm_head(h)
        return out * self.logit_scale if self.logit_scale != 1.0 else out

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or the mean next-token cross-entropy when ``targets`` is given."""
        h = self.hidden_states(idx)
        if targets is not None and self.kernels.fused_loss:
            w = self.wte.weight if self.lm_head is None else self.lm_head.weight
            return fused_linear_cross_entropy(h.flatten(0, 1), w, targets.flatten(),
                                              scale=self.logit_scale,
                                              chunk=self.kernels.loss_chunk)
        logits = self.logits(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    # ---- accounting -------------------------------------------------------------------
    def num_params(self, *, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * d_model * T.

        N counts the parameters that take part in matmuls: position embeddings and an untied
        input embedding are lookups and are left out; tied embeddings count once, as the
        output projection. The attention term counts QK^T and AV over the full (not
        causal-halved) T x T, as in Kaplan et al. 2020 and PaLM's MFU.
        """
        c = self.cfg
        n = self.num_params(exclude_positions=True)
        if self.lm_head is not None:
            n -= self.wte.weight.numel()
        return 6.0 * n + 12.0 * c.n_layer * c.d_model * seq_len


def build_model(cfg: ModelConfig, device: str | torch.device = "meta", *,
                kernels: Kernels = PLAIN) -> GPT:
    """Build on the meta device (no memory); ``materialize`` allocates and initialises.
    ``kernels``: the execution choices (:mod:`lmfab.models.execution`; default plain PyTorch)."""
    with torch.device(device):
        return GPT(cfg, kernels)


def materialize(
    model: GPT, device: str | torch.device, *, seed: int = 0, dtype: torch.dtype | None = None
) -> GPT:
    """Allocate a meta-built model on ``device`` and initialise it reproducibly from ``seed``.

    Every rank of a distributed run draws the same weights (same seed, same device type);
    DDP also broadcasts rank 0's parameters at wrap time.
    """
    device = torch.device(device)
    model.to_empty(device=device)
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model if dtype is None else model.to(dtype=dtype)
