"""``lmfab run --help-config``: every params key, its type, default and help.

The help is each field's attribute docstring in :mod:`lmfab.config.schema` (the string
literal right after the field), read from the source with ``ast``, so the schema stays the
one place where a key is defined and explained.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

from lmfab.config import schema
from lmfab.config.schema import Config


def field_docs(cls: type) -> dict[str, str]:
    """{field name: attribute docstring} of a dataclass defined in the schema."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "(section)" if dataclasses.is_dataclass(value) else repr(value)
    return "required"


def _type(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("lmfab.config.schema.", "")


def describe(cls: type = Config, prefix: str = "", width: int = 100) -> list[str]:
    """Lines of help for ``cls`` and its sections, keys named by their full path."""
    hints = typing.get_type_hints(cls, vars(schema))
    docs = field_docs(cls)
    lines, sections = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            sections.append((path, tp))
            continue
        lines.append(f"  {path}: {_type(tp)} = {_default(f)}")
        if f.name in docs:
            lines += textwrap.wrap(docs[f.name], width, initial_indent="      ",
                                   subsequent_indent="      ")
    for path, tp in sections:
        head = " ".join((tp.__doc__ or "").split())
        lines += ["", f"{path}:"] + textwrap.wrap(head, width, initial_indent="  # ",
                                                  subsequent_indent="  # ")
        lines += describe(tp, f"{path}.", width)
    return lines


def help_text() -> str:
    return "\n".join(["Params file keys (YAML sections; --set KEY.PATH=VALUE):", *describe()])
