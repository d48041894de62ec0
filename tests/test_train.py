"""The training loop end to end on CPU: resume, init_from, modes, 1-vs-2-process parity."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmfab import checkpoint as ckpt
from lmfab.config import ConfigError, load_config
from lmfab.train import loop
from lmfab.train.loop import run_mode

from .conftest import CONFIGS, REPO, tiny_overrides

TINY = CONFIGS / "train" / "tiny.yaml"


def _cfg(data: Path, **extra):
    return load_config(TINY, tiny_overrides(data, **extra))


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(model_dir) / "model.safetensors"))


def _losses(model_dir: Path, split: str = "train") -> dict[int, float]:
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == split}


def test_train_loss_falls_and_writes_run_dir(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 30, "runconfig.log_steps": 5})
    result = run_mode(cfg, mode="train_and_eval", model_dir=tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert losses[30] < losses[5] - 0.5, losses
    assert result["eval"]["loss"] < 6.0  # ln(512) = 6.24 at init
    meta = json.loads((tiny_data / "meta.json").read_text())["splits"]["val"]
    expected_bpb = result["eval"]["loss"] / math.log(2) * meta["tokens"] / meta["text_bytes"]
    assert result["eval"]["bits_per_byte"] == pytest.approx(expected_bpb)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
    newest = ckpt.latest_checkpoint(run)
    assert newest.name == "step_00000030"
    assert {p.name for p in newest.iterdir()} >= {
        "model.safetensors", "optimizer.pt", "state.json", "rng_rank0.pt", "config.yaml"}
    assert load_config(newest / "config.yaml") == cfg


def test_resume_is_bit_identical(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 8, "runconfig.checkpoint_steps": 3,
                             "model.dropout": 0.1})  # dropout: the RNG state must resume too
    run_mode(cfg, mode="train", model_dir=tmp_path / "straight")
    # Interrupted: 5 steps (checkpoint at 3, final save at 5), then a second invocation.
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed", num_steps=5)
    # A crash during a later save leaves a temp dir: resume must ignore it.
    (ckpt.checkpoint_root(tmp_path / "resumed") / ".step_00000006.tmp").mkdir()
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "straight")[8] == _losses(tmp_path / "resumed")[8]


def test_fused_loss_trains_like_the_standard_loss(tiny_data, tmp_path):
    """runconfig.kernels.loss=fused (the CPU path of the fused kernel) follows the standard loss
    curve step for step; runconfig.kernels.loss_chunk too."""
    curves = []
    for name, extra in (("std", {"runconfig.kernels.loss": "standard"}),
                        ("fused", {"runconfig.kernels.loss": "fused"}),
                        ("chunked", {"runconfig.kernels.loss": "fused", "runconfig.kernels.loss_chunk": 100})):
        run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 8, "runconfig.log_steps": 1, **extra}),
                 mode="train", model_dir=tmp_path / name)
        curves.append(_losses(tmp_path / name))
    for other in curves[1:]:
        assert sorted(other) == sorted(curves[0]) and len(other) == 8
        for step, loss in curves[0].items():
            assert abs(loss - other[step]) < 1e-4, (curves[0], other)


def test_keep_checkpoints_prunes_oldest(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 8, "runconfig.checkpoint_steps": 2,
                             "runconfig.keep_checkpoints": 2})
    run_mode(cfg, mode="train", model_dir=tmp_path / "run")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == [
        "step_00000006", "step_00000008"]


def test_checkpoint_at_end_false_skips_only_the_final_save(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 5, "runconfig.checkpoint_steps": 2,
                             "runconfig.checkpoint_at_end": False})
    run_mode(cfg, mode="train", model_dir=tmp_path / "run")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == [
        "step_00000002", "step_00000004"]


def test_out_of_memory_names_what_to_change(tiny_data, tmp_path, monkeypatch, capsys):
    """A step that runs out of device memory fails with lmfab's advice after torch's message,
    and `lmfab run` prints it without a traceback (exit 3)."""
    from lmfab import cli

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "_train_step", oom)
    sets = [a for o in tiny_overrides(tiny_data) for a in ("--set", o)]
    rc = cli.main(["run", "--params", str(TINY), "--mode", "train", "--model_dir",
                   str(tmp_path / "run"), *sets])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "Tried to allocate 2.00 GiB" in err and "training step 1" in err
    assert "runconfig.parallel.strategy: fsdp" in err and "micro_batch_size than 4" in err
    assert "Traceback" not in err


def test_profile_steps_write_a_table_and_trace_per_rank(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 6, "runconfig.profile.steps": 2,
                             "runconfig.profile.start": 2})
    run_mode(cfg, mode="train", model_dir=tmp_path / "run")
    out = tmp_path / "run" / "profile"
    summary = json.loads((out / "kernels_rank0.json").read_text())
    assert summary["steps"] == [3, 4] and summary["wall_ms"] > 0
    assert (out / "kernels_rank0.txt").read_text().startswith("  GPU kernels")
    assert (out / "trace_rank0.json.gz").stat().st_size > 0
    # A run that ends inside the window profiles the steps it ran.
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 3, "runconfig.profile.steps": 5,
                             "runconfig.profile.start": 1})
    run_mode(cfg, mode="train", model_dir=tmp_path / "short")
    short = json.loads((tmp_path / "short" / "profile" / "kernels_rank0.json").read_text())
    assert short["steps"] == [2, 3]
    # Resumed inside the window: the steps left in it are profiled.
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 8, "runconfig.profile.steps": 4,
                             "runconfig.profile.start": 2})
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed", num_steps=4)
    (tmp_path / "resumed" / "profile" / "kernels_rank0.json").unlink()
    run_mode(cfg, mode="train", model_dir=tmp_path / "resumed")
    resumed = json.loads((tmp_path / "resumed" / "profile" / "kernels_rank0.json").read_text())
    assert resumed["steps"] == [5, 6]


def test_a_failure_inside_the_profile_window_stops_the_profiler(tiny_data, tmp_path, monkeypatch):
    real, calls = loop._train_step, []

    def fail_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("loss is nan")
        return real(*a, **k)

    monkeypatch.setattr(loop, "_train_step", fail_on_third)
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 6, "runconfig.profile.steps": 3,
                             "runconfig.profile.start": 1})
    with pytest.raises(FloatingPointError):
        run_mode(cfg, mode="train", model_dir=tmp_path / "failed")
    assert not torch._C._autograd._profiler_enabled()
    monkeypatch.setattr(loop, "_train_step", real)
    run_mode(cfg, mode="train", model_dir=tmp_path / "next")  # a profiler can start again
    assert json.loads((tmp_path / "next" / "profile" / "kernels_rank0.json").read_text())[
        "steps"] == [2, 4]


def test_kernel_categories():
    from lmfab.train.profile import categorize

    assert categorize("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    assert categorize("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT") == "gemm"
    assert categorize("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert categorize("triton_per_fused_native_layer_norm_0") == "fused (inductor)"
    assert categorize("void at::native::multi_tensor_apply_kernel") == "optimizer"
    assert categorize("some_other_kernel") == "other"


def test_timeline_measures_active_time_and_exposed_communication():
    from lmfab.train.profile import format_summary, timeline

    # 2 steps (ms): compute 0-100 and 150-300 (two streams overlapping 180-200), NCCL 80-120
    # (20 under compute, 20 exposed) and 290-330 (10 under, 30 exposed)
    ms = [(0, 100, False), (150, 200, False), (180, 300, False), (80, 120, True),
          (290, 330, True)]
    t = timeline([(1e3 * a, 1e3 * b, c) for a, b, c in ms], n=2)  # spans in µs
    assert t == {"active_ms": (120 + 180) / 2, "comm_ms": 80 / 2, "comm_exposed_ms": 50 / 2}
    assert timeline([], n=1) == {"active_ms": 0.0, "comm_ms": 0.0, "comm_exposed_ms": 0.0}
    line = format_summary({"wall_ms": 160.0, "busy_ms": 250.0, "categories_ms": {},
                           "top_kernels_ms": {}, **t}).splitlines()[1]
    assert line == ("  timeline: GPU active 150.0 ms (idle 10.0); NCCL 40.0 ms, exposed 25.0 ms "
                    "(no compute beside it)")


def test_launch_lead_pairs_launches_with_kernels_by_correlation(tmp_path):
    import gzip

    from lmfab.train.profile import format_summary, launch_lead, read_trace

    def launch(corr, ts, cat="cuda_runtime"):
        return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 5,
                "args": {"correlation": corr}}

    def kernel(corr, ts):
        return {"ph": "X", "cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": 50,
                "args": {"correlation": corr}}

    # three kernels queued 2-3 ms ahead, one (a Triton launch, driver API) started 20 µs
    # after its launch, one kernel whose launch is outside the window (ignored)
    events = [launch(1, 0.0), launch(2, 10.0), launch(3, 20.0), launch(4, 5000.0, "cuda_driver"),
              kernel(1, 2000.0), kernel(2, 2510.0), kernel(3, 3020.0), kernel(4, 5020.0),
              kernel(9, 6000.0), {"ph": "f", "cat": "ac2g", "id": 1, "ts": 1.0}]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    lead = launch_lead(read_trace(path))
    assert lead == {"lead_median_ms": (2.0 + 2.5) / 2, "host_behind": 0.25}
    assert launch_lead([kernel(1, 0.0)]) == {}
    graph = {**launch(7, 0.0), "name": "cudaGraphLaunch"}
    assert launch_lead([graph, kernel(7, 900.0), {"cat": "kernel", "ts": 1.0, "args": None}]) == {}
    line = format_summary({"wall_ms": 10.0, "busy_ms": 9.0, "categories_ms": {},
                           "top_kernels_ms": {}, **lead}).splitlines()[1]
    assert line.startswith("  launch lead: median 2.25 ms from launch to start; 25% of kernels")


def test_resume_accepts_a_checkpoint_from_before_a_new_model_field(tiny_data, tmp_path):
    """A checkpoint written before ModelConfig gained a field (the key is absent from its
    config.yaml) resumes when the field is at its default, and is refused otherwise."""
    import yaml

    run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 2}), mode="train", model_dir=tmp_path / "r")
    path = ckpt.latest_checkpoint(tmp_path / "r") / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    for key in ("rope_theta", "output_mult", "dropout"):
        del raw["model"][key]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="dropout"):
        run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 4, "model.dropout": 0.1}),
                 mode="train", model_dir=tmp_path / "r")
    run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 4}), mode="train", model_dir=tmp_path / "r")
    assert sorted(_losses(tmp_path / "r")) == [1, 2, 3, 4]


def test_resume_refuses_an_older_checkpoint_layout(tiny_data, tmp_path):
    run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 2}), mode="train", model_dir=tmp_path / "r")
    saved = ckpt.latest_checkpoint(tmp_path / "r")
    state = json.loads((saved / "state.json").read_text())
    assert state["format"] == ckpt.FORMAT
    del state["format"], state["loader"]["stage"]  # an early development checkpoint's layout
    (saved / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="layout is format 0 .* --init_from"):
        run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 4}), mode="train", model_dir=tmp_path / "r")
    # Its weights still start a new run.
    run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 1}), mode="train",
             model_dir=tmp_path / "new", init_from=str(saved))


def test_init_from_loads_weights_only(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 4})
    run_mode(cfg, mode="train", model_dir=tmp_path / "src")
    zero = _cfg(tiny_data, **{"runconfig.max_steps": 0})
    run_mode(zero, mode="train", model_dir=tmp_path / "dst", init_from=str(tmp_path / "src"))
    src, dst = _weights(tmp_path / "src"), _weights(tmp_path / "dst")
    assert all(torch.equal(src[k], dst[k]) for k in src)
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "dst") / "state.json").read_text())
    assert state["step"] == 0  # a new run, not a resume


def test_resume_refuses_a_different_model(tiny_data, tmp_path):
    run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 2}), mode="train", model_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"model section differs.*d_model"):
        run_mode(_cfg(tiny_data, **{"runconfig.max_steps": 4, "model.d_model": 32}),
                 mode="train", model_dir=tmp_path / "r")


def test_eval_modes(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, **{"runconfig.max_steps": 4, "runconfig.checkpoint_steps": 2})
    run_mode(cfg, mode="train", model_dir=tmp_path / "r")
    (one,) = run_mode(cfg, mode="eval", model_dir=tmp_path / "r")
    assert one["step"] == 4 and one["loss"] > 0
    every = run_mode(cfg, mode="eval_all", model_dir=tmp_path / "r")
    assert [e["step"] for e in every] == [2, 4]
    assert every[1]["loss"] == pytest.approx(one["loss"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_mode(cfg, mode="eval", model_dir=tmp_path / "empty")


def test_seq_len_mismatch_with_shards_is_a_clear_error(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, **{"train_input.seq_len": 16})
    with pytest.raises(ValueError, match="seq_len"):
        run_mode(cfg, mode="train", model_dir=tmp_path / "r")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_accumulation(tiny_data, tmp_path):
    """2 gloo processes x micro 4 == 1 process x 2 accumulation steps x micro 4 (global 8)."""
    steps = 6
    sets = tiny_overrides(tiny_data, **{"runconfig.max_steps": steps})
    cfg = load_config(TINY, sets)
    run_mode(cfg, mode="train", model_dir=tmp_path / "one")

    cmd = [sys.executable, "-m", "lmfab", "run", "--params", str(TINY), "--mode", "train",
           "--model_dir", str(tmp_path / "two"), "--num_devices", "2"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 x cpu" in proc.stdout

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_alibi_run_evaluates_at_4x_its_training_length(tiny_data, tmp_path):
    """eval_input.seq_len longer than training, through the loop: ALiBi extrapolates."""
    from lmfab.data.prep.tokenize_corpus import tokenize_corpus

    from .conftest import SAMPLE

    long_data = tmp_path / "long"
    tokenize_corpus([str(SAMPLE / "books.jsonl.zst")], str(long_data), seq_len=128,
                    tokenizer=str(tiny_data / "tokenizer.json"), val_fraction=0.05, progress=False)
    sets = {"model.pos": "alibi", "runconfig.max_steps": 40, "runconfig.log_steps": 10}
    cfg = _cfg(tiny_data, **sets)
    run_mode(cfg, mode="train", model_dir=tmp_path / "r")
    (short,) = run_mode(cfg, mode="eval", model_dir=tmp_path / "r")
    long_cfg = _cfg(tiny_data, **sets, **{"eval_input.seq_len": 128,
                                           "eval_input.data_dir": str(long_data)})
    (long,) = run_mode(long_cfg, mode="eval", model_dir=tmp_path / "r")
    assert long["tokens"] == 2 * 8 * 128
    assert long["loss"] < short["loss"] + 0.3, (short, long)
    with pytest.raises(ValueError, match="eval_input.seq_len=128.*learned positions"):
        _cfg(tiny_data, **{"eval_input.seq_len": 128})  # learned positions end at 32
