"""Execution choices of a model: which kernels compute it, decided before it is built.

They change how the model computes, never what (the same loss and gradients up to rounding),
so they are not model fields: checkpoints, presets and ``ModelConfig`` know nothing of them.
:func:`choose_kernels` reads them from ``runconfig.kernels`` for a device; the model receives the
frozen :class:`Kernels` at construction (``build_model(cfg.model, kernels=...)``) and nothing
sets attributes on a built module afterwards. The default, ``PLAIN = Kernels()``, is the
plain PyTorch path: what tests, evaluation and generation use unless they ask otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from lmfab.config.schema import KernelsConfig


@dataclass(frozen=True)
class Kernels:
    # output projection + cross-entropy as one matmul and one row kernel (kernels/cross_entropy.py)
    fused_loss: bool = False
    loss_chunk: int = 0  # fused loss: positions per block (0: all at once)
    fused_mlp: bool = False  # the MLP's bias + GELU as one op (kernels/bias_gelu.py)
    residual_dtype: torch.dtype | None = None  # the residual stream's dtype (None: the embedding's)
    sdpa_backends: tuple | None = None  # SDPA backends in priority order (None: PyTorch's)


PLAIN = Kernels()  # the plain PyTorch path, the default of every model


def uses_fused_loss(k: KernelsConfig, device_type: str) -> bool:
    """``runconfig.kernels.loss``: fused, or auto on CUDA."""
    return k.loss == "fused" or (k.loss == "auto" and device_type == "cuda")


def uses_fused_mlp(k: KernelsConfig, device_type: str) -> bool:
    """``runconfig.kernels.mlp_kernel``: fused, or auto on CUDA where Triton is installed (without it
    the op runs its PyTorch fallback, which inductor cannot fuse: slower than standard)."""
    if k.mlp_kernel == "auto":
        return device_type == "cuda" and importlib.util.find_spec("triton") is not None
    return k.mlp_kernel == "fused"


_SDPA_NAMES = ("cudnn", "flash", "efficient", "math")


def sdpa_priority(name: str, device: torch.device) -> list | None:
    """The SDPA backends, in priority order, for ``runconfig.kernels.attention_backend`` ``name`` on
    ``device``; None leaves PyTorch's own order (``torch``, CPUs, ``auto`` off Hopper).

    ``auto`` puts cuDNN first on Hopper (compute capability 9.x) where cuDNN is available: its
    fused attention is 1.5-1.8x the flash backend there (benchmarks/sdpa_backends.py). Every
    other backend stays enabled after the chosen one, so a shape or feature the first does
    not support (dropout, grouped-query attention) falls back instead of failing.
    """
    from torch.nn.attention import SDPBackend

    if name == "torch" or device.type != "cuda":
        return None
    if name == "auto":
        hopper = torch.cuda.get_device_capability(device)[0] == 9
        if not (hopper and torch.backends.cudnn.is_available()):
            return None
        name = "cudnn"
    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name not in table:
        raise ValueError(f"attention backend {name!r}: expected auto, torch or one of {_SDPA_NAMES}")
    return [table[name]] + [table[n] for n in _SDPA_NAMES if n != name]


def choose_kernels(k: KernelsConfig, device: torch.device, *, bf16: bool) -> Kernels:
    """The kernels ``runconfig.kernels`` asks for on ``device`` (``bf16``: training under bf16
    autocast, which the bf16 residual stream needs)."""
    order = sdpa_priority(k.attention_backend, device)
    return Kernels(
        fused_loss=uses_fused_loss(k, device.type),
        loss_chunk=k.loss_chunk,
        fused_mlp=uses_fused_mlp(k, device.type),
        residual_dtype=torch.bfloat16 if bf16 and k.residual_dtype == "bf16" else None,
        sdpa_backends=None if order is None else tuple(order),
    )
