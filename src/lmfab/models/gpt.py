"""The one GPT module of lmfab.

Behaviour follows from :class:`lmfab.config.ModelConfig` fields, never from a preset's name.
This version implements the Cerebras-GPT / GPT-2 architecture (Radford et al. 2019;
Dey et al. 2023, arXiv 2304.03208): learned absolute positions, pre-LayerNorm blocks, GELU
MLP, tied input/output embeddings, causal attention through PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels where available).

Construction is cheap and allocation-free on the meta device; :meth:`GPT.init_weights`
fills the parameters explicitly (normal(0, init_std); residual output projections scaled by
1/sqrt(2 * n_layer) as in GPT-2). Model code is written for one device: parallelism is
applied from outside (:mod:`lmfab.dist`). No torch.distributed here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmfab.config.schema import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> 3 x (B, H, T, Dh)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's gelu_new


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1, self.attn = _norm(cfg), Attention(cfg)
        self.ln_2, self.mlp = _norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _norm(cfg)
        # Tied: logits use wte.weight directly, so there is no second tensor to keep tied
        # through meta-device construction, to_empty(), DDP/FSDP or safetensors.
        self.lm_head = (
            None if cfg.tied_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )

    # ---- initialisation -------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fill every parameter. Call after ``to_empty(device=...)`` on a meta-built model."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.ndim == 1:  # norm weights and biases
                if name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            elif name.endswith("proj.weight"):  # residual-branch outputs
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    # ---- forward ----------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d_model) final-normed hidden states."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} > model.max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)  # (B, T, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or the mean next-token cross-entropy when ``targets`` is given."""
        logits = self.logits(self.hidden_states(idx))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    # ---- accounting -------------------------------------------------------------------
    def num_params(self, *, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_positions else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * d_model * T.

        N excludes position embeddings (they are a lookup, not a matmul); tied embeddings
        count once, as the output projection. The attention term counts QK^T and AV over the
        full (not causal-halved) T x T, as in Kaplan et al. 2020 and PaLM's MFU.
        """
        c = self.cfg
        return 6.0 * self.num_params(exclude_positions=True) + 12.0 * c.n_layer * c.d_model * seq_len


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> GPT:
    """Build on the meta device (no memory); ``materialize`` allocates and initialises."""
    with torch.device(device):
        return GPT(cfg)


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
