"""ALiBi attention speed on a GPU: lmfab's FlexAttention path against causal SDPA (flash).

    python benchmarks/alibi_attention.py [--B 4 --H 16 --T 2048,8192 --D 128] [--json out.json]

Times forward + backward (bf16) of:
  sdpa-causal        F.scaled_dot_product_attention(is_causal=True), no bias: the floor
  sdpa-bias          SDPA with a materialised (H, T, T) ALiBi + causal bias (what ALiBi costs
                     without a fused kernel; skipped where it would not fit comfortably)
  flex-<variant>     torch.compile(flex_attention) with lmfab's ALiBi score_mod and a causal
                     block mask, for several kernel-option variants; "default" uses
                     FlexAttention's own choice
and checks every variant's output and gradients against SDPA with a float32 bias.
Prints a table with time and ratio to sdpa-causal; the best variant is what
``lmfab.kernels.alibi.ALIBI_KERNEL_OPTIONS`` should hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfab.models.attention import alibi_slopes  # noqa: E402

VARIANTS: dict[str, dict | None] = {
    "default": None,
    "safe-rows": {"ROWS_GUARANTEED_SAFE": True},
    "m128n64-w8-s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3,
                      "ROWS_GUARANTEED_SAFE": True},
    "m128n128-w8-s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2,
                       "ROWS_GUARANTEED_SAFE": True},
    "m64n128-w4-s3": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3,
                      "ROWS_GUARANTEED_SAFE": True},
    "bwd-m64n128": {"ROWS_GUARANTEED_SAFE": True, "BLOCK_M1": 64, "BLOCK_N1": 128,
                    "BLOCK_M2": 128, "BLOCK_N2": 64, "num_warps": 8, "num_stages": 3},
    "bwd-m64n128-fwd-m128n64": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 128,
                                "BLOCK_M2": 128, "BLOCK_N2": 64, "num_warps": 8, "num_stages": 3},
    "bwd-m32n128": {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32,
                    "num_warps": 8, "num_stages": 3},
}


def bench(fn, *args, reps: int = 30) -> float:
    """Median ms of fn(*args) forward + backward, CUDA events, after warm-up."""
    q, k, v = args
    for _ in range(5):
        fn(q, k, v).sum().backward()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--T", default="2048,8192")
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json")
    args = p.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = torch.device("cuda")
    slopes = alibi_slopes(args.H).to(dev)
    rows = []
    for T in [int(t) for t in args.T.split(",")]:
        g = torch.Generator(device=dev).manual_seed(T)
        q, k, v = (torch.randn(args.B, args.H, T, args.D, device=dev, dtype=torch.bfloat16,
                               generator=g).requires_grad_() for _ in range(3))
        scale = args.D**-0.5
        i = torch.arange(T, device=dev)
        rel = (i[None, :] - i[:, None]).float()

        def bias(dtype, rel=rel):
            return (slopes[:, None, None] * rel).masked_fill(rel > 0, float("-inf")).to(dtype)

        # Reference in float32 (forward output and gradients).
        ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*ref_in, attn_mask=bias(torch.float32), scale=scale)
        ref.backward(torch.ones_like(ref))

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=dev)
        base = bench(lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=True), q, k, v)
        rows.append({"T": T, "impl": "sdpa-causal", "ms": base, "ratio": 1.0, "err": None})
        if T <= 4096:
            bb = bias(torch.bfloat16)
            ms = bench(lambda a, b_, c, bb=bb, scale=scale: F.scaled_dot_product_attention(
                a, b_, c, attn_mask=bb, scale=scale), q, k, v)
            rows.append({"T": T, "impl": "sdpa-bias", "ms": ms, "ratio": ms / base, "err": None})
            del bb
        for name in args.variants.split(","):
            opts = VARIANTS[name]
            # A fresh compile per variant: each option set is a new graph, and dynamo's
            # recompile limit would otherwise silently drop later ones to the eager path.
            torch._dynamo.reset()
            flex = torch.compile(flex_attention, dynamic=False)
            def fn(a, b_, c, opts=opts, mask=mask, scale=scale, flex=flex):
                return flex(a, b_, c, score_mod=alibi, block_mask=mask, scale=scale,
                            kernel_options=opts)
            try:
                for t in (q, k, v):
                    t.grad = None
                out = fn(q, k, v)
                out.backward(torch.ones_like(out))
                errs = [((out.float() - ref).norm() / ref.norm()).item()] + [
                    ((t.grad.float() - r.grad).norm() / r.grad.norm()).item()
                    for t, r in zip((q, k, v), ref_in, strict=True)]
                ms = bench(fn, q, k, v)
                rows.append({"T": T, "impl": f"flex-{name}", "ms": ms, "ratio": ms / base,
                             "err": max(errs), "options": opts})
            except Exception as e:  # a variant the compiler rejects: report, go on
                rows.append({"T": T, "impl": f"flex-{name}", "ms": None, "ratio": None,
                             "err": None, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(rows[-1], file=sys.stderr, flush=True)
        del q, k, v, ref_in, ref
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | B={args.B} H={args.H} "
          f"D={args.D} bf16, forward+backward, median of 30")
    print("| T | impl | ms | × causal SDPA | max rel. error vs fp32 |\n|---|---|---:|---:|---:|")
    for r in rows:
        ms = "failed: " + r["error"] if r.get("error") else f"{r['ms']:.3f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        err = "" if r["err"] is None else f"{r['err']:.1e}"
        print(f"| {r['T']} | {r['impl']} | {ms} | {ratio} | {err} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
