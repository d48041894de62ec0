"""Model Zoo params import: legacy YAMLs written from the published key names and values."""

from __future__ import annotations

import pytest
import yaml

from lmfab.cli import main
from lmfab.config import ConfigError
from lmfab.config.load import load_model_config
from lmfab.models import build_model
from lmfab.models.mup import multipliers
from lmfab.tools.modelzoo import load_config

from .conftest import CONFIGS, REPO

FIXTURES = REPO / "tests" / "fixtures" / "modelzoo"


def test_gpt3_111m_maps_to_the_cerebras_preset():
    cfg = load_config(FIXTURES / "params_gpt3_111m.yaml")
    assert cfg.model == load_model_config(CONFIGS / "models" / "cerebras-gpt-111m.yaml")
    assert build_model(cfg.model).num_params() == 111_050_496
    assert cfg.train_input.batch_size == 120 and cfg.train_input.seq_len == 2048
    assert cfg.train_input.seed == 1337 and cfg.train_input.shuffle is False
    assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.betas == [0.9, 0.95]
    assert [s.steps for s in cfg.optimizer.learning_rate] == [1500, 7537]
    assert cfg.optimizer.learning_rate[0].end == pytest.approx(6e-4)
    assert cfg.runconfig.max_steps == 9037 and cfg.runconfig.seed == 1


def test_gpt3_111m_mup_recovers_the_width_multiplier():
    cfg = load_config(FIXTURES / "params_gpt3_111m_mup.yaml")
    m = cfg.model
    assert m.mup_base_d_model == 256 and multipliers(m).width == pytest.approx(3.0)
    assert m.init_std == pytest.approx(0.08) and m.embedding_mult == 10.0
    assert m.output_mult == pytest.approx(1.0, rel=1e-6)  # 0.3333 = output_mult / m
    assert m.attn_score_scale == "inv_d_head"
    # The imported file describes exactly lmfab's Cerebras-GPT-111M muP preset.
    assert m == load_model_config(CONFIGS / "models" / "cerebras-gpt-111m-mup.yaml",
                                  ["norm_eps=1e-5"])


def test_btlm_maps_alibi_swiglu_mup():
    m = load_config(FIXTURES / "params_btlm_3b_8k.yaml").model
    assert (m.pos, m.mlp, m.max_seq_len, m.d_ff) == ("alibi", "swiglu", 8192, 6826)
    assert (m.mup_base_d_model, m.output_mult, m.embedding_mult) == (256, 2.22, 14.6)
    assert abs(build_model(m).num_params() - 2.6e9) < 0.05e9


def test_notices_are_printed_nothing_silently_dropped(capsys):
    load_config(FIXTURES / "params_gpt3_111m.yaml")
    err = capsys.readouterr().err
    for key in ("train_input.num_workers", "model.precision_opt_level", "optimizer.log_summaries",
                "runconfig.save_initial_checkpoint", "truncated_normal", "data_processor"):
        assert key in err


def test_keys_lmfab_cannot_honour_are_listed(tmp_path):
    raw = yaml.safe_load((FIXTURES / "params_gpt3_111m.yaml").read_text())
    raw["model"]["use_rotary_scaling"] = True
    raw["model"]["loss_scaling"] = "batch_size"
    raw["optimizer"]["optimizer_type"] = "SGD"
    raw["runconfig"]["enable_act_frequency"] = True
    raw["optimizer"]["learning_rate"][0]["scheduler"] = "Exponential"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    for item in ("model.use_rotary_scaling", "model.loss_scaling='batch_size'",
                 "optimizer.optimizer_type='SGD'", "runconfig.enable_act_frequency",
                 "scheduler='Exponential'"):
        assert item in msg, msg
    assert str(path) in msg


def test_import_cli_writes_an_lmfab_params_file(tmp_path, capsys):
    out = tmp_path / "lmfab.yaml"
    assert main(["import", "modelzoo", str(FIXTURES / "params_btlm_3b_8k.yaml"), "-o", str(out)]) == 0
    converted = load_config(out)
    assert converted == load_config(FIXTURES / "params_btlm_3b_8k.yaml")
    assert "hidden_size" not in out.read_text()


def test_the_library_loader_points_at_the_importer():
    from lmfab.config import load_config as load_lmfab_config

    with pytest.raises(ConfigError, match="lmfab.tools.modelzoo"):
        load_lmfab_config(FIXTURES / "params_gpt3_111m.yaml")
