"""The GPT module: shapes, initialisation, parameter counts and FLOPs accounting."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmfab.config import ModelConfig
from lmfab.models import build_model, materialize
from lmfab.models.execution import Kernels


def small(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=64, vocab_size=101, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def test_forward_backward_shapes():
    model = materialize(build_model(small()), "cpu", seed=0)
    idx = torch.randint(0, 101, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 101)
    loss = model(idx, torch.randint(0, 101, (3, 17)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Untrained, small-std init: loss near ln(V) = 4.6.
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_meta_build_allocates_nothing_and_init_is_seeded():
    meta = build_model(small())
    assert all(p.is_meta for p in meta.parameters())
    a = materialize(build_model(small()), "cpu", seed=1)
    b = materialize(build_model(small()), "cpu", seed=1)
    c = materialize(build_model(small()), "cpu", seed=2)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), n
        if pa.ndim > 1:
            assert not torch.equal(pa, pc), n
    std = a.blocks[0].mlp.fc.weight.std().item()
    assert 0.015 < std < 0.025  # init_std 0.02
    assert a.blocks[0].attn.proj.weight.std().item() < 0.012  # scaled by 1/sqrt(2 n_layer)


def test_causality():
    model = materialize(build_model(small()), "cpu", seed=0).eval()
    idx = torch.randint(0, 101, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 101
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tied_and_untied():
    tied = build_model(small())
    untied = build_model(small(tied_embeddings=False))
    assert untied.num_params() - tied.num_params() == 101 * 64
    assert tied.lm_head is None


def test_gpt2_small_parameter_count():
    # GPT-2 124M: 12 x 768, vocab 50257, 1024 positions, tied: 124,439,808 parameters.
    cfg = ModelConfig(n_layer=12, n_head=12, d_model=768, vocab_size=50257, max_seq_len=1024)
    assert build_model(cfg).num_params() == 124_439_808


@pytest.mark.parametrize("shape", [(2, 4, 64, 101, 32), (3, 6, 96, 500, 64)])
def test_flops_per_token_matches_flop_counter(shape):
    """6N + 12LdT against torch's own FLOP counter over a real forward+backward."""
    n_layer, n_head, d, vocab, T = shape
    cfg = small(n_layer=n_layer, n_head=n_head, d_model=d, vocab_size=vocab, max_seq_len=T)
    model = materialize(build_model(cfg), "cpu", seed=0)
    B = 2
    idx = torch.randint(0, vocab, (B, T))
    # The math backend runs attention as explicit matmuls, which the counter sees.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx).backward()
    counted = counter.get_total_flops() / (B * T)
    # The counter sees matmuls only (no biases, norms, GELU, softmax): those are the
    # 6 x (bias + norm parameters) that 6N counts and it does not.
    small_params = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 1)
    predicted = model.flops_per_token(T) - 6 * small_params
    assert counted == pytest.approx(predicted, rel=1e-6)


def test_sequence_longer_than_positions_fails():
    model = materialize(build_model(small()), "cpu")
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("chunk", [0, 7, 1000])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_fused_linear_cross_entropy_matches_f_cross_entropy(chunk, scale):
    from lmfab.kernels.cross_entropy import fused_linear_cross_entropy

    gen = torch.Generator().manual_seed(chunk + int(10 * scale))
    h = torch.randn(100, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 37, (100,), generator=gen)
    ref = torch.nn.functional.cross_entropy(scale * h @ w.t(), t)
    (2 * ref).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = fused_linear_cross_entropy(h, w, t, scale=scale, chunk=chunk)
    (2 * out).backward()  # the incoming gradient scales both parameter gradients
    # The loss runs in fp32 (as the standard loss on .float() logits): fp32-level agreement.
    assert abs(out.item() - ref.item()) < 1e-5
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert abs(fused_linear_cross_entropy(h, w, t, scale=scale, chunk=chunk).item() - ref.item()) < 1e-5


