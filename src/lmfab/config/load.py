"""Params YAML <-> dataclasses: read, override, convert strictly, write back.

YAML is data: it is parsed with ``yaml.safe_load`` and converted into the dataclasses of
:mod:`lmfab.config.schema` by a strict converter that walks the type hints. Unknown keys,
wrong types, values outside a closed set and missing required keys fail with the key path
and a hint; :func:`lmfab.config.check.check_config` then rejects impossible combinations.
Model presets (``model: {preset: NAME}``) are expanded before conversion, old runconfig keys
are named or upgraded (:mod:`lmfab.config.keys`), and a Cerebras Model Zoo file is pointed to
its importer (:mod:`lmfab.tools.modelzoo`). What a run derives from a config (batch split,
stages, kernels) lives with its user, not here.

``--set a.b=c`` overrides are applied to the raw mapping before conversion, so they are
checked exactly like the file. The value is parsed as YAML (``3e-4``, ``true``, ``[1, 2]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lmfab.config.check import check_config, check_model_config
from lmfab.config.errors import ConfigError
from lmfab.config.keys import upgrade_runconfig
from lmfab.config.schema import Config, ModelConfig

# re-exported: lmfab.config.load.ConfigError and check_config stay importable
__all__ = ["ConfigError", "check_config", "check_model_config"]


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


def config_from_dict(
    raw: dict, *, world_size: int = 1, source: str = "params", base_dir: Path | None = None,
    resolved: bool = False,
) -> Config:
    """Convert and check a raw mapping. Errors are prefixed with ``source`` (the file).
    ``resolved``: the mapping is a config lmfab wrote (see
    :func:`lmfab.config.keys.upgrade_runconfig`)."""
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


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def write_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
