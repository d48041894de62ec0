"""Loaders named by the task YAML files (``custom_dataset: !function utils.<name>``).

lm-eval imports this file by path, so it imports nothing of lmfab: the jsonl items beside
it become a ``datasets.Dataset`` test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> dict:
    path = HERE / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}


def load_cloze(**kwargs) -> dict:
    return _load("lmfab_cloze")


def load_choice(**kwargs) -> dict:
    return _load("lmfab_choice")