def test_fused_loss_and_bf16_residual_in_the_model():
    """GPT.fused_loss gives the standard loss and gradients (muP logit scale included); the
    bf16 residual stream changes the activations' dtype, not the result beyond bf16 noise."""
    cfg = small(mup_base_d_model=32, output_mult=2.0)
    idx, tgt = torch.randint(0, 101, (3, 17)), torch.randint(0, 101, (3, 17))
    grads = {}
    for fused in (False, True):
        kernels = Kernels(fused_loss=fused, loss_chunk=5 if fused else 0)
        model = materialize(build_model(cfg, kernels=kernels), "cpu", seed=4)
        loss = model(idx, tgt)
        loss.backward()
        grads[fused] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert abs(grads[True][0] - grads[False][0]) < 1e-5
    for a, b in zip(grads[True][1], grads[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model = materialize(build_model(cfg, kernels=Kernels(residual_dtype=torch.bfloat16)), "cpu",
                        seed=4)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, tgt)
    assert seen == [torch.bfloat16]
    assert abs(loss.item() - grads[False][0]) < 0.05


def test_attention_backend_priority():
    from lmfab.config import KernelsConfig
    from lmfab.models.attention import Attention
    from lmfab.models.execution import choose_kernels, sdpa_priority

    cpu = torch.device("cpu")
    assert sdpa_priority("auto", cpu) is None and sdpa_priority("cudnn", cpu) is None
    # A named backend on CUDA: first, then the others as fall-backs (no CUDA call needed).
    cuda = torch.device("cuda")
    assert sdpa_priority("flash", cuda) == [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    assert sdpa_priority("torch", cuda) is None
    with pytest.raises(ValueError, match="attention backend 'fa3'"):
        sdpa_priority("fa3", cuda)
    kernels = choose_kernels(KernelsConfig(attention_backend="flash"), cpu, bf16=False)
    model = materialize(build_model(small(), kernels=kernels), "cpu", seed=0)
    assert all(m.sdpa_backends is None for m in model.modules() if isinstance(m, Attention))
    # The priority list path runs through sdpa_kernel on any device.
    model = materialize(build_model(small(), kernels=Kernels(sdpa_backends=(SDPBackend.MATH,))),
                        "cpu", seed=0)
    idx = torch.randint(0, 101, (2, 9))
    ref = materialize(build_model(small()), "cpu", seed=0)(idx)
    torch.testing.assert_close(model(idx), ref)


def test_compile_module_maps_compile_mode():
    """runconfig.parallel.compile_mode reaches torch.compile as its mode or inductor options."""
    from lmfab.config import ParallelConfig
    from lmfab.dist.parallel import compile_module

    class Recorder(torch.nn.Module):
        def compile(self, *args, **kwargs):
            self.seen = kwargs

    expected = {"default": {}, "tuned": {"options": {"coordinate_descent_tuning": True}},
                "max-autotune-no-cudagraphs": {"mode": "max-autotune-no-cudagraphs"},
                "reduce-overhead": {"mode": "reduce-overhead"}}
    for mode, kwargs in expected.items():
        m = Recorder()
        compile_module(m, ParallelConfig(compile=True, compile_mode=mode))
        assert m.seen == kwargs, mode


def test_resume_check_refuses_a_key_only_the_checkpoint_has(tmp_path):
    import yaml

    from lmfab.checkpoint import check_resumable
    from lmfab.config import ConfigError, load_config, write_config

    from .conftest import CONFIGS

    cfg = load_config(CONFIGS / "train" / "tiny.yaml")
    write_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "state.json").write_text('{"format": 1, "step": 1, "loader": {"stage": 0}}')
    check_resumable(tmp_path, cfg)  # the same config resumes
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["model"]["n_experts"] = 8  # a field this lmfab does not have
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="n_experts"):
        check_resumable(tmp_path, cfg)


_INTERPRETER_CHECK = """
import json, sys, torch, torch.nn.functional as F
from lmfab.kernels.cross_entropy import _triton_kernel
dtype = getattr(torch, sys.argv[1])
gen = torch.Generator().manual_seed(7)
n, v, scale = 6, 9000, 0.37
logits = (3 * torch.randn(n, v, generator=gen)).to(dtype)
targets = torch.randint(0, v, (n,), generator=gen)
ref_in = logits.double() * scale
loss, grad = torch.empty(n, dtype=torch.float32), logits.clone()
_triton_kernel()[(n,)](grad, grad.stride(0), targets, loss, v, scale, 0.5, BLOCK=4096,
                       WRITE_GRAD=True)
ref = F.cross_entropy(ref_in, targets, reduction="none")
ref_grad = torch.softmax(ref_in, -1)
ref_grad[torch.arange(n), targets] -= 1.0
ref_grad *= scale * 0.5
print(json.dumps({"loss": (loss.double() - ref).abs().max().item(),
                  "grad": ((grad.double() - ref_grad).norm() / ref_grad.norm()).item()}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ce_row_kernel_in_triton_interpreter(dtype):
    """The Triton row kernel itself, run by Triton's CPU interpreter (TRITON_INTERPRET=1, in
    a fresh process so the flag holds from import) where Triton is installed (GPU machines;
    CPU-only installs skip, with this reason): loss and in-place gradient against fp64, with
    a partial last block and a logit scale."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="needs the triton package (CUDA builds of torch ship it)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK, dtype], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["loss"] < 1e-5
    assert err["grad"] < (1e-6 if dtype == "float32" else 1e-2)
