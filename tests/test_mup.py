"""muP: exact reduction to SP at the base width, the coordinate check, transfer, the CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmfab.cli import main
from lmfab.config import ModelConfig, OptimizerConfig, load_config
from lmfab.config.load import load_model_config
from lmfab.models import build_model, materialize
from lmfab.models.mup import multipliers
from lmfab.tools.coord_check import LAYER_TYPES, coord_check, spread
from lmfab.train.optim import build_optimizer, set_lr

from .conftest import CONFIGS


def _mup_cfg(**kw) -> ModelConfig:
    return load_model_config(CONFIGS / "models" / "cerebras-gpt-111m-mup.yaml",
                             [f"{k}={v}" for k, v in kw.items()])


def _train(cfg: ModelConfig, steps: int = 3) -> torch.nn.Module:
    model = materialize(build_model(cfg), "cpu", seed=0)
    opt = build_optimizer(model, OptimizerConfig(), torch.device("cpu"), cfg)
    set_lr(opt, 6e-3)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model


def test_mup_at_base_width_equals_sp_exactly():
    mup = _mup_cfg(n_layer=2, d_model=256, n_head=4, d_ff=1024, vocab_size=512, max_seq_len=32)
    assert multipliers(mup).width == 1.0
    sp = dataclasses.replace(mup, mup_base_d_model=None, mup_base_d_ff=None)
    a, b = _train(mup), _train(sp)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_mup_scales_init_lr_and_logits_by_width():
    wide = _mup_cfg(n_layer=2, d_model=1024, n_head=16, d_ff=4096, vocab_size=512, max_seq_len=32)
    assert multipliers(wide).width == 4.0 and multipliers(wide).ffn == 4.0
    model = materialize(build_model(wide), "cpu", seed=0)
    assert model.logit_scale == pytest.approx(1.0 / 4.0)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.08 / 2, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.08, rel=0.05)  # embeddings: base
    opt = build_optimizer(model, OptimizerConfig(), torch.device("cpu"), wide)
    set_lr(opt, 1.0)
    by_name = {g["name"]: g["lr"] for g in opt.param_groups}
    assert by_name == {"decay@lr*0.25": 0.25, "no_decay@lr*1": 1.0}


@pytest.mark.slow
def test_coord_check_mup_flat_sp_grows():
    """The coordinate check: widths 128..1024 (8x), 5 steps, the same LR at every width."""
    cfg = _mup_cfg(n_layer=2, vocab_size=1024, max_seq_len=64)
    widths = [128, 256, 512, 1024]
    mup = coord_check(cfg, widths, steps=5, lr=6e-3, mup=True)
    sp = coord_check(cfg, widths, steps=5, lr=6e-3, mup=False)
    for kind in LAYER_TYPES:
        assert spread(mup, kind) <= 1.5, (kind, spread(mup, kind))
    logits_sp = [sp[w]["logits"][-1] for w in widths]
    assert logits_sp[-1] > 2.0 * logits_sp[0], logits_sp
    assert spread(sp, "block") > 5.0
    # At the base width (256) muP and SP are the same model.
    assert mup[256] == sp[256]


def test_transfer_maps_proxy_hyperparameters(tmp_path, capsys):
    tiny = CONFIGS / "train" / "tiny.yaml"
    proxy = tmp_path / "proxy.yaml"
    target = tmp_path / "target.yaml"
    from lmfab.config import write_config

    write_config(load_config(tiny, [
        "model.d_model=128", "model.n_head=2", "model.d_ff=512", "model.init_std=0.08",
        "model.embedding_mult=10.0", "model.attn_score_scale=inv_d_head",
        "optimizer.learning_rate=6e-3", "optimizer.weight_decay=0.05"]), proxy)
    write_config(load_config(tiny, ["model.d_model=512", "model.n_head=8", "model.d_ff=2048"]),
                 target)
    out = tmp_path / "out.yaml"
    assert main(["mup", "transfer", "--proxy", str(proxy), "--target", str(target),
                 "-o", str(out)]) == 0
    cfg = load_config(out)
    assert cfg.model.d_model == 512 and cfg.model.mup_base_d_model == 128
    assert multipliers(cfg.model).width == 4.0
    assert cfg.model.init_std == 0.08 and cfg.model.embedding_mult == 10.0
    assert max(s.end for s in cfg.optimizer.learning_rate) == pytest.approx(6e-3)
    assert cfg.optimizer.learning_rate[-1].steps == 450  # the target's schedule length
    assert cfg.optimizer.weight_decay == 0.05
    assert "mup_base_d_model: None -> 128" in capsys.readouterr().out


def test_coord_check_cli_writes_table_and_png(tmp_path, capsys):
    code = main(["mup", "coord-check", "--params", str(CONFIGS / "models" / "tiny-alibi-swiglu.yaml"),
                 "--widths", "32,64", "--steps", "2", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "muP   logits" in out and "SP    logits" in out
    png = tmp_path / "coord_check.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "coord_check.json").is_file()
