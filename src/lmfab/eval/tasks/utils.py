"""Loaders named by the task YAML files (``custom_dataset: !function utils.<name>``).

lm-eval imports this file by path, so it imports nothing of lmfab: the jsonl items beside
it become a ``datasets.Dataset`` test split. ``python -m lmfab.eval.tasks.build --name N
--out DIR`` copies it beside its own YAML files, which name their items through
``dataset_kwargs: {data_file: ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(data_file: str) -> dict:
    """The items of ``data_file`` (beside this file; a task YAML names it in
    ``dataset_kwargs``) as a test split."""
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the task's items are missing (python -m "
                                "lmfab.eval.tasks.build writes them)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}


def load_cloze(data_file: str = "lmfab_cloze.jsonl", **kwargs) -> dict:
    return _load(data_file)


def load_choice(data_file: str = "lmfab_choice.jsonl", **kwargs) -> dict:
    return _load(data_file)
