"""Shared fixtures: a small tokenized dataset made from the shipped sample corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
CONFIGS = REPO / "configs"


def pytest_collection_modifyitems(config, items):
    n_gpu = torch.cuda.device_count()
    for item in items:
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 CUDA GPUs, found {n_gpu}"))
        elif "gpu" in item.keywords and n_gpu < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The shipped sample, tokenized with a 512-token BPE into seq_len=32 windows (~seconds)."""
    from lmfab.data.prep.tokenize_corpus import tokenize_corpus

    out = tmp_path_factory.mktemp("data") / "tiny"
    tokenize_corpus([str(SAMPLE)], str(out), seq_len=32, vocab_size=512, val_fraction=0.05,
                    progress=False)
    return out


def tiny_overrides(data_dir: Path, **extra) -> list[str]:
    """--set overrides that shrink configs/train/tiny.yaml to a sub-second CPU model."""
    values = {
        "train_input.data_dir": str(data_dir),
        "train_input.seq_len": 32,
        "train_input.batch_size": 8,
        "train_input.micro_batch_size": 4,
        "eval_input.batch_size": 8,
        "eval_input.max_batches": 2,
        "model.vocab_size": 512,
        "model.max_seq_len": 32,
        "model.n_layer": 2,
        "model.d_model": 64,
        "model.d_ff": 256,
        "runconfig.log_steps": 1,
        "runconfig.tensorboard": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]



@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A run folder with a briefly trained tiny GPT (25 steps on the sample, seconds): what
    generation, quantization and serving tests load."""
    from lmfab.cli import main

    run = tmp_path_factory.mktemp("runs") / "tiny"
    args = ["run", "--params", str(CONFIGS / "train" / "tiny.yaml"), "--mode", "train",
            "--model_dir", str(run), "--num_steps", "25"]
    for s in tiny_overrides(tiny_data, **{"runconfig.log_steps": 25}):
        args += ["--set", s]
    assert main(args) == 0
    return run
