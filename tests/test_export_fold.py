"""Folding muP multipliers into the weights keeps the logits (lmfab.export.fold)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmfab.export.fold import fold_state_dict, folded_config, is_folded
from lmfab.models.gpt import build_model, materialize
from lmfab.tools.modelzoo import load_model_config

from .conftest import CONFIGS


def _preset(name: str, **changes):
    cfg = load_model_config(str(CONFIGS / "models" / f"{name}.yaml"), [])
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("cfg", [
    _preset("tiny-alibi-swiglu"),  # tied, embeddings x14.6, logits x2.22/2, scores / d_head
    _preset("tiny-learned", embedding_mult=10.0, output_mult=1.5, attn_score_scale="inv_d_head",
            mup_base_d_model=16),
    _preset("tiny-llama", embedding_mult=3.0, output_mult=0.7, attn_score_scale="inv_d_head",
            mup_base_d_model=32),  # untied, no biases, GQA
], ids=["alibi-swiglu", "learned-mup", "llama-mup"])
def test_folded_model_gives_the_same_logits(cfg):
    torch.manual_seed(0)
    model = materialize(build_model(cfg), "cpu", seed=1).eval()
    plain = folded_config(cfg)
    assert not is_folded(cfg) and is_folded(plain)
    folded = materialize(build_model(plain), "cpu").eval()
    folded.load_state_dict(fold_state_dict(model.state_dict(), cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want, got = model(ids), folded(ids)
    assert want.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # a tied model stays tied: folding adds no head matrix
    assert ("lm_head.weight" in folded.state_dict()) == (not cfg.tied_embeddings)
