"""Scaling-law fits over a sweep's results: the loss a bigger run will reach, before it runs.

A sweep writes one JSON object per run to ``<sweep_dir>/results.jsonl``. ``load_results``
validates the rows ("fit what it can": a run that failed, diverged, is unfinished or has a
missing field or a non-finite loss is reported by name with the reason and left out), then:

- ``fit_power_law``: Cerebras-GPT's loss-compute law L(C) = a·C^-b + c, published as
  L = (C/C0)^-b + c with C0 = a^(1/b) (arXiv 2304.03208, Fig. 1: C0 = 5.984e22, b = 0.0737,
  c = 0.5066 on the Pile, which predicted the 13B model to 0.5%). Least squares on L with
  C handled in log space (centred, so 1e12..1e24 FLOPs are equally well conditioned), started
  from the best of a grid of c values with log(L - c) regressed on log C.
- ``fit_chinchilla``: Hoffmann et al. 2022's L(N, D) = E + A/N^alpha + B/D^beta (arXiv
  2203.15556, approach 3): Huber loss (delta 1e-3) between the log-sum-exp prediction and log
  L, minimised by BFGS (their L-BFGS, with full memory at 5 parameters) from the best starts
  of their grid of initialisations. Besiroglu et al. 2024 (arXiv 2404.10102) showed the
  published fit was under-converged and its intervals far too narrow; so the optimiser runs
  to tight tolerances here and the intervals come from a bootstrap over runs, not from the
  curvature.
- ``isoflop_minima`` and ``lr_optima`` (in :mod:`lmfab.scaling.optima`, re-exported here):
  Hoffmann's approach 2, per iso-FLOP group the N at a parabola's minimum in log N; the best
  learning rate per width of an LR sweep and whether it moves across widths.
- ``predict_target``: a params YAML's FLOPs by lmfab's own run plan, and the fitted loss.
- ``run_fit``: all of the above that applies, written to ``fit.json`` and PNGs (plots.py).

Intervals are bootstrap percentiles (runs resampled with replacement, refitted; refits that
fail are skipped and counted). Pure numpy/scipy; lmfab.config and lmfab.train.plan (torch)
are imported only inside ``predict_target``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import logsumexp

from lmfab.atomic import atomic_path
from lmfab.scaling.optima import (  # noqa: F401  (re-exported: fit's API)
    IsoflopMinimum,
    LROptimum,
    LRSweep,
    _parabola_min,
    isoflop_exponents,
    isoflop_minima,
    lr_optima,
)
from lmfab.scaling.results import (  # noqa: F401  (re-exported: the table's API)
    STATUSES,
    Rejected,
    Results,
    check_row,
    fitted_as,
    is_isoflop_group,
    is_lr_group,
    jsonable,
    load_results,
)

LEVEL = 0.9  # central interval of the bootstrap percentiles
# ---------------------------------------------------------------------------------------
# helpers


def _interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    q = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(samples, [q, 100 - q], axis=0)
    return lo, hi


def _goodness(y: np.ndarray, pred: np.ndarray) -> dict:
    """R^2 on the loss, and the residuals (absolute and relative to the fit)."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    return {"r2": r2, "residuals": (y - pred).tolist(),
            "rel_residuals": ((y - pred) / pred).tolist()}


