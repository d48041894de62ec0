"""Imports run one way (DESIGN.md, "Dependency direction"), pinned by parsing every module.

    config <- kernels <- models <- dist <- checkpoint <- train <- (infer, export, scaling)
    <- eval <- tools, serve, experimental <- cli

(eval scores what infer loads and generates, quantized models too, so it sits above it.)

A module may import lmfab modules of its own package and of lower layers only. Every
``import`` statement counts, also those inside functions (a function-level import hides a
cycle from Python's import system, not from this test). ``data`` stands beside the layers:
it imports ``config``, the foundation (``atomic``, ``strict_yaml``: standard library and yaml
only, importable from every layer) and itself, and the layers from ``train`` up may import it. The
core never imports ``experimental``: only the CLI does (it enables the opt-in features).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmfab"

LAYERS = {
    "config": 0,
    "kernels": 1,
    "models": 2,
    "dist": 3,
    "checkpoint": 4,
    "train": 5,
    "infer": 6, "export": 6, "scaling": 6,
    "eval": 7,
    "tools": 8, "experimental": 8, "serve": 8,
    "cli": 9, "__main__": 10,
    "__init__": -1,  # lmfab/__init__.py: the version only, importable from anywhere
    # the foundation: standard library (and yaml) only, importable from anywhere, data too
    "atomic": -1,  # atomic writes and done markers
    "strict_yaml": -1,  # the strict YAML -> dataclass converter
    "faultpoint": -1,  # fault injection points for the reliability tests
}
DATA_MAY_IMPORT = {"config", "data", "__init__", "atomic", "strict_yaml", "faultpoint"}
DATA_IMPORTED_FROM = LAYERS["train"]  # train and up


def _part(module: str) -> str:
    """The top-level part of an lmfab module name: lmfab.train.loop -> train."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path = SRC) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def lmfab_imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, module) of every lmfab import in a file, at any depth of the syntax tree."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lmfab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.split(".")[0] != "lmfab":
                continue
            if name == "lmfab":  # from lmfab import checkpoint (a module) or __version__
                found += [(node.lineno, "lmfab" if a.name.startswith("__") else f"lmfab.{a.name}")
                          for a in node.names]
            else:
                found.append((node.lineno, name))
    return found


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (None when it may)."""
    src, dst = _part(importer), _part(imported)
    if src == dst:
        return None
    if src == "data":
        return None if dst in DATA_MAY_IMPORT else "data imports config and itself only"
    if dst == "data":
        ok = LAYERS.get(src, -1) >= DATA_IMPORTED_FROM
        return None if ok else f"{src} is below train and may not import data"
    if dst == "experimental" and src != "cli":
        return "the core never imports experimental (only the CLI enables it)"
    if src not in LAYERS or dst not in LAYERS:
        return f"{src if src not in LAYERS else dst} has no place in the layering (add it)"
    if LAYERS[dst] >= LAYERS[src]:
        return f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]}) against the direction"
    return None


def all_modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_import_runs_one_way():
    bad = []
    for path in all_modules():
        importer = _module_name(path)
        for line, imported in lmfab_imports(path):
            why = violation(importer, imported)
            if why:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {importer} -> {imported}: {why}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_torch_distributed_in_model_code():
    """Model code is written for one device; parallelism is applied from outside."""
    bad = []
    for part in ("models", "kernels"):
        for path in sorted((SRC / part).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                bad += [f"{path.relative_to(SRC.parent)}:{node.lineno}: {n}"
                        for n in names if n.startswith("torch.distributed")]
    assert not bad, bad


@pytest.mark.parametrize("importer, imported", [
    ("lmfab.models.gpt", "lmfab.train.optim"),  # up the layers
    ("lmfab.config.load", "lmfab.tools.modelzoo"),
    ("lmfab.infer.generate", "lmfab.tools.coord_check"),
    ("lmfab.train.loop", "lmfab.eval.loss"),
    ("lmfab.infer.generate", "lmfab.eval.harness"),  # eval sits above infer
    ("lmfab.scaling.sweep", "lmfab.eval.harness"),
    ("lmfab.train.loop", "lmfab.experimental.graph"),
    ("lmfab.data.curate.pipeline", "lmfab.train.loop"),
    ("lmfab.models.gpt", "lmfab.data.loader"),
    ("lmfab.newpart.thing", "lmfab.config"),
    ("lmfab.atomic", "lmfab.config.errors"),  # the foundation imports nothing of lmfab
])
def test_the_rules_catch_what_they_should(importer, imported):
    assert violation(importer, imported) is not None


def test_imports_inside_functions_are_seen(tmp_path):
    fake = tmp_path / "lmfab" / "models"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from lmfab.train import loop\n    return loop\n"
                                 "def g():\n    from ..train import plan\n    return plan\n")
    assert lmfab_imports(fake / "bad.py", tmp_path / "lmfab") == [(2, "lmfab.train"),
                                                                  (5, "lmfab.train")]
    assert violation("lmfab.models.bad", "lmfab.train") is not None
