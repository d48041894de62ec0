"""``lmfab export hf``: a run's checkpoint as a folder ``transformers`` loads with no extra code.

The architecture is chosen from the model's fields, never from a preset's name
(:func:`choose_architecture`):

==========================================================  =====================
lmfab fields                                                transformers class
==========================================================  =====================
pos learned, layernorm, gelu / gelu_tanh / relu, serial      GPT2LMHeadModel
pos rope (rope_fraction 1), rmsnorm, swiglu, serial (+GQA)   LlamaForCausalLM
pos rope (any fraction), layernorm, gelu / gelu_tanh / relu  GPTNeoXForCausalLM
pos alibi (BTLM, Jais: ALiBi + SwiGLU; any norm / MLP)       LmfabAlibiForCausalLM,
                                                            bundled modeling code
other combinations                                          refused, the fields named
==========================================================  =====================

Before mapping, muP and the other multipliers are folded into the weights
(:mod:`lmfab.export.fold`): a tied head stays tied. The tensors are renamed and laid out as
each class expects: GPT-2's ``Conv1D`` stores weights transposed (in, out); Llama's separate
q/k/v and gate/up projections are lmfab's fused [q | k | v] and [gate | up] rows split;
GPT-NeoX's ``query_key_value`` is interleaved per head ([q_h | k_h | v_h] for each head h).
Biases a class always has and an lmfab model without biases lacks are written as zeros.
The folder (``config.json``, ``model.safetensors`` or shards with their index, the tokenizer
as a ``PreTrainedTokenizerFast``, ``generation_config.json``, ``README.md``) is written into a
temporary folder beside ``out`` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lmfab.config.errors import ConfigError
from lmfab.config.schema import Config, ModelConfig
from lmfab.export.fold import fold_state_dict, folded_config, is_folded

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SHARD_BYTES = 5 * 2**30  # shards of at most 5 GiB, as the Hub's large models are cut
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}  # HF ACT2FN names


BUNDLED = "lmfab_alibi"  # model_type of the bundled modeling code
BUNDLED_FILE = Path(__file__).with_name("modeling_lmfab_alibi.py")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM", BUNDLED: "LmfabAlibiForCausalLM"}


class ExportError(ConfigError):
    """A model, checkpoint or option that cannot be exported; the message names the field."""


# ---- the architecture ---------------------------------------------------------------------

def _needs(cfg: ModelConfig) -> dict[str, list[str]]:
    """For each native class, the fields of ``cfg`` that keep it from mapping there."""
    serial = [] if not cfg.parallel_residual else ["parallel_residual=true (needs false)"]
    mha = ([] if cfg.kv_heads == cfg.n_head
           else [f"n_kv_head={cfg.n_kv_head} (needs n_head, no grouped-query attention)"])
    plain_mlp = [] if cfg.mlp in _ACT else [f"mlp={cfg.mlp} (needs gelu, gelu_tanh or relu)"]

    def want(field: str, *allowed) -> list[str]:
        have = getattr(cfg, field)
        return [] if have in allowed else [f"{field}={have} (needs {' or '.join(map(str, allowed))})"]

    return {
        "gpt2": want("pos", "learned") + want("norm", "layernorm") + plain_mlp + serial + mha,
        "llama": (want("pos", "rope") + want("rope_fraction", 1.0) + want("norm", "rmsnorm")
                  + want("mlp", "swiglu") + serial),
        "gpt_neox": want("pos", "rope") + want("norm", "layernorm") + plain_mlp + mha,
    }


def choose_architecture(cfg: ModelConfig) -> str:
    """The ``model_type`` that computes ``cfg``'s model: gpt2, llama or gpt_neox natively;
    ``lmfab_alibi`` (bundled modeling code, :mod:`lmfab.export.modeling_lmfab_alibi`) for
    ALiBi, which no transformers class has with these fields; otherwise an
    :class:`ExportError` listing, for each native class, the fields that do not fit."""
    needs = _needs(cfg)
    for arch in ("gpt2", "llama", "gpt_neox"):
        if not needs[arch]:
            return arch
    if cfg.pos == "alibi":
        return BUNDLED
    lines = "; ".join(f"{arch}: {', '.join(why)}" for arch, why in needs.items())
    raise ExportError(f"model fields with no native transformers mapping: {lines}")


def hf_config(cfg: ModelConfig, arch: str, *, bos: int | None, eos: int | None,
              pad: int | None, dtype: str):
    """The transformers config of a folded ``cfg`` for ``arch``."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=cfg.vocab_size, bos_token_id=bos, eos_token_id=eos,
                  pad_token_id=pad, tie_word_embeddings=cfg.tied_embeddings,
                  initializer_range=cfg.init_std)
    if arch == "gpt2":
        c = GPT2Config(n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_inner=cfg.ffn_dim, n_positions=cfg.max_seq_len,
                       activation_function=_ACT[cfg.mlp], layer_norm_epsilon=cfg.norm_eps,
                       resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                       scale_attn_weights=True, **common)
    elif arch == "llama":
        c = LlamaConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                        head_dim=cfg.d_head, intermediate_size=cfg.ffn_dim, hidden_act="silu",
                        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                        attention_bias=cfg.bias, mlp_bias=cfg.bias,
                        attention_dropout=cfg.dropout, **common)
    elif arch == BUNDLED:
        from lmfab.export.modeling_lmfab_alibi import LmfabAlibiConfig

        c = LmfabAlibiConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                             intermediate_size=cfg.ffn_dim, max_position_embeddings=cfg.max_seq_len,
                             mlp=cfg.mlp, norm=cfg.norm, norm_eps=cfg.norm_eps,
                             parallel_residual=cfg.parallel_residual, bias=cfg.bias, **common)
        c.auto_map = {"AutoConfig": "modeling_lmfab_alibi.LmfabAlibiConfig",
                      "AutoModelForCausalLM": "modeling_lmfab_alibi.LmfabAlibiForCausalLM"}
    else:
        c = GPTNeoXConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                          num_attention_heads=cfg.n_head, intermediate_size=cfg.ffn_dim,
                          hidden_act=_ACT[cfg.mlp], max_position_embeddings=cfg.max_seq_len,
                          layer_norm_eps=cfg.norm_eps,
                          rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                           "partial_rotary_factor": cfg.rope_fraction},
                          use_parallel_residual=cfg.parallel_residual,
                          attention_bias=cfg.bias, attention_dropout=cfg.dropout,
                          hidden_dropout=cfg.dropout, **common)
    c.architectures = [ARCHITECTURES[arch]]
    c.dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    return c


