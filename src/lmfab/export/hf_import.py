"""``lmfab import hf``: a local Hugging Face GPT-2, Llama or GPT-NeoX folder as an lmfab run.

The folder's ``config.json`` becomes an lmfab model section (every field checked: one that
lmfab cannot represent, such as Llama 3's rope scaling or GPT-NeoX without attention biases,
is refused by name), its weights are renamed into lmfab's layout (the inverse of
:func:`lmfab.export.hf.to_hf_tensors`: GPT-2's transposed ``Conv1D`` weights, Llama's
separate q/k/v and gate/up projections fused, GPT-NeoX's per-head interleaved
``query_key_value`` de-interleaved) and checked tensor by tensor. Weights are read from
``model.safetensors`` (or its shards) and only then from ``pytorch_model.bin`` through
``torch.load(weights_only=True)``, which refuses pickled code.

The run folder written (into a temporary folder, renamed when complete)::

    config.yaml                                   params to train from (set the data)
    tokenizer.json                                the folder's tokenizer
    checkpoints/step_00000000/model.safetensors   the weights, lmfab names
    checkpoints/step_00000000/{config.yaml,state.json}

Continued pre-training starts from it with ``lmfab run --params runs/y/config.yaml
--model-dir runs/y-cpt --init_from runs/y`` (weights only; optimizer and step start fresh).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lmfab.config.load import config_from_dict, write_config
from lmfab.config.schema import ModelConfig
from lmfab.export.hf import BUNDLED, ExportError, _out_folder

_ACT_BACK = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "relu": "relu"}
ARCHS = ("gpt2", "llama", "gpt_neox", BUNDLED)
# Buffers some older checkpoints carry (causal masks, rotary tables): not weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
            ".rotary_emb.inv_freq")


def _refuse(path: Path, fields: list[str]) -> None:
    if fields:
        raise ExportError(f"{path}: fields lmfab cannot represent: {'; '.join(fields)}")


def _rope(c: dict, default_fraction: float = 1.0) -> tuple[float, float, list[str]]:
    """(theta, partial rotary fraction, refusals) from transformers 5's rope_parameters or the
    older top-level keys; absent keys take the class's defaults."""
    rp = c.get("rope_parameters") or {}
    bad = []
    scaling = c.get("rope_scaling")
    kind = rp.get("rope_type", (scaling or {}).get("rope_type", "default"))
    if kind != "default":
        bad.append(f"rope_parameters.rope_type={kind} (lmfab has plain RoPE only)")
    theta = rp.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0)))
    frac = rp.get("partial_rotary_factor",
                  c.get("rotary_pct", c.get("partial_rotary_factor", default_fraction)))
    return float(theta), float(frac), bad


