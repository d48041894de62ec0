"""Optima read off parabolas in log space: the compute-optimal size of each iso-FLOP profile
(Hoffmann et al. 2022, approach 2) and the best learning rate per width of an LR sweep,
with whether it moves more than one 2x grid step across widths (what muTransfer promises it
will not, under muP). Used by :func:`lmfab.scaling.fit.run_fit`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from lmfab.scaling.results import is_isoflop_group, is_lr_group, jsonable


def _parabola_min(x: np.ndarray, y: np.ndarray) -> tuple[float, float, list[float]] | None:
    """(x_min, y_min, coeffs) of y = p0 x^2 + p1 x + p2 fitted to the points, or None
    where it opens downward."""
    p = np.polyfit(x, y, 2)
    if p[0] <= 0:
        return None
    xm = -p[1] / (2 * p[0])
    return float(xm), float(np.polyval(p, xm)), p.tolist()


@dataclass
class IsoflopMinimum:
    group: str
    flops: float  # the group's budget (median of its runs)
    n_points: int
    n_opt: float  # parameters at the parabola's minimum
    tokens_opt: float  # tokens there, from log D regressed on log N within the group
    loss_min: float
    interior: bool  # the best run has a smaller and a larger neighbour and the parabola's
    #                 minimum lies between them (else n_opt is the best run's: an edge)
    best_name: str
    coeffs: list[float]  # loss = p0 (ln N)^2 + p1 ln N + p2
    edge: str | None = None  # "small" / "large": the best run is the smallest / largest size

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def isoflop_minima(rows: Iterable[dict], *, loss_key: str = "eval_loss",
                   n_key: str = "n_params") -> list[IsoflopMinimum]:
    """Per iso-FLOP group (group name ``isoflop...``) with 3 or more model sizes: the
    parabola of loss in ln N and the N, tokens and loss at its minimum; by budget."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if is_isoflop_group(r["group"]):
            groups.setdefault(r["group"], []).append(r)
    out = []
    for g, rs in groups.items():
        x = np.log([r[n_key] for r in rs])
        y = np.array([r[loss_key] for r in rs], dtype=float)
        if len(np.unique(x)) < 3:
            continue
        best = int(np.argmin(y))
        fit = _parabola_min(x, y)
        # bracketed: the parabola bottoms out inside the sampled sizes *and* the best run
        # has a larger and a smaller neighbour; a loss rising monotonically from the
        # smallest size can still put a whole-profile parabola's vertex just inside it
        bracketed = x.min() < x[best] < x.max()
        interior = fit is not None and bracketed and x.min() <= fit[0] <= x.max()
        xo, lo, coeffs = fit if interior else (x[best], y[best], fit[2] if fit else [])
        slope, icpt = np.polyfit(x, np.log([r["tokens"] for r in rs]), 1)
        out.append(IsoflopMinimum(
            group=g, flops=float(np.median([r["flops"] for r in rs])), n_points=len(rs),
            n_opt=float(math.exp(xo)), tokens_opt=float(math.exp(icpt + slope * xo)),
            loss_min=float(lo), interior=bool(interior), best_name=rs[best]["name"],
            coeffs=list(coeffs),
            edge=None if bracketed else ("small" if x[best] == x.min() else "large")))
    return sorted(out, key=lambda m: m.flops)


def isoflop_exponents(minima: Sequence[IsoflopMinimum]) -> dict | None:
    """N_opt ∝ C^a and D_opt ∝ C^b over the interior minima (Hoffmann's approach 2)."""
    ms = [m for m in minima if m.interior]
    if len(ms) < 2 or len({m.flops for m in ms}) < 2:
        return None
    lc = np.log([m.flops for m in ms])
    a = float(np.polyfit(lc, np.log([m.n_opt for m in ms]), 1)[0])
    b = float(np.polyfit(lc, np.log([m.tokens_opt for m in ms]), 1)[0])
    return {"a": a, "b": b, "n_groups": len(ms)}


@dataclass
class LROptimum:
    d_model: int
    n_points: int
    best_lr: float  # the grid point with the lowest loss
    best_loss: float
    best_name: str
    lr_fit: float | None  # parabola in log2 LR through the best point and its neighbours
    loss_fit: float | None
    at_edge: bool  # the best grid point is the smallest or largest LR tried


@dataclass
class LRSweep:
    group: str
    parametrization: str
    widths: list[LROptimum]
    grid_step_octaves: float  # median spacing of the LR grid, in log2
    shift_octaves: float  # log2(max / min) of the best grid LR across widths
    shift_fit_octaves: float | None  # the same over the sub-grid estimates, where all exist
    shifted: bool  # the best grid LR moves more than one 2x step across widths

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def lr_optima(rows: Iterable[dict], *, loss_key: str = "eval_loss") -> list[LRSweep]:
    """Best learning rate per width in LR-sweep groups (a word ``lr`` in the group name),
    keyed by (group, parametrization, d_model); rows without d_model, learning_rate or
    parametrization are not LR-sweep points and are skipped."""
    keyed: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for r in rows:
        if is_lr_group(r["group"]) and all(k in r for k in ("d_model", "learning_rate",
                                                             "parametrization")):
            key = (r["group"], r["parametrization"])
            keyed.setdefault(key, {}).setdefault(int(r["d_model"]), []).append(r)
    out = []
    for (g, par), widths in sorted(keyed.items()):
        opts, steps = [], []
        for d, rs in sorted(widths.items()):
            rs = sorted(rs, key=lambda r: r["learning_rate"])
            x = np.log2([r["learning_rate"] for r in rs])
            y = np.array([r[loss_key] for r in rs], dtype=float)
            if len(x) > 1:
                steps.extend(np.diff(np.unique(x)))
            i = int(np.argmin(y))
            lo = min(max(i - 1, 0), max(len(x) - 3, 0))
            w = slice(lo, lo + 3)
            fit = _parabola_min(x[w], y[w]) if len(np.unique(x[w])) == 3 else None
            if fit is not None and not (x[lo] <= fit[0] <= x[min(lo + 2, len(x) - 1)]):
                fit = None
            opts.append(LROptimum(
                d_model=d, n_points=len(rs), best_lr=float(2 ** x[i]), best_loss=float(y[i]),
                best_name=rs[i]["name"], lr_fit=float(2 ** fit[0]) if fit else None,
                loss_fit=fit[1] if fit else None, at_edge=len(x) > 1 and i in (0, len(x) - 1)))
        best = np.log2([o.best_lr for o in opts])
        fits = [o.lr_fit for o in opts]
        shift = float(best.max() - best.min())
        out.append(LRSweep(
            group=g, parametrization=par, widths=opts,
            grid_step_octaves=float(np.median(steps)) if steps else float("nan"),
            shift_octaves=shift,
            shift_fit_octaves=(float(np.ptp(np.log2(fits))) if None not in fits else None),
            shifted=len(opts) > 1 and shift > 1.0 + 1e-6))
    return out
