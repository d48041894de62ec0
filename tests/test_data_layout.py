"""The data layer's layout rules: the offline steps never load torch; data never loads config.

Preparation (``lmfab.data.prep``) and curation (``lmfab.data.curate``) run on CPU machines
and in worker processes where importing torch would cost seconds and gigabytes per process;
the runtime modules (shards, loader, mixture) are numpy only. Checked in a fresh
interpreter, importing every module of both packages. Data sits beside config in the
dependency order (DESIGN.md), so none of it may import :mod:`lmfab.config` either.
"""

from __future__ import annotations

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import lmfab.data.curate, lmfab.data.prep
names = ["lmfab.data.shards", "lmfab.data.loader", "lmfab.data.mixture"]
for pkg in (lmfab.data.prep, lmfab.data.curate):
    names += [pkg.__name__ + "." + m.name for m in pkgutil.iter_modules(pkg.__path__)]
for name in names:
    importlib.import_module(name)
assert len(names) > 10, names
assert "torch" not in sys.modules, "the offline data pipeline imported torch"
config = [m for m in sys.modules if m.startswith("lmfab.config")]
assert not config, f"the data layer imported {config}"
"""


def test_data_imports_neither_torch_nor_config():
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
