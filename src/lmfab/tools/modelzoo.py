"""Import a Cerebras Model Zoo (2023, "legacy") GPT-2 / GPT-3 / BTLM params YAML.

``lmfab run --params modelzoo.yaml`` accepts such a file unchanged (it is recognised by
``model.hidden_size``; :func:`load_config` here is the loader that ``lmfab run`` uses, while
:mod:`lmfab.config` itself reads lmfab params only), and ``lmfab import modelzoo FILE -o OUT`` writes the lmfab params
file it maps to. Every key is accounted for, in one of three ways:

- mapped to an lmfab field (``hidden_size`` -> ``model.d_model``, ...);
- accepted with a printed notice, for keys that only steer Cerebras hardware or its
  runtime (``num_workers``, ``precision_opt_level``, ...) or whose value is lmfab's fixed
  behaviour (``loss_scaling: num_tokens``, ``correct_bias: true``, ...);
- refused: every key lmfab cannot honour is listed in one error. Nothing is dropped
  silently.

muP: the legacy files spell muP out as explicit numbers (``output_logits_scale``, per-layer
initializer stds, ``adjust_learning_rate.decoder_kernel``); lmfab derives those from a base
width. The importer recovers the width multiplier m = 1 / decoder_kernel, sets
``mup_base_d_model = hidden_size / m``, ``output_mult = output_logits_scale * m`` and
``init_std = initializer std * sqrt(m)``; newer files' ``mup_base_hidden_size`` is used as is.
"""

from __future__ import annotations

import math
import sys
import typing
from pathlib import Path
from typing import Any

from lmfab.config.load import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    looks_like_modelzoo,
    model_config_from_dict,
    read_yaml,
)
from lmfab.config.schema import Config, ModelConfig

# legacy model key -> lmfab model key
_MODEL_KEYS = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_heads": "n_head",
    "filter_size": "d_ff", "vocab_size": "vocab_size", "max_position_embeddings": "max_seq_len",
    "share_embedding_weights": "tied_embeddings", "layer_norm_epsilon": "norm_eps",
    "dropout_rate": "dropout", "embeddings_scale": "embedding_mult",
    "num_kv_groups": "n_kv_head", "mup_base_hidden_size": "mup_base_d_model",
    "mup_base_filter_size": "mup_base_d_ff", "rotary_dim": None, "rope_theta": "rope_theta",
}
_POSITIONS = {"learned": "learned", "alibi": "alibi", "rotary": "rope", "rope": "rope"}
_NONLINEARITY = {"gelu": "gelu", "relu": "relu", "swiglu": "swiglu", "gelu_new": "gelu_tanh"}
_NORMS = {"layernorm": "layernorm", "rmsnorm": "rmsnorm"}
# Keys read below by their own rules (positions, activation, norm, biases, muP, init).
_MODEL_USED = {"position_embedding_type", "nonlinearity", "norm_type", "rotary_dim",
               "use_projection_bias_in_attention", "use_ffn_bias_in_attention", "use_ffn_bias",
               "attention_dropout_rate", "scale_qk_dot_by_d", "initializer",
               "embedding_initializer", "output_layer_initializer", "output_logits_scale",
               "output_logits_alpha", "loss_scaling", "loss_weight", "use_bfloat16",
               "mixed_precision"}
# Keys whose value is lmfab's fixed behaviour: accepted when they hold that value.
_MODEL_FIXED = {"attention_type": "scaled_dot_product", "use_bias_in_output": False,
                "use_position_embedding": True, "embedding_dropout_rate": 0.0,
                "fixed_sparse_attention": None}
# Keys that steer only Cerebras hardware or its runtime: accepted, listed in a notice.
_MODEL_NO_EFFECT = {"precision_opt_level", "fp16_type", "boundary_casting", "tf_summary",
                    "attention_kernel", "alibi_implementation", "attention_softmax_fp32"}
_INPUT_KEYS = {"data_dir": "data_dir", "batch_size": "batch_size",
               "max_sequence_length": "seq_len", "shuffle": "shuffle", "shuffle_seed": "seed"}
_INPUT_NO_EFFECT = {"data_processor", "num_workers", "prefetch_factor", "persistent_workers",
                    "vocab_size", "shuffle_buffer", "use_worker_cache", "drop_last",
                    "mixed_precision", "use_multiple_workers", "micro_batch_size"}
