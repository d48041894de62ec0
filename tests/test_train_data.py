"""Training data wiring: weighted mixtures and sequence-length stages through the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmfab import checkpoint as ckpt
from lmfab.config import ConfigError, load_config
from lmfab.data.prep.tokenize_corpus import tokenize_corpus
from lmfab.train.loop import run_mode
from lmfab.train.plan import train_stages

from .conftest import CONFIGS, SAMPLE, tiny_overrides

TINY = CONFIGS / "train" / "tiny.yaml"


@pytest.fixture(scope="module")
def packed(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Two more datasets with tiny_data's tokenizer: another split seed at 32, and 64."""
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for name, seq_len, seed in (("other32", 32, 7), ("long64", 64, 0)):
        tokenize_corpus([str(SAMPLE / "books.jsonl.zst")], str(root / name), seq_len=seq_len,
                        tokenizer=str(tiny_data / "tokenizer.json"), val_fraction=0.05,
                        seed=seed, progress=False)
        out[name] = root / name
    return out


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(d) / "model.safetensors"))


def _mixture_sets(tiny_data, packed, **extra) -> list[str]:
    sets = tiny_overrides(tiny_data, **extra)
    sets = [s for s in sets if not s.startswith("train_input.data_dir=")]
    return sets + ["train_input.data_dir=null",
                   f"train_input.mixture=[{{data_dir: {tiny_data}, weight: 3}}, "
                   f"{{data_dir: {packed['other32']}, weight: 1}}]",
                   f"eval_input.data_dir={tiny_data}"]


def test_mixture_trains_and_resumes_exactly(tiny_data, packed, tmp_path):
    cfg = load_config(TINY, _mixture_sets(tiny_data, packed, **{"runconfig.max_steps": 6}))
    run_mode(cfg, mode="train", model_dir=tmp_path / "straight")
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed", num_steps=3)
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "resumed") / "state.json").read_text())
    assert state["loader"]["state"]["kind"] == "mixture"
    assert state["loader"]["state"]["counts_per_period"] == [3, 1]
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seq_len_schedule_switches_data_and_keeps_tokens_per_step(tiny_data, packed, tmp_path, capsys):
    sets = tiny_overrides(tiny_data, **{"runconfig.max_steps": 6, "model.max_seq_len": 64})
    sets.append(f"train_input.seq_len_schedule=[{{seq_len: 64, at_step: 3, data_dir: {packed['long64']}}}]")
    cfg = load_config(TINY, sets)
    stages = train_stages(cfg)
    assert [(s.seq_len, s.batch_size, s.micro_batch, s.grad_accum) for s in stages] == [
        (32, 8, 4, 2), (64, 4, 2, 2)]
    run_mode(cfg, mode="train", model_dir=tmp_path / "straight")
    assert "step 3: seq_len 64, global batch 4" in capsys.readouterr().out
    # Interrupted at step 2 (before the switch) and at 4 (after it): same weights.
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed", num_steps=2)
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed", num_steps=2)
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "resumed") / "state.json").read_text())
    assert state["loader"]["stage"] == 1 and state["tokens"] == 4 * 8 * 32
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_data_sections_fail_at_load(tiny_data, packed):
    with pytest.raises(ConfigError, match="exactly one of data_dir and mixture"):
        load_config(TINY, tiny_overrides(tiny_data) + [
            f"train_input.mixture=[{{data_dir: {packed['other32']}}}]"])
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[0\].seq_len=48: the 256 tokens"):
        load_config(TINY, tiny_overrides(tiny_data, **{"model.max_seq_len": 64}) + [
            f"train_input.seq_len_schedule=[{{seq_len: 48, at_step: 2, data_dir: {packed['long64']}}}]"])
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[0\].seq_len=64: .*max_seq_len=32"):
        load_config(TINY, tiny_overrides(tiny_data) + [
            f"train_input.seq_len_schedule=[{{seq_len: 64, at_step: 2, data_dir: {packed['long64']}}}]"])


def test_a_dataset_with_another_tokenizer_is_refused(tiny_data, tmp_path):
    other = tmp_path / "other"
    tokenize_corpus([str(SAMPLE / "books.jsonl.zst")], str(other), seq_len=32, vocab_size=300,
                    val_fraction=0.05, progress=False)
    sets = _mixture_sets(tiny_data, {"other32": other}, **{"runconfig.max_steps": 1})
    with pytest.raises(ConfigError, match="differs from the run's"):
        run_mode(load_config(TINY, sets), mode="train", model_dir=tmp_path / "r")
