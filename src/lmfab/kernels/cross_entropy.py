"""Output projection + cross-entropy as one step, with the logits' gradient made in forward.

The standard path (``F.cross_entropy(logits.float(), targets)``) reads the (N, V) logits in
forward, keeps them for backward and reads them again there to form softmax - onehot: at the
GPT-2 124M shape (N = 32,768 positions, V = 50,304) inductor's two kernels for that took 9.1
ms of a 64 ms step on an H200 (dev/LOG.md). :func:`fused_linear_cross_entropy` makes
the logits with one matmul, then one row kernel (Triton on CUDA, PyTorch elsewhere) computes
each row's log-sum-exp and loss and overwrites the row, in place, with its gradient
``scale * (softmax - onehot) / N``. Backward has only the two matmuls left. Same FLOPs, about
a third of the memory traffic, and no fp32 copy of the logits.

With ``chunk`` < N the positions are processed ``chunk`` rows at a time and the two gradient
matmuls run in forward as well, so only one (chunk, V) block of logits exists at a time
(the idea behind Liger-Kernel's fused linear cross-entropy): for long sequences or large
vocabularies, at the cost of smaller matmuls.

Numerics: logits come from a matmul in the compute dtype (the autocast dtype, as
``F.linear`` under autocast); the log-sum-exp and softmax run in fp32; the output weight's
gradient is returned in fp32. Targets must lie in [0, V) (no ignore index; the Triton kernel
does not check, so the data loader's check that the tokenizer's vocabulary fits
``model.vocab_size`` is what guarantees it).
"""

from __future__ import annotations

import functools

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.lru_cache(maxsize=1)
def _triton_kernel():
    """The Triton row kernel, or None where Triton is missing (CPU wheels)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def ce_rows(logits_ptr, stride, targets_ptr, loss_ptr, V, scale, grad_scale,
                BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        # Read before pass 2 can overwrite it: the warps of a program are not in lockstep.
        x_t = tl.load(ptr + target).to(tl.float32) * scale
        cols = tl.arange(0, BLOCK)
        # Pass 1: online max and sum of exp, one lane per column of the block. The block-wide
        # reductions after it wait for every warp, so pass 2's writes follow all its reads.
        m = tl.full([BLOCK], -1.0e30, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            x = tl.load(ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * scale
            x = tl.where(mask, x, -float("inf"))
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
        tl.store(loss_ptr + row, lse - x_t)
        if WRITE_GRAD:  # pass 2 (the row is mostly still in L2): the gradient, in place
            g_mult = scale * grad_scale
            for off in range(0, V, BLOCK):
                mask = off + cols < V
                x = tl.load(ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * scale
                p = tl.exp(x - lse)
                p = tl.where(off + cols == target, p - 1.0, p)
                tl.store(ptr + off + cols, (p * g_mult).to(ptr.dtype.element_ty), mask=mask)

    return ce_rows


def ce_rows_(logits: torch.Tensor, targets: torch.Tensor, scale: float,
             grad_scale: float | None) -> torch.Tensor:
    """Per-row loss of ``scale * logits`` (N,) fp32; unless ``grad_scale`` is None, overwrites
    ``logits`` (N, V) with ``grad_scale * d(loss)/d(logits)`` = ``grad_scale * scale *
    (softmax - onehot)``."""
    kernel = _triton_kernel() if logits.is_cuda else None
    if kernel is not None:
        n, V = logits.shape
        if logits.stride(1) != 1:
            raise ValueError("ce_rows_: logits must be contiguous along the vocabulary")
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        kernel[(n,)](logits, logits.stride(0), targets, loss, V, float(scale),
                     float(grad_scale or 0.0), BLOCK=4096, WRITE_GRAD=grad_scale is not None,
                     num_warps=8)
        return loss
    z = logits.float() * scale
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    if grad_scale is None:
        return loss
    g = torch.exp(z - lse[:, None])
    g.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    logits.copy_(g * (scale * grad_scale))
    return loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, scale: float, chunk: int, dtype: torch.dtype):
        n = h.shape[0]
        hc, wc = h.to(dtype), w.to(dtype)
        ctx.dtypes = (h.dtype, w.dtype)
        if chunk >= n:  # one block: keep the logits' gradient, matmuls in backward
            g = hc @ wc.t()
            loss = ce_rows_(g, targets, scale, 1.0 / n).sum() / n
            ctx.save_for_backward(hc, wc, g)
            ctx.deferred = True
            return loss
        grad_h = torch.empty_like(hc)
        grad_w = torch.zeros(w.shape, dtype=torch.promote_types(dtype, torch.float32),
                             device=w.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk):
            hs = hc[start:start + chunk]
            g = hs @ wc.t()
            loss = loss + ce_rows_(g, targets[start:start + chunk], scale, 1.0 / n).sum()
            grad_h[start:start + chunk] = g @ wc
            grad_w += (g.t() @ hs).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.deferred = False
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):
        h_dtype, w_dtype = ctx.dtypes
        if ctx.deferred:
            hc, wc, g = ctx.saved_tensors
            grad_h = g @ wc
            grad_w = g.t() @ hc
        else:
            grad_h, grad_w = ctx.saved_tensors
        # Cast first, then scale: one rounding when grad_out is not a power of two.
        return (grad_h.to(h_dtype) * grad_out, grad_w.to(w_dtype) * grad_out,
                None, None, None, None)


@torch.compiler.disable
def fused_linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, *, scale: float = 1.0,
    chunk: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``scale * h @ w.T`` against ``targets``.

    h (N, C) hidden states, w (V, C) output weight, targets (N,) int64 in [0, V); ``chunk``:
    positions per block (0: all at once). Equal to ``F.cross_entropy((scale * h @ w.T).float(),
    targets)`` up to matmul rounding. Runs outside torch.compile (a graph break at the loss):
    it is one matmul and one kernel, with nothing left for the compiler to fuse.
    """
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    n = h.shape[0]
    chunk = n if chunk == 0 else min(chunk, n)
    dtype = _compute_dtype(h)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        with torch.autocast(h.device.type, enabled=False):
            return _FusedLinearCrossEntropy.apply(h, w, targets.contiguous(), float(scale),
                                                  int(chunk), dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    hc, wc = h.to(dtype), w.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, n, chunk):
            logits = hc[start:start + chunk] @ wc.t()
            total += ce_rows_(logits, targets[start:start + chunk].contiguous(), scale, None).sum()
    return total / n