# train_input.repeat: lmfab's loader cycles the training data (a new shuffle each epoch) and
# evaluates the held-out data once.
_INPUT_FIXED = {"train_input": {"repeat": True}, "eval_input": {"repeat": False}}
_OPT_KEYS = {"weight_decay_rate": "weight_decay", "weight_decay": "weight_decay",
             "max_gradient_norm": "max_grad_norm", "eps": "eps", "epsilon": "eps"}
_OPT_USED = {"optimizer_type", "beta1", "beta2", "betas", "learning_rate", "adjust_learning_rate"}
_OPT_FIXED = {"correct_bias": True}
_OPT_NO_EFFECT = {"log_summaries", "loss_scaling_factor", "initial_loss_scale",
                  "steps_per_increase", "min_loss_scale", "max_loss_scale", "ws_summary"}
_RUN_KEYS = {"max_steps": "max_steps", "checkpoint_steps": "checkpoint_steps",
             "log_steps": "log_steps", "seed": "seed", "model_dir": "model_dir",
             "keep_checkpoint_max": "keep_checkpoints"}
_RUN_NO_EFFECT = {"save_initial_checkpoint", "save_losses", "num_wgt_servers", "num_csx",
                  "num_workers_per_csx", "use_cs_grad_accum", "mode", "eval_frequency",
                  "checkpoint_path", "eval_steps", "precision_opt_level", "compile_only",
                  "validate_only", "execute_crd_memory_gi", "enable_distributed",
                  "save_summary_steps", "use_appliance_data", "execution_strategy",
                  "log_step_count_steps"}


def load_config(
    path: str | Path, overrides: typing.Sequence[str] = (), *, world_size: int = 1
) -> Config:
    """:func:`lmfab.config.load_config` that also reads a Model Zoo params file: converted,
    its notices printed to stderr, then overridden and checked like an lmfab file."""
    raw = read_yaml(path)
    if looks_like_modelzoo(raw):
        try:
            raw, notices = convert_modelzoo(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        for note in notices:
            print(f"lmfab: {path}: Model Zoo import: {note}", file=sys.stderr)
        raw = apply_overrides(raw, overrides)
        t = raw.get("train_input")
        if isinstance(t, dict) and t.get("data_dir") is None and t.get("mixture") is None:
            raise ConfigError(
                f"{path}: train_input.data_dir: none lmfab can read (the file names the Model "
                "Zoo's HDF5 folders); give lmfab token shards with --set "
                "train_input.data_dir=DIR (made by `lmfab data tokenize`)")
    else:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, world_size=world_size, source=str(path),
                            base_dir=Path(path).parent)


def load_model_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> ModelConfig:
    """:func:`lmfab.config.load.load_model_config` that also reads a Model Zoo params file."""
    raw = read_yaml(path)
    if looks_like_modelzoo(raw):
        raw = {"model": convert_modelzoo(raw)[0]["model"]}
    return model_config_from_dict(raw, path, overrides)


