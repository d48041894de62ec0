"""GPU checks (skipped without CUDA): bf16 training runs, compiles and resumes on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmfab.config import load_config
from lmfab.train import checkpoint as ckpt
from lmfab.train.loop import run_mode

from .conftest import CONFIGS, REPO, tiny_overrides

TINY = CONFIGS / "train" / "tiny.yaml"


def _losses(model_dir):
    rows = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.gpu
@pytest.mark.parametrize("compile_model", [False, True])
def test_bf16_training_on_gpu(tiny_data, tmp_path, compile_model):
    cfg = load_config(TINY, tiny_overrides(tiny_data, **{
        "runconfig.max_steps": 40, "runconfig.log_steps": 10,
        "runconfig.compile": compile_model, "runconfig.device": "cuda"}))
    result = run_mode(cfg, mode="train_and_eval", model_dir=tmp_path / "r")
    losses = _losses(tmp_path / "r")
    assert losses[-1] < losses[0] - 0.5, losses
    assert result["mfu"] is None or 0 < result["mfu"] < 1
    assert torch.isfinite(torch.tensor(result["eval"]["loss"]))
    assert ckpt.latest_checkpoint(tmp_path / "r").name == "step_00000040"


@pytest.mark.multigpu
def test_two_gpu_ddp_matches_one_gpu(tiny_data, tmp_path):
    steps = 5
    sets = tiny_overrides(tiny_data, **{"runconfig.max_steps": steps, "runconfig.device": "cuda",
                                        "runconfig.precision": "fp32"})
    run_mode(load_config(TINY, sets), mode="train", model_dir=tmp_path / "one")
    cmd = [sys.executable, "-m", "lmfab", "run", "--params", str(TINY), "--mode", "train",
           "--model_dir", str(tmp_path / "two"), "--num_devices", "2"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        assert abs(a - b) < 1e-4  # TF32/cuBLAS reductions differ slightly across GPUs
