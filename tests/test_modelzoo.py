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


# ---- the published 2023 files, as a Cerebras user has them ---------------------------------

PUBLISHED = sorted((FIXTURES / "published").glob("*.yaml"))


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_published_params_import_and_resolve(path, tmp_path, capsys):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path, ["train_input.data_dir=shards"])
    m = raw["model"]
    assert (cfg.model.d_model, cfg.model.n_layer) == (m["hidden_size"], m["num_hidden_layers"])
    assert cfg.train_input.seq_len == raw["train_input"].get("max_sequence_length",
                                                             m["max_position_embeddings"])
    # loss_scaling batch_size x loss_weight 1/MSL is lmfab's per-token mean: accepted as is
    assert m["loss_scaling"] == "batch_size"
    assert m["loss_weight"] * cfg.train_input.seq_len == 1.0
    want = "bf16" if m.get("use_bfloat16") else "auto"
    assert cfg.runconfig.precision == want
    out = tmp_path / "lmfab.yaml"
    assert main(["import", "modelzoo", str(path), "-o", str(out),
                 "--set", "train_input.data_dir=shards"]) == 0
    assert load_config(out) == cfg


@pytest.fixture(scope="module")
def msl_data(tmp_path_factory):
    """Small token shards at the published files' sequence lengths (2048 and 8192)."""
    import numpy as np

    from lmfab.data.shards import write_shard

    root = tmp_path_factory.mktemp("msl")
    for msl in (2048, 8192):
        ids = np.random.default_rng(msl).integers(0, 50257, size=(2, msl + 1))
        for split in ("train", "val"):
            (root / f"seq{msl}" / split).mkdir(parents=True)
            write_shard(root / f"seq{msl}" / split / "shard_00000.tok", ids, msl + 1, "ab" * 32)
    return root


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_published_params_dry_run(path, msl_data, capsys):
    msl = load_config(path, ["train_input.data_dir=x"]).train_input.seq_len
    data = msl_data / f"seq{msl}"
    code = main(["run", "--params", str(path), "--dry-run", "--set",
                 f"train_input.data_dir={data}", "--set", f"eval_input.data_dir={data}"])
    out, err = capsys.readouterr()
    assert code == 0, err[-500:]
    assert "parameters" in out and "memory/device" in out


def test_published_hdf5_folders_need_lmfab_shards(capsys):
    path = FIXTURES / "published" / "cerebras_gpt_111m_r2.0.yaml"
    assert main(["run", "--params", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train_input.data_dir" in err and "--set train_input.data_dir=DIR" in err


def _edited(tmp_path, edit) -> str:
    raw = yaml.safe_load((FIXTURES / "published" / "cerebras_gpt_111m_r2.0.yaml").read_text())
    edit(raw)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("scaling,weight", [("batch_size", 1.0), ("batch_size", 1 / 1024),
                                            ("num_tokens", 1 / 2048)])
def test_a_loss_weight_that_scales_the_mean_is_refused_with_the_factor(tmp_path, scaling, weight):
    def edit(raw):
        raw["model"].update(loss_scaling=scaling, loss_weight=weight)
    with pytest.raises(ConfigError) as info:
        load_config(_edited(tmp_path, edit), ["train_input.data_dir=x"])
    msg = str(info.value)
    factor = weight * 2048 if scaling == "batch_size" else weight
    assert f"model.loss_scaling='{scaling}' with loss_weight" in msg
    assert f"{factor:g} x the per-token mean" in msg


def test_num_tokens_weight_one_and_no_effect_values_are_accepted(tmp_path):
    def edit(raw):
        raw["model"].update(loss_scaling="num_tokens", loss_weight=1.0, use_bfloat16=False,
                            mixed_precision=False, embedding_dropout_rate=0.0)
    cfg = load_config(_edited(tmp_path, edit), ["train_input.data_dir=x"])
    assert cfg.runconfig.precision == "fp32"


def test_an_embedding_dropout_lmfab_lacks_is_refused(tmp_path):
    def edit(raw):
        raw["model"]["embedding_dropout_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"model.embedding_dropout_rate=0.1"):
        load_config(_edited(tmp_path, edit), ["train_input.data_dir=x"])


def test_open_ended_constant_tail_runs_to_max_steps():
    cfg = load_config(FIXTURES / "published" / "gpt3_xl_r1.8.yaml", ["train_input.data_dir=x"])
    segs = cfg.optimizer.learning_rate
    assert [s.schedule for s in segs] == ["linear", "cosine", "constant"]
    assert sum(s.steps for s in segs) == cfg.runconfig.max_steps == 1_200_000
