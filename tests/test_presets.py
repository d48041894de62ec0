"""Model presets: each builds on the meta device with its published size and FLOPs count;
tiny versions of every architecture option train on CPU with falling loss."""

from __future__ import annotations

import pytest
import torch

from lmfab.config import ModelConfig, OptimizerConfig
from lmfab.config.check import check_config
from lmfab.config.load import _to_dataclass, list_presets, resolve_model_preset
from lmfab.models import build_model, materialize
from lmfab.train.optim import build_optimizer, set_lr

# Published sizes and the unit of their last digit ("2.7B" is 2.7e9 +- 0.05e9).
PUBLISHED = {
    "cerebras-gpt-111m": (111e6, 1e6), "cerebras-gpt-256m": (256e6, 1e6),
    "cerebras-gpt-590m": (590e6, 1e6), "cerebras-gpt-1.3b": (1.3e9, 0.1e9),
    "cerebras-gpt-2.7b": (2.7e9, 0.1e9), "cerebras-gpt-6.7b": (6.7e9, 0.1e9),
    "cerebras-gpt-13b": (13e9, 1e9), "gpt3-xl-1.3b": (1.3e9, 0.1e9),
    "gpt-neox-20b": (20_554_567_680, 1), "btlm-3b-8k": (2.6e9, 0.1e9),
    "jais-13b": (13e9, 1e9), "llama-1b": (1_100_048_384, 1),
    "llama-110m": (110e6, 1e6),
}


def preset(name: str, **overrides) -> ModelConfig:
    return _to_dataclass(resolve_model_preset({"preset": name, **overrides}), ModelConfig, "model")


def test_every_family_has_a_preset():
    names = set(list_presets())
    assert set(PUBLISHED) <= names
    assert {f"{n}-mup" for n in PUBLISHED if n.startswith("cerebras")} <= names


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    published, unit = PUBLISHED[name]
    n = build_model(preset(name)).num_params()
    assert abs(n - published) <= max(0.01 * published, unit / 2), (name, n, published)
    mup = f"{name}-mup"
    if mup in list_presets():
        assert build_model(preset(mup)).num_params() == n


def _independent_flops(c: ModelConfig, T: int) -> float:
    """Matmul FLOPs per token, forward + backward (x3), from the shapes alone."""
    dh, kv = c.d_model // c.n_head, c.n_kv_head or c.n_head
    ff_in = 2 * c.ffn_dim if c.mlp == "swiglu" else c.ffn_dim
    per_layer = (c.d_model * (c.n_head + 2 * kv) * dh + c.d_model * c.d_model
                 + c.d_model * ff_in + c.ffn_dim * c.d_model)
    attention = 2 * c.n_head * dh * T  # QK^T and AV, multiply-adds per token
    head = c.d_model * c.vocab_size
    return 3 * 2 * (c.n_layer * (per_layer + attention) + head)


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_preset_builds_and_flops_match_independent_count(name):
    cfg = preset(name)
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    vector_params = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    T = cfg.max_seq_len
    assert model.flops_per_token(T) - 6 * vector_params == pytest.approx(
        _independent_flops(cfg, T), rel=1e-9)


TINY = ["tiny-learned", "tiny-alibi-swiglu", "tiny-llama", "tiny-neox"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_architectures_train_with_falling_loss(name):
    torch.manual_seed(0)
    cfg = preset(name)
    model = materialize(build_model(cfg), "cpu", seed=0)
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.0), torch.device("cpu"), cfg)
    set_lr(opt, 3e-3)
    # A learnable stream: repeated random phrases.
    phrases = torch.randint(0, cfg.vocab_size, (8, 8))
    data = phrases[torch.randint(0, 8, (64,))].flatten()
    losses = []
    for _ in range(30):
        i = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[j:j + 33] for j in i])
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, (name, losses[0], losses[-5:])


def test_alibi_model_trained_short_evaluates_longer():
    """ALiBi extrapolation: train at T=32, evaluate at T=128 (4x) with no position table."""
    torch.manual_seed(0)
    cfg = preset("tiny-alibi-swiglu", max_seq_len=32)
    model = materialize(build_model(cfg), "cpu", seed=0)
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.0), torch.device("cpu"), cfg)
    set_lr(opt, 3e-3)
    period = torch.randint(0, cfg.vocab_size, (16,))
    data = period.repeat(64)  # a periodic stream: predictable from local context
    for _ in range(60):
        i = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[j:j + 33] for j in i])
        model(batch[:, :-1], batch[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        short = model(data[None, :32], data[None, 1:33]).item()
        long = model(data[None, :128], data[None, 1:129]).item()
    assert long < short * 1.5 + 0.1, (short, long)
    assert long < 2.0  # far below ln(512) = 6.2: it predicts at 4x the trained length


def test_rope_is_relative():
    """RoPE preserves norms and makes q.k depend on the position difference only."""
    from lmfab.models.attention import apply_rope, rope_tables

    cos, sin = rope_tables(16, 16, 10000.0, "cpu", torch.float32)
    q = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))
    # The same q and k vectors at every position: <R_m q, R_(m+1) k> is constant in m.
    k = torch.randn(1, 2, 1, 16).expand(1, 2, 16, 16)
    qq = torch.randn(1, 2, 1, 16).expand(1, 2, 16, 16)
    s = (apply_rope(qq, cos, sin)[..., :-1, :] * apply_rope(k, cos, sin)[..., 1:, :]).sum(-1)
    torch.testing.assert_close(s, s[..., :1].expand_as(s), atol=1e-5, rtol=1e-5)


def test_alibi_reference_blocks_agree():
    from lmfab.kernels.alibi import alibi_reference as _alibi_reference
    from lmfab.models.attention import alibi_slopes

    q, k, v = (torch.randn(2, 4, 40, 8) for _ in range(3))
    slopes = alibi_slopes(4)
    whole = _alibi_reference(q, k, v, slopes, 0.125, block=64)
    torch.testing.assert_close(_alibi_reference(q, k, v, slopes, 0.125, block=7), whole)
    # Against a direct computation.
    i = torch.arange(40)
    bias = slopes[:, None, None] * (i[None, :] - i[:, None]).float()
    scores = (q @ k.transpose(-1, -2)) * 0.125 + bias
    scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
    torch.testing.assert_close(whole, scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)
    assert alibi_slopes(8).tolist() == [2 ** -(i + 1) for i in range(8)]


def test_bad_model_combinations_fail_at_load():
    from lmfab.config import ConfigError, load_config

    from .conftest import CONFIGS

    tiny = CONFIGS / "train" / "tiny.yaml"
    with pytest.raises(ConfigError, match="n_kv_head=3 must divide"):
        load_config(tiny, ["model.n_kv_head=3"])
    with pytest.raises(ConfigError, match="muP .* needs inv_d_head"):
        load_config(tiny, ["model.mup_base_d_model=64"])
    with pytest.raises(ConfigError, match="unknown preset 'cerebras-gpt-111'"):
        load_config(tiny, ["model.preset=cerebras-gpt-111"])
    cfg = load_config(tiny, ["model.preset=tiny-llama"])
    assert cfg.model.n_kv_head == 2 and cfg.model.bias is False  # from the preset
    assert cfg.model.n_layer == 4 and cfg.model.pos == "learned"  # the params file wins
    check_config(cfg)
