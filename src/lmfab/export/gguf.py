"""``lmfab export gguf``: one GGUF file that llama.cpp loads and generates with.

The file is written with the ``gguf`` package (llama.cpp's own writer). The llama.cpp
architecture follows from the model's fields, never from a preset's name:

=============  ======================================================  ====================
llama.cpp      lmfab fields                                            lmfab presets
=============  ======================================================  ====================
``gpt2``       pos learned, layernorm, gelu / gelu_tanh, bias,         tiny-learned,
               sequential residual                                     Cerebras-GPT
``llama``      pos rope, rmsnorm, swiglu, no bias, sequential          tiny-llama, llama-1b
``gptneox``    pos rope, layernorm, gelu / gelu_tanh, bias             tiny-neox, NeoX-20B
               (parallel residual or not, rotary on a share of dims)
``jais``       pos alibi, layernorm, swiglu, bias, sequential          tiny-alibi-swiglu,
                                                                       BTLM, Jais
=============  ======================================================  ====================

Any other combination is refused, naming the fields that have no llama.cpp architecture.

What changes on the way (each exact up to float rounding):

- muP multipliers (embedding_mult, output_mult / m) and the 1/d_head score scale are folded
  into the weights by :mod:`lmfab.export.fold`; a tied head stays tied (llama.cpp reuses
  ``token_embd`` when there is no ``output`` tensor). llama.cpp's ``jais`` graph scales
  scores by 1/d_head itself, so there the query rows carry the 1/d_head convention instead.
- ``llama``: llama.cpp rotates adjacent pairs of each head's dims, lmfab (like Hugging Face)
  rotates the two halves, so the query and key rows of each head are permuted into pairs;
  the attention result is the same. ``gptneox`` rotates halves like lmfab: no permutation.
- SwiGLU's fused ``[gate | up]`` rows become ``ffn_gate`` and ``ffn_up``.
- ALiBi: lmfab's slopes are llama.cpp's with ``max_alibi_bias`` 8 (the reference rule, also
  for head counts that are not a power of two).
- GELU: llama.cpp's ``gpt2`` and ``gptneox`` graphs use the tanh approximation; an erf-GELU
  model (``mlp: gelu``) is exported with a warning (the two differ by at most 5e-4 per
  activation; llama.cpp also reads GELU from an fp16 table).

Tensor types: ``f32``; ``f16``; ``q8_0`` and ``q4_0`` (blocks of 32, quantized with
``gguf.quants``). Norm weights and biases (1-D) stay f32 in every type; a matrix whose row
length is not a multiple of 32 stays f16 in the quantized types, as llama.cpp's own converter
does.

Tokenizer: lmfab's byte-level BPE maps onto llama.cpp's ``gpt2`` tokenizer model (the same
byte-to-unicode alphabet, vocabulary and merges) with the ``gpt-2`` pre-tokenizer (GPT-2's
split). ``<|endoftext|>`` is BOS and EOS; special tokens are control tokens; llama.cpp adds
no BOS, as lmfab does not. The ``gpt2-marks`` split (combining marks kept inside words) has no
llama.cpp counterpart: such tokenizers are refused unless ``allow_split_mismatch``, in which
case llama.cpp splits text with combining marks GPT-2's way (other text tokenizes the same).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmfab.atomic import atomic_path
from lmfab.checkpoint import find_tokenizer, read_run_config, resolve_checkpoint
from lmfab.config.schema import ModelConfig
from lmfab.export.fold import fold_state_dict

TYPES = ("f32", "f16", "q8_0", "q4_0")
ALIBI_MAX_BIAS = 8.0  # lmfab's slopes 2^(-8 i / n): llama.cpp's rule with max_bias 8
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class Exported:
    path: Path
    arch: str
    type: str
    n_tensors: int
    warnings: tuple[str, ...]


# ---- architecture -------------------------------------------------------------------------

def choose_arch(cfg: ModelConfig) -> tuple[str, list[str]]:
    """The llama.cpp architecture for ``cfg`` and the warnings it comes with; ValueError
    naming the fields when there is none."""
    c = cfg
    gelu = c.mlp in ("gelu", "gelu_tanh")
    wanted: dict[str, dict[str, object]] = {
        "gpt2": {"pos": "learned", "norm": "layernorm", "mlp": "gelu|gelu_tanh", "bias": True,
                 "parallel_residual": False},
        "llama": {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
                  "parallel_residual": False},
        "gptneox": {"pos": "rope", "norm": "layernorm", "mlp": "gelu|gelu_tanh", "bias": True},
        "jais": {"pos": "alibi", "norm": "layernorm", "mlp": "swiglu", "bias": True,
                 "parallel_residual": False},
    }

    def mismatches(req: dict[str, object]) -> list[str]:
        bad = []
        for key, want in req.items():
            have = getattr(c, key)
            ok = have in str(want).split("|") if isinstance(want, str) else have == want
            if not ok:
                bad.append(f"{key}={have} (needs {want})")
        return bad

    for arch, req in wanted.items():
        if not mismatches(req):
            warns = []
            if gelu and c.mlp == "gelu":
                warns.append(f"mlp=gelu (erf): llama.cpp's {arch} graph uses the tanh GELU; "
                             "logits differ by float-rounding amounts, not in kind")
            return arch, warns
    closest = min(wanted, key=lambda a: len(mismatches(wanted[a])))
    raise ValueError(
        "model: no llama.cpp architecture for this combination of fields; the closest, "
        f"{closest}, differs in: {', '.join(mismatches(wanted[closest]))}"
    )


def _rope_pairs(w: torch.Tensor, n_heads: int, d_head: int, rot: int) -> torch.Tensor:
    """Rows of each head reordered from rotate-half (lmfab, Hugging Face) to llama.cpp's
    adjacent pairs on the first ``rot`` dims: [x0..x(r/2-1), x(r/2)..] -> [x0, x(r/2), x1, ...]."""
    rest = w.shape[1:]
    h = w.reshape(n_heads, d_head, *rest).clone()
    part = h[:, :rot].reshape(n_heads, 2, rot // 2, *rest).transpose(1, 2)
    h[:, :rot] = part.reshape(n_heads, rot, *rest)
    return h.reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig,
                 arch: str) -> dict[str, torch.Tensor]:
    """Folded lmfab weights under llama.cpp's tensor names, fp32, in PyTorch's (out, in) shape."""
    sd = fold_state_dict(state, cfg)
    H, Hkv, Dh = cfg.n_head, cfg.kv_heads, cfg.d_head
    if arch == "jais":  # llama.cpp's jais divides scores by d_head, not sqrt(d_head)
        for i in range(cfg.n_layer):
            for kind in ("weight", "bias"):
                sd[f"blocks.{i}.attn.qkv.{kind}"][: H * Dh] *= math.sqrt(Dh)
    out: dict[str, torch.Tensor] = {"token_embd.weight": sd["wte.weight"]}
    if "wpe.weight" in sd:
        out["position_embd.weight"] = sd["wpe.weight"]
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm"), ("attn.proj", "attn_output")):
            for kind in ("weight", "bias"):
                if p + f"{src}.{kind}" in sd:
                    out[b + f"{dst}.{kind}"] = sd[p + f"{src}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = sd.get(p + f"attn.qkv.{kind}")
            if qkv is None:
                continue
            if arch == "llama":
                q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=0)
                rot = int(Dh * cfg.rope_fraction)
                out[b + f"attn_q.{kind}"] = _rope_pairs(q, H, Dh, rot)
                out[b + f"attn_k.{kind}"] = _rope_pairs(k, Hkv, Dh, rot)
                out[b + f"attn_v.{kind}"] = v
            else:  # one fused [q | k | v] tensor, lmfab's own layout
                out[b + f"attn_qkv.{kind}"] = qkv
        for kind in ("weight", "bias"):
            fc, proj = sd.get(p + f"mlp.fc.{kind}"), sd.get(p + f"mlp.proj.{kind}")
            if fc is not None:
                if cfg.mlp == "swiglu":
                    gate, up = fc.chunk(2, dim=0)
                    out[b + f"ffn_gate.{kind}"], out[b + f"ffn_up.{kind}"] = gate, up
                else:
                    out[b + f"ffn_up.{kind}"] = fc
            if proj is not None:
                out[b + f"ffn_down.{kind}"] = proj
    out["output_norm.weight"] = sd["ln_f.weight"]
    if "ln_f.bias" in sd:
        out["output_norm.bias"] = sd["ln_f.bias"]
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    elif arch in ("gptneox", "jais"):  # these graphs need an output tensor: the tied one
        out["output.weight"] = sd["wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ---- tokenizer ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int | None
    pad_id: int | None
    warnings: tuple[str, ...]


def gguf_vocab(tok_file: Path, vocab_size: int, *, allow_split_mismatch: bool = False) -> Vocab:
    """llama.cpp's ``gpt2`` tokenizer fields from an lmfab (HF ``tokenizers``) tokenizer.json."""
    from gguf import TokenType

    spec = json.loads(Path(tok_file).read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{tok_file}: model.type={model.get('type')!r}; GGUF export needs "
                         "lmfab's byte-level BPE")
    if spec.get("normalizer") is not None:
        raise ValueError(f"{tok_file}: normalizer {spec['normalizer'].get('type')!r} has no "
                         "llama.cpp counterpart")
    pre = spec.get("pre_tokenizer") or {}
    warns = []
    is_gpt2 = (pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
               and pre.get("use_regex", True))
    if not is_gpt2:
        what = ("pre_tokenizer gpt2-marks (combining marks kept inside words)"
                if pre.get("type") == "Sequence" else f"pre_tokenizer {pre.get('type')!r}")
        msg = (f"{tok_file}: {what} has no llama.cpp pre-tokenizer; llama.cpp would split "
               "text with combining marks (diacritised Arabic, ...) GPT-2's way")
        if not allow_split_mismatch:
            raise ValueError(msg + " (pass --allow-split-mismatch to export anyway)")
        warns.append(msg)
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ValueError(f"{tok_file}: {n} tokens, more than model.vocab_size={vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        if added.get("special"):
            types[added["id"]] = int(TokenType.CONTROL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab(tokens, types, merges, vocab.get(EOS_TOKEN), vocab.get(PAD_TOKEN), tuple(warns))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---- writing ------------------------------------------------------------------------------

def _encode(name: str, t: torch.Tensor, qtype: str):
    """(array, raw dtype or None, type name) of one tensor for the requested file type."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = t.to(torch.float32).numpy()
    if a.ndim == 1 or qtype == "f32":
        return a, None, "f32"
    if qtype == "f16":
        return a.astype(np.float16), None, "f16"
    q = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    block = quants.GGML_QUANT_SIZES[q][0]
    if a.shape[-1] % block:  # as llama.cpp's converter: such rows stay f16
        return a.astype(np.float16), None, "f16"
    return quants.quantize(a, q), q, qtype


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType as F

    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0,
                "q4_0": F.MOSTLY_Q4_0}[qtype])


def export_gguf(model_dir: str | Path, out: str | Path, *, checkpoint: str | None = None,
                qtype: str = "f16", allow_split_mismatch: bool = False,
                warn=None) -> Exported:
    """Write ``out`` (atomically) from a run folder's newest checkpoint, or ``checkpoint``
    (``step_N`` under ``model_dir/checkpoints``, or a checkpoint directory)."""
    import gguf
    from safetensors.torch import load_file

    if qtype not in TYPES:
        raise ValueError(f"--type {qtype!r}: unknown; choose one of {', '.join(TYPES)}")
    model_dir = Path(model_dir)
    if checkpoint is not None:
        cand = Path(checkpoint)
        if not (cand / "model.safetensors").is_file():
            cand = model_dir / "checkpoints" / checkpoint
        if not (cand / "model.safetensors").is_file():
            raise FileNotFoundError(f"{cand}: no checkpoint (expected model.safetensors)")
        ckpt = cand
    else:
        ckpt = resolve_checkpoint(model_dir)
    run = read_run_config(ckpt)
    cfg = run.model
    arch, warns = choose_arch(cfg)
    vocab = gguf_vocab(find_tokenizer(ckpt, run), cfg.vocab_size,
                       allow_split_mismatch=allow_split_mismatch)
    warns += list(vocab.warnings)
    tensors = gguf_tensors(load_file(str(ckpt / "model.safetensors")), cfg, arch)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(model_dir.resolve().name)
        w.add_description(f"exported by lmfab from {ckpt.parent.name}/{ckpt.name}")
        w.add_file_type(_file_type(qtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.ffn_dim)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.kv_heads)
        if cfg.norm == "rmsnorm":
            w.add_layer_norm_rms_eps(cfg.norm_eps)
        else:
            w.add_layer_norm_eps(cfg.norm_eps)
        if cfg.pos == "rope":
            w.add_rope_dimension_count(int(cfg.d_head * cfg.rope_fraction))
            w.add_rope_freq_base(cfg.rope_theta)
        if arch == "gptneox":
            w.add_parallel_residual(cfg.parallel_residual)
        if arch == "jais":
            w.add_max_alibi_bias(ALIBI_MAX_BIAS)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        if vocab.eos_id is not None:
            w.add_bos_token_id(vocab.eos_id)
            w.add_eos_token_id(vocab.eos_id)
        if vocab.pad_id is not None:
            w.add_pad_token_id(vocab.pad_id)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        for name, t in tensors.items():
            data, raw, _ = _encode(name, t, qtype)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    for msg in warns:
        (warn or _stderr)(f"warning: {msg}")
    return Exported(out, arch, qtype, len(tensors), tuple(warns))
