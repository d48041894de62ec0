"""Bias + GELU for the MLP's first layer, with the bias gradient made in the same pass.

The plain path is ``F.gelu(fc(x))``: the GEMM adds the bias in its epilogue, a pointwise
kernel applies GELU, and in backward one kernel forms ``dz = dy * gelu'(z)`` and reduces it
over the rows into the bias gradient. At the Cerebras-GPT 1.3B shape (24,576 rows x 8,192
columns per layer) inductor's kernels for that took 22.6 ms per training step on an H200.

:func:`bias_gelu` takes the GEMM output *without* the bias and the bias itself. Forward is
one pointwise Triton kernel (read h, write gelu(h + b)); backward is one kernel over column
blocks x row slices, software-pipelined, that writes ``dz`` and each slice's fp32 column
sums, which a small sum turns into the bias gradient. In the same training step they took
19.5 ms (forward 7.9, backward 11.6; the lab log dev/LOG.md). Neither runs at the
card's bandwidth: erf and exp in fp32 cost about as much issue time as the bytes cost
memory time, so the forward is no faster than inductor's; the gain is in the backward.

cuBLASLt's own GELU epilogues (``GELU_AUX_BIAS`` forward, ``DGELU_BGRAD`` backward) were
tried through ctypes and measured no faster than these kernels on an H200 (dev/LOG.md,
docs/decisions.md; the patch is in dev/results/2026-11-29-h200-cublaslt-gelu-epilogues/).

Both are ``torch.library`` custom ops, so ``torch.compile`` keeps them in its graph (no
graph break) and autograd, activation checkpointing, DDP and FSDP2 see an ordinary op. Off
CUDA (or without Triton) the ops run the same math in PyTorch.

Numerics: h may be bf16 (the autocast GEMM's output); the bias add, GELU and its derivative
run in fp32, ``y`` and ``dz`` are written in h's dtype, the bias gradient is an fp32 sum of
the unrounded ``dz`` in the bias's dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_K = 0.044715

APPROXIMATIONS = ("none", "tanh")


@functools.lru_cache(maxsize=1)
def _triton_kernels():
    """(forward, backward) Triton kernels, or None where Triton is missing (CPU wheels)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _gelu_parts(z, TANH: tl.constexpr):
        """(gelu(z), gelu'(z)) in fp32."""
        if TANH:
            inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
            y = 0.5 * z * (1.0 + t)
            dy = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (
                1.0 + 3.0 * 0.044715 * z * z)
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            y = z * cdf
            dy = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
        return y, dy

    @triton.jit
    def bias_gelu_fwd(h_ptr, b_ptr, y_ptr, M, N, TANH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        z = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        y, _ = _gelu_parts(z, TANH)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bias_gelu_bwd(dy_ptr, h_ptr, b_ptr, dz_ptr, part_ptr, M, N, rows_per_slice,
                      TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      STAGES: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = tl.program_id(1)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # reduced over rows once, at the end
        start = s.to(tl.int64) * rows_per_slice
        for r in tl.range(0, rows_per_slice, BLOCK_M, num_stages=STAGES):
            rows = start + r + tl.arange(0, BLOCK_M)
            mask = (rows[:, None] < M) & col_ok[None, :]
            offs = rows[:, None] * N + cols[None, :]
            z = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
            g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            _, d = _gelu_parts(z, TANH)
            dz = tl.where(mask, g * d, 0.0)
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            acc += dz
        tl.store(part_ptr + s * N + cols, tl.sum(acc, axis=0), mask=col_ok)

    return bias_gelu_fwd, bias_gelu_bwd


def _reference(h: torch.Tensor, b: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(h.float() + b.float(), approximate=approximate)


def _gelu_grad(z: torch.Tensor, approximate: str) -> torch.Tensor:
    """d gelu(z) / dz, the same formulas as the Triton kernels."""
    if approximate == "tanh":
        t = torch.tanh(_TANH_C * (z + _TANH_K * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _TANH_C * (1.0 + 3.0 * _TANH_K * z * z)
    return 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton_kernels() is not None


# Launch settings of the kernels, chosen with benchmarks/mlp_activation.py --sweep on an H200:
# the forward's tile shape hardly matters (0.40-0.41 ms per 1.3B layer); the backward wants
# many programs per SM and a pipelined row loop (0.575 ms, against 0.746 with 4 programs per
# SM unpipelined and 1.0-1.1 ms with one tile per program).
FWD_CONFIG = {"block_m": 16, "block_n": 256, "num_warps": 4}
BWD_CONFIG = {"block_m": 32, "block_n": 128, "num_warps": 4, "programs_per_sm": 16,
              "stages": 3}


def _slices(m: int, n_col_blocks: int, block_m: int, programs_per_sm: int,
            device: torch.device) -> int:
    """Row slices for the backward grid: about ``programs_per_sm`` programs per SM, at least
    one row block each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, -(-programs_per_sm * sms // n_col_blocks))
    return min(want, -(-m // block_m))


@torch.library.custom_op("lmfab::bias_gelu", mutates_args=())
def _bias_gelu_op(h: torch.Tensor, b: torch.Tensor, approximate: str) -> torch.Tensor:
    if not _use_triton(h) or h.numel() == 0:
        return _reference(h, b, approximate).to(h.dtype)
    fwd, _ = _triton_kernels()
    n = h.shape[-1]
    h2 = h.reshape(-1, n).contiguous()  # the kernels index rows with stride n
    y = torch.empty_like(h2)
    m = h2.shape[0]
    c = FWD_CONFIG
    grid = (_cdiv(m, c["block_m"]), _cdiv(n, c["block_n"]))
    fwd[grid](h2, b, y, m, n, TANH=approximate == "tanh", BLOCK_M=c["block_m"],
              BLOCK_N=c["block_n"], num_warps=c["num_warps"])
    return y.view(h.shape)


@_bias_gelu_op.register_fake
def _(h, b, approximate):
    return torch.empty_like(h)


@torch.library.custom_op("lmfab::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(dy: torch.Tensor, h: torch.Tensor, b: torch.Tensor,
                           approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not _use_triton(h) or h.numel() == 0:
        dz = dy.float() * _gelu_grad(h.float() + b.float(), approximate)
        return dz.to(h.dtype), dz.flatten(0, -2).sum(0).to(b.dtype)
    _, bwd = _triton_kernels()
    n = h.shape[-1]
    h2, dy2 = h.reshape(-1, n).contiguous(), dy.reshape(-1, n).contiguous()
    m = h2.shape[0]
    c = BWD_CONFIG
    block_m, block_n = c["block_m"], c["block_n"]
    n_col_blocks = _cdiv(n, block_n)
    slices = _slices(m, n_col_blocks, block_m, c["programs_per_sm"], h.device)
    rows_per_slice = _cdiv(_cdiv(m, slices), block_m) * block_m
    slices = _cdiv(m, rows_per_slice)
    dz = torch.empty_like(h2)
    part = torch.empty((slices, n), dtype=torch.float32, device=h.device)
    bwd[(n_col_blocks, slices)](dy2, h2, b, dz, part, m, n, rows_per_slice,
                                TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
                                STAGES=c["stages"], num_warps=c["num_warps"])
    return dz.view(h.shape), part.sum(0).to(b.dtype)


@_bias_gelu_backward_op.register_fake
def _(dy, h, b, approximate):
    return torch.empty_like(h), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    h, b, approximate = inputs
    ctx.save_for_backward(h, b)
    ctx.approximate = approximate


def _backward(ctx, dy):
    h, b = ctx.saved_tensors
    dz, db = _bias_gelu_backward_op(dy, h, b, ctx.approximate)
    return dz, db, None


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(h: torch.Tensor, b: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(h + b, approximate=approximate)`` for h (..., N) contiguous, b (N,).

    h is a GEMM's output without its bias (``F.linear(x, w)``); the result has h's dtype.
    Backward gives the gradient of h in h's dtype and that of b in b's dtype, in one pass."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if b.ndim != 1 or h.shape[-1] != b.shape[0]:
        raise ValueError(f"bias_gelu: bias of shape {tuple(b.shape)} for h of shape "
                         f"{tuple(h.shape)}")
    return _bias_gelu_op(h.contiguous(), b, approximate)
