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
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from lmfab import strict_yaml
from lmfab.config.check import check_config, check_model_config
from lmfab.config.errors import ConfigError
from lmfab.config.keys import upgrade_runconfig
from lmfab.config.schema import Config, ModelConfig

# re-exported: lmfab.config.load.ConfigError and check_config stay importable
__all__ = ["ConfigError", "check_config", "check_model_config"]


# The strict converter is lmfab.strict_yaml's (shared with the curation recipes, which must
# not import config); here its SchemaError becomes this package's ConfigError.
_hint = strict_yaml.hint


def _as_config_error(fn):
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError:
            raise
        except strict_yaml.SchemaError as e:
            raise ConfigError(str(e)) from None
    call.__doc__ = fn.__doc__
    return call


_to_dataclass = _as_config_error(strict_yaml.to_dataclass)
apply_overrides = _as_config_error(strict_yaml.apply_overrides)
read_yaml = _as_config_error(strict_yaml.read_yaml)


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
