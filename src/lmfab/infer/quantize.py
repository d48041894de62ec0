"""Weight-only int8 and int4 quantization of a trained model, through torchao.

Every ``nn.Linear`` of the blocks (and an untied output head) gets quantized weights; the
activations stay in the model's dtype, and the embedding table (also the tied output
projection) stays as it is. What runs where, with torchao 0.18:

==========  ========================================  ========================================
scheme      CUDA (bf16 activations)                   CPU (fp32 or bf16 activations)
==========  ========================================  ========================================
int8        ``Int8WeightOnlyConfig``: per-row scales  the same
int4        ``Int4WeightOnlyConfig`` tinygemm layout  ``IntxWeightOnlyConfig(int4, PerGroup)``:
            (``tile_packed_to_4d``): two weights per  int4 values and per-group scales, stored
            byte, groups of 128 (64, 32) inputs       one value per byte (int8 memory, int4
                                                      accuracy; torchao's packed CPU kernels
                                                      are not part of its wheel)
==========  ========================================  ========================================

Groups span 128 input features, or 64 or 32 where 128 does not divide a layer's inputs; a
layer whose input width no group size divides (BTLM's d_ff = 6826) keeps per-row int8
weights under int4 on CUDA and per-row int4 on the CPU: :func:`quantize_model` reports each
such layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

SCHEMES = ("int8", "int4")
GROUP_SIZES = (128, 64, 32)


class QuantizeError(ValueError):
    """A scheme this device (or this torchao) cannot run; the message says what can."""


@dataclass
class QuantizeReport:
    scheme: str
    device: str
    layers: dict[str, str] = field(default_factory=dict)  # linear name -> what it became

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for v in self.layers.values():
            kinds[v] = kinds.get(v, 0) + 1
        return f"{self.scheme} on {self.device}: " + ", ".join(
            f"{n} x {k}" for k, n in sorted(kinds.items()))


def supported(device_type: str) -> tuple[str, ...]:
    """The schemes that run on this device type with the installed torchao."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return ()
    return SCHEMES if device_type in ("cpu", "cuda") else ()


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers, quantized tensors counted by their parts."""
    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += nbytes(t)
    return total


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _group(in_features: int) -> int | None:
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def quantize_model(model: nn.Module, scheme: str) -> QuantizeReport:
    """Quantize ``model``'s linear weights in place (``scheme``: int8 or int4)."""
    device = next(model.parameters()).device
    if scheme not in SCHEMES:
        raise QuantizeError(f"--quantize {scheme}: expected one of {', '.join(SCHEMES)}")
    ok = supported(device.type)
    if scheme not in ok:
        raise QuantizeError(
            f"--quantize {scheme} does not run on {device.type} here; supported on "
            f"{device.type}: {', '.join(ok) or 'none (is torchao installed?)'}; "
            "int8 and int4 run on cpu and cuda")
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerAxis, PerGroup

    report = QuantizeReport(scheme, device.type)
    linears = _linears(model)
    plan: dict[object, list[str]] = {}  # config -> layer names
    configs: dict[object, tuple[object, str]] = {}

    def assign(key, make, label, name):
        if key not in configs:
            configs[key] = (make(), label)
        plan.setdefault(key, []).append(name)

    for name, lin in linears.items():
        g = _group(lin.in_features)
        if scheme == "int8":
            assign("int8", tq.Int8WeightOnlyConfig, "int8 per-row", name)
        elif device.type == "cuda" and g is not None:
            if next(lin.parameters()).dtype != torch.bfloat16:
                raise QuantizeError("--quantize int4 on cuda needs bf16 weights (the tinygemm "
                                    "kernel's); cast the model with .to(torch.bfloat16) first")
            assign(("int4", g), lambda g=g: tq.Int4WeightOnlyConfig(
                group_size=g, int4_packing_format="tile_packed_to_4d"),
                f"int4 groups of {g}", name)
        elif device.type == "cuda":
            assign("int8", tq.Int8WeightOnlyConfig, "int8 per-row (no int4 group fits)", name)
        elif g is not None:
            assign(("intx", g), lambda g=g: tq.IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=PerGroup(g)),
                f"int4 groups of {g} (stored unpacked)", name)
        else:
            assign("intx-row", lambda: tq.IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=PerAxis(0)),
                "int4 per-row (no group fits, stored unpacked)", name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, names in plan.items():
            config, label = configs[key]
            chosen = {linears[n] for n in names}
            try:
                tq.quantize_(model, config, filter_fn=lambda m, fqn, chosen=chosen: m in chosen)
            except (ImportError, AssertionError, NotImplementedError, RuntimeError) as e:
                raise QuantizeError(f"--quantize {scheme} on {device.type}: torchao cannot "
                                    f"quantize {names[0]} ({type(e).__name__}: {e})") from e
            report.layers.update(dict.fromkeys(names, label))
    return report
