"""muP (Maximal Update Parametrization) as Cerebras applies it, derived from the config.

Yang et al. 2022 (Tensor Programs V, arXiv 2203.03466); Cerebras-GPT (arXiv 2304.03208,
Appendix G) and BTLM (arXiv 2309.11568). With width multiplier m = d_model / base_d_model
(and m_ff = d_ff / base_d_ff for matrices whose fan-in is the MLP width):

- output logits x output_mult / m;
- hidden matrices (fan-in grows with width): init std / sqrt(m_in), Adam LR / m_in;
- embeddings, norms and biases: base init, base LR;
- attention scores x 1/d_head (checked at config load).

At m = 1 everything reduces to the standard parametrization with the same fields, which a
test checks exactly. Nothing here is stored on tensors: the model and the optimizer call
these functions with the config, so FSDP, torch.compile and torch.save cannot lose it.
The coordinate check and muTransfer build on this as tools (:mod:`lmfab.tools.coord_check`,
:mod:`lmfab.tools.mutransfer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmfab.config.schema import ModelConfig


@dataclass(frozen=True)
class Multipliers:
    width: float  # m: d_model / base (1.0 without muP)
    ffn: float  # m_ff: d_ff / base d_ff (1.0 without muP)

    @property
    def logits(self) -> float:
        return 1.0 / self.width


def multipliers(cfg: ModelConfig) -> Multipliers:
    if cfg.mup_base_d_model is None:
        return Multipliers(1.0, 1.0)
    m = cfg.d_model / cfg.mup_base_d_model
    if cfg.mup_base_d_ff is not None:
        m_ff = cfg.ffn_dim / cfg.mup_base_d_ff
    else:
        m_ff = m
    return Multipliers(m, m_ff)


def fan_in_multiplier(param_name: str, cfg: ModelConfig) -> float:
    """Width multiplier of a hidden matrix's fan-in (1.0 for non-hidden parameters)."""
    mult = multipliers(cfg)
    if param_name.startswith("blocks.") and param_name.endswith(".weight"):
        if ".mlp.proj." in param_name:  # fan-in is the MLP width
            return mult.ffn
        if ".ln" not in param_name:
            return mult.width
    return 1.0