# ---- tensors ------------------------------------------------------------------------------

def to_hf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """lmfab names and layout (of a folded state dict) -> ``arch``'s names and layout. Tensors
    an lmfab model without biases lacks are left out here (:func:`export_hf` writes zeros)."""
    H, Hkv, Dh, L = cfg.n_head, cfg.kv_heads, cfg.d_head, cfg.n_layer
    out: dict[str, torch.Tensor] = {}

    def put(name: str, key: str, fn=lambda t: t) -> None:
        if key in sd:
            out[name] = fn(sd[key]).contiguous()

    t = lambda w: w.t()  # noqa: E731 -- GPT-2's Conv1D: (in, out)
    if arch == BUNDLED:  # the bundled code keeps lmfab's names and layout
        return {k: v.contiguous() for k, v in sd.items()}
    if arch == "gpt2":
        put("transformer.wte.weight", "wte.weight")
        put("transformer.wpe.weight", "wpe.weight")
        for i in range(L):
            a, b = f"transformer.h.{i}", f"blocks.{i}"
            for n in ("ln_1", "ln_2"):
                put(f"{a}.{n}.weight", f"{b}.{n}.weight")
                put(f"{a}.{n}.bias", f"{b}.{n}.bias")
            for hf, lm in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                           ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
                put(f"{a}.{hf}.weight", f"{b}.{lm}.weight", t)
                put(f"{a}.{hf}.bias", f"{b}.{lm}.bias")
        put("transformer.ln_f.weight", "ln_f.weight")
        put("transformer.ln_f.bias", "ln_f.bias")
    elif arch == "llama":
        put("model.embed_tokens.weight", "wte.weight")
        for i in range(L):
            a, b = f"model.layers.{i}", f"blocks.{i}"
            put(f"{a}.input_layernorm.weight", f"{b}.ln_1.weight")
            put(f"{a}.post_attention_layernorm.weight", f"{b}.ln_2.weight")
            for kind in ("weight", "bias"):
                key = f"{b}.attn.qkv.{kind}"
                if key in sd:
                    q, k, v = sd[key].split([H * Dh, Hkv * Dh, Hkv * Dh], dim=0)
                    for n, part in (("q", q), ("k", k), ("v", v)):
                        out[f"{a}.self_attn.{n}_proj.{kind}"] = part.contiguous()
                put(f"{a}.self_attn.o_proj.{kind}", f"{b}.attn.proj.{kind}")
                key = f"{b}.mlp.fc.{kind}"
                if key in sd:
                    gate, up = sd[key].chunk(2, dim=0)
                    out[f"{a}.mlp.gate_proj.{kind}"] = gate.contiguous()
                    out[f"{a}.mlp.up_proj.{kind}"] = up.contiguous()
                put(f"{a}.mlp.down_proj.{kind}", f"{b}.mlp.proj.{kind}")
        put("model.norm.weight", "ln_f.weight")
    else:
        def interleave(w: torch.Tensor) -> torch.Tensor:  # [q | k | v] -> per head [q_h k_h v_h]
            return w.reshape(3, H, Dh, *w.shape[1:]).transpose(0, 1).reshape(w.shape)

        put("gpt_neox.embed_in.weight", "wte.weight")
        for i in range(L):
            a, b = f"gpt_neox.layers.{i}", f"blocks.{i}"
            for kind in ("weight", "bias"):
                put(f"{a}.input_layernorm.{kind}", f"{b}.ln_1.{kind}")
                put(f"{a}.post_attention_layernorm.{kind}", f"{b}.ln_2.{kind}")
                put(f"{a}.attention.query_key_value.{kind}", f"{b}.attn.qkv.{kind}", interleave)
                put(f"{a}.attention.dense.{kind}", f"{b}.attn.proj.{kind}")
                put(f"{a}.mlp.dense_h_to_4h.{kind}", f"{b}.mlp.fc.{kind}")
                put(f"{a}.mlp.dense_4h_to_h.{kind}", f"{b}.mlp.proj.{kind}")
        put("gpt_neox.final_layer_norm.weight", "ln_f.weight")
        put("gpt_neox.final_layer_norm.bias", "ln_f.bias")
    if not cfg.tied_embeddings:
        put("lm_head.weight", "lm_head.weight")
    return out


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a folder for ``config`` holds (tied copies left out),
    from the transformers class itself, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if config.model_type == BUNDLED:
            from lmfab.export.modeling_lmfab_alibi import LmfabAlibiForCausalLM

            model = LmfabAlibiForCausalLM(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def complete_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                     cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Zeros for the biases the class has and a bias-free lmfab model lacks; then every name
    and shape checked against the class (a mismatch is a bug in the mapping, said so)."""
    out = dict(tensors)
    for name, shape in expected.items():
        if name not in out and name.endswith(".bias") and not cfg.bias:
            out[name] = torch.zeros(shape, dtype=torch.float32)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    shapes = [n for n in expected if n in out and tuple(out[n].shape) != expected[n]]
    if missing or extra or shapes:
        raise ExportError(f"tensors do not fit the transformers class: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}, shape mismatch {shapes[:5]}")
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, *,
                      shard_bytes: int = SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` when the tensors exceed ``shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        names.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


# ---- the tokenizer and generation defaults --------------------------------------------------

def write_tokenizer(tokenizer_file: Path, folder: Path, max_len: int,
                    specials: dict[str, str] | None = None) -> dict[str, int | None]:
    """tokenizer.json + tokenizer_config.json (a ``PreTrainedTokenizerFast``; BOS = EOS =
    ``<|endoftext|>`` as lmfab uses it between documents; ``<|pad|>`` when the vocabulary has
    it). ``specials``: the bos / eos / pad strings an imported model came with (they win).
    Returns the special tokens' ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tokenizer_file))
    names = {"bos": EOS, "eos": EOS, "pad": PAD, **(specials or {})}
    ids = {k: tok.token_to_id(v) for k, v in names.items()}
    if ids["eos"] is None:
        raise ExportError(f"{tokenizer_file}: the vocabulary has no {names['eos']} token (EOS)")
    names = {k: (v if ids[k] is not None else None) for k, v in names.items()}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=names["bos"],
                                   eos_token=names["eos"], unk_token=None, pad_token=names["pad"],
                                   model_max_length=max_len, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(folder))
    return ids


