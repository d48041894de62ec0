"""Weight-only int8 and int4 quantization of a trained model, through torchao.

Every ``nn.Linear`` of the blocks (and an untied output head) gets quantized weights; the
activations stay in the model's dtype, and the embedding table (also the tied output
projection) stays as it is. What runs where, with torchao 0.18:

==========  ========================================  ========================================
scheme      CUDA (bf16 activations)                   CPU (fp32 or bf16 model)
==========  ========================================  ========================================
int8        ``Int8WeightOnlyConfig``: per-row scales  the same
int4        ``Int4WeightOnlyConfig`` tinygemm layout  torchao's ``Int4OpaqueTensor``
            (``tile_packed_to_4d``): two weights per  (``PrototypeInt4WeightOnlyConfig``):
            byte, groups of 128 (64, 32) inputs       two weights per byte, groups of 128
                                                      (64, 32), PyTorch's own CPU int4
                                                      matmul; the layer runs in bf16 (the
                                                      kernel's fast path) inside an fp32
                                                      model
==========  ========================================  ========================================

Groups span 128 input features, or 64 or 32 where 128 does not divide a layer's inputs; a
layer whose input width no group size divides (BTLM's d_ff = 6826) keeps per-row int8
weights under int4 on CUDA and per-row int4, one value per byte, on the CPU
(``IntxWeightOnlyConfig``): :func:`quantize_model` reports each such layer. So does a layer
whose output width is not a multiple of 16 (the packed kernel's rule), and a torchao without
the CPU int4 tensor puts every layer in that unpacked form; each is reported.

On a 2-core CPU (AMX, bf16) a 768 x 3072 layer at batch 1 takes 64 us packed against 1.2 ms
unpacked and 0.2 ms dense (docs/benchmarks.md has the whole-model figures).
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


class Bf16Linear(nn.Module):
    """A packed-int4 CPU linear inside a model of another dtype: the input goes in as bf16,
    the kernel's fast path (its fp32 path is 10-70x slower), and the output comes back in the
    input's dtype. ``inner`` is the quantized ``nn.Linear``."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.bfloat16)).to(x.dtype)


def _cpu_int4_config():
    """torchao's packed CPU int4 config, or None where this torchao has none."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    except ImportError:
        return None
    return PrototypeInt4WeightOnlyConfig


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


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
    cpu_int4 = _cpu_int4_config() if device.type == "cpu" and scheme == "int4" else None
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
        elif g is not None and cpu_int4 is not None and lin.out_features % 16 == 0:
            assign(("cpu-int4", g), lambda g=g: cpu_int4(group_size=g, set_inductor_config=False),
                   f"int4 groups of {g} (packed, bf16 compute)", name)
        elif g is not None:
            assign(("intx", g), lambda g=g: tq.IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=PerGroup(g)),
                f"int4 groups of {g} (stored unpacked: "
                + ("this torchao has no packed CPU int4)" if cpu_int4 is None else
                   "the packed kernel needs outputs in multiples of 16)"), name)
        else:
            assign("intx-row", lambda: tq.IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=PerAxis(0)),
                "int4 per-row (no group fits, stored unpacked)", name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, names in plan.items():
            config, label = configs[key]
            chosen = {linears[n] for n in names}
            packed_cpu = isinstance(key, tuple) and key[0] == "cpu-int4"
            if packed_cpu:  # the kernel's fast path takes bf16 weights and activations
                for n in names:
                    linears[n].to(torch.bfloat16)
            try:
                tq.quantize_(model, config, filter_fn=lambda m, fqn, chosen=chosen: m in chosen)
            except (ImportError, AssertionError, NotImplementedError, RuntimeError) as e:
                raise QuantizeError(f"--quantize {scheme} on {device.type}: torchao cannot "
                                    f"quantize {names[0]} ({type(e).__name__}: {e})") from e
            report.layers.update(dict.fromkeys(names, label))
            if packed_cpu:
                for n in names:
                    _replace(model, n, Bf16Linear(linears[n]))
    return report
