"""runconfig.parallel.float8: torchao's Float8Linear in the blocks (fp8 matmuls with dynamic scaling).

torchao's fp8 matmul also runs on CPUs (slowly), so the conversion, training and checkpoint
interchange are checked here; the speed figure is a GPU benchmark (docs/benchmarks.md)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lmfab import checkpoint as ckpt
from lmfab.config import ConfigError, load_config
from lmfab.models.gpt import GPT, build_model, materialize
from lmfab.train.loop import run_mode
from lmfab.train.plan import config_notes

from .conftest import CONFIGS, tiny_overrides

TINY = CONFIGS / "train" / "tiny.yaml"
pytest.importorskip("torchao.float8", reason="torchao is in the dev extra")


def _losses(model_dir):
    rows = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_float8_converts_only_the_blocks_and_keeps_parameter_names():
    from lmfab.dist.parallel import apply_float8

    cfg = load_config(TINY)
    plain = materialize(build_model(cfg.model), torch.device("cpu"), seed=0)
    model = materialize(build_model(cfg.model), torch.device("cpu"), seed=0)
    n = apply_float8(model, "tensorwise", torch.device("cpu"))
    assert n == 4 * cfg.model.n_layer  # qkv, attention proj, fc, mlp proj per block
    kinds = {type(m).__name__ for m in model.blocks.modules()}
    assert "Float8Linear" in kinds and "Linear" not in kinds
    assert model.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():  # conversion keeps the weights
        assert torch.equal(model.state_dict()[k], v), k


def test_float8_run_trains_close_to_fp32_and_its_checkpoint_loads_without_float8(tiny_data, tmp_path):
    curves = {}
    for name, mode in (("fp32", "off"), ("fp8", "tensorwise")):
        cfg = load_config(TINY, tiny_overrides(tiny_data, **{
            "runconfig.max_steps": 12, "runconfig.parallel.float8": mode}))
        run_mode(cfg, mode="train", model_dir=tmp_path / name)
        curves[name] = _losses(tmp_path / name)
    a, b = curves["fp32"], curves["fp8"]
    assert b[12] < b[1] - 0.05, b  # it learns
    assert max(abs(a[s] - b[s]) for s in a) < 0.05, (a, b)  # fp8 rounding, not a different model
    assert a != b  # and the matmuls really ran in fp8
    plain = GPT(load_config(TINY, tiny_overrides(tiny_data)).model)
    ckpt.load_weights(plain, tmp_path / "fp8")  # strict: names and shapes


def test_float8_without_torchao_is_a_clear_error(monkeypatch):
    from lmfab.dist.parallel import apply_float8

    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    model = build_model(load_config(TINY).model)
    with pytest.raises(ConfigError, match=r"float8=rowwise needs torchao.*lmfab\[fp8\]"):
        apply_float8(model, "rowwise", torch.device("cpu"))


def test_float8_without_compile_is_noted():
    cfg = load_config(TINY, ["runconfig.parallel.float8=tensorwise"])
    assert any("float8" in n and "compile" in n for n in config_notes(cfg, "cuda"))
    cfg = load_config(TINY, ["runconfig.parallel.float8=tensorwise", "runconfig.parallel.compile=true"])
    assert not any("float8" in n for n in config_notes(cfg, "cuda"))
