"""The throughput benchmark runs end to end on a CPU (numbers there mean nothing; the code
path that produces docs/benchmarks.md's figures must not rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import CONFIGS, REPO


def test_train_throughput_isolates_impls_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"),
           "--config", str(CONFIGS / "train" / "tiny.yaml"), "--device", "cpu",
           "--impl", "lmfab-eager,hf-eager", "--steps", "2", "--warmup", "1",
           "--set", "runconfig.kernels.loss=fused", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in rows] == ["lmfab-eager", "hf-eager"]
    assert all(r["ok"] and r["tokens_per_s"] > 0 and len(r["step_ms"]) == 2 for r in rows)
    assert rows[0]["params"] == rows[1]["params"]  # same shapes on both sides
    assert rows[0]["pid"] != rows[1]["pid"]  # each impl in its own process
    assert "| lmfab-eager |" in proc.stdout and "| hf-eager |" in proc.stdout
    assert "| tiny.yaml | 1 | lmfab-eager |" in proc.stdout  # config and devices columns


def test_compare_curves_reports_differences(tiny_data, tmp_path):
    from lmfab.config import load_config
    from lmfab.train.loop import run_mode

    from .conftest import tiny_overrides

    sets = {"runconfig.max_steps": 4, "runconfig.log_steps": 1}
    for name, lr in (("a", None), ("b", None), ("c", 0.0)):
        extra = {} if lr is None else {"optimizer.learning_rate": lr}
        run_mode(load_config(CONFIGS / "train" / "tiny.yaml", tiny_overrides(tiny_data, **sets, **extra)),
                 mode="train", model_dir=tmp_path / name)
    script = str(REPO / "benchmarks" / "compare_curves.py")
    same = subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "b"),
                           "--json", str(tmp_path / "ab.json")],
                          capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, same.stderr
    assert json.loads((tmp_path / "ab.json").read_text())["max_abs_diff"] == [0.0] * 4
    frozen = subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "c"),
                             "--labels", "trained,frozen", "--png", str(tmp_path / "ac.png")],
                            capture_output=True, text=True, timeout=300)
    assert frozen.returncode == 0, frozen.stderr
    assert "| trained | frozen |" in frozen.stdout and (tmp_path / "ac.png").stat().st_size > 0
    last = frozen.stdout.strip().splitlines()[-1]
    assert float(last.split("max |diff| ")[1].split(",")[0]) > 0  # lr 0 leaves the loss flat


@pytest.mark.parametrize("global_batch", [None, 8])
def test_scaling_script_on_cpu_with_gloo(tiny_data, tmp_path, global_batch):
    """Weak scaling (global batch = micro x devices) and a fixed global batch reached by
    accumulation (8 = 4 x 2 micro-batches on one device, 4 x 1 on each of two)."""
    from .conftest import tiny_overrides

    def scaling(devices: str, out: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(REPO / "benchmarks" / "scaling.py"),
               "--params", str(CONFIGS / "train" / "tiny.yaml"), "--devices", devices,
               "--strategies", "ddp", "--steps", "4", "--log_steps", "1", "--warmup", "1",
               "--micro_batch", "4", "--out", str(tmp_path / out), *extra]
        if global_batch:
            cmd += ["--global_batch", str(global_batch)]
        for s in tiny_overrides(tiny_data):
            if not s.startswith(("train_input.batch_size", "train_input.micro_batch_size")):
                cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    proc = scaling("1,2", "scaling")
    points = json.loads((tmp_path / "scaling" / "scaling.json").read_text())
    got = [(p["strategy"], p["devices"], p["global_batch"], p["accumulation"]) for p in points]
    assert got == ([("ddp", 1, 4, 1), ("ddp", 2, 8, 1)] if global_batch is None
                   else [("ddp", 1, 8, 2), ("ddp", 2, 8, 1)])
    assert all(p["tokens_per_s"] > 0 for p in points)
    # not saved by default (the folder exists: the run checks it is writable before training)
    assert not list((tmp_path / "scaling" / "ddp-2" / "checkpoints").glob("step_*"))
    assert (tmp_path / "scaling" / "scaling.png").stat().st_size > 0
    if global_batch:  # one global batch: the same training on 1 and 2 processes (fp32, CPU)
        assert points[1]["max_abs_loss_diff"] < 1e-4
        assert "max abs loss diff vs 1" in proc.stdout
        # A 2-device variant alone: efficiency and losses against the earlier 1-device point.
        scaling("2", "variant", "--baseline", str(tmp_path / "scaling" / "scaling.json"))
        (point,) = json.loads((tmp_path / "variant" / "scaling.json").read_text())
        assert point["devices"] == 2 and point["efficiency"] > 0
        assert point["max_abs_loss_diff"] < 1e-4


def test_throughput_sweep_prints_one_row_per_variant(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "benchmarks" / "throughput_sweep.sh"), str(tmp_path),
           str(REPO / "configs" / "train" / "tiny.yaml"), "2", "1",
           "std=lmfab-eager;--set runconfig.kernels.loss=standard",
           "fused=lmfab-eager;--set runconfig.kernels.loss=fused"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| std ")
            or line.startswith("| fused ")]
    assert len(rows) == 2 and all("did not finish" not in r for r in rows), proc.stdout
    params = json.loads((tmp_path / "std.json").read_text())["results"][0]["params"]
    assert rows[0].split("|")[2].strip() == f"{params:,}"  # the params column, aligned
    assert (tmp_path / "fused.json").is_file()


def _run_script(name: str, args: list[str], monkeypatch) -> None:
    """A benchmark script in this process (its imports are already loaded here)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [name, *args])
    try:
        runpy.run_path(str(REPO / "benchmarks" / name), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), e.code


@pytest.mark.slow
def test_decode_and_quantize_benchmarks_run_on_cpu(tiny_run, tmp_path, monkeypatch, capsys):
    """The decode benchmark checks lmfab's greedy tokens against HF's before timing; the
    quantize benchmark scores the run's held-out split per scheme."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "decode.json"
        _run_script("decode.py", [
            "--device", "cpu", "--model", str(CONFIGS / "models" / "tiny-llama.yaml"),
            "--batch", "1,3", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1",
            "--warmup", "1", "--min-agreement", "1.0", "--json", str(out)], monkeypatch)
        rows = json.loads(out.read_text())["results"]
        assert [(r["impl"], r["batch"]) for r in rows] == [
            ("lmfab", 1), ("hf-static", 1), ("lmfab", 3), ("hf-static", 3)]
        assert all(r["greedy_agreement"] == 1.0 and r["decode_tokens_per_s"] > 0 for r in rows)
        assert "| hf-static | 3 |" in capsys.readouterr().out

        out = tmp_path / "quantize.json"
        _run_script("quantize.py", [
            "--model-dir", str(tiny_run), "--device", "cpu", "--windows", "16",
            "--new-tokens", "6", "--json", str(out)], monkeypatch)
        rows = {r["scheme"]: r for r in json.loads(out.read_text())["results"]}
        assert set(rows) == {"none", "int8", "int4"}
        assert rows["int8"]["weight_bytes"] < rows["none"]["weight_bytes"]
        assert all(abs(r["bpb"] - rows["none"]["bpb"]) < 0.2 for r in rows.values())
        assert "| int4 |" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
