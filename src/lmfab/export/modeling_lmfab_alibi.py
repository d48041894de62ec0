"""GPT with ALiBi attention for transformers: the modeling code lmfab bundles in an export.

transformers has no class for ALiBi with SwiGLU (BTLM, Jais), so ``lmfab export hf`` copies
this file into the exported folder and names it in ``config.json``'s ``auto_map``; the
model then loads with::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

as the published BTLM and Jais checkpoints do. The file is self-contained (torch and
transformers only; it never imports lmfab) and computes exactly what lmfab's GPT computes
for ``pos: alibi``: ALiBi slopes 2^(-8 i / n) per head (the closest power of two's plus
every other slope of the next one for other head counts), LayerNorm or RMSNorm, GELU /
GELU-tanh / ReLU / SwiGLU ([gate | up] rows of one ``fc``) MLPs, serial or parallel
residual, grouped-query attention, optional biases, tied or untied head. The multipliers
of muP are folded into the weights before export, so none appear here.

No KV cache: each generated token runs the whole sequence again (fine for the small models
it is meant for; quadratic in length). Prompts in a batch must be of equal length (no
padding mask): a padded batch is refused rather than silently shifted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class LmfabAlibiConfig(PretrainedConfig):
    model_type = "lmfab_alibi"

    def __init__(self, vocab_size: int = 50257, hidden_size: int = 768,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12,
                 num_key_value_heads: int | None = None, intermediate_size: int = 3072,
                 max_position_embeddings: int = 2048, mlp: str = "swiglu",
                 norm: str = "layernorm", norm_eps: float = 1e-5,
                 parallel_residual: bool = False, bias: bool = True,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = True, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.mlp, self.norm, self.norm_eps = mlp, norm, norm_eps
        self.parallel_residual, self.bias = parallel_residual, bias
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def alibi_slopes(n_head: int) -> torch.Tensor:
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_two(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def _norm(c: LmfabAlibiConfig) -> nn.Module:
    if c.norm == "rmsnorm":
        return nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
    return nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.bias)


class Attention(nn.Module):
    def __init__(self, c: LmfabAlibiConfig):
        super().__init__()
        self.h, self.kv = c.num_attention_heads, c.num_key_value_heads
        self.dh = c.hidden_size // c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, (self.h + 2 * self.kv) * self.dh, bias=c.bias)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([self.h * self.dh, self.kv * self.dh, self.kv * self.dh], -1)
        q = q.view(B, T, self.h, self.dh).transpose(1, 2)
        k = k.view(B, T, self.kv, self.dh).transpose(1, 2)
        v = v.view(B, T, self.kv, self.dh).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           scale=self.dh**-0.5, enable_gqa=self.h != self.kv)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: LmfabAlibiConfig):
        super().__init__()
        self.kind = c.mlp
        d_in = 2 * c.intermediate_size if c.mlp == "swiglu" else c.intermediate_size
        self.fc = nn.Linear(c.hidden_size, d_in, bias=c.bias)
        self.proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, c: LmfabAlibiConfig):
        super().__init__()
        self.parallel = c.parallel_residual
        self.ln_1, self.attn, self.ln_2, self.mlp = _norm(c), Attention(c), _norm(c), MLP(c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return x + self.attn(self.ln_1(x), bias) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


class LmfabAlibiForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LmfabAlibiConfig
    base_model_prefix = "lmfab"
    _no_split_modules = ["Block"]
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: LmfabAlibiConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = _norm(config)
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.wte = value

    def alibi_bias(self, T: int, device) -> torch.Tensor:
        """(H, T, T): slope x (j - i) for j <= i, -inf above the diagonal."""
        pos = torch.arange(T, device=device)
        rel = (pos[None, :] - pos[:, None]).float()
        bias = alibi_slopes(self.config.num_attention_heads).to(device)[:, None, None] * rel
        return bias.masked_fill(rel > 0, float("-inf"))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("this model has no padding mask: give prompts of equal length")
        T = input_ids.shape[1]
        x = self.wte(input_ids)
        bias = self.alibi_bias(T, x.device)
        for block in self.blocks:
            x = block(x, bias)
        h = self.ln_f(x)
        logits = F.linear(h, self.wte.weight if self.lm_head is None else self.lm_head.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}


LmfabAlibiConfig.register_for_auto_class()
LmfabAlibiForCausalLM.register_for_auto_class("AutoModelForCausalLM")
