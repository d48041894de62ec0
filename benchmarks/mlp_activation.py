"""The MLP's bias + GELU, forward + backward, on a GPU: inductor's kernels against lmfab's.

    python benchmarks/mlp_activation.py [--json out.json]

For each training shape (the GPT-2 124M step: 32,768 rows x 3,072; the Cerebras-GPT 1.3B
step: 24,576 x 8,192) it times, median of 30 after 5 warm-ups (each the mean of 10 calls in a
row), bf16 activations and fp32 bias and weights:

- ``act`` rows: the activation alone. ``inductor`` is ``torch.compile(F.gelu(z))`` with the
  gradient of z and the bias gradient ``dz.sum(0)`` (what the compiled model runs after a
  GEMM that added the bias in its epilogue); ``lmfab`` is
  :func:`lmfab.kernels.bias_gelu.bias_gelu` on the bias-free GEMM output.
- ``fc`` rows: the whole first MLP layer under bf16 autocast, ``F.gelu(F.linear(x, w, b))``
  compiled, against ``bias_gelu(F.linear(x, w), b)`` compiled: GEMMs included, so the
  difference is what a training step would see.

Outputs and gradients are checked against an fp32 reference. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfab.kernels.bias_gelu import bias_gelu  # noqa: E402
from lmfab.train.profile import cuda_time_ms  # noqa: E402

SHAPES = {"124M": (32768, 768, 3072), "1.3B": (24576, 2048, 8192)}


def time_ms(fn) -> float:
    """10 calls in a row per timing, so the op's host dispatch overlaps the GPU's work as in a
    training step (the first 2026-11-29 sweep took one call per timing)."""
    return cuda_time_ms(fn, inner=10)


FWD_SWEEP = [dict(block_m=16, block_n=256, num_warps=4), dict(block_m=32, block_n=256, num_warps=8),
             dict(block_m=8, block_n=512, num_warps=4), dict(block_m=64, block_n=128, num_warps=4)]
ONE_TILE = 10**9  # programs per SM: one row block per program (no loop)
BWD_SWEEP = [
    dict(block_m=32, block_n=128, num_warps=4, programs_per_sm=4, stages=1),
    dict(block_m=32, block_n=128, num_warps=4, programs_per_sm=16, stages=1),
    dict(block_m=32, block_n=128, num_warps=4, programs_per_sm=16, stages=3),
    dict(block_m=16, block_n=256, num_warps=4, programs_per_sm=16, stages=1),
    dict(block_m=64, block_n=128, num_warps=8, programs_per_sm=8, stages=2),
    dict(block_m=64, block_n=256, num_warps=8, programs_per_sm=ONE_TILE, stages=1),
    dict(block_m=32, block_n=256, num_warps=4, programs_per_sm=ONE_TILE, stages=1),
    dict(block_m=128, block_n=128, num_warps=8, programs_per_sm=ONE_TILE, stages=1),
]


def sweep(name: str, h, b, dy, approx: str) -> list[dict]:
    """Each kernel alone under each launch setting: ms and GB/s of the bytes it must move."""
    from lmfab.models import activation as act

    out = []
    fwd_bytes = 2 * h.numel() * h.element_size()
    bwd_bytes = 3 * h.numel() * h.element_size()
    saved = dict(act.FWD_CONFIG), dict(act.BWD_CONFIG)
    try:
        for kind, configs, table, nbytes in (("fwd", FWD_SWEEP, act.FWD_CONFIG, fwd_bytes),
                                              ("bwd", BWD_SWEEP, act.BWD_CONFIG, bwd_bytes)):
            for c in configs:
                table.clear()
                table.update(c)
                if kind == "fwd":
                    fn = lambda: torch.ops.lmfab.bias_gelu(h, b.detach(), approx)  # noqa: E731
                else:
                    fn = lambda: torch.ops.lmfab.bias_gelu_backward(  # noqa: E731
                        dy, h, b.detach(), approx)
                ms = time_ms(fn)
                out.append({"shape": name, "part": f"sweep-{kind}", "config": c, "ms": ms,
                            "gb_per_s": nbytes / ms / 1e6})
                print(f"| {name} | {kind} alone | {c} | {ms:.3f} | {nbytes / ms / 1e6:.0f} GB/s "
                      "| |", flush=True)
    finally:
        act.FWD_CONFIG.clear()
        act.FWD_CONFIG.update(saved[0])
        act.BWD_CONFIG.clear()
        act.BWD_CONFIG.update(saved[1])
    return out


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).abs().max() / ref.abs().max())


def bench_shape(name: str, approx: str, do_sweep: bool) -> list[dict]:
    M, K, N = SHAPES[name]
    dev = torch.device("cuda")
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(M, N, device=dev, dtype=torch.bfloat16, generator=g)
    b = (0.1 * torch.randn(N, device=dev, generator=g)).requires_grad_(True)
    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16, generator=g)
    # fp32 reference on the same bf16 inputs
    z_ref = (h.float() + b.detach()).requires_grad_(True)
    y_ref = F.gelu(z_ref, approximate=approx)
    (dz_ref,) = torch.autograd.grad(y_ref, z_ref, dy.float())
    refs = (y_ref, dz_ref, dz_ref.sum(0))

    # inductor: the bias added in the compiled graph (as the GEMM epilogue does in the model,
    # in the compute dtype), its gradient reduced in the compiled backward
    hh = h.clone().requires_grad_(True)
    ind = torch.compile(lambda h, b: F.gelu(h + b.to(h.dtype), approximate=approx))

    def run_inductor():
        y = ind(hh, b)
        return (y, *torch.autograd.grad(y, (hh, b), dy))

    def run_lmfab():
        y = bias_gelu(hh, b, approx)
        return (y, *torch.autograd.grad(y, (hh, b), dy))

    base = None
    for impl, fn in (("inductor", run_inductor), ("lmfab", run_lmfab)):
        errs = tuple(rel(a, r) for a, r in zip(fn(), refs, strict=True))
        ms = time_ms(fn)
        base = base or ms
        rows.append({"shape": name, "part": "act", "impl": impl, "ms": ms, "errors": errs})
        print(f"| {name} | act | {impl} | {ms:.3f} | {base / ms:.2f}× | "
              + ", ".join(f"{e:.1e}" for e in errs) + " |", flush=True)
    if do_sweep:
        rows += sweep(name, h, b, dy, approx)

    x = torch.randn(M, K, device=dev, generator=g).requires_grad_(True)
    w = (0.02 * torch.randn(N, K, device=dev, generator=g)).requires_grad_(True)
    std = torch.compile(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approx))
    ours = torch.compile(lambda x, w, b: bias_gelu(F.linear(x, w), b, approx))
    base = None
    for impl, f in (("inductor", std), ("lmfab", ours)):
        def step(f=f):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = f(x, w, b)
            return torch.autograd.grad(y, (x, w, b), dy)
        ms = time_ms(step)
        base = base or ms
        rows.append({"shape": name, "part": "fc", "impl": impl, "ms": ms})
        print(f"| {name} | fc | {impl} | {ms:.3f} | {base / ms:.2f}× | |", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--approximate", default="none", choices=("none", "tanh"))
    ap.add_argument("--sweep", action="store_true",
                    help="also time the kernels alone under several launch settings")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | GELU approximate="
          f"{args.approximate}")
    print("| shape | part | impl | ms fwd+bwd | × inductor | max rel err (y, dz, db) |\n"
          "|---|---|---|---:|---:|---|")
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, args.approximate, args.sweep)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                               "torch": torch.__version__, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