def _loss(m_in: dict, msl: Any, refused: list[str]) -> None:
    """``loss_scaling`` / ``loss_weight``: accepted where they give lmfab's loss, the mean
    cross-entropy over the batch's tokens.

    The Model Zoo sums the per-token losses of the batch (masked positions excluded), then
    divides by the number of real tokens (``num_tokens``) or by the batch size
    (``batch_size``), and multiplies by ``loss_weight``. lmfab's sequences are packed full
    windows, no padding and no mask, so ``batch_size`` with ``loss_weight = 1 / MSL`` (the
    published Cerebras-GPT and BTLM files: 1/2048, 1/8192) is exactly the per-token mean,
    as is ``num_tokens`` with weight 1. Any other combination scales the loss by a constant,
    which changes gradient clipping and Adam's epsilon: refused, with the factor.
    """
    scaling = str(m_in.get("loss_scaling", "num_tokens")).lower()
    weight = m_in.get("loss_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        refused.append(f"model.loss_weight={weight!r} (a number)")
        return
    if scaling == "num_tokens":
        factor = float(weight)
    elif scaling == "batch_size":
        if isinstance(msl, bool) or not isinstance(msl, int) or msl <= 0:
            refused.append("model.loss_scaling='batch_size' needs train_input.max_sequence_length "
                           "(or model.max_position_embeddings) to check loss_weight = 1/MSL")
            return
        factor = float(weight) * msl
    else:
        refused.append(f"model.loss_scaling={m_in['loss_scaling']!r} (num_tokens or batch_size)")
        return
    if not math.isclose(factor, 1.0, rel_tol=1e-6):
        refused.append(
            f"model.loss_scaling={scaling!r} with loss_weight={weight!r}: that loss is "
            f"{factor:g} x the per-token mean (lmfab trains on the mean over packed, unpadded "
            "tokens: use loss_weight 1/max_sequence_length with batch_size, or 1.0 with "
            "num_tokens)")


def _precision(m_in: dict, notices: list[str]) -> str | None:
    """``use_bfloat16`` / ``mixed_precision`` -> ``runconfig.precision`` (None: leave auto)."""
    bf16, mixed = m_in.get("use_bfloat16"), m_in.get("mixed_precision")
    if bf16 is True:
        return "bf16"
    if mixed is False:
        return "fp32"
    if mixed is True:  # float16 with loss scaling on Cerebras; lmfab has no fp16 mode
        notices.append("model.mixed_precision without use_bfloat16 is float16 on Cerebras; "
                       "lmfab trains with runconfig.precision auto (bf16 on CUDA, fp32 on CPUs)")
    return None


def _fill_open_end(segments: list[dict], max_steps: Any) -> None:
    """A last segment with no length (the Model Zoo's open-ended ``Constant`` tail) runs to
    ``runconfig.max_steps``."""
    if not segments or segments[-1].get("steps") is not None:
        return
    used = sum(s["steps"] for s in segments[:-1])
    if isinstance(max_steps, int) and max_steps > used:
        segments[-1]["steps"] = max_steps - used
    else:
        segments.pop()  # nothing left to run: the schedule ends with the previous segment


def _scheduler(seg: dict, where: str, refused: list[str], *, last: bool = False) -> dict | None:
    kind = str(seg.get("scheduler", "")).lower()
    kinds = {"linear": "linear", "linearlr": "linear", "cosinedecay": "cosine",
             "cosineannealing": "cosine", "cosine": "cosine", "constant": "constant",
             "constantlr": "constant"}
    if kind not in kinds:
        refused.append(f"{where}.scheduler={seg.get('scheduler')!r}")
        return None
    steps = seg.get("total_iters", seg.get("steps", seg.get("decay_steps")))
    start = seg.get("initial_learning_rate", seg.get("learning_rate"))
    known = {"scheduler", "total_iters", "steps", "decay_steps", "initial_learning_rate",
             "learning_rate", "end_learning_rate"}
    refused += [f"{where}.{k}" for k in seg if k not in known]
    open_end = steps is None and last and kinds[kind] == "constant"
    if (steps is None and not open_end) or start is None:
        refused.append(f"{where} (needs total_iters and initial_learning_rate)")
        return None
    out = {"schedule": kinds[kind], "steps": None if open_end else int(steps),
           "start": float(start)}
    if kinds[kind] != "constant":
        out["end"] = float(seg.get("end_learning_rate", start))
    return out


def _init_std(spec: Any, where: str, notices: list[str], refused: list[str]) -> float | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or "std" not in spec:
        refused.append(f"{where}={spec!r} (need {{name: normal|truncated_normal, std: ...}})")
        return None
    if spec.get("name") == "truncated_normal":
        note = "model.*initializer: truncated_normal is initialised as normal with the same std"
        if note not in notices:
            notices.append(note)
    elif spec.get("name") not in ("normal", None):
        refused.append(f"{where}.name={spec.get('name')!r}")
    return float(spec["std"])


_NUMBER = (int, float)
# Values the conversion computes with, and the type each must have.
_TYPES = {
    "model": {"hidden_size": int, "num_hidden_layers": int, "num_heads": int,
              "filter_size": int, "max_position_embeddings": int, "vocab_size": int,
              "rotary_dim": (int, type(None)), "mup_base_hidden_size": _NUMBER,
              "output_logits_scale": _NUMBER, "output_logits_alpha": _NUMBER,
              "loss_weight": _NUMBER},
    "optimizer": {"beta1": _NUMBER, "beta2": _NUMBER, "adjust_learning_rate": (dict, type(None)),
                  "learning_rate": (int, float, list)},
    "train_input": {"max_sequence_length": int},
}
_SEGMENT_TYPES = {"total_iters": int, "steps": int, "decay_steps": int,
                  "initial_learning_rate": _NUMBER, "learning_rate": _NUMBER,
                  "end_learning_rate": _NUMBER}


def _type_errors(raw: dict) -> list[str]:
    """Every value the conversion needs that has the wrong type (bool is not a number)."""
    bad = []

    def check(where: str, value: Any, want) -> None:
        if isinstance(value, bool) and bool not in (want if isinstance(want, tuple) else (want,)):
            bad.append(f"{where}={value!r} (expected a number)")
        elif not isinstance(value, want):
            bad.append(f"{where}={value!r} (expected {_want_name(want)})")

    for section in raw:
        if not isinstance(raw[section], dict):
            bad.append(f"{section}: expected a mapping of keys, got {raw[section]!r}")
    for section, types in _TYPES.items():
        sec = raw.get(section)
        if not isinstance(sec, dict):
            continue
        for key, want in types.items():
            if key in sec:
                check(f"{section}.{key}", sec[key], want)
        for key in ("initializer", "embedding_initializer", "output_layer_initializer"):
            spec = sec.get(key) if section == "model" else None
            if isinstance(spec, dict) and "std" in spec:
                check(f"model.{key}.std", spec["std"], _NUMBER)
    opt = raw.get("optimizer") if isinstance(raw.get("optimizer"), dict) else {}
    adjust = opt.get("adjust_learning_rate")
    if isinstance(adjust, dict) and "decoder_kernel" in adjust:
        check("optimizer.adjust_learning_rate.decoder_kernel", adjust["decoder_kernel"], _NUMBER)
    if isinstance(opt.get("learning_rate"), list):
        for i, seg in enumerate(opt["learning_rate"]):
            if not isinstance(seg, dict):
                bad.append(f"optimizer.learning_rate[{i}]={seg!r} (expected a scheduler mapping)")
                continue
            for key, want in _SEGMENT_TYPES.items():
                if key in seg:
                    check(f"optimizer.learning_rate[{i}].{key}", seg[key], want)
    return bad


def _want_name(want) -> str:
    names = {int: "an integer", float: "a number", list: "a list", dict: "a mapping",
             type(None): "null"}
    wants = want if isinstance(want, tuple) else (want,)
    if set(wants) >= {int, float}:
        wants = tuple(w for w in wants if w is not int)
    return " or ".join(names[w] for w in wants)


def convert_modelzoo(raw: dict) -> tuple[dict, list[str]]:
    """(lmfab params mapping, notices). Raises ConfigError listing every refused key."""
    bad = _type_errors(raw)
    if bad:
        raise ConfigError("Model Zoo params with values lmfab cannot read: " + ", ".join(bad))
    try:
        return _convert(raw)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as err:
        if isinstance(err, ConfigError):
            raise
        # a combination the checks above do not foresee: still one message, not a traceback
        raise ConfigError(f"Model Zoo params lmfab cannot convert ({type(err).__name__}: "
                          f"{err}); check the model and optimizer values") from None


def _convert(raw: dict) -> tuple[dict, list[str]]:
    notices: list[str] = []
    refused: list[str] = []
    out: dict[str, dict] = {"model": {}, "optimizer": {}, "train_input": {}, "eval_input": {},
                            "runconfig": {}}
    for section in raw:
        if section not in out:
            refused.append(section)

    no_effect: list[str] = []

    def fixed(where: str, value: Any, required: Any) -> None:
        if value != required:
            refused.append(f"{where}={value!r} (lmfab supports {required!r})")

    m_in, m = raw.get("model", {}), out["model"]
    for key, value in m_in.items():
        if key in _MODEL_KEYS and _MODEL_KEYS[key]:
            m[_MODEL_KEYS[key]] = value
        elif key in _MODEL_FIXED:
            fixed(f"model.{key}", value, _MODEL_FIXED[key])
        elif key in _MODEL_NO_EFFECT:
            no_effect.append(f"model.{key}")
        elif key not in _MODEL_USED and key not in _MODEL_KEYS:
            refused.append(f"model.{key}")
    pos = str(m_in.get("position_embedding_type", "learned")).lower()
    if pos not in _POSITIONS:
        refused.append(f"model.position_embedding_type={pos!r}")
    m["pos"] = _POSITIONS.get(pos, "learned")
    if "rotary_dim" in m_in:
        if m["pos"] == "rope":
            m["rope_fraction"] = m_in["rotary_dim"] / (m_in["hidden_size"] / m_in["num_heads"])
        elif m_in["rotary_dim"] is not None:
            refused.append(f"model.rotary_dim={m_in['rotary_dim']!r} without rotary positions")
    act = str(m_in.get("nonlinearity", "gelu")).lower()
    if act not in _NONLINEARITY:
        refused.append(f"model.nonlinearity={act!r}")
    m["mlp"] = _NONLINEARITY.get(act, "gelu")
    norm = str(m_in.get("norm_type", "layernorm")).lower()
    if norm not in _NORMS:
        refused.append(f"model.norm_type={norm!r}")
    m["norm"] = _NORMS.get(norm, "layernorm")
    biases = {m_in.get(k, True) for k in ("use_projection_bias_in_attention",
                                          "use_ffn_bias_in_attention", "use_ffn_bias")}
    if len(biases) > 1:
        refused.append("model.use_*_bias (lmfab has one `bias` switch; these disagree)")
    m["bias"] = biases.pop()
    if m_in.get("attention_dropout_rate", m_in.get("dropout_rate", 0.0)) != m_in.get("dropout_rate", 0.0):
        refused.append("model.attention_dropout_rate (lmfab uses dropout_rate for both)")
    if m_in.get("scale_qk_dot_by_d"):
        m["attn_score_scale"] = "inv_d_head"
    # The training sequence length: train_input's, else the model's (as lmfab defaults it)
    msl = (raw.get("train_input") or {}).get("max_sequence_length",
                                             m_in.get("max_position_embeddings"))
    _loss(m_in, msl, refused)
    precision = _precision(m_in, notices)
    if precision is not None:
        out["runconfig"]["precision"] = precision

    std = _init_std(m_in.get("initializer"), "model.initializer", notices, refused)
    emb_std = _init_std(m_in.get("embedding_initializer"), "model.embedding_initializer",
                        notices, refused)
    opt_in = raw.get("optimizer", {})
    decoder_lr = (opt_in.get("adjust_learning_rate") or {}).get("decoder_kernel")
    if isinstance(opt_in.get("adjust_learning_rate"), dict):
        extra = set(opt_in["adjust_learning_rate"]) - {"decoder_kernel"}
        refused += [f"optimizer.adjust_learning_rate.{k}" for k in sorted(extra)]
    width_mult = 1.0 / decoder_lr if decoder_lr else None
    if "mup_base_hidden_size" in m_in:
        width_mult = m_in["hidden_size"] / m_in["mup_base_hidden_size"]
    elif width_mult is not None:
        m["mup_base_d_model"] = round(m_in["hidden_size"] / width_mult)
        if "filter_size" in m_in:
            m["mup_base_d_ff"] = round(m_in["filter_size"] / width_mult)
    if emb_std is not None:
        m["init_std"] = emb_std
    elif std is not None:
        m["init_std"] = std * math.sqrt(width_mult or 1.0)
    if std is not None and "init_std" in m:
        derived = m["init_std"] / math.sqrt(width_mult or 1.0)
        if not math.isclose(std, derived, rel_tol=0.02):
            notices.append(f"model.initializer std {std:g}: lmfab derives hidden-matrix init "
                           f"{derived:g} (init_std {m['init_std']:g} / sqrt(m))")
    logits_scale = m_in.get("output_logits_scale")
    if "output_logits_alpha" in m_in:
        m["output_mult"] = float(m_in["output_logits_alpha"])
    elif logits_scale is not None:
        m["output_mult"] = float(logits_scale) * (width_mult or 1.0)
    if width_mult is not None and not m_in.get("scale_qk_dot_by_d"):
        refused.append("model.scale_qk_dot_by_d=false with muP (lmfab's muP scales by 1/d_head)")

    o = out["optimizer"]
    kind = str(opt_in.get("optimizer_type", "adamw")).lower()
    if kind != "adamw":
        refused.append(f"optimizer.optimizer_type={opt_in.get('optimizer_type')!r} (AdamW only)")
    o["betas"] = [float(opt_in.get("beta1", 0.9)), float(opt_in.get("beta2", 0.999))]
    if "betas" in opt_in:  # the newer spelling: betas: [0.9, 0.95]
        betas = opt_in["betas"]
        if "beta1" in opt_in or "beta2" in opt_in:
            refused.append("optimizer.betas together with optimizer.beta1/beta2")
        elif not (isinstance(betas, list) and len(betas) == 2):
            refused.append(f"optimizer.betas={betas!r} (need [beta1, beta2])")
        else:
            o["betas"] = betas
    for key, value in opt_in.items():
        if key in _OPT_KEYS:
            o[_OPT_KEYS[key]] = value
        elif key in _OPT_FIXED:
            fixed(f"optimizer.{key}", value, _OPT_FIXED[key])
        elif key in _OPT_NO_EFFECT:
            no_effect.append(f"optimizer.{key}")
        elif key not in _OPT_USED:
            refused.append(f"optimizer.{key}")
    lr = opt_in.get("learning_rate")
    if isinstance(lr, list):
        segs = [_scheduler(s, f"optimizer.learning_rate[{i}]", refused,
                           last=i == len(lr) - 1) for i, s in enumerate(lr)]
        o["learning_rate"] = [s for s in segs if s is not None]
        _fill_open_end(o["learning_rate"], (raw.get("runconfig") or {}).get("max_steps"))
    elif lr is not None:
        o["learning_rate"] = lr

    train_in = raw.get("train_input", {})
    for section in ("train_input", "eval_input"):
        src, dst = raw.get(section, {}), out[section]
        for key, value in src.items():
            where = f"{section}.{key}"
            if key in _INPUT_NO_EFFECT:
                no_effect.append(where)
            elif key in _INPUT_FIXED[section]:
                fixed(where, value, _INPUT_FIXED[section][key])
            elif key == "data_dir" and isinstance(value, list):
                if len(value) == 1:
                    dst["data_dir"] = value[0]
                else:  # the Model Zoo's HDF5 folders, read as one dataset
                    notices.append(
                        f"{where}: {len(value)} Model Zoo HDF5 folders; lmfab reads one folder "
                        "of its own token shards (or a weighted mixture): give it with --set "
                        f"{section}.data_dir=DIR")
            elif section == "train_input" and key in _INPUT_KEYS:
                dst[_INPUT_KEYS[key]] = value
            elif section == "eval_input" and key in ("data_dir", "batch_size"):
                dst[key] = value
            elif section == "eval_input" and key == "max_sequence_length":
                fixed(where, value, train_in.get("max_sequence_length"))
            elif section == "eval_input" and key in ("shuffle", "shuffle_seed"):
                notices.append(f"{where}: lmfab evaluates in order, unshuffled")
            else:
                refused.append(where)
    for key, value in raw.get("runconfig", {}).items():
        if key in _RUN_KEYS:
            out["runconfig"][_RUN_KEYS[key]] = value
        elif key in _RUN_NO_EFFECT:
            no_effect.append(f"runconfig.{key}")
        else:
            refused.append(f"runconfig.{key}")
    if "data_processor" in train_in:
        notices.append(f"train_input.data_processor={train_in['data_processor']}: lmfab reads "
                       "its own token shards from data_dir (make them with lmfab data tokenize)")
    if no_effect:
        notices.append("accepted, no effect in lmfab (Cerebras hardware/runtime settings): "
                       + ", ".join(no_effect))
    out_std = _init_std(m_in.get("output_layer_initializer"), "model.output_layer_initializer",
                        notices, refused)
    if out_std is not None and "init_std" in m:
        derived = m["init_std"] / math.sqrt(width_mult or 1.0) / math.sqrt(2 * m_in["num_hidden_layers"])
        if not math.isclose(out_std, derived, rel_tol=0.02):
            notices.append(f"model.output_layer_initializer std {out_std:g}: lmfab derives "
                           f"{derived:g} (init_std / sqrt(2 n_layer m))")
    t = out["train_input"]
    if "seq_len" not in t and "max_position_embeddings" in m_in:
        t["seq_len"] = m_in["max_position_embeddings"]  # the Model Zoo's default MSL
    if refused:
        raise ConfigError("Model Zoo params lmfab cannot honour: " + ", ".join(refused))
    if not out["eval_input"]:
        del out["eval_input"]
    return out, notices
