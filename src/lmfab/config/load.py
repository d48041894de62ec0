"""Load, override, validate and write params files.

YAML is data: it is parsed with ``yaml.safe_load`` and converted into the dataclasses of
:mod:`lmfab.config.schema` by a strict converter that walks the type hints. Unknown keys,
wrong types, values outside a closed set and missing required keys fail with the key path
and a hint; :func:`check_config` then rejects impossible combinations (global batch not
divisible over the devices, ``seq_len`` beyond the model's positions, ...).

``--set a.b=c`` overrides are applied to the raw mapping before conversion, so they are
checked exactly like the file. The value is parsed as YAML (``3e-4``, ``true``, ``[1, 2]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lmfab.config.errors import ConfigError
from lmfab.config.schema import Config, ModelConfig

__all__ = ["ConfigError"]  # re-exported: lmfab.config.load.ConfigError stays importable


def _hint(key: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise ConfigError at ``path``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors: list[tuple[Any, ConfigError]] = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as e:
                errors.append((option, e))
        # A list or mapping that failed inside: report the inner error, it names the key.
        for option, err in errors:
            if (isinstance(value, list) and typing.get_origin(option) is list) or (
                isinstance(value, dict) and dataclasses.is_dataclass(option)
            ):
                raise err
        expected = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{path}: expected {expected}, got {value!r}") from None
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML 1.1 reads a bare off/no as false and on/yes as true: take them as meant.
        if isinstance(value, bool) and ("on" if value else "off") in allowed:
            value = "on" if value else "off"
        if value not in allowed:
            hint = _hint(str(value), [str(a) for a in allowed])
            if isinstance(value, bool):
                hint += " (YAML reads a bare on/off/yes/no as a boolean: quote the word)"
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _to_dataclass(value, tp, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str):  # PyYAML reads 1e6 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")  # a bug in the schema


def _to_dataclass(raw: Any, cls: type, path: str) -> Any:
    where = path or "params"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"{path + '.' if path else ''}{key}: unknown key{_hint(str(key), fields)}; "
                f"allowed in {where}: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing")
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``a.b=c`` overrides to a raw params mapping (in place; returned for chaining)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key in {key!r}")
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def preset_dirs() -> list[Path]:
    """Where model presets are looked up: $LMFAB_MODEL_PRESETS (os.pathsep-separated), then
    the repository's configs/models."""
    extra = [Path(p) for p in os.environ.get("LMFAB_MODEL_PRESETS", "").split(os.pathsep) if p]
    return [*extra, Path(__file__).resolve().parents[3] / "configs" / "models"]


