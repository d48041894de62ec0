"""Speed levers on CPU: the MLP's fused bias + GELU op (its Triton kernels are checked
against the same references in tests/test_gpu.py), the clip folded into fused AdamW, and
``ddp_split_graph: auto`` as resolved and as the run plan reports it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmfab.config import ModelConfig
from lmfab.config.schema import KernelsConfig, ParallelConfig
from lmfab.dist.parallel import split_ddp_graph
from lmfab.kernels.bias_gelu import bias_gelu
from lmfab.models.execution import Kernels
from lmfab.models.gpt import MLP
from lmfab.train.optim import clip_and_step


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_matches_gelu_of_the_sum(approximate, dtype):
    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(4, 7, 40, generator=g)).to(dtype).requires_grad_(True)
    b = torch.randn(40, generator=g, requires_grad=True)
    dy = torch.randn(4, 7, 40, generator=g).to(dtype)
    y = bias_gelu(h, b, approximate)
    dh, db = torch.autograd.grad(y, (h, b), dy)
    assert (y.dtype, dh.dtype, db.dtype) == (dtype, dtype, torch.float32)

    z = (h.detach().float() + b.detach()).requires_grad_(True)
    y_ref = F.gelu(z, approximate=approximate)
    (dz_ref,) = torch.autograd.grad(y_ref, z, dy.float())
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(dh.float(), dz_ref, atol=tol, rtol=tol)
    # the bias gradient sums the unrounded dz in fp32, whatever h's dtype
    torch.testing.assert_close(db, dz_ref.sum((0, 1)), atol=1e-5, rtol=1e-5)


def test_bias_gelu_compiles_into_one_graph_and_checks_its_arguments():
    h = torch.randn(6, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    compiled = torch.compile(lambda h, b: bias_gelu(h, b).square().sum(), fullgraph=True)
    compiled(h, b).backward()
    eager_h, eager_b = h.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.gelu(eager_h + eager_b).square().sum().backward()
    torch.testing.assert_close(h.grad, eager_h.grad)
    torch.testing.assert_close(b.grad, eager_b.grad)
    for op, args in ((torch.ops.lmfab.bias_gelu.default, (torch.randn(3, 8), torch.randn(8), "none")),
                     (torch.ops.lmfab.bias_gelu_backward.default,
                      (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), "tanh"))):
        torch.library.opcheck(op, args)
    with pytest.raises(ValueError, match="bias of shape"):
        bias_gelu(torch.randn(3, 8), torch.randn(7))
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu(torch.randn(3, 8), torch.randn(8), "erf")


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh"])
def test_fused_mlp_gives_the_plain_mlps_output_and_gradients(kind):
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=64, max_seq_len=8, mlp=kind)
    torch.manual_seed(0)
    plain = MLP(cfg)
    fused = MLP(cfg, Kernels(fused_mlp=True))
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 32)
    for m in (plain, fused):
        m(x).pow(2).sum().backward()
    torch.testing.assert_close(fused(x), plain(x))
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_fused_mlp_leaves_a_replaced_first_layer_in_charge():
    """float8 swaps fc for a Linear subclass with its own forward: the fused path must not
    bypass it (it would silently run bf16 matmuls and drop the subclass's behaviour)."""

    class Shifted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=64, max_seq_len=8)
    torch.manual_seed(0)
    m = MLP(cfg, Kernels(fused_mlp=True))
    shifted = Shifted(16, cfg.ffn_dim)
    shifted.load_state_dict(m.fc.state_dict())
    m.fc = shifted
    x = torch.randn(3, 16)
    expected = m.proj(F.gelu(shifted(x)))
    torch.testing.assert_close(m(x), expected)


def _model_and_grads(scale: float, fused: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    loss = scale * model(torch.randn(32, 8)).square().mean()
    loss.backward()
    return model, opt


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scale", [1e-3, 1e3])  # clip inactive, active
def test_clip_and_step_equals_clip_grad_norm_then_step(fused, scale):
    ref_model, ref_opt = _model_and_grads(scale, fused)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
    ref_opt.step()
    model, opt = _model_and_grads(scale, fused)
    norm = clip_and_step(opt, list(model.parameters()), 1.0)
    torch.testing.assert_close(norm, ref_norm)
    assert (norm > 1.0) == (scale > 1)
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    assert getattr(opt, "grad_scale", None) is None  # not left for the next step


def test_clip_and_step_without_a_limit_steps_on_the_raw_gradients():
    ref_model, ref_opt = _model_and_grads(1e3, True)
    ref_opt.step()
    model, opt = _model_and_grads(1e3, True)
    norm = clip_and_step(opt, list(model.parameters()), None)
    assert norm > 1.0
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p)


@pytest.mark.parametrize(("setting", "accum", "split"), [
    ("auto", 1, True), ("auto", 2, False), ("auto", 8, False),
    (True, 8, True), (False, 1, False)])
def test_ddp_graph_is_cut_only_when_every_micro_batch_reduces(setting, accum, split):
    assert split_ddp_graph(ParallelConfig(ddp_split_graph=setting), accum) is split


def test_mlp_kernel_auto_is_fused_only_on_cuda():
    from lmfab.models.execution import uses_fused_mlp

    assert uses_fused_mlp(KernelsConfig(), "cpu") is False
    assert uses_fused_mlp(KernelsConfig(mlp_kernel="fused"), "cpu") is True
    assert uses_fused_mlp(KernelsConfig(mlp_kernel="standard"), "cuda") is False


def test_the_run_plan_says_how_ddp_meets_compile():
    from lmfab.config import load_config
    from lmfab.train.plan import format_plan, plan_run

    from .conftest import CONFIGS

    path = CONFIGS / "train" / "tiny.yaml"  # global batch 16, micro-batch 8
    ddp = ["runconfig.parallel.compile=true", "runconfig.parallel.strategy=ddp"]
    assert plan_run(load_config(path, ddp), world_size=1).ddp_graph == ""  # no DDP
    assert plan_run(load_config(path, ddp[1:]), world_size=2).ddp_graph == ""  # not compiled
    fsdp = ["runconfig.parallel.compile=true", "runconfig.parallel.strategy=fsdp"]
    assert plan_run(load_config(path, fsdp), world_size=2).ddp_graph == ""
    # 2 devices x micro-batch 8 = the global batch: every micro-batch all-reduces
    assert "cut at the gradient buckets" in format_plan(plan_run(load_config(path, ddp), 2))
    # micro-batch 4: two per device per all-reduce
    accum = load_config(path, [*ddp, "train_input.micro_batch_size=4"])
    assert "DDP: one compiled graph" in format_plan(plan_run(accum, 2))