def write_generation_config(folder: Path, ids: dict[str, int | None]) -> None:
    """``lmfab generate``'s defaults: temperature 0.8, top-k 50, stop at EOS."""
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                     do_sample=True, temperature=0.8, top_k=50).save_pretrained(str(folder))


# ---- the command ---------------------------------------------------------------------------

def _need_transformers() -> None:
    """transformers 5 (its config keys, e.g. ``rope_parameters``, are what is written)."""
    try:
        import transformers
    except ImportError:
        raise ExportError("lmfab export hf needs transformers: pip install 'lmfab[hf]'") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ExportError(f"lmfab export hf needs transformers 5, found {transformers.__version__}"
                          ": pip install 'lmfab[hf]'")


@dataclass
class Exported:
    out: Path
    arch: str
    checkpoint: Path
    files: list[str]


def pick_checkpoint(model_dir: str | Path, checkpoint: str | None) -> Path:
    """The checkpoint to export: ``--checkpoint`` (step_N, N, or a folder) or the newest."""
    from lmfab.checkpoint import checkpoint_root, list_checkpoints

    model_dir = Path(model_dir)
    if checkpoint is None:
        if (model_dir / "model.safetensors").is_file():
            return model_dir
        found = list_checkpoints(model_dir)
        if not found:
            raise ExportError(f"{model_dir}: no checkpoint (expected "
                              f"{checkpoint_root(model_dir)}/step_*/model.safetensors)")
        return found[-1]
    for cand in (Path(checkpoint), checkpoint_root(model_dir) / checkpoint,
                 checkpoint_root(model_dir) / (f"step_{int(checkpoint):08d}"
                                               if checkpoint.isdigit() else checkpoint)):
        if (cand / "model.safetensors").is_file():
            return cand
    have = ", ".join(p.name for p in list_checkpoints(model_dir)) or "none"
    raise ExportError(f"--checkpoint {checkpoint}: no such checkpoint in {model_dir} "
                      f"(have: {have})")


