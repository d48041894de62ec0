"""Strict YAML -> dataclass conversion, torch-free, for lmfab's YAML files.

YAML is data (DESIGN principle 4): a file is parsed with ``yaml.safe_load`` and converted
into dataclasses by a converter that walks their type hints. Unknown keys, wrong types,
values outside a ``Literal`` set and missing required keys fail with the key path and a
"did you mean" hint (principle 5); ``--set a.b=c`` overrides are applied to the raw mapping
before conversion, so they are checked exactly like the file.

This module depends on nothing in lmfab, so every layer can use it -- the data layer's
curation recipes do, without importing :mod:`lmfab.config` (data sits beside config, not on
top of it). :mod:`lmfab.config.load` holds the same converter for params files, with the
same messages; it can import this one instead. A caller re-raises :class:`SchemaError` as
its own error class (``ConfigError``, ``DataConfigError``) with the file as prefix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class SchemaError(ValueError):
    """A YAML value or override that does not fit the schema. The message names the key path."""


def hint(key: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
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
    """Convert a YAML value to the annotated type ``tp`` or raise SchemaError at ``path``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors: list[tuple[Any, SchemaError]] = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except SchemaError as e:
                errors.append((option, e))
        # A list or mapping that failed inside: report the inner error, it names the key.
        for option, err in errors:
            if (isinstance(value, list) and typing.get_origin(option) is list) or (
                isinstance(value, dict) and dataclasses.is_dataclass(option)
            ):
                raise err
        expected = " or ".join(_type_name(o) for o in options)
        raise SchemaError(f"{path}: expected {expected}, got {value!r}") from None
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML 1.1 reads a bare off/no as false and on/yes as true: take them as meant.
        if isinstance(value, bool) and ("on" if value else "off") in allowed:
            value = "on" if value else "off"
        if value not in allowed:
            extra = hint(str(value), [str(a) for a in allowed])
            if isinstance(value, bool):
                extra += " (YAML reads a bare on/off/yes/no as a boolean: quote the word)"
            raise SchemaError(f"{path}: {value!r} is not one of {list(allowed)}{extra}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return to_dataclass(value, tp, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected true or false, got {value!r}")
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
            raise SchemaError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SchemaError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")  # a bug in the schema


def to_dataclass(raw: Any, cls: type, path: str) -> Any:
    """Convert the mapping ``raw`` into dataclass ``cls``; ``path`` prefixes key paths."""
    where = path or "params"
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise SchemaError(
                f"{path + '.' if path else ''}{key}: unknown key{hint(str(key), fields)}; "
                f"allowed in {where}: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{sub}: required key is missing")
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``a.b=c`` overrides to a raw params mapping (in place; returned for chaining)."""
    for item in overrides:
        if "=" not in item:
            raise SchemaError(f"--set {item!r}: expected KEY.PATH=VALUE")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise SchemaError(f"--set {item!r}: empty key in {key!r}")
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise SchemaError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML file (``{}`` for an empty file)."""
    path = Path(path)
    if path.is_dir():
        raise SchemaError(f"{path}: is a folder, not a YAML file")
    if not path.is_file():
        raise SchemaError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise SchemaError(f"{path}: cannot be read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SchemaError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:  # deeply nested flow collections
        raise SchemaError(f"{path}: not valid YAML: nested too deeply") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SchemaError(f"{path}: the top level must be a mapping of sections")
    return raw
