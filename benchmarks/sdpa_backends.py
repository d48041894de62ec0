"""Causal attention forward + backward through each SDPA backend on a GPU (bf16).

    python benchmarks/sdpa_backends.py

Shapes: the GPT-2 124M step (B=32, H=12, T=1024, d_head=64) and the Cerebras-GPT 1.3B step
(B=12, H=16, T=2048, d_head=128); backends flash, cuDNN, mem-efficient and FlexAttention
(causal block mask). Prints median ms per backend and the speed-up over
flash; a backend the build lacks for a shape is reported, not hidden.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfab.train.profile import cuda_time_ms  # noqa: E402

SHAPES = {"124M": (32, 12, 1024, 64), "1.3B": (12, 16, 2048, 128)}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "flex": None}


def main() -> int:
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cuDNN "
          f"{torch.backends.cudnn.version()}")
    print("| shape | backend | ms fwd+bwd | × flash |\n|---|---|---:|---:|")
    for name, (B, H, T, D) in SHAPES.items():
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        ref = None
        for label, backend in BACKENDS.items():
            def step(backend=backend, q=q, k=k, v=v):
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(torch.ones_like(out))
                return out
            if label == "flex":  # FlexAttention, causal block mask (lmfab's ALiBi kernel family)
                from torch.nn.attention.flex_attention import flex_attention

                from lmfab.kernels.alibi import causal_block_mask
                flex, mask = torch.compile(flex_attention), causal_block_mask(T, q.device)

                def step(q=q, k=k, v=v, flex=flex, mask=mask):
                    out = flex(q, k, v, block_mask=mask)
                    out.backward(torch.ones_like(out))
                    return out
            try:
                out = step()
                ms = cuda_time_ms(step)
            except RuntimeError as e:
                print(f"| {name} | {label} | unavailable: {str(e)[:60]} | |")
                continue
            if ref is None:
                ref, base = out.detach().float(), ms
            err = ((out.detach().float() - ref).norm() / ref.norm()).item()
            print(f"| {name} | {label} | {ms:.3f} | {base / ms:.2f}× (err {err:.1e}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