def list_presets() -> list[str]:
    return sorted({p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def _find_preset(name: str, base_dir: Path | None) -> Path:
    if name.endswith((".yaml", ".yml")):
        for candidate in (base_dir / name if base_dir else None, Path(name)):
            if candidate is not None and candidate.is_file():
                return candidate
        raise ConfigError(f"model.preset: file {name!r} not found")
    for d in preset_dirs():
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    raise ConfigError(
        f"model.preset: unknown preset {name!r}{_hint(name, list_presets())}; "
        f"available: {', '.join(list_presets())}"
    )


def resolve_model_preset(model: Any, base_dir: Path | None = None, _seen: tuple = ()) -> Any:
    """Expand ``model: {preset: NAME, ...overrides}``: the preset's fields, then the overrides.

    A preset file holds model fields and may itself name a ``preset`` (e.g. a muP variant
    on top of its standard-parametrization shape).
    """
    if not isinstance(model, dict) or "preset" not in model:
        return model
    name = model["preset"]
    if not isinstance(name, str):
        raise ConfigError(f"model.preset: expected a preset name, got {name!r}")
    if name in _seen:
        raise ConfigError(f"model.preset: cycle {' -> '.join((*_seen, name))}")
    path = _find_preset(name, base_dir)
    base = read_yaml(path)
    base = resolve_model_preset(base, path.parent, (*_seen, name))
    return {**base, **{k: v for k, v in model.items() if k != "preset"}}


# runconfig keys that lmfab no longer has, and why (docs/decisions.md). A params file that
# sets one fails saying so; a resolved config written before (beside a checkpoint) loads.
REMOVED_RUN_KEYS = {
    "cuda_graph": "the whole-step CUDA graph was removed (measured at noise level: +0.6% at "
                  "124M on an H200); drop the key",
    "gc_steps": "the fixed-step garbage collection was removed (measured at noise level); "
                "drop the key",
}


def upgrade_runconfig(raw: dict, *, resolved: bool) -> dict:
    """``raw`` with its runconfig section in today's layout. ``resolved``: a config lmfab
    wrote itself (beside a checkpoint), whose removed keys are dropped; in a params file
    they fail with the reason."""
    run = raw.get("runconfig")
    if not isinstance(run, dict) or not any(k in run for k in REMOVED_RUN_KEYS):
        return raw
    for key in REMOVED_RUN_KEYS:
        if key in run and not resolved:
            raise ConfigError(f"runconfig.{key}: {REMOVED_RUN_KEYS[key]}")
    return {**raw, "runconfig": {k: v for k, v in run.items() if k not in REMOVED_RUN_KEYS}}


def config_from_dict(
    raw: dict, *, world_size: int = 1, source: str = "params", base_dir: Path | None = None,
    resolved: bool = False,
) -> Config:
    """Convert and check a raw mapping. Errors are prefixed with ``source`` (the file).
    ``resolved``: the mapping is a config lmfab wrote (see :func:`upgrade_runconfig`)."""
    try:
        raw = upgrade_runconfig(raw, resolved=resolved)
        if "model" in raw:
            raw = {**raw, "model": resolve_model_preset(raw["model"], base_dir)}
        cfg = _to_dataclass(raw, Config, "")
        check_config(cfg, world_size=world_size)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(
    path: str | Path, overrides: typing.Sequence[str] = (), *, world_size: int = 1
) -> Config:
    """Read an lmfab params YAML, apply ``--set`` overrides, convert and check it.

    A Cerebras Model Zoo params file is refused with a pointer to the importer
    (:func:`lmfab.tools.modelzoo.load_config` reads both, as ``lmfab run`` does)."""
    raw = read_yaml(path)
    refuse_modelzoo(raw, path)
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, world_size=world_size, source=str(path),
                            base_dir=Path(path).parent)


def looks_like_modelzoo(raw: dict) -> bool:
    """A Cerebras Model Zoo params mapping (recognised by ``model.hidden_size``)."""
    model = raw.get("model")
    return isinstance(model, dict) and "hidden_size" in model


def refuse_modelzoo(raw: dict, path: str | Path) -> None:
    if looks_like_modelzoo(raw):
        raise ConfigError(
            f"{path}: a Cerebras Model Zoo params file (model.hidden_size); lmfab.config reads "
            "lmfab params only: use lmfab.tools.modelzoo.load_config (as `lmfab run` does) or "
            "`lmfab import modelzoo FILE -o OUT`")


def load_model_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> ModelConfig:
    """The model section of a params file, or a model preset file (model fields only).

    Overrides name model fields directly (``n_layer=2``) or with the section (``model.n_layer=2``).
    """
    return model_config_from_dict(read_yaml(path), path, overrides)


def model_config_from_dict(raw: dict, path: str | Path,
                           overrides: typing.Sequence[str] = ()) -> ModelConfig:
    """:func:`load_model_config` on a mapping already read from ``path``."""
    if "model" in raw:
        refuse_modelzoo(raw, path)
        raw = raw["model"]
    raw = apply_overrides({"model": dict(raw)},
                          [o if o.startswith("model.") else f"model.{o}" for o in overrides])
    try:
        model = resolve_model_preset(raw["model"], Path(path).parent)
        cfg = _to_dataclass(model, ModelConfig, "model")
        check_model_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def micro_batching(batch_size: int, micro: int | None, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum_steps) for a global batch over ``world_size`` devices."""
    if batch_size % world_size:
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by the {world_size} devices"
        )
    per_device = batch_size // world_size
    micro = micro or per_device
    if per_device % micro:
        raise ConfigError(
            f"batch_size={batch_size} over {world_size} device(s) is {per_device} per device, "
            f"not divisible by micro_batch_size={micro}; choose a divisor of {per_device}"
        )
    return micro, per_device // micro


def check_model_config(m: ModelConfig) -> None:
    """Rules within the model section."""
    for name in ("n_layer", "n_head", "d_model", "vocab_size", "max_seq_len"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name}: must be positive, got {getattr(m, name)}")
    if m.d_model % m.n_head:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}"
        )
    for name in ("output_mult", "embedding_mult", "init_std"):
        if not getattr(m, name) > 0:
            raise ConfigError(f"model.{name}: must be positive, got {getattr(m, name)}")
    if m.kv_heads <= 0 or m.n_head % m.kv_heads:
        raise ConfigError(
            f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head} (grouped-query)"
        )
    if m.pos == "rope":
        rot = int(m.d_head * m.rope_fraction)
        if not 0.0 < m.rope_fraction <= 1.0 or rot % 2:
            raise ConfigError(
                f"model.rope_fraction={m.rope_fraction}: the rotated dims (d_head x fraction "
                f"= {m.d_head * m.rope_fraction:g}) must be a positive even number"
            )
    if m.mup_base_d_model is not None:
        if m.mup_base_d_model <= 0:
            raise ConfigError("model.mup_base_d_model: must be positive")
        if m.attn_score_scale != "inv_d_head":
            raise ConfigError(
                "model.attn_score_scale: muP (mup_base_d_model set) needs inv_d_head: "
                "attention logits scaled 1/d_head keep their size as the width grows"
            )
    elif m.mup_base_d_ff is not None:
        raise ConfigError("model.mup_base_d_ff needs model.mup_base_d_model (muP) as well")
    if m.d_ff is not None and m.d_ff <= 0:
        raise ConfigError(f"model.d_ff: must be positive, got {m.d_ff}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.dropout > 0 and m.pos == "alibi":
        raise ConfigError("model.dropout: the fused ALiBi attention has no attention-probability "
                          "dropout; use dropout 0 with pos: alibi (as BTLM and Jais do)")


@dataclass(frozen=True)
class TrainStage:
    """One stretch of training at one sequence length, derived from train_input."""

    index: int
    at_step: int
    seq_len: int
    sources: tuple[tuple[str, float], ...]  # (data_dir, weight)
    mixture: bool  # sources came from a mixture list (weighted loader)
    batch_size: int  # global sequences per step
    micro_batch: int  # per device
    grad_accum: int


def _sources(data_dir: str | None, mixture: list | None, where: str) -> tuple:
    if (data_dir is None) == (mixture is None):
        raise ConfigError(f"{where}: give exactly one of data_dir and mixture")
    if mixture is not None:
        if not mixture:
            raise ConfigError(f"{where}.mixture: an empty list")
        for i, src in enumerate(mixture):
            if not src.weight > 0:
                raise ConfigError(f"{where}.mixture[{i}].weight: must be positive")
        return tuple((src.data_dir, src.weight) for src in mixture)
    return ((data_dir, 1.0),)


def train_stages(cfg: Config, world_size: int = 1) -> list[TrainStage]:
    """The sequence-length stages of a run (one unless train_input.seq_len_schedule is set)."""
    t, m = cfg.train_input, cfg.model
    micro, accum = micro_batching(t.batch_size, t.micro_batch_size, world_size)
    stages = [TrainStage(0, 0, t.seq_len, _sources(t.data_dir, t.mixture, "train_input"),
                         t.mixture is not None, t.batch_size, micro, accum)]
    last_step = 0
    for i, st in enumerate(t.seq_len_schedule or []):
        where = f"train_input.seq_len_schedule[{i}]"
        if st.at_step <= last_step:
            raise ConfigError(f"{where}.at_step={st.at_step}: must be after the previous stage's")
        if st.seq_len <= 0 or (m.pos == "learned" and st.seq_len > m.max_seq_len):
            raise ConfigError(f"{where}.seq_len={st.seq_len}: must be positive and, with learned "
                              f"positions, at most model.max_seq_len={m.max_seq_len}")
        tokens, micro_tokens = t.batch_size * t.seq_len, micro * t.seq_len
        if tokens % st.seq_len or micro_tokens % st.seq_len:
            raise ConfigError(
                f"{where}.seq_len={st.seq_len}: the {tokens} tokens per step (and {micro_tokens} "
                "per micro-batch) must divide into whole sequences of this length")
        batch, st_micro = tokens // st.seq_len, micro_tokens // st.seq_len
        try:
            st_micro, st_accum = micro_batching(batch, st_micro, world_size)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        stages.append(TrainStage(i + 1, st.at_step, st.seq_len,
                                 _sources(st.data_dir, st.mixture, where), st.mixture is not None,
                                 batch, st_micro, st_accum))
        last_step = st.at_step
    return stages


def check_config(cfg: Config, *, world_size: int = 1) -> None:
    """Cross-field checks: combinations that cannot run fail here, not at step 1000."""
    m, o, t, e, r = cfg.model, cfg.optimizer, cfg.train_input, cfg.eval_input, cfg.runconfig
    check_model_config(m)
    if t.seq_len <= 0:
        raise ConfigError(f"train_input.seq_len: must be positive, got {t.seq_len}")
    if t.seq_len > m.max_seq_len and m.pos == "learned":
        raise ConfigError(
            f"train_input.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
            "(learned positions end there); raise model.max_seq_len or lower seq_len"
        )
    if e.seq_len is not None and (e.seq_len <= 0 or (e.seq_len > m.max_seq_len and m.pos == "learned")):
        raise ConfigError(
            f"eval_input.seq_len={e.seq_len}: must be positive and, with learned positions, "
            f"at most model.max_seq_len={m.max_seq_len}"
        )
    if r.loss_chunk < 0:
        raise ConfigError(f"runconfig.loss_chunk: must be >= 0 (0: all positions at once), got {r.loss_chunk}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optimizer.betas: expected two numbers in [0, 1), got {o.betas}")
    if o.max_grad_norm is not None and o.max_grad_norm <= 0:
        raise ConfigError("optimizer.max_grad_norm: must be positive or null (no clipping)")
    if isinstance(o.learning_rate, list):
        if not o.learning_rate:
            raise ConfigError("optimizer.learning_rate: an empty schedule list")
        for i, seg in enumerate(o.learning_rate):
            where = f"optimizer.learning_rate[{i}]"
            if seg.steps <= 0:
                raise ConfigError(f"{where}.steps: must be positive, got {seg.steps}")
            if seg.schedule == "constant" and seg.end not in (None, seg.start):
                raise ConfigError(f"{where}.end: a constant segment holds start; drop end")
            if seg.schedule != "constant" and seg.end is None:
                raise ConfigError(f"{where}.end: required for a {seg.schedule} segment")
    elif o.learning_rate < 0:
        raise ConfigError("optimizer.learning_rate: must be non-negative")
    for section, batch, micro in (
        ("train_input", t.batch_size, t.micro_batch_size),
        ("eval_input", e.batch_size, e.micro_batch_size),
    ):
        if batch <= 0 or (micro is not None and micro <= 0):
            raise ConfigError(f"{section}.batch_size and micro_batch_size must be positive")
        try:
            micro_batching(batch, micro, world_size)
        except ConfigError as err:
            raise ConfigError(f"{section}: {err}") from None
    train_stages(cfg, world_size)
    if r.max_steps < 0 or r.log_steps <= 0:
        raise ConfigError("runconfig.max_steps must be >= 0 and runconfig.log_steps > 0")
    if r.checkpoint_steps < 0 or r.eval_steps < 0 or r.keep_checkpoints < 0:
        raise ConfigError("runconfig.checkpoint_steps, eval_steps, keep_checkpoints: >= 0")
    if r.profile_steps < 0 or r.profile_start < 0:
        raise ConfigError("runconfig.profile_steps, profile_start: >= 0")
    if r.checkpoint_every < 1:
        raise ConfigError(f"runconfig.checkpoint_every: must be >= 1, got {r.checkpoint_every}")
    if not r.ddp_bucket_mb > 0:
        raise ConfigError(f"runconfig.ddp_bucket_mb: must be > 0, got {r.ddp_bucket_mb}")
    if r.compile and r.ddp_split_graph is not False and r.ddp_bucket_mb < 1:
        # torch.compile's DDP graph split asserts that DDP's 1 MiB first bucket is no larger
        # than the others (an AssertionError deep in dynamo on the first multi-GPU step)
        raise ConfigError(
            f"runconfig.ddp_bucket_mb={r.ddp_bucket_mb}: under torch.compile on several GPUs "
            "the graph may be cut at the buckets (ddp_split_graph true, or auto without "
            "accumulation), which needs every bucket at least as large as DDP's first, 1 MB; "
            "use >= 1, or runconfig.ddp_split_graph: false")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def write_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
