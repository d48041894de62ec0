"""Params files: every shipped YAML loads and builds; bad ones fail with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmfab.config import (
    ConfigError,
    LRSegment,
    config_to_dict,
    load_config,
    micro_batching,
    write_config,
)
from lmfab.models import build_model
from lmfab.train.schedule import LRSchedule

from .conftest import CONFIGS

SHIPPED = sorted((CONFIGS / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_yaml_loads_and_builds_on_meta(path: Path):
    cfg = load_config(path)
    model = build_model(cfg.model)
    assert next(model.parameters()).device.type == "meta"
    assert model.num_params() > 0


def test_shipped_presets_exist():
    assert {p.stem for p in SHIPPED} >= {"tiny", "gpt2-124m", "cerebras-gpt-1.3b"}


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _tiny_raw() -> dict:
    return yaml.safe_load((CONFIGS / "train" / "tiny.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["model"].update(n_heads=4), r"model\.n_heads: unknown key \(did you mean 'n_head'\?\)"),
        (lambda r: r.update(trainer={}), r"trainer: unknown key"),
        (lambda r: r["model"].update(n_layer="four"), r"model\.n_layer: expected an integer"),
        (lambda r: r["model"].update(pos="alibii"), r"model\.pos: 'alibii' is not one of"),
        (lambda r: r["model"].pop("d_model"), r"model\.d_model: required key is missing"),
        (lambda r: r["model"].update(n_head=3), r"d_model=128 is not divisible by model\.n_head=3"),
        (lambda r: r["train_input"].update(seq_len=256), r"seq_len=256 exceeds model\.max_seq_len=128"),
        (lambda r: r["train_input"].update(micro_batch_size=5), r"train_input: .*micro_batch_size=5"),
        (lambda r: r["optimizer"]["learning_rate"][1].pop("end"), r"learning_rate\[1\]\.end: required"),
        (lambda r: r["optimizer"]["learning_rate"][0].update(shedule="linear"),
         r"learning_rate\[0\]\.shedule: unknown key \(did you mean 'schedule'\?\)"),
        (lambda r: r["runconfig"].update(tensorboard="yes"), r"runconfig\.tensorboard: expected true or false"),
        (lambda r: r["model"].update(output_mult=0.0), r"model\.output_mult: must be positive"),
        (lambda r: r["runconfig"].update(kernels={"loss_chunk": -1}),
         r"runconfig\.kernels\.loss_chunk: must be >= 0"),
        (lambda r: r["runconfig"].update(kernels={"attention_backend": "fa3"}),
         r"runconfig\.kernels\.attention_backend: 'fa3' is not one of"),
        (lambda r: r["runconfig"].update(kernels={"residual_dtype": "fp16"}),
         r"runconfig\.kernels\.residual_dtype: 'fp16' is not one of"),
        (lambda r: r["runconfig"].update(parallel={"ddp_bucket_mb": 0}),
         r"runconfig\.parallel\.ddp_bucket_mb: must be > 0"),
        (lambda r: r["eval_input"].update(data_dir=" "), r"eval_input\.data_dir: an empty path"),
        (lambda r: r["train_input"].update(batch_size=10**30),
         r"train_input\.batch_size=1000000000000000000000000000000 x seq_len=128 .* 64-bit"),
        (lambda r: r["eval_input"].update(tasks_include_path=[""]),
         r"eval_input\.tasks_include_path\[0\]: an empty path"),
    ],
)
def test_bad_config_fails_with_key_path(tmp_path, mutate, message):
    raw = _tiny_raw()
    mutate(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_batch_must_divide_over_devices():
    path = CONFIGS / "train" / "tiny.yaml"
    load_config(path, world_size=2)  # 16 = 2 devices x 8 micro x 1 accum
    with pytest.raises(ConfigError, match="not divisible by the 3 devices"):
        load_config(path, world_size=3)
    assert micro_batching(16, 8, 1) == (8, 2)
    assert micro_batching(16, None, 4) == (4, 1)


def test_set_overrides_are_typed_and_checked(tmp_path):
    path = CONFIGS / "train" / "tiny.yaml"
    cfg = load_config(path, ["optimizer.learning_rate=3e-4", "train_input.batch_size=64",
                             "runconfig.parallel.compile=true"])
    assert cfg.optimizer.learning_rate == pytest.approx(3e-4)
    assert cfg.train_input.batch_size == 64 and cfg.runconfig.parallel.compile is True
    with pytest.raises(ConfigError, match=r"model\.d_modle: unknown key \(did you mean 'd_model'"):
        load_config(path, ["model.d_modle=64"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(path, ["model.d_model"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "train" / "tiny.yaml")
    out = tmp_path / "config.yaml"
    write_config(cfg, out)
    assert load_config(out) == cfg
    resolved = yaml.safe_load(out.read_text())
    assert resolved["model"]["norm_eps"] == 1e-5  # defaults are filled in


def test_lr_schedule_segments():
    sched = LRSchedule([LRSegment("linear", 10, 0.0, 1.0), LRSegment("cosine", 10, 1.0, 0.1)])
    assert sched(0) == 0.0
    assert sched(5) == pytest.approx(0.5)
    assert sched(10) == pytest.approx(1.0)
    assert sched(15) == pytest.approx(0.55)
    assert sched(20) == pytest.approx(0.1) and sched(1000) == pytest.approx(0.1)
    assert LRSchedule(3e-4)(123) == 3e-4


def test_config_notes_name_settings_without_effect():
    from lmfab.train.plan import config_notes

    path = CONFIGS / "train" / "tiny.yaml"
    assert config_notes(load_config(path), "cpu") == []
    cfg = load_config(path, ["runconfig.kernels.loss_chunk=512", "runconfig.parallel.compile_mode=tuned",
                             "runconfig.kernels.residual_dtype=bf16"])
    notes = config_notes(cfg, "cpu")
    assert len(notes) == 3 and "loss_chunk" in notes[0] and "compile_mode" in notes[1]
    assert "residual_dtype" in notes[2]
    # On CUDA the loss is fused and precision bf16: only compile_mode stays inert.
    assert [n.split("=")[0] for n in config_notes(cfg, "cuda")] == ["runconfig.parallel.compile_mode"]
    notes = config_notes(load_config(path, ["runconfig.parallel.ddp_split_graph=false",
                                            "runconfig.parallel.strategy=ddp",
                                            "runconfig.parallel.fsdp_reshard_after_forward=false"]), "cpu")
    assert [n.split("=")[0] for n in notes] == ["runconfig.parallel.ddp_split_graph",
                                                "runconfig.parallel.fsdp_reshard_after_forward"]
    assert config_notes(load_config(path, ["runconfig.parallel.ddp_split_graph=false",
                                           "runconfig.parallel.compile=true"]), "cpu") == []
    # the fused MLP op needs a GELU MLP with biases and plain (not float8) linear layers
    assert config_notes(load_config(path, ["runconfig.kernels.mlp_kernel=fused"]), "cuda") == []
    for sets in (["model.mlp=swiglu"], ["model.bias=false"], ["runconfig.parallel.float8=tensorwise"]):
        notes = config_notes(load_config(path, ["runconfig.kernels.mlp_kernel=fused", *sets]), "cuda")
        assert [n.split("=")[0] for n in notes if "mlp_kernel" in n] == ["runconfig.kernels.mlp_kernel"]


def test_ddp_buckets_below_the_first_bucket_are_refused_under_a_cut_graph():
    path = CONFIGS / "train" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"ddp_bucket_mb=0.5: .* DDP's first, 1 MB"):
        load_config(path, ["runconfig.parallel.compile=true", "runconfig.parallel.ddp_bucket_mb=0.5"])
    load_config(path, ["runconfig.parallel.ddp_bucket_mb=0.5"])  # eager: DDP alone takes any size
    load_config(path, ["runconfig.parallel.compile=true", "runconfig.parallel.ddp_bucket_mb=0.5",
                       "runconfig.parallel.ddp_split_graph=false"])


def test_yaml_off_and_on_mean_the_words_where_a_key_takes_them(tmp_path):
    """YAML 1.1 reads bare off/on as booleans; a key whose values include "off"/"on" gets
    the word, and a boolean stays an error where neither word is allowed."""
    raw = yaml.safe_load((CONFIGS / "train" / "tiny.yaml").read_text())
    raw["optimizer"]["fused"] = False  # what `fused: off` parses to
    raw["runconfig"]["parallel"] = {"float8": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.optimizer.fused == "off" and cfg.runconfig.parallel.float8 == "off"
    assert load_config(path, ["optimizer.fused=on"]).optimizer.fused == "on"
    with pytest.raises(ConfigError, match="runconfig.kernels.attention_backend"):
        load_config(path, ["runconfig.kernels.attention_backend=off"])


def test_removed_run_keys_fail_with_the_reason_but_resolved_configs_still_load(tmp_path):
    import yaml

    from lmfab.config import config_from_dict

    path = CONFIGS / "train" / "tiny.yaml"
    for key in ("cuda_graph=true", "gc_steps=50"):
        with pytest.raises(ConfigError, match=f"runconfig.{key.split('=')[0]}: .*removed"):
            load_config(path, [f"runconfig.{key}"])
    # a config.yaml written beside an older checkpoint holds the keys: it still loads
    raw = yaml.safe_load(yaml.safe_dump(config_to_dict(load_config(path))))
    raw["runconfig"].update(cuda_graph=False, gc_steps=0)
    assert config_from_dict(raw, resolved=True) == load_config(path)


def test_flat_run_keys_that_moved_name_their_new_place():
    import yaml

    from lmfab.config import config_from_dict

    path = CONFIGS / "train" / "tiny.yaml"
    for old, new in (("loss=fused", "kernels.loss"), ("compile=true", "parallel.compile"),
                     ("strategy=fsdp", "parallel.strategy"), ("profile_steps=2", "profile.steps")):
        key = old.split("=")[0]
        with pytest.raises(ConfigError, match=f"runconfig.{key} moved to runconfig.{new}"):
            load_config(path, [f"runconfig.{old}"])
    # a resolved config of the flat layout (beside an older checkpoint) is moved, not refused
    moved = load_config(path, ["runconfig.kernels.loss=fused", "runconfig.parallel.compile=true",
                               "runconfig.profile.start=3"])
    raw = yaml.safe_load(yaml.safe_dump(config_to_dict(load_config(path))))
    raw["runconfig"].update(loss="fused", compile=True, profile_start=3)
    assert config_from_dict(raw, resolved=True) == moved
