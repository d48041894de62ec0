"""Figures of a sweep's fits: the loss-compute law, iso-FLOP parabolas, LR sweeps per width.

The figures Cerebras-GPT (arXiv 2304.03208, Figs. 1 and 3: loss against compute with the
fitted law; muP against SP learning-rate sweeps) and Hoffmann et al. (arXiv 2203.15556,
Fig. 3: iso-FLOP profiles) argue with, drawn from ``scaling.fit``'s results. Each function
writes one PNG to the path it is given (``run_fit`` passes a temporary file and renames it).
Figures are made with ``matplotlib.figure.Figure`` and saved by the Agg canvas: no pyplot,
no global backend switched, no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from lmfab.scaling.fit import IsoflopMinimum, LRSweep, PowerFit


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)


def plot_power_fit(fit: PowerFit, path: str, *, target: dict | None = None) -> None:
    """Loss against FLOPs: the runs, the fitted law and its bootstrap band, the target run
    if any; below, the relative residuals in percent."""
    C, L = np.asarray(fit.C), np.asarray(fit.L)
    hi_c = max(C.max(), target["flops"] if target else 0) * 3
    grid = np.logspace(np.log10(C.min() / 3), np.log10(hi_c), 200)
    mean, lo, hi = fit.predict(grid)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax, res = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.fill_between(grid, lo, hi, color="C0", alpha=0.2,
                    label=f"{fit.level:.0%} bootstrap band ({fit.n_boot_ok} refits)")
    ax.plot(grid, mean, color="C0", label=fit.formula())
    ax.scatter(C, L, color="k", zorder=3, s=18, label=f"runs ({len(C)})")
    if target:
        err = [[target["loss"] - target["loss_lo"]], [target["loss_hi"] - target["loss"]]]
        ax.errorbar([target["flops"]], [target["loss"]], yerr=err, fmt="*", color="C3",
                    ms=12, capsize=4, label=f"target {target['loss']:.3f}")
        if target.get("realized") is not None:  # the target's measured loss, once trained
            ax.plot([target["flops"]], [target["realized"]], "D", color="C2", ms=8,
                    label=f"target trained {target['realized']:.3f}")
    ax.set_xscale("log")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(f"L(C) = (C/C0)^-b + c    R² = {fit.r2:.4f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    res.axhline(0, color="0.5", lw=0.8)
    res.scatter(C, 100 * np.asarray(fit.rel_residuals), color="k", s=14)
    res.set_xscale("log")
    res.set_xlabel("training FLOPs")
    res.set_ylabel("residual (%)")
    res.grid(alpha=0.3)
    _save(fig, path)


def plot_isoflop(minima: Sequence[IsoflopMinimum], rows: Sequence[dict], path: str, *,
                 loss_key: str = "eval_loss", n_key: str = "n_params") -> None:
    """Loss against parameters per iso-FLOP group, each group's parabola and its minimum."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for i, m in enumerate(minima):
        rs = [r for r in rows if r["group"] == m.group]
        n = np.array([r[n_key] for r in rs], dtype=float)
        color = f"C{i % 10}"
        ax.scatter(n, [r[loss_key] for r in rs], color=color, s=16,
                   label=f"{m.group} ({m.flops:.2g} FLOPs)")
        if len(m.coeffs) == 3:
            x = np.linspace(np.log(n.min()), np.log(n.max()), 100)
            ax.plot(np.exp(x), np.polyval(m.coeffs, x), color=color, lw=1)
        ax.plot([m.n_opt], [m.loss_min], marker="v" if m.interior else "x", color=color, ms=9)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("iso-FLOP profiles (markers: parabola minima)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def plot_lr_sweeps(sweeps: Sequence[LRSweep], rows: Sequence[dict], path: str, *,
                   loss_key: str = "eval_loss") -> None:
    """Loss against learning rate, one line per width, one panel per parametrization."""
    pars = sorted({s.parametrization for s in sweeps})
    fig = Figure(figsize=(5.5 * len(pars), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(pars), sharey=True))
    for ax, par in zip(axes, pars, strict=True):
        mine = [s for s in sweeps if s.parametrization == par]
        for s in mine:
            for i, o in enumerate(s.widths):
                rs = sorted((r for r in rows if r["group"] == s.group
                             and r.get("parametrization") == par
                             and r.get("d_model") == o.d_model),
                            key=lambda r: r["learning_rate"])
                label = f"d_model {o.d_model}" + (f" ({s.group})" if len(mine) > 1 else "")
                color = f"C{i % 10}"
                ax.plot([r["learning_rate"] for r in rs], [r[loss_key] for r in rs],
                        marker="o", ms=4, color=color, label=label)
                lr = o.lr_fit or o.best_lr
                ax.axvline(lr, color=color, ls=":", lw=1)
        shifted = any(s.shifted for s in mine)
        ax.set_title(f"{par}: optimum {'shifts' if shifted else 'stable'} across widths")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("eval loss (nats/token)")
    _save(fig, path)


def plot_score_map(smap, path: str, *, fitted_as: str, targets: Sequence[dict] = ()) -> None:
    """A downstream score against the loss over the runs, its line, and each target's
    predicted loss (with interval) carried to the score."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.scatter(smap.loss, smap.y, color="C0", label="runs", zorder=3)
    xs = [*smap.loss, *[t["loss"] for t in targets]]
    grid = np.linspace(min(xs), max(xs), 50)
    ax.plot(grid, smap.intercept + smap.slope * grid, color="C0", lw=1,
            label=f"line (R² {smap.r2:.3f})")
    for i, t in enumerate(targets):
        ax.errorbar([t["loss"]], [t["metric_fitted"]],
                    xerr=[[t["loss"] - t["loss_lo"]], [t["loss_hi"] - t["loss"]]],
                    fmt="*", ms=12, color=f"C{i + 1}", label=f"target ({t['form']} loss law)")
    ax.set_xlabel(smap.against)
    ax.set_ylabel(fitted_as)
    ax.set_title(f"{smap.metric} against {smap.against}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