def _out_folder(out: Path) -> tuple[Path, Path]:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return out, tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked before)
    tmp.rename(out)


def export_hf(model_dir: str | Path, out: str | Path, *, checkpoint: str | None = None,
              dtype: str = "fp32") -> Exported:
    """Write the Hugging Face folder ``out`` for a run's checkpoint (see the module docstring)."""
    from safetensors.torch import load_file

    from lmfab.checkpoint import find_tokenizer, read_run_config, read_state
    from lmfab.export.card import model_card

    _need_transformers()
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    ckpt = pick_checkpoint(model_dir, checkpoint)
    cfg: Config = read_run_config(ckpt) if (ckpt / "config.yaml").is_file() else \
        read_run_config(Path(model_dir))
    m = cfg.model
    plain = folded_config(m)
    arch = choose_architecture(plain)  # before any work: a refusal costs nothing
    tok_file = find_tokenizer(ckpt, cfg)
    out, tmp = _out_folder(Path(out))
    try:
        sd = fold_state_dict(load_file(str(ckpt / "model.safetensors")), m)
        tensors = to_hf_tensors(sd, plain, arch)
        state = read_state(ckpt) if (ckpt / "state.json").is_file() else {}
        ids = write_tokenizer(tok_file, tmp, m.max_seq_len, state.get("special_tokens"))
        config = hf_config(plain, arch, bos=ids["bos"], eos=ids["eos"], pad=ids["pad"],
                           dtype=dtype)
        tensors = complete_tensors(tensors, expected_tensors(config), plain)
        tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
        if arch == "gpt_neox" and "lm_head.weight" in tensors:  # the name on disk, as
            tensors["embed_out.weight"] = tensors.pop("lm_head.weight")  # save_pretrained's
        write_safetensors(tensors, tmp)
        config.save_pretrained(str(tmp))
        if arch == BUNDLED:
            shutil.copyfile(BUNDLED_FILE, tmp / BUNDLED_FILE.name)
        write_generation_config(tmp, ids)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else Path(model_dir)
        (tmp / "README.md").write_text(model_card(
            cfg, arch=config.architectures[0], run_dir=run_dir, checkpoint=ckpt, state=state,
            dtype=dtype, folded=not is_folded(m), n_params=sum(
                t.numel() for t in tensors.values())), encoding="utf-8")
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out, config.architectures[0], ckpt, sorted(p.name for p in out.iterdir()))


def describe(e: Exported) -> str:
    remote = ", trust_remote_code=True" if e.arch == ARCHITECTURES[BUNDLED] else ""
    return (f"wrote {e.out} ({e.arch}, from {e.checkpoint}): {', '.join(e.files)}\n"
            f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(e.out)!r}"
            f"{remote})")


__all__ = ["ExportError", "choose_architecture", "export_hf", "hf_config", "to_hf_tensors"]