def _bootstrap(n: int, refit: Callable[[np.ndarray], Sequence[float]], n_boot: int, seed: int,
               usable: Callable[[np.ndarray], bool], width: int) -> np.ndarray:
    """(k, width) parameter samples from refits to resampled runs; a resample that is not
    ``usable`` (too few distinct points) or whose refit fails is skipped."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if not usable(idx):
            continue
        try:
            out.append(refit(idx))
        except (RuntimeError, ValueError, np.linalg.LinAlgError, OverflowError):
            continue
    return np.array(out, dtype=float).reshape(-1, width)


def _cis(samples: dict[str, np.ndarray], level: float) -> dict[str, tuple[float, float]]:
    return {k: tuple(float(v) for v in _interval(x, level)) for k, x in samples.items()
            if len(x)}


def _names(names: Sequence[str] | None, n: int) -> list[str]:
    return list(names) if names is not None else [f"#{i}" for i in range(n)]


def _refuse(what: str, need: str, names: list[str]) -> ValueError:
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return ValueError(f"{what} needs {need}, got {len(names)}: {shown or 'none'}")


# ---------------------------------------------------------------------------------------
# L(C) = a * C^-b + c


@dataclass
class PowerFit:
    """L(C) = a·C^-b + c = (C/C0)^-b + c, with bootstrap intervals."""

    a: float
    b: float
    c: float
    C0: float
    r2: float
    C: list[float]
    L: list[float]
    names: list[str]
    residuals: list[float]  # L - fit
    rel_residuals: list[float]  # (L - fit) / fit
    ci: dict[str, tuple[float, float]]
    n_boot: int
    n_boot_ok: int
    level: float = LEVEL
    boot: np.ndarray = field(default=None, repr=False)  # (n_boot_ok, 3): a, b, c

    def curve(self, C: Any, a: Any = None, b: Any = None, c: Any = None) -> np.ndarray:
        a, b, c = (self.a if a is None else a, self.b if b is None else b,
                   self.c if c is None else c)
        logc = np.log(np.asarray(C, dtype=float))
        return np.exp(np.log(a) - b * logc) + c

    def predict(self, C: Any) -> tuple[Any, Any, Any]:
        """(fit, lo, hi): the fitted loss at C and the bootstrap interval."""
        x = np.atleast_1d(np.asarray(C, dtype=float))
        mean = self.curve(x)
        if self.boot is not None and len(self.boot):
            a, b, c = (self.boot[:, i, None] for i in range(3))
            lo, hi = _interval(self.curve(x[None, :], a, b, c), self.level)
        else:
            lo = hi = np.full_like(mean, np.nan)
        if np.ndim(C) == 0:
            return float(mean[0]), float(lo[0]), float(hi[0])
        return mean, lo, hi

    def formula(self) -> str:
        return f"L = (C/{self.C0:.4g})^-{self.b:.4g} + {self.c:.4g}"

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "boot"}
        d["formula"] = self.formula()
        # the bootstrap draws, so that `lmfab plan --fit` gives intervals without refitting
        d["boot"] = [] if self.boot is None else np.round(self.boot, 8).tolist()
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: dict) -> PowerFit:
        """The law of a ``fit.json`` (as ``to_dict`` wrote it), ready to predict."""
        names = {f for f in cls.__dataclass_fields__ if f != "boot"}
        boot = np.asarray(d.get("boot") or [], dtype=float).reshape(-1, 3)
        return cls(**{k: d[k] for k in names if k in d}, boot=boot)


def _power_solve(x: np.ndarray, y: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Least squares for y = exp(k - b*x) + c, x = log C - mean; returns (k, b, c)."""
    if start is None:  # grid over c: log(y - c) is linear in x for the right c
        best = None
        span = max(float(y.min()), 1e-9)
        for c in span * np.concatenate([np.linspace(0, 0.98, 50), [0.995, 0.999]]):
            slope, k = np.polyfit(x, np.log(y - c), 1)
            sse = float(np.sum((np.exp(k + slope * x) + c - y) ** 2))
            if best is None or sse < best[0]:
                best = (sse, np.array([k, max(-slope, 1e-6), c]))
        start = best[1]

    def resid(p):
        return np.exp(p[0] - p[1] * x) + p[2] - y

    def jac(p):
        e = np.exp(p[0] - p[1] * x)
        return np.stack([e, -x * e, np.ones_like(x)], axis=1)

    res = optimize.least_squares(resid, start, jac=jac, bounds=([-np.inf, 0, 0], np.inf),
                                 x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12,
                                 max_nfev=2000)
    if not np.all(np.isfinite(res.x)):
        raise RuntimeError("power-law fit did not converge")
    return res.x


def fit_power_law(C: Sequence[float], L: Sequence[float], *, names: Sequence[str] | None = None,
                  bootstrap: int = 1000, seed: int = 0, level: float = LEVEL) -> PowerFit:
    """Fit L(C) = a·C^-b + c (C in FLOPs, L in nats/token) to finished runs."""
    C, L = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    names = _names(names, len(C))
    if C.shape != L.shape or C.ndim != 1 or len(names) != len(C):
        raise ValueError("C, L (and names) must be 1-D and of one length")
    if len(C) < 4:
        raise _refuse("power-law fit (3 parameters)", "at least 4 finished runs", names)
    if len(np.unique(C)) < 3:
        raise ValueError(f"power-law fit needs runs at 3 or more distinct compute budgets, "
                         f"got {len(np.unique(C))}: {', '.join(names)}")
    if np.any(C <= 0) or np.any(L <= 0) or not np.all(np.isfinite(C * L)):
        raise ValueError("power-law fit needs positive finite C and L")
    xm = float(np.mean(np.log(C)))
    x = np.log(C) - xm
    k, b, c = _power_solve(x, L)

    def abc(k, b, c):
        return math.exp(k + b * xm), b, c

    start = np.array([k, b, c])
    a, b, c = abc(k, b, c)
    boot = _bootstrap(len(C), lambda i: abc(*_power_solve(x[i], L[i], start)), bootstrap, seed,
                      lambda i: len(np.unique(C[i])) >= 3, 3)
    C0s = np.exp(np.log(boot[:, 0]) / np.maximum(boot[:, 1], 1e-12))
    ci = _cis({"a": boot[:, 0], "b": boot[:, 1], "c": boot[:, 2], "C0": C0s}, level)
    return PowerFit(
        a=a, b=float(b), c=float(c), C0=math.exp(math.log(a) / b) if b > 0 else float("inf"),
        C=C.tolist(), L=L.tolist(), names=names, ci=ci, n_boot=bootstrap, n_boot_ok=len(boot),
        level=level, boot=boot, **_goodness(L, np.exp(math.log(a) - b * np.log(C)) + c))


