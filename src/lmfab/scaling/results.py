"""A sweep's results table, read for fitting: ``<sweep_dir>/results.jsonl``, one run a line.

:mod:`lmfab.scaling.sweep` writes it; :mod:`lmfab.scaling.fit` reads it through
``load_results``, which validates every row and "fits what it can": a run that failed,
diverged, is unfinished, or has a missing field or a non-finite loss is reported by name with
the reason and left out. Group names say what a group is: ``isoflop...`` (an IsoFLOP
profile) and any group with the word ``lr`` (an LR sweep); the rest are families.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATUSES = ("done", "failed", "diverged", "unfinished", "missing")
# Fields the fits read: a done row without one of them is excluded.
REQUIRED = {"name": str, "status": str, "group": str, "n_params": int, "tokens": int,
            "flops": float, "eval_loss": float}
# Fields checked for type where present; the fits that need them say so.
OPTIONAL = {"reason": str, "n_params_nonembed": int, "eval_loss_smoothed": float,
            "bpb": float, "wall_s": float, "d_model": int, "n_layer": int,
            "learning_rate": float, "parametrization": str, "vocab_size": int, "tags": dict,
            "downstream": dict}
POSITIVE = ("n_params", "n_params_nonembed", "tokens", "flops", "eval_loss",
            "eval_loss_smoothed", "learning_rate", "d_model")


# ---------------------------------------------------------------------------------------
# results table


@dataclass(frozen=True)
class Rejected:
    name: str
    reason: str


@dataclass
class Results:
    source: str
    rows: list[dict]
    rejected: list[Rejected] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "n_rows": len(self.rows),
                "rejected": [asdict(r) for r in self.rejected]}


def _results_path(source: str | Path) -> Path:
    p = Path(source)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no results table at {p} (expected <sweep_dir>/results.jsonl)")
    return p


def _check_field(row: dict, key: str, tp: type, required: bool) -> str | None:
    """Why ``row[key]`` is unusable, or None. A field no fit reads may be null or NaN (a
    run's bpb or smoothed loss not measured) without losing the row."""
    v = row[key]
    if v is None and not required:
        return None
    if tp is str or tp is dict:
        return None if isinstance(v, tp) else f"{key} is not a {tp.__name__}: {v!r}"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return f"{key} is not a number: {v!r}"
    if not math.isfinite(v):
        return f"{key} is not finite: {v!r}" if required else None
    if key in POSITIVE and v <= 0:
        return f"{key} is not positive: {v!r}"
    return None


def check_row(row: Any, loss_key: str = "eval_loss") -> str | None:
    """Why a results row cannot be fitted, or None if it can."""
    if not isinstance(row, dict):
        return "not a JSON object"
    status = row.get("status")
    if status not in STATUSES:
        return f"unknown status {status!r} (expected one of {', '.join(STATUSES)})"
    if status != "done":
        return f"{status}: {row.get('reason') or 'no reason given'}"
    required = dict(REQUIRED, **{loss_key: float})
    missing = [k for k in required if k not in row]
    if missing:
        return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    for key, tp in {**required, **OPTIONAL}.items():
        if key in row and (why := _check_field(row, key, tp, key in required)):
            return why
    return None


def load_results(source: str | Path, *, loss_key: str = "eval_loss") -> Results:
    """Read ``<sweep_dir>/results.jsonl`` (or that file); keep the rows that can be fitted.

    A later row with the same name replaces an earlier one (a re-run appended to the table).
    """
    path = _results_path(source)
    kept: dict[str, dict] = {}
    rejected: dict[str, Rejected] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            rejected[f"line {i}"] = Rejected(f"line {i}", f"not valid JSON: {e.msg}")
            continue
        name = row.get("name") if isinstance(row, dict) else None
        name = name if isinstance(name, str) and name else f"line {i}"
        row = with_downstream_value(row, loss_key)
        why = check_row(row, loss_key)
        kept.pop(name, None)
        rejected.pop(name, None)
        if why:
            rejected[name] = Rejected(name, why)
        else:
            kept[name] = row
    return Results(str(path), list(kept.values()), list(rejected.values()))


def flat_metrics(results: dict) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` from a simple_evaluate result (filters other than
    lm-eval's default ``none`` keep their suffix; standard errors are left out): what
    metrics.jsonl logs and a results row keeps. Needs no lm-eval import."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if (key in ("alias", "sample_len") or "_stderr" in key
                    or not isinstance(value, int | float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"{task}/{name}"] = float(value) if math.isfinite(value) else None
    return out


def downstream_metrics(record: dict | None) -> dict[str, float] | None:
    """The downstream scores of an eval record of metrics.jsonl (``"<task>/<metric>"`` keys,
    logged when the run's ``eval_input.tasks`` names tasks), or None when it has none. A
    results row keeps them under ``downstream``, so loss -> accuracy can be fitted."""
    if not record:
        return None
    found = {k: v for k, v in record.items()
             if "/" in k and (v is None or isinstance(v, int | float))}
    return found or None


def fitted_as(key: str) -> tuple[Callable[[float], float], Callable[[float], float], str]:
    """How the score ``key`` is fitted: (to the fitted quantity, back to the score, what the
    fitted quantity is). Losses (``eval_loss``, ``bpb``) as they are. Downstream scores
    ``"<task>/<metric>"``: accuracies (``acc...``) as the error 1 - acc, which falls with
    compute like a loss, so the same law L = a·C^-b + c applies (Cerebras-GPT's downstream
    fits take this form too); perplexities (``...perplexity``) as their log, the mean
    negative log-likelihood in nats, itself a loss; other metrics as they are."""
    metric = key.split("/", 1)[1] if "/" in key else ""
    if metric.startswith("acc"):
        return (lambda v: 1.0 - v), (lambda y: 1.0 - y), "1 - " + metric
    if metric.endswith("perplexity"):
        return math.log, math.exp, f"log {metric} (nats)"
    return float, float, key


def with_downstream_value(row: Any, key: str) -> Any:
    """A row with ``key`` filled from its downstream scores when ``key`` names one
    (``"<task>/<metric>"``, e.g. ``lmfab_choice/acc``), in the units it is fitted in
    (:func:`fitted_as`). A row without that score (or a perplexity that is not positive) is
    returned unchanged and :func:`check_row` names the missing field."""
    if "/" not in key or not isinstance(row, dict) or key in row:
        return row
    scores = row.get("downstream")
    value = scores.get(key) if isinstance(scores, dict) else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return row
    to_fit = fitted_as(key)[0]
    try:
        return {**row, key: to_fit(float(value))}
    except ValueError:  # log of a perplexity <= 0
        return row


def is_isoflop_group(group: str) -> bool:
    return group.startswith("isoflop")


def is_lr_group(group: str) -> bool:
    """``mup-lr``, ``sp-lr``, ``lr-sweep``: a dash- or underscore-separated word ``lr``."""
    return "lr" in re.split(r"[-_]", group.lower())


def jsonable(x: Any) -> Any:
    """numpy scalars and arrays to Python; non-finite floats to None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
