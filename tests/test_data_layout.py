"""The data layer's layout rules: the offline steps never load torch.

Preparation (``lmfab.data.prep``) and curation (``lmfab.data.curate``) run on CPU machines
and in worker processes where importing torch would cost seconds and gigabytes per process;
the runtime modules (shards, loader, mixture) are numpy only. Checked in a fresh
interpreter, importing every module of both packages.
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
"""


def test_prep_and_curate_do_not_import_torch():
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