# ---------------------------------------------------------------------------------------
# L(N, D) = E + A/N^alpha + B/D^beta


def _huber_objective(p: np.ndarray, lnN: np.ndarray, lnD: np.ndarray, lnL: np.ndarray,
                     delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber(LSE(a - alpha lnN, b - beta lnD, e) - ln L) / delta^2 and its gradient.

    Dividing by delta^2 leaves the minimum where it is and gives the optimiser a unit-scale problem.
    p = (a, b, e, alpha, beta), A = exp(a), B = exp(b), E = exp(e).
    """
    a, b, e, alpha, beta = p
    u1, u2 = a - alpha * lnN, b - beta * lnD
    m = np.maximum(np.maximum(u1, u2), e)
    x1, x2, x3 = np.exp(u1 - m), np.exp(u2 - m), np.exp(e - m)
    s = x1 + x2 + x3
    r = m + np.log(s) - lnL
    ar = np.abs(r)
    small = ar <= delta
    f = np.where(small, 0.5 * (r / delta) ** 2, ar / delta - 0.5).sum()
    psi = np.where(small, r / delta**2, np.sign(r) / delta) / s  # times softmax weights x/s
    g1, g2 = psi * x1, psi * x2
    grad = np.array([g1.sum(), g2.sum(), (psi * x3).sum(), -(g1 @ lnN), -(g2 @ lnD)])
    return float(f), grad


# Hoffmann et al.'s grid of initialisations (their appendix D.2), in (a, b, e, alpha, beta).
_GRID = np.array(np.meshgrid(np.arange(0, 30, 5.0), np.arange(0, 30, 5.0),
                             np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5),
                             np.arange(0, 2.5, 0.5), indexing="ij")).reshape(5, -1).T


def _chinchilla_solve(lnN, lnD, lnL, delta, starts: np.ndarray) -> np.ndarray:
    """BFGS from each start; the best minimum. It runs on centred logs (a - alpha ln N =
    a' - alpha (ln N - mean)): the same minimum with a and alpha no longer entangled, reached
    in tens of iterations instead of thousands. BFGS, not scipy's L-BFGS-B: on 5 parameters
    it is L-BFGS with full memory, and L-BFGS-B's compiled core spent milliseconds per
    iteration in threaded BLAS on a loaded machine (docs/decisions.md, 2026-12-03)."""
    mN, mD = float(lnN.mean()), float(lnD.mean())
    shift = np.array([[1, 0, 0, -mN, 0], [0, 1, 0, 0, -mD], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0],
                      [0, 0, 0, 0, 1]], dtype=float)  # p' = shift @ p
    best = None
    for s in starts:
        res = optimize.minimize(_huber_objective, shift @ s, jac=True, method="BFGS",
                                args=(lnN - mN, lnD - mD, lnL, delta),
                                options={"maxiter": 2000, "gtol": 1e-8})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise RuntimeError("Chinchilla fit did not converge from any start")
    return np.linalg.solve(shift, best.x)


def _grid_starts(lnN, lnD, lnL, delta, k: int) -> np.ndarray:
    """The k grid points with the lowest objective: BFGS runs from these only."""
    a, b, e, al, be = (_GRID[:, i, None] for i in range(5))
    u = np.stack(np.broadcast_arrays(a - al * lnN, b - be * lnD, e + 0 * lnN))
    r = logsumexp(u, axis=0) - lnL
    f = np.where(np.abs(r) <= delta, 0.5 * (r / delta) ** 2, np.abs(r) / delta - 0.5).sum(1)
    return _GRID[np.argsort(f)[:k]]


@dataclass
class ChinchillaFit:
    """L(N, D) = E + A/N^alpha + B/D^beta; compute-optimal N ∝ C^a, D ∝ C^b under C = 6ND."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    a: float  # beta / (alpha + beta)
    b: float  # alpha / (alpha + beta)
    G: float  # (alpha A / (beta B))^(1/(alpha+beta))
    r2: float
    N: list[float]
    D: list[float]
    L: list[float]
    names: list[str]
    residuals: list[float]
    rel_residuals: list[float]
    ci: dict[str, tuple[float, float]]
    n_boot: int
    n_boot_ok: int
    huber_delta: float = 1e-3
    level: float = LEVEL
    boot: np.ndarray = field(default=None, repr=False)  # (n_boot_ok, 5): E, A, B, alpha, beta

    @staticmethod
    def _law(N, D, E, A, B, alpha, beta):
        return E + A * np.exp(-alpha * np.log(N)) + B * np.exp(-beta * np.log(D))

    def predict(self, N: Any, D: Any) -> tuple[Any, Any, Any]:
        """(fit, lo, hi): the fitted loss of N parameters trained on D tokens."""
        n, d = np.broadcast_arrays(np.atleast_1d(np.asarray(N, dtype=float)),
                                   np.atleast_1d(np.asarray(D, dtype=float)))
        mean = self._law(n, d, self.E, self.A, self.B, self.alpha, self.beta)
        if self.boot is not None and len(self.boot):
            p = [self.boot[:, i, None] for i in range(5)]
            lo, hi = _interval(self._law(n[None], d[None], *p), self.level)
        else:
            lo = hi = np.full_like(mean, np.nan)
        if np.ndim(N) == 0 and np.ndim(D) == 0:
            return float(mean[0]), float(lo[0]), float(hi[0])
        return mean, lo, hi

    def optimal(self, C: float, flops_per_token: Callable[[float], float] | None = None
                ) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L at C FLOPs: C = 6ND, or C = flops_per_token(N)·D."""
        if flops_per_token is None:
            return self.G * (C / 6) ** self.a, (C / 6) ** self.b / self.G

        def loss(lnN):
            n = math.exp(lnN)
            return float(self._law(n, C / flops_per_token(n), self.E, self.A, self.B,
                                   self.alpha, self.beta))

        n0 = math.log(self.G * (C / 6) ** self.a)
        res = optimize.minimize_scalar(loss, bounds=(n0 - 5, n0 + 5), method="bounded",
                                       options={"xatol": 1e-6})
        n = math.exp(res.x)
        return n, C / flops_per_token(n)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "boot"}
        d["formula"] = (f"L = {self.E:.4g} + {self.A:.4g}/N^{self.alpha:.4g}"
                        f" + {self.B:.4g}/D^{self.beta:.4g}")
        return jsonable(d)


def fit_chinchilla(N: Sequence[float], D: Sequence[float], L: Sequence[float], *,
                   names: Sequence[str] | None = None, bootstrap: int = 1000, seed: int = 0,
                   huber_delta: float = 1e-3, n_starts: int = 8, level: float = LEVEL
                   ) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. 2022 (approach 3).

    Needs at least 5 finished runs (5 parameters), with 2 or more distinct N and 2 or more
    distinct tokens-per-parameter ratios D/N: runs all at one ratio (a family at 20 tokens per
    parameter) cannot tell alpha from beta.
    """
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    names = _names(names, len(N))
    if not (N.shape == D.shape == L.shape) or N.ndim != 1 or len(names) != len(N):
        raise ValueError("N, D, L (and names) must be 1-D and of one length")
    if len(N) < 5:
        raise _refuse("Chinchilla fit (5 parameters)", "at least 5 finished runs", names)
    if np.any(N <= 0) or np.any(D <= 0) or np.any(L <= 0) or not np.all(np.isfinite(N * D * L)):
        raise ValueError("Chinchilla fit needs positive finite N, D and L")
    lnN, lnD, lnL = np.log(N), np.log(D), np.log(L)
    n_distinct = len(np.unique(np.round(lnN, 4)))
    ratios = len(np.unique(np.round(lnD - lnN, 2)))  # ratios within 1% count as one
    if n_distinct < 2 or ratios < 2:
        raise ValueError(
            f"Chinchilla fit needs runs at 2 or more model sizes N and 2 or more "
            f"tokens-per-parameter ratios D/N (e.g. an iso-FLOP sweep), got {n_distinct} "
            f"size(s) and {ratios} ratio(s) over {len(N)} runs")
    starts = _grid_starts(lnN, lnD, lnL, huber_delta, n_starts)
    p = _chinchilla_solve(lnN, lnD, lnL, huber_delta, starts)
    def natural(q):  # (a, b, e, alpha, beta) -> (E, A, B, alpha, beta)
        return [math.exp(q[2]), math.exp(q[0]), math.exp(q[1]), q[3], q[4]]

    boot = _bootstrap(len(N), lambda i: natural(_chinchilla_solve(
        lnN[i], lnD[i], lnL[i], huber_delta, p[None])), bootstrap, seed,
        lambda i: len(np.unique(i)) >= 5, 5)
    E, A, B, alpha, beta = natural(p)
    s = boot[:, 3] + boot[:, 4]
    ci = _cis(dict(zip(("E", "A", "B", "alpha", "beta"), boot.T, strict=True),
                   a=boot[:, 4] / s, b=boot[:, 3] / s), level)
    return ChinchillaFit(
        E=E, A=A, B=B, alpha=float(alpha), beta=float(beta),
        a=float(beta / (alpha + beta)), b=float(alpha / (alpha + beta)),
        G=float((alpha * A / (beta * B)) ** (1 / (alpha + beta))),
        N=N.tolist(), D=D.tolist(), L=L.tolist(), names=names, ci=ci, n_boot=bootstrap,
        n_boot_ok=len(boot), huber_delta=huber_delta, level=level, boot=boot,
        **_goodness(L, ChinchillaFit._law(N, D, E, A, B, alpha, beta)))


# ---------------------------------------------------------------------------------------
# the target run, and the whole fit of a sweep


def target_budget(params_yaml: str | Path, overrides: Sequence[str] = ()) -> dict:
    """A params YAML's parameters, tokens and training FLOPs, by lmfab's own run plan."""
    from lmfab.config import load_config  # torch (via the model's meta build): only here
    from lmfab.train.plan import plan_run

    cfg = load_config(params_yaml, overrides)
    plan = plan_run(cfg)
    steps = cfg.runconfig.max_steps
    tokens = plan.tokens_per_step * steps
    # parameters as the sweep counts them (no position embeddings), so L(N, D) sees one N
    return {"params": str(params_yaml), "overrides": list(overrides),
            "n_params": plan.n_params_no_pos,
            "tokens": tokens, "max_steps": steps, "flops_per_token": plan.flops_per_token,
            "flops": plan.flops_per_token * tokens}


def predict_target(fit: PowerFit | ChinchillaFit, params_yaml: str | Path,
                   overrides: Sequence[str] = ()) -> dict:
    """The loss ``fit`` predicts for the run a params YAML describes, with its interval.

    ``extrapolation`` is how far beyond the sweep the target lies (its FLOPs over the
    largest run's for a power law; its N over the largest N for a Chinchilla fit).
    """
    return _predict(fit, target_budget(params_yaml, overrides))


def _predict(fit: PowerFit | ChinchillaFit, budget: dict) -> dict:
    t = dict(budget)
    if isinstance(fit, PowerFit):
        mean, lo, hi = fit.predict(t["flops"])
        t.update(form="power", extrapolation=t["flops"] / max(fit.C))
    else:
        mean, lo, hi = fit.predict(t["n_params"], t["tokens"])
        fpt = t["flops_per_token"] / t["n_params"]  # the target's FLOPs per token per parameter
        n_opt, d_opt = fit.optimal(t["flops"], lambda n: fpt * n)
        t.update(form="chinchilla", extrapolation=t["n_params"] / max(fit.N),
                 n_opt=n_opt, tokens_opt=d_opt)
    t.update(loss=mean, loss_lo=lo, loss_hi=hi, level=fit.level)
    return jsonable(t)


def _power_points(res: Results, minima: list[IsoflopMinimum], loss_key: str
                  ) -> tuple[str, list[float], list[float], list[str]]:
    """What the power law is fitted to: the runs outside iso-FLOP and LR-sweep groups (a
    family, each run at its own compute-optimal size), else the iso-FLOP minima."""
    fam = [r for r in res.rows if not is_isoflop_group(r["group"]) and not is_lr_group(r["group"])]
    ms = [m for m in minima if m.interior]
    if len(fam) < 4 and len(ms) >= 4:
        return ("isoflop minima", [m.flops for m in ms], [m.loss_min for m in ms],
                [m.group for m in ms])
    groups = sorted({r["group"] for r in fam})
    return (", ".join(groups) or "no family runs", [r["flops"] for r in fam],
            [r[loss_key] for r in fam], [r["name"] for r in fam])


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` beside ``path``, then rename (:mod:`lmfab.atomic`): a reader never sees
    half a file."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def _g(x: float | None, fmt: str = ".3g") -> str:
    return "?" if x is None or not math.isfinite(x) else format(x, fmt)


@dataclass
class ScoreMap:
    """A downstream score (in its fitted units, :func:`lmfab.scaling.results.fitted_as`) as a
    straight line in a loss over the same runs: y = intercept + slope * L. The second step of
    predicting a score from compute (compute -> loss by the loss law, loss -> score by this
    line), as Llama 3 (2024) and others predict downstream scores; the line is the simplest
    map that two quantities falling together allow with a handful of runs."""

    metric: str
    against: str
    intercept: float
    slope: float
    r2: float
    loss: list[float]
    y: list[float]
    names: list[str]
    boot: np.ndarray = field(repr=False)  # (n, 2): intercept, slope per bootstrap sample

    def at(self, loss: float, lo: float | None = None, hi: float | None = None,
           level: float = LEVEL) -> tuple[float, float, float]:
        """(value, lo, hi) at a loss, the interval covering the line's bootstrap and, when
        given, the loss's own interval [lo, hi]."""
        mid = self.intercept + self.slope * loss
        ends = [x for x in (loss, lo, hi) if x is not None]
        vals = np.concatenate([self.boot[:, 0] + self.boot[:, 1] * x for x in ends])
        a, b = _interval(vals, level)
        return float(mid), float(min(a, mid)), float(max(b, mid))

    def to_dict(self) -> dict:
        return jsonable({"metric": self.metric, "against": self.against,
                         "intercept": self.intercept, "slope": self.slope, "r2": self.r2,
                         "loss": self.loss, "y": self.y, "names": self.names,
                         "n_boot_ok": len(self.boot)})


def fit_score_map(loss: Sequence[float], y: Sequence[float], *, metric: str, against: str,
                  names: Sequence[str] | None = None, bootstrap: int = 1000, seed: int = 0
                  ) -> ScoreMap:
    """Least squares line of ``y`` (a score in its fitted units) in ``loss``; needs 3 runs
    with 2 distinct losses."""
    x, yy = np.asarray(loss, dtype=float), np.asarray(y, dtype=float)
    names = _names(names, len(x))
    if len(x) < 3 or len(np.unique(x)) < 2:
        raise _refuse(f"a line of {metric} in {against}", "3 runs with distinct losses", names)
    slope, icpt = np.polyfit(x, yy, 1)
    boot = _bootstrap(len(x), lambda i: np.polyfit(x[i], yy[i], 1)[::-1], bootstrap, seed,
                      usable=lambda i: len(np.unique(x[i])) > 1, width=2)
    return ScoreMap(metric, against, float(icpt), float(slope),
                    _goodness(yy, icpt + slope * x)["r2"], x.tolist(), yy.tolist(), names,
                    boot)


def fit_warnings(power: PowerFit | None, chin: ChinchillaFit | None) -> list[str]:
    """What a fit's own numbers say about how far to trust it (printed and in fit.json)."""
    out = []
    if power is not None and power.c < 1e-6 * min(power.L):
        out.append("power law: the floor c sits at its bound 0, so the points cannot tell "
                   "an irreducible loss from the slope; predictions beyond them fall at the "
                   "fitted slope forever (sample further in compute, or fit --form chinchilla)")
    if chin is not None:
        odd = [f"{k} {v:.2f}" for k, v in (("alpha", chin.alpha), ("beta", chin.beta))
               if not 0.05 <= v <= 1.0]
        if odd:
            out.append(f"chinchilla: {', '.join(odd)} outside 0.05-1 (published fits: "
                       "0.2-0.8): the runs do not pin that term; vary N at long D and D at "
                       "large N, not only along IsoFLOP lines")
        if chin.E < 1e-6 * min(chin.L):
            out.append("chinchilla: E sits at its bound 0 (no floor found)")
    return out


def _summary(out: dict, res: Results, power: PowerFit | None, chin: ChinchillaFit | None,
             minima: list[IsoflopMinimum], sweeps: list[LRSweep]) -> str:
    lines = [f"fit: {len(res.rows)} finished runs from {res.source}"
             + (f" ({out['loss_key']} fitted as {out['fitted_as']})" if "fitted_as" in out
                else "")]
    if res.rejected:
        lines.append(f"  excluded {len(res.rejected)}: "
                     + "; ".join(f"{r.name} ({r.reason})" for r in res.rejected[:8])
                     + ("; ..." if len(res.rejected) > 8 else ""))
    if power is not None:
        lo, hi = power.ci.get("b", (math.nan, math.nan))
        lines.append(f"power law over {out['power']['points']} ({len(power.C)} points): "
                     f"{power.formula()}  R^2 {power.r2:.4f}  b in [{_g(lo)}, {_g(hi)}]")
    for key in ("power", "chinchilla"):
        if isinstance(out.get(key), dict) and "skipped" in out[key]:
            lines.append(f"{key}: skipped: {out[key]['skipped']}")
    if chin is not None:
        lines.append(f"chinchilla ({len(chin.N)} runs): E {_g(chin.E)} A {_g(chin.A)} "
                     f"B {_g(chin.B)} alpha {_g(chin.alpha)} beta {_g(chin.beta)}; "
                     f"N_opt ~ C^{chin.a:.3f}, D_opt ~ C^{chin.b:.3f}")
    for m in minima:
        lines.append(f"{m.group}: N_opt {_g(m.n_opt)} D_opt {_g(m.tokens_opt)} "
                     f"loss {m.loss_min:.4f}" + ("" if m.interior else
                     f" (not bracketed: the best run, {m.best_name}, is the "
                     f"{'smallest' if m.edge == 'small' else 'largest'} size sampled; "
                     f"add {'smaller' if m.edge == 'small' else 'larger'} sizes)"
                     if m.edge else " (the parabola opens downward or bottoms out beyond "
                     "the sampled sizes)"))
    for s in sweeps:
        best = ", ".join(f"{o.d_model}:{_g(o.lr_fit or o.best_lr)}" for o in s.widths)
        lines.append(f"{s.group} {s.parametrization}: best LR by d_model {best}; "
                     + (f"SHIFTS {s.shift_octaves:.1f} octaves" if s.shifted
                        else f"stable (shift {s.shift_octaves:.1f} octaves)"))
    for t in out.get("target", []):
        lines.append(f"target {t['params']} ({t['form']}): C {_g(t['flops'])} FLOPs, "
                     f"N {_g(t['n_params'])}, D {_g(t['tokens'])}: loss {_g(t['loss'], '.4f')} "
                     f"[{_g(t['loss_lo'], '.4f')}, {_g(t['loss_hi'], '.4f')}]"
                     f" ({_g(t['extrapolation'])}x beyond the sweep)"
                     + (f"; {t['metric']} {_g(t['value'], '.4g')} [{_g(t['value_lo'], '.4g')}, "
                        f"{_g(t['value_hi'], '.4g')}]" if "value" in t else ""))
    if "score_map" in out:
        m = out["score_map"]
        lines.append(f"{m['metric']} as {out['score_fitted_as']} = {_g(m['intercept'], '.4g')} "
                     f"{'+' if m['slope'] >= 0 else '-'} {_g(abs(m['slope']), '.4g')} x "
                     f"{m['against']} over {len(m['loss'])} runs, R^2 {m['r2']:.3f}")
    lines += [f"warning: {w}" for w in out.get("warnings", [])]
    lines.append(f"wrote {', '.join(out['files'])} to {out['out_dir']}")
    return "\n".join(lines)


def run_fit(source: str | Path, *, form: str = "power", predict: str | Path | None = None,
            out_dir: str | Path, overrides: Sequence[str] = (), loss_key: str = "eval_loss",
            against: str | None = None, bootstrap: int = 1000, seed: int = 0,
            echo: bool = True) -> dict:
    """Load a sweep's results, fit, write ``fit.json`` and PNGs to ``out_dir``; print and
    return the summary (``result["summary"]``).

    ``form`` is ``power``, ``chinchilla`` or ``both``: one form that cannot be fitted raises
    ValueError; under ``both`` it is recorded as skipped (with why) unless neither fits.
    ``predict`` is a params YAML (with ``overrides``) whose loss is predicted.
    """
    from lmfab.scaling import plots

    if form not in ("power", "chinchilla", "both"):
        raise ValueError(f"form must be power, chinchilla or both, got {form!r}")
    metric = None
    if against is not None:  # two steps: the law on the loss, the score as a line in it
        if "/" not in loss_key or "/" in against:
            raise ValueError(f"against={against!r} maps a downstream score TASK/METRIC onto a "
                             f"loss (eval_loss or bpb); the score to map is {loss_key!r}")
        metric, loss_key = loss_key, against
    res = load_results(source, loss_key=loss_key)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    minima = isoflop_minima(res.rows, loss_key=loss_key)
    sweeps = lr_optima(res.rows, loss_key=loss_key)
    out: dict[str, Any] = {"results": res.to_dict(), "loss_key": loss_key, "form": form,
                           "isoflop": [m.to_dict() for m in minima],
                           "isoflop_exponents": isoflop_exponents(minima),
                           "lr_sweeps": [s.to_dict() for s in sweeps], "target": []}
    power = chin = None
    if form in ("power", "both"):
        what, C, L, names = _power_points(res, minima, loss_key)
        try:
            power = fit_power_law(C, L, names=names, bootstrap=bootstrap, seed=seed)
            out["power"] = dict(power.to_dict(), points=what)
        except ValueError as e:
            # A sweep of LR grids only has no family to fit: say so, fit what it has.
            if form == "power" and not (sweeps and len(C) == 0):
                raise
            out["power"] = {"skipped": str(e)}
    if form in ("chinchilla", "both"):
        rows = [r for r in res.rows if not is_lr_group(r["group"])]  # LR sweeps vary the recipe
        try:
            chin = fit_chinchilla([r["n_params"] for r in rows], [r["tokens"] for r in rows],
                                  [r[loss_key] for r in rows], names=[r["name"] for r in rows],
                                  bootstrap=bootstrap, seed=seed)
            out["chinchilla"] = chin.to_dict()
        except ValueError as e:
            if form == "chinchilla":
                raise
            if power is None:
                raise ValueError(f"{out['power']['skipped']}; and {e}") from None
            out["chinchilla"] = {"skipped": str(e)}
    if predict is not None:
        budget = target_budget(predict, overrides)
        out["target"] = [_predict(f, budget) for f in (power, chin) if f]
    if "/" in loss_key:  # a downstream score: the prediction in its own units too
        _, back, out["fitted_as"] = fitted_as(loss_key)
        for t in out["target"]:
            ends = sorted((back(t["loss_lo"]), back(t["loss_hi"])))
            t.update(metric=loss_key, value=back(t["loss"]), value_lo=ends[0], value_hi=ends[1])
    smap = None
    if metric is not None:
        mres = load_results(source, loss_key=metric)
        rows = [r for r in mres.rows if not is_lr_group(r["group"])
                and isinstance(r.get(loss_key), int | float)]
        smap = fit_score_map([r[loss_key] for r in rows], [r[metric] for r in rows],
                             metric=metric, against=loss_key, names=[r["name"] for r in rows],
                             bootstrap=bootstrap, seed=seed)
        _, back, out["score_fitted_as"] = fitted_as(metric)
        out["score_map"] = smap.to_dict()
        for t in out["target"]:
            y, lo, hi = smap.at(t["loss"], t["loss_lo"], t["loss_hi"])
            ends = sorted((back(lo), back(hi)))
            t.update(metric=metric, metric_fitted=y, value=back(y), value_lo=ends[0],
                     value_hi=ends[1])
    files = []

    def plot(name: str, draw: Callable[[str], None]) -> None:
        _atomic_write(out_dir / name, draw)
        files.append(name)

    if power is not None:
        tgt = next((t for t in out["target"] if t["form"] == "power"), None)
        plot("power_fit.png", lambda p: plots.plot_power_fit(power, p, target=tgt))
    if minima:
        plot("isoflop.png", lambda p: plots.plot_isoflop(minima, res.rows, p, loss_key=loss_key))
    if sweeps:
        plot("mup_lr.png", lambda p: plots.plot_lr_sweeps(sweeps, res.rows, p, loss_key=loss_key))
    if smap is not None:
        plot("score_map.png", lambda p: plots.plot_score_map(
            smap, p, fitted_as=out["score_fitted_as"], targets=out["target"]))
    for stale in {"power_fit.png", "isoflop.png", "mup_lr.png", "score_map.png"} - set(files):
        (out_dir / stale).unlink(missing_ok=True)  # from an earlier fit of other rows
    files.append("fit.json")
    out.update(files=files, out_dir=str(out_dir), warnings=fit_warnings(power, chin))
    out["summary"] = _summary(out, res, power, chin, minima, sweeps)
    text = json.dumps(jsonable(out), indent=1, allow_nan=False)
    _atomic_write(out_dir / "fit.json", lambda p: Path(p).write_text(text + "\n"))
    if echo:
        print(out["summary"])
    return out
