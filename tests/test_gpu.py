"""GPU checks (skipped without CUDA): bf16 training runs, compiles and resumes on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmfab import checkpoint as ckpt
from lmfab.config import load_config
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
        "runconfig.parallel.compile": compile_model, "runconfig.device": "cuda"}))
    result = run_mode(cfg, mode="train_and_eval", model_dir=tmp_path / "r")
    losses = _losses(tmp_path / "r")
    assert losses[-1] < losses[0] - 0.5, losses
    assert result["mfu"] is None or 0 < result["mfu"] < 1
    assert torch.isfinite(torch.tensor(result["eval"]["loss"]))
    assert ckpt.latest_checkpoint(tmp_path / "r").name == "step_00000040"


@pytest.mark.gpu
def test_profile_steps_on_gpu_counts_gemm_time(tiny_data, tmp_path):
    cfg = load_config(TINY, tiny_overrides(tiny_data, **{
        "runconfig.max_steps": 6, "runconfig.device": "cuda", "runconfig.profile.steps": 2,
        "runconfig.profile.start": 3}))
    run_mode(cfg, mode="train", model_dir=tmp_path / "r")
    s = json.loads((tmp_path / "r" / "profile" / "kernels_rank0.json").read_text())
    assert s["steps"] == [4, 5] and s["categories_ms"]["gemm"] > 0
    assert 0 < s["busy_ms"] and s["wall_ms"] > 0
    # the timeline: kernels ran part of the wall time; one GPU has no NCCL
    assert 0 < s["active_ms"] <= s["wall_ms"] * 1.05 and s["comm_ms"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("compile_model", [False, True])
def test_training_step_never_waits_for_the_gpu(tiny_data, tmp_path, compile_model, monkeypatch):
    """The host queues step after step without synchronising with the GPU (outside log
    steps): batches go up through pinned memory, and nothing in forward, backward, clip or
    AdamW reads a value back. Checked with PyTorch's sync debug mode, which raises on any
    synchronising call (a blocking copy, .item(), nonzero, a stream sync). The debug mode
    cannot see a driver-side wait in a non-blocking copy from pageable memory, so the test
    also checks that every batch is pinned first."""
    import numpy as np

    from lmfab.train.data import make_loader
    from lmfab.train.loop import _train_step, setup, to_device
    from lmfab.train.optim import build_optimizer
    from lmfab.train.plan import train_stages

    cfg = load_config(TINY, tiny_overrides(tiny_data, **{
        "runconfig.device": "cuda", "runconfig.parallel.compile": compile_model}))
    run = setup(cfg, tmp_path / "r")
    stage = train_stages(cfg, 1)[0]
    loader = make_loader(cfg, stage, run.world)
    optimizer = build_optimizer(run.model, cfg.optimizer, run.world.device, cfg.model)
    batch = loader.next_batch()
    rows = to_device(batch, run.world.device)
    assert rows.is_cuda and torch.equal(rows.cpu(), torch.from_numpy(np.asarray(batch)))
    for _ in range(2):  # compilation and first-step allocations may synchronise
        _train_step(run, optimizer, to_device(loader.next_batch(), run.world.device),
                    stage.micro_batch, stage.grad_accum)
    torch.cuda.synchronize()
    pinned, real_pin = [], torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self, *a, **k: pinned.append(1) or real_pin(self, *a, **k))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss, _ = _train_step(run, optimizer, to_device(loader.next_batch(), run.world.device),
                                  stage.micro_batch, stage.grad_accum)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    assert len(pinned) == 3  # one pinned batch per step


@pytest.mark.gpu
def test_float8_trains_compiled_on_a_gpu_with_fp8_tensor_cores(tiny_data, tmp_path):
    pytest.importorskip("torchao.float8", reason="torchao: the fp8 extra (carry its wheel)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 tensor cores (compute capability 8.9+)")
    curves = {}
    for mode in ("off", "tensorwise", "rowwise"):
        cfg = load_config(TINY, tiny_overrides(tiny_data, **{
            "runconfig.max_steps": 30, "runconfig.log_steps": 10, "runconfig.device": "cuda",
            "runconfig.parallel.compile": True, "runconfig.parallel.float8": mode}))
        run_mode(cfg, mode="train", model_dir=tmp_path / mode)
        curves[mode] = _losses(tmp_path / mode)
    for mode in ("tensorwise", "rowwise"):
        assert curves[mode][-1] < curves[mode][0] - 0.5, curves[mode]
        assert abs(curves[mode][-1] - curves["off"][-1]) < 0.1, curves


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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [0, 3000])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_fused_loss_triton_kernel_matches_reference(chunk, scale):
    """The Triton row kernel and the fused linear + CE against fp64 F.cross_entropy, under
    bf16 autocast, at an odd vocabulary (a partial last block)."""
    from lmfab.kernels.cross_entropy import _triton_kernel, fused_linear_cross_entropy

    assert _triton_kernel() is not None, "Triton should be importable next to CUDA torch"
    gen = torch.Generator(device="cuda").manual_seed(int(scale * 100) + chunk)
    n, c, v = 8192, 256, 50257
    h = torch.randn(n, c, device="cuda", generator=gen, requires_grad=True)
    w = (0.05 * torch.randn(v, c, device="cuda", generator=gen)).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, t, scale=scale, chunk=chunk)
    (3.0 * loss).backward()
    # Reference: the same bf16-rounded operands, fp64 arithmetic.
    hr = h.detach().bfloat16().double().requires_grad_()
    wr = w.detach().bfloat16().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(scale * hr @ wr.t(), t)
    (3.0 * ref).backward()
    assert abs(loss.item() - ref.item()) < 2e-3 * ref.item()
    assert h.grad.dtype == h.dtype and w.grad.dtype == torch.float32
    assert _rel(h.grad, hr.grad) < 1e-2 and _rel(w.grad, wr.grad) < 1e-2
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # eval path: loss only
        assert abs(fused_linear_cross_entropy(h, w, t, scale=scale).item() - ref.item()) < 2e-3 * ref.item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_attention_backends_agree_in_compiled_model(backend):
    """Each SDPA backend choice, compiled: loss and gradients within bf16 noise of math."""
    from lmfab.config import ModelConfig
    from lmfab.models.execution import Kernels, sdpa_priority
    from lmfab.models.gpt import build_model, materialize

    cfg = ModelConfig(vocab_size=512, n_layer=2, n_head=4, d_model=256, max_seq_len=256)
    idx = torch.randint(0, 512, (4, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    from torch.profiler import ProfilerActivity, profile

    results, kernels = {}, {}
    for name in ("math", backend):
        order = tuple(sdpa_priority(name, torch.device("cuda")))
        model = materialize(build_model(cfg, kernels=Kernels(sdpa_backends=order)), "cuda", seed=3)
        compiled = torch.compile(model)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(idx[:, :-1], idx[:, 1:])
            loss.backward()
            torch.cuda.synchronize()
        kernels[name] = " ".join(e.key.lower() for e in prof.key_averages())
        results[name] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
        torch._dynamo.reset()
    # The priority took effect: the chosen backend's kernels ran (cuDNN's own names contain
    # "flash" too, so flash and efficient must also show no cuDNN kernel).
    marker = {"cudnn": "cudnn", "flash": "flash", "efficient": "fmha"}[backend]
    assert marker in kernels[backend], kernels[backend][:2000]
    assert backend == "cudnn" or "cudnn" not in kernels[backend]
    assert abs(results[backend][0] - results["math"][0]) < 1e-2
    assert _rel(results[backend][1], results["math"][1]) < 3e-2


@pytest.mark.gpu
def test_fused_loss_and_bf16_residual_train_like_standard(tiny_data, tmp_path):
    """runconfig.kernels.loss=fused and residual_dtype=bf16 follow the standard loss curve."""
    curves = {}
    for name, extra in {"standard": {"runconfig.kernels.loss": "standard"},
                        "fused": {"runconfig.kernels.loss": "fused", "runconfig.kernels.residual_dtype": "bf16"}}.items():
        cfg = load_config(TINY, tiny_overrides(tiny_data, **{
            "runconfig.max_steps": 30, "runconfig.log_steps": 10, "runconfig.device": "cuda",
            **extra}))
        run_mode(cfg, mode="train", model_dir=tmp_path / name)
        curves[name] = _losses(tmp_path / name)
    for a, b in zip(curves["standard"], curves["fused"], strict=True):
        assert abs(a - b) < 0.05 * a, curves


@pytest.mark.gpu
def test_fused_loss_kernel_beyond_two_to_the_31_elements():
    """More than 2^31 logits: row offsets are 64-bit (the last rows are right)."""
    from lmfab.kernels.cross_entropy import ce_rows_

    n, v = 44_000, 50_304  # 2.21e9 elements, 4.4 GB in bf16
    logits = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
    tail = torch.randn(16, v, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    logits[-16:] = tail.bfloat16()
    logits[:-16] = 0.0
    targets = torch.randint(0, v, (n,), device="cuda")
    loss = ce_rows_(logits, targets, 1.0, 1.0)
    ref_in = tail.bfloat16().double()
    ref = torch.nn.functional.cross_entropy(ref_in, targets[-16:], reduction="none")
    assert torch.allclose(loss[-16:].double(), ref, rtol=1e-4, atol=1e-4)
    grad = torch.softmax(ref_in, -1)
    grad[torch.arange(16), targets[-16:]] -= 1.0
    assert _rel(logits[-16:], grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(3, 77, 200), (1000, 3 * 128 + 5)])  # partial tiles, slices
def test_bias_gelu_triton_kernels_match_reference(approximate, shape):
    """runconfig.kernels.mlp_kernel=fused: the forward and backward Triton kernels against fp32 GELU of
    the same bf16 inputs, and the bias gradient against the fp32 column sums."""
    from lmfab.kernels.bias_gelu import bias_gelu

    g = torch.Generator("cuda").manual_seed(0)
    h = (2 * torch.randn(*shape, device="cuda", generator=g)).bfloat16().requires_grad_(True)
    b = torch.randn(shape[-1], device="cuda", generator=g).requires_grad_(True)
    dy = torch.randn(*shape, device="cuda", generator=g).bfloat16()
    y = bias_gelu(h, b, approximate)
    dh, db = torch.autograd.grad(y, (h, b), dy)
    z = (h.detach().float() + b.detach()).requires_grad_(True)
    y_ref = torch.nn.functional.gelu(z, approximate=approximate)
    (dz_ref,) = torch.autograd.grad(y_ref, z, dy.float())
    assert _rel(y, y_ref) < 1e-2 and _rel(dh, dz_ref) < 1e-2
    assert _rel(db, dz_ref.flatten(0, -2).sum(0)) < 1e-5


@pytest.mark.gpu
def test_fused_mlp_kernel_trains_compiled_like_the_standard_one(tiny_data, tmp_path):
    curves = {}
    for kernel in ("standard", "fused"):
        cfg = load_config(TINY, tiny_overrides(tiny_data, **{
            "runconfig.max_steps": 30, "runconfig.log_steps": 10, "runconfig.device": "cuda",
            "runconfig.parallel.compile": True, "runconfig.kernels.mlp_kernel": kernel}))
        run_mode(cfg, mode="train", model_dir=tmp_path / kernel)
        curves[kernel] = _losses(tmp_path / kernel)
    for a, b in zip(curves["standard"], curves["fused"], strict=True):
        assert abs(a - b) < 0.02 * a, curves