def model_config_from_hf(c: dict, path: Path) -> tuple[ModelConfig, str]:
    """lmfab's model section for a transformers config.json (a dict), and its model_type."""
    arch = c.get("model_type")
    if arch not in ARCHS:
        raise ExportError(f"{path}: model_type {arch!r} is not supported (lmfab imports "
                          f"{', '.join(ARCHS)})")
    bad: list[str] = []
    if arch == "gpt2":
        act = c.get("activation_function", "gelu_new")
        if act not in _ACT_BACK:
            bad.append(f"activation_function={act}")
        if not c.get("scale_attn_weights", True):
            bad.append("scale_attn_weights=false")
        if c.get("scale_attn_by_inverse_layer_idx"):
            bad.append("scale_attn_by_inverse_layer_idx=true")
        if c.get("add_cross_attention"):
            bad.append("add_cross_attention=true")
        d = int(c["n_embd"])
        fields = dict(n_layer=c["n_layer"], n_head=c["n_head"], d_model=d,
                      d_ff=c.get("n_inner") or 4 * d, max_seq_len=c["n_positions"],
                      pos="learned", mlp=_ACT_BACK.get(act, "gelu"), norm="layernorm",
                      norm_eps=c.get("layer_norm_epsilon", 1e-5), bias=True)
    elif arch == "llama":
        theta, frac, rope_bad = _rope(c)
        bad += rope_bad
        if c.get("hidden_act", "silu") != "silu":
            bad.append(f"hidden_act={c.get('hidden_act')} (lmfab's SwiGLU is silu-gated)")
        if frac != 1.0:
            bad.append(f"partial_rotary_factor={frac}")
        if bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
            bad.append(f"attention_bias={c.get('attention_bias')} with mlp_bias="
                       f"{c.get('mlp_bias')} (lmfab has one bias flag)")
        if c.get("pretraining_tp", 1) != 1:
            bad.append(f"pretraining_tp={c.get('pretraining_tp')}")
        d, h = int(c["hidden_size"]), int(c["num_attention_heads"])
        if c.get("head_dim") not in (None, d // h) or d % h:
            bad.append(f"head_dim={c.get('head_dim')} (lmfab: hidden_size / heads = {d // h})")
        kv = c.get("num_key_value_heads") or h
        fields = dict(n_layer=c["num_hidden_layers"], n_head=h, d_model=d,
                      n_kv_head=None if kv == h else kv, d_ff=c["intermediate_size"],
                      max_seq_len=c["max_position_embeddings"], pos="rope", rope_theta=theta,
                      mlp="swiglu", norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
                      bias=bool(c.get("attention_bias", False)))
    elif arch == BUNDLED:  # lmfab's own export with bundled ALiBi code: lmfab's fields
        h = c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or h
        fields = dict(n_layer=c["num_hidden_layers"], n_head=h, d_model=c["hidden_size"],
                      n_kv_head=None if kv == h else kv, d_ff=c["intermediate_size"],
                      max_seq_len=c["max_position_embeddings"], pos="alibi", mlp=c["mlp"],
                      norm=c["norm"], norm_eps=c["norm_eps"],
                      parallel_residual=c["parallel_residual"], bias=c["bias"])
    else:
        theta, frac, rope_bad = _rope(c, default_fraction=0.25)  # GPTNeoXConfig's default
        bad += rope_bad
        act = c.get("hidden_act", "gelu")
        if act not in _ACT_BACK:
            bad.append(f"hidden_act={act}")
        if not c.get("attention_bias", True):
            bad.append("attention_bias=false (lmfab's MLP and attention share one bias flag)")
        fields = dict(n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                      d_model=c["hidden_size"], d_ff=c["intermediate_size"],
                      max_seq_len=c["max_position_embeddings"], pos="rope", rope_theta=theta,
                      rope_fraction=frac, mlp=_ACT_BACK.get(act, "gelu"), norm="layernorm",
                      norm_eps=c.get("layer_norm_eps", 1e-5),
                      parallel_residual=bool(c.get("use_parallel_residual", True)), bias=True)
    _refuse(path, bad)
    tied_default = arch in ("gpt2", BUNDLED)  # the config classes' defaults
    fields.update(vocab_size=c["vocab_size"],
                  tied_embeddings=bool(c.get("tie_word_embeddings", tied_default)),
                  init_std=c.get("initializer_range", 0.02), dropout=0.0)
    return ModelConfig(**fields), arch


def from_hf_tensors(hf: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """``arch``'s names and layout -> lmfab's (KeyError names a missing tensor)."""
    H, Dh, L = cfg.n_head, cfg.d_head, cfg.n_layer
    out: dict[str, torch.Tensor] = {}
    kinds = ("weight", "bias") if cfg.bias else ("weight",)

    def take(lm: str, name: str, fn=lambda t: t) -> None:
        out[lm] = fn(hf[name]).contiguous()

    t = lambda w: w.t()  # noqa: E731
    if arch == BUNDLED:  # lmfab's names and layout already
        from lmfab.models.gpt import build_model

        for k in build_model(cfg).state_dict():
            take(k, k)
        return out
    if arch == "gpt2":
        take("wte.weight", "transformer.wte.weight")
        take("wpe.weight", "transformer.wpe.weight")
        for i in range(L):
            a, b = f"transformer.h.{i}", f"blocks.{i}"
            for n in ("ln_1", "ln_2"):
                take(f"{b}.{n}.weight", f"{a}.{n}.weight")
                take(f"{b}.{n}.bias", f"{a}.{n}.bias")
            for hfn, lm in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                            ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
                take(f"{b}.{lm}.weight", f"{a}.{hfn}.weight", t)
                take(f"{b}.{lm}.bias", f"{a}.{hfn}.bias")
        take("ln_f.weight", "transformer.ln_f.weight")
        take("ln_f.bias", "transformer.ln_f.bias")
    elif arch == "llama":
        take("wte.weight", "model.embed_tokens.weight")
        for i in range(L):
            a, b = f"model.layers.{i}", f"blocks.{i}"
            take(f"{b}.ln_1.weight", f"{a}.input_layernorm.weight")
            take(f"{b}.ln_2.weight", f"{a}.post_attention_layernorm.weight")
            for kind in kinds:
                out[f"{b}.attn.qkv.{kind}"] = torch.cat(
                    [hf[f"{a}.self_attn.{n}_proj.{kind}"] for n in "qkv"], dim=0)
                take(f"{b}.attn.proj.{kind}", f"{a}.self_attn.o_proj.{kind}")
                out[f"{b}.mlp.fc.{kind}"] = torch.cat(
                    [hf[f"{a}.mlp.{n}_proj.{kind}"] for n in ("gate", "up")], dim=0)
                take(f"{b}.mlp.proj.{kind}", f"{a}.mlp.down_proj.{kind}")
        take("ln_f.weight", "model.norm.weight")
    else:
        def deinterleave(w: torch.Tensor) -> torch.Tensor:  # per head [q_h k_h v_h] -> [q|k|v]
            return w.reshape(H, 3, Dh, *w.shape[1:]).transpose(0, 1).reshape(w.shape)

        take("wte.weight", "gpt_neox.embed_in.weight")
        for i in range(L):
            a, b = f"gpt_neox.layers.{i}", f"blocks.{i}"
            for kind in ("weight", "bias"):
                take(f"{b}.ln_1.{kind}", f"{a}.input_layernorm.{kind}")
                take(f"{b}.ln_2.{kind}", f"{a}.post_attention_layernorm.{kind}")
                take(f"{b}.attn.qkv.{kind}", f"{a}.attention.query_key_value.{kind}", deinterleave)
                take(f"{b}.attn.proj.{kind}", f"{a}.attention.dense.{kind}")
                take(f"{b}.mlp.fc.{kind}", f"{a}.mlp.dense_h_to_4h.{kind}")
                take(f"{b}.mlp.proj.{kind}", f"{a}.mlp.dense_4h_to_h.{kind}")
        take("ln_f.weight", "gpt_neox.final_layer_norm.weight")
        take("ln_f.bias", "gpt_neox.final_layer_norm.bias")
    if not cfg.tied_embeddings:
        take("lm_head.weight", "lm_head.weight")
    return out


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a folder: safetensors (one file or an index of shards), else a
    ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors")), folder / "model.safetensors"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            if not (folder / s).is_file():
                raise ExportError(f"{index}: names shard {s}, which is missing")
            sd.update(load_file(str(folder / s)))
        return sd, index
    bin_file = folder / "pytorch_model.bin"
    if bin_file.is_file():
        import pickle

        try:
            sd = torch.load(bin_file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{bin_file}: not loadable as weights only (lmfab never runs "
                              f"pickled code; convert it to safetensors): {first}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ExportError(f"{bin_file}: not a state dict of tensors")
        return sd, bin_file
    raise ExportError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                      "pytorch_model.bin")


def _normalise_names(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Drop non-weight buffers; add the ``transformer.`` prefix old GPT-2 files lack."""
    out = {k: v for k, v in sd.items() if not k.endswith(_BUFFERS)}
    if arch == "gpt2" and not any(k.startswith("transformer.") for k in out):
        out = {(k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in out.items()}
    if arch == "gpt_neox" and "embed_out.weight" in out:  # the name before transformers 5
        out["lm_head.weight"] = out.pop("embed_out.weight")
    return out


class _Seen(dict):
    """A dict that remembers which keys were read (tensors the mapping used)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.seen: set[str] = set()

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)


def tokenizer_json(folder: Path) -> str:
    """The folder's tokenizer.json, or one that transformers converts from its other tokenizer
    files (GPT-2's vocab.json + merges.txt, ...)."""
    f = folder / "tokenizer.json"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    sources = [n for n in ("vocab.json", "merges.txt", "tokenizer.model") if (folder / n).is_file()]
    if not sources:
        raise ExportError(f"{f}: missing, and the folder has no vocab.json + merges.txt or "
                          "tokenizer.model to build one from")
    try:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer.to_str()
        size = Tokenizer.from_str(text).get_vocab_size()
    except Exception as e:  # noqa: BLE001 -- any failure: the same message, with its cause
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{f}: missing, and transformers could not build one from "
                          f"{', '.join(sources)} ({first})") from None
    if size < 2:
        raise ExportError(f"{f}: missing, and the one built from {', '.join(sources)} is empty")
    return text


def special_tokens(folder: Path, hf_cfg: dict, tokenizer_text: str) -> dict[str, str]:
    """BOS / EOS / PAD token strings of a foreign folder (tokenizer_config.json, else the ids
    in config.json), kept so that a later export names the same tokens."""
    from tokenizers import Tokenizer

    found: dict[str, str] = {}
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            raw = json.loads(tc.read_text())
        except json.JSONDecodeError:
            raw = {}
        for key in ("bos", "eos", "pad"):
            v = raw.get(f"{key}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                found[key] = v
    tok = Tokenizer.from_str(tokenizer_text)
    for key in ("bos", "eos", "pad"):
        i = hf_cfg.get(f"{key}_token_id")
        if key not in found and isinstance(i, int) and tok.id_to_token(i) is not None:
            found[key] = tok.id_to_token(i)
    return found


@dataclass
class Imported:
    out: Path
    arch: str
    n_params: int


def import_hf(path: str | Path, out: str | Path, *, data_dir: str | None = None) -> Imported:
    """Write the lmfab run folder ``out`` for the local HF folder ``path`` (module docstring)."""
    from safetensors.torch import save_file

    from lmfab.models.gpt import build_model

    src = Path(path)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"{src}: no config.json (expected a local Hugging Face model folder)")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{cfg_file}: not JSON ({e})") from None
    try:
        model_cfg, arch = model_config_from_hf(hf_cfg, cfg_file)
    except KeyError as e:
        raise ExportError(f"{cfg_file}: the field {e.args[0]} is missing") from None
    tok_text = tokenizer_json(src)
    raw, weights_file = read_hf_weights(src)
    hf = _Seen(_normalise_names(raw, arch))
    try:
        sd = from_hf_tensors(hf, model_cfg, arch)
    except KeyError as e:
        raise ExportError(f"{weights_file}: tensor {e.args[0]} is missing") from None
    except RuntimeError as e:  # a reshape of a tensor of the wrong size
        raise ExportError(f"{weights_file}: a tensor does not fit config.json ({e})") from None
    unused = sorted(set(hf) - hf.seen - ({"lm_head.weight"} if model_cfg.tied_embeddings else set()))
    if unused:
        raise ExportError(f"{weights_file}: tensors lmfab's {arch} mapping has no place for: "
                          f"{unused[:3]}{' ...' if len(unused) > 3 else ''}")
    own = {k: tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}
    wrong = [f"{k} {tuple(sd[k].shape)} (config.json says {own[k]})" for k in own
             if k in sd and tuple(sd[k].shape) != own[k]]
    if wrong:
        raise ExportError(f"{weights_file}: tensor shape mismatch: {'; '.join(wrong[:3])}")
    missing = sorted(set(own) - set(sd))
    if missing:
        raise ExportError(f"{weights_file}: tensors missing for {missing[:3]}")
    seq = min(model_cfg.max_seq_len, 2048)
    params = {
        "model": {k: v for k, v in vars(model_cfg).items()},
        "optimizer": {"learning_rate": 3e-4},
        "train_input": {"data_dir": data_dir or "runs/data", "batch_size": 8, "seq_len": seq},
        "eval_input": {},
        "runconfig": {"max_steps": 1000},
    }
    cfg = config_from_dict(params, source=str(cfg_file))
    out, tmp = _out_folder(Path(out))
    try:
        ck = tmp / "checkpoints" / "step_00000000"
        ck.mkdir(parents=True)
        write_config(cfg, tmp / "config.yaml")
        write_config(cfg, ck / "config.yaml")
        (tmp / "tokenizer.json").write_text(tok_text, encoding="utf-8")
        save_file({k: v.to(torch.float32).contiguous() for k, v in sd.items()},
                  str(ck / "model.safetensors"), metadata={"format": "pt"})
        (ck / "state.json").write_text(json.dumps(
            {"format": 1, "step": 0, "tokens": 0, "imported_from": str(src.resolve().name),
             "model_type": arch, "special_tokens": special_tokens(src, hf_cfg, tok_text)},
            indent=1))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Imported(out, arch, sum(v.numel() for v in sd.values()))


def describe(r: Imported) -> str:
    return (f"wrote {r.out} ({r.arch}, {r.n_params:,} parameters). Tokenize data with its "
            f"tokenizer (lmfab data tokenize --tokenizer {r.out}/tokenizer.json ...), then: "
            f"lmfab run --params {r.out}/config.yaml --set train_input.data_dir=DATA "
            f"--model-dir {r.out}-cpt --init-from {r.out}")
