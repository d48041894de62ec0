"""scaling.fit: the fits recover planted laws; bad rows are reported; run_fit writes its files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmfab.scaling.fit import (
    _parabola_min,
    fit_chinchilla,
    fit_power_law,
    fit_score_map,
    fit_warnings,
    isoflop_exponents,
    isoflop_minima,
    load_results,
    lr_optima,
    predict_target,
    run_fit,
)

REPO = Path(__file__).resolve().parents[1]
# Cerebras-GPT's published law (arXiv 2304.03208): L = (C / 5.984e22)^-0.0737 + 0.5066
C0, B_EXP, C_IRR = 5.984e22, 0.0737, 0.5066
# Hoffmann et al. 2022's fit (arXiv 2203.15556, approach 3)
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def cerebras(C):
    return (np.asarray(C, dtype=float) / C0) ** -B_EXP + C_IRR


def chinchilla(N, D):
    return E + A / np.asarray(N, dtype=float) ** ALPHA + B / np.asarray(D, dtype=float) ** BETA


def noisy_cerebras(seed=0, n=8, noise=0.003):
    C = np.logspace(17, 21, n)
    rng = np.random.default_rng(seed)
    return C, cerebras(C) * (1 + noise * rng.standard_normal(n))


def row(name, group, n_params, tokens, loss, status="done", **extra):
    r = {"name": name, "status": status, "reason": "", "group": group, "n_params": int(n_params),
         "n_params_nonembed": int(n_params * 0.9), "tokens": int(tokens),
         "flops": 6.0 * n_params * tokens, "eval_loss": loss, "eval_loss_smoothed": loss,
         "bpb": None, "wall_s": 1.0, "d_model": 256, "n_layer": 4, "learning_rate": 6e-3,
         "parametrization": "mup", "vocab_size": 8192, "tags": {"vocab": "8k"}}
    r.update(extra)
    return r


def write_rows(path: Path, rows: list, extra_lines: tuple = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


# --------------------------------------------------------------------------------- power law


def test_power_law_recovers_cerebras_law():
    C, L = noisy_cerebras()
    fit = fit_power_law(C, L, bootstrap=200, seed=0)
    # 8 points with 0.3% noise pin b to ~10%; c trades off against b (the fit cannot tell a
    # slightly flatter law with a higher floor apart) and is known to ~0.1 nats.
    assert fit.b == pytest.approx(B_EXP, abs=0.006)
    assert fit.c == pytest.approx(C_IRR, abs=0.1)
    assert fit.a == pytest.approx(fit.C0 ** fit.b, rel=1e-9)
    for key, truth in (("b", B_EXP), ("c", C_IRR), ("a", C0 ** B_EXP)):
        lo, hi = fit.ci[key]
        assert lo < truth < hi, (key, lo, truth, hi)
    assert fit.r2 > 0.999
    assert np.max(np.abs(fit.rel_residuals)) < 0.01
    assert fit.n_boot_ok > 150
    d = json.loads(json.dumps(fit.to_dict(), allow_nan=False))
    assert d["formula"].startswith("L = (C/") and len(d["residuals"]) == 8


def test_power_law_exact_points_give_exact_constants():
    C = np.logspace(12, 24, 6)  # the whole range of scales, no noise
    fit = fit_power_law(C, cerebras(C), bootstrap=0)
    assert fit.b == pytest.approx(B_EXP, rel=1e-5)
    assert fit.c == pytest.approx(C_IRR, rel=1e-5)
    assert fit.C0 == pytest.approx(C0, rel=1e-3)


def test_power_law_predicts_10x_beyond_the_range():
    C, L = noisy_cerebras()
    fit = fit_power_law(C, L, bootstrap=200, seed=0)
    mean, lo, hi = fit.predict(1e22)
    truth = float(cerebras(1e22))
    assert mean == pytest.approx(truth, rel=0.01)
    assert lo < truth < hi
    assert hi - lo < 0.1 * truth
    means, los, his = fit.predict([1e18, 1e22])
    assert means.shape == (2,) and np.all(los < means) and np.all(means < his)


def test_power_law_refuses_too_few_points():
    with pytest.raises(ValueError, match=r"at least 4 finished runs, got 2: run-a, run-b"):
        fit_power_law([1e18, 1e19], [3.0, 2.5], names=["run-a", "run-b"])
    with pytest.raises(ValueError, match="3 or more distinct compute budgets"):
        fit_power_law([1e18, 1e18, 1e19, 1e19], [3.0, 3.0, 2.5, 2.5])


# ----------------------------------------------------------------------------------- loader


def test_loader_reports_and_excludes_bad_rows(tmp_path):
    good = [row(f"fam-{i}", "family", 1e6 * 2**i, 2e7 * 2**i, 3.0 - 0.1 * i) for i in range(4)]
    good.append(row("no-smoothed", "family", 1e7, 2e8, 2.5, eval_loss_smoothed=float("nan"),
                    reason=None, tags=None))
    missing = row("no-tokens", "family", 1e6, 2e7, 3.0)
    del missing["tokens"]
    bad = [row("oom", "family", 1e8, 2e9, 2.0, status="failed", reason="CUDA out of memory"),
           row("blew-up", "family", 1e8, 2e9, 2.0, status="diverged", reason="loss NaN at 300"),
           row("nan-loss", "family", 1e8, 2e9, float("nan")),
           row("inf-flops", "family", 1e8, 2e9, 2.0, flops=float("inf")),
           row("str-width", "family", 1e8, 2e9, 2.0, d_model="wide"),
           missing]
    path = write_rows(tmp_path / "sweep" / "results.jsonl", good + bad, ("{not json\n",))
    for source in (path.parent, path):
        res = load_results(source)
        assert [r["name"] for r in res.rows] == [r["name"] for r in good]
        why = {r.name: r.reason for r in res.rejected}
        assert set(why) == {"oom", "blew-up", "nan-loss", "inf-flops", "str-width", "no-tokens",
                            "line 12"}
        assert why["oom"] == "failed: CUDA out of memory"
        assert why["blew-up"].startswith("diverged")
        assert "eval_loss is not finite" in why["nan-loss"]
        assert "flops is not finite" in why["inf-flops"]
        assert why["no-tokens"] == "missing field tokens"
        assert "not valid JSON" in why["line 12"]
        assert "d_model is not a number" in why["str-width"]
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        load_results(tmp_path / "nowhere")


def test_loader_keeps_the_last_row_of_a_name(tmp_path):
    first = row("r", "family", 1e6, 2e7, 3.0, status="unfinished", reason="preempted")
    path = write_rows(tmp_path / "results.jsonl", [first, row("r", "family", 1e6, 2e7, 2.9)])
    res = load_results(path)
    assert [r["eval_loss"] for r in res.rows] == [2.9] and res.rejected == []


# ------------------------------------------------------------------------------- Chinchilla


def chinchilla_grid(noise=0.001, seed=0):
    N, D = np.meshgrid(np.logspace(7, 10, 6), np.logspace(8, 11, 6))
    N, D = N.ravel(), D.ravel()
    rng = np.random.default_rng(seed)
    return N, D, chinchilla(N, D) * (1 + noise * rng.standard_normal(N.size))


def test_chinchilla_recovers_hoffmann_constants():
    fit = fit_chinchilla(*chinchilla_grid(), bootstrap=200, seed=0)
    assert fit.E == pytest.approx(E, abs=0.02)
    assert fit.alpha == pytest.approx(ALPHA, abs=0.01)
    assert fit.beta == pytest.approx(BETA, abs=0.01)
    assert fit.A == pytest.approx(A, rel=0.1)
    assert fit.B == pytest.approx(B, rel=0.1)
    assert fit.a == pytest.approx(BETA / (ALPHA + BETA), abs=0.01)
    assert fit.a + fit.b == pytest.approx(1.0)
    assert fit.n_boot_ok > 150
    for key in ("E", "alpha", "beta", "a"):
        lo, hi = fit.ci[key]
        assert lo < getattr(fit, key) < hi and hi - lo < 0.05
    mean, lo, hi = fit.predict(1e11, 2e12)
    assert mean == pytest.approx(float(chinchilla(1e11, 2e12)), rel=0.01) and lo <= mean <= hi
    json.dumps(fit.to_dict(), allow_nan=False)


def test_fits_say_when_their_own_constants_are_not_pinned():
    # laws the points determine: no warnings
    C, L = noisy_cerebras()
    assert fit_warnings(fit_power_law(C, L, bootstrap=20),
                        fit_chinchilla(*chinchilla_grid(), bootstrap=20)) == []
    # a pure power law (no floor) fitted to its own points: c at its bound
    C = np.logspace(13, 15, 6)
    (w,) = fit_warnings(fit_power_law(C, (C / 1e19) ** -0.13, bootstrap=20), None)
    assert w.startswith("power law: the floor c sits at its bound 0")
    # a parameter term with exponent 1.5: real, but outside what the check lets pass
    N, D, _ = chinchilla_grid()
    N, D = np.asarray(N), np.asarray(D)
    steep = fit_chinchilla(N, D, 1.7 + 4e9 / N**1.5 + 410.7 / D**0.28, bootstrap=20)
    assert steep.alpha > 1.0
    assert any(w.startswith("chinchilla: alpha 1.5") for w in fit_warnings(None, steep))


def test_chinchilla_optimal_allocation():
    fit = fit_chinchilla(*chinchilla_grid(noise=0.0), bootstrap=0)
    Cs = np.logspace(20, 24, 5)
    opt = np.array([fit.optimal(c) for c in Cs])
    assert np.allclose(6 * opt[:, 0] * opt[:, 1], Cs, rtol=1e-9)
    slope = np.polyfit(np.log(Cs), np.log(opt[:, 0]), 1)[0]
    assert slope == pytest.approx(BETA / (ALPHA + BETA), abs=1e-3)
    n_num, d_num = fit.optimal(1e22, lambda n: 6 * n)  # the numeric path agrees
    n_cf, d_cf = fit.optimal(1e22)
    assert n_num == pytest.approx(n_cf, rel=1e-3) and d_num == pytest.approx(d_cf, rel=1e-3)
    # the closed form's N minimises the loss along C = 6ND
    ns = n_cf * np.array([0.8, 1.0, 1.25])
    losses = fit.predict(ns, 1e22 / (6 * ns))[0]
    assert np.argmin(losses) == 1


def test_chinchilla_says_what_it_needs():
    with pytest.raises(ValueError, match="at least 5 finished runs, got 3"):
        fit_chinchilla([1e7, 1e8, 1e9], [2e8, 2e9, 2e10], [3.0, 2.8, 2.6])
    N = np.logspace(7, 10, 8)  # a family at 20 tokens per parameter: alpha and beta mix
    with pytest.raises(ValueError, match="2 or more tokens-per-parameter ratios"):
        fit_chinchilla(N, 20 * N, chinchilla(N, 20 * N))


# ------------------------------------------------------------------- iso-FLOP and LR optima


def test_isoflop_minima_at_the_planted_optimum():
    rows = []
    planted = {1e15: 3e6, 1e16: 1e7, 1e17: 3.5e7}
    for C, n_star in planted.items():
        for n in n_star * 2.0 ** np.arange(-3, 3.5, 1):  # minimum not on the grid centre
            loss = 3.0 - 0.1 * math.log10(C) + 0.05 * (math.log(n) - math.log(n_star)) ** 2
            rows.append(row(f"iso-{C:.0e}-{n:.3g}", f"isoflop-{C:.0e}", n, C / (6 * n), loss))
    rows.append(row("fam", "family", 1e6, 2e7, 3.5))  # not an iso-FLOP group
    ms = isoflop_minima(rows)
    assert [m.group for m in ms] == ["isoflop-1e+15", "isoflop-1e+16", "isoflop-1e+17"]
    for m, (C, n_star) in zip(ms, planted.items(), strict=True):
        assert m.interior and m.n_points == 7
        assert m.n_opt == pytest.approx(n_star, rel=1e-6)
        assert m.tokens_opt == pytest.approx(C / (6 * n_star), rel=1e-6)
        assert m.loss_min == pytest.approx(3.0 - 0.1 * math.log10(C), abs=1e-9)
        assert m.flops == pytest.approx(C)
    # a budget whose parabola bottoms out below the smallest run: flagged, not extrapolated
    edge = [row(f"e{i}", "isoflop-edge", 1e6 * 2**i, 1e9 / 2**i,
                3.0 + 0.05 * math.log(1e6 * 2**i / 1e5) ** 2) for i in range(4)]
    (m,) = isoflop_minima(edge)
    assert not m.interior and m.best_name == "e0" and m.n_opt == pytest.approx(1e6)
    assert m.edge == "small"


def test_isoflop_minimum_not_bracketed_although_the_parabola_bottoms_out_inside():
    # a profile measured on the H200 (3e14 FLOPs, docs/scaling.md): the loss rises from the
    # smallest size on, yet a parabola through all six runs has its vertex just above it
    n = [5.6e5, 1.07e6, 1.7e6, 2.5e6, 3.4e6, 4.5e6]
    loss = [3.3008, 3.3959, 3.5830, 3.8138, 4.1592, 4.4540]
    rows = [row(f"p{i}", "isoflop-3e14", x, 3e14 / (6 * x), y)
            for i, (x, y) in enumerate(zip(n, loss, strict=True))]
    vertex = _parabola_min(np.log(n), np.array(loss))[0]
    assert math.log(n[0]) < vertex < math.log(n[-1])  # the trap
    (m,) = isoflop_minima(rows)
    assert not m.interior and m.edge == "small" and m.best_name == "p0"
    assert m.n_opt == pytest.approx(n[0]) and m.loss_min == pytest.approx(loss[0])
    assert isoflop_exponents([m]) is None
    # the mirror image: best at the largest size
    rows = [row(f"q{i}", "isoflop-3e14", x, 3e14 / (6 * x), y)
            for i, (x, y) in enumerate(zip(n, loss[::-1], strict=True))]
    (m,) = isoflop_minima(rows)
    assert not m.interior and m.edge == "large" and m.best_name == "q5"


def lr_rows(par, lr_star_of_width, widths=(256, 512, 1024)):
    rows = []
    for d in widths:
        for k in range(-10, -3):  # 2^-10 .. 2^-4, one 2x step apart
            lr = 2.0**k
            loss = 3.0 - 0.1 * math.log2(d) + 0.02 * (k - math.log2(lr_star_of_width(d))) ** 2
            rows.append(row(f"{par}-d{d}-lr{k}", f"{par}-lr", 1e6, 2e7, loss, d_model=d,
                            learning_rate=lr, parametrization=par))
    return rows


def test_lr_optima_finds_the_planted_optimum_and_flags_a_shift():
    mup_star = 2.0**-7.4  # muP: one optimum for every width
    sp_star = {256: 2.0**-5.3, 512: 2.0**-6.3, 1024: 2.0**-7.3}  # SP: halves as width doubles
    rows = lr_rows("mup", lambda d: mup_star) + lr_rows("sp", sp_star.get)
    rows.append(row("fam", "family", 1e6, 2e7, 3.5))  # not an LR sweep
    sweeps = {s.parametrization: s for s in lr_optima(rows)}
    assert set(sweeps) == {"mup", "sp"}
    mup, sp = sweeps["mup"], sweeps["sp"]
    assert [o.d_model for o in mup.widths] == [256, 512, 1024]
    for o in mup.widths:
        assert o.best_lr == 2.0**-7 and not o.at_edge and o.n_points == 7
        assert o.lr_fit == pytest.approx(mup_star, rel=1e-6)
    for o in sp.widths:
        assert o.lr_fit == pytest.approx(sp_star[o.d_model], rel=1e-6)
    assert not mup.shifted and mup.shift_octaves == 0
    assert sp.shifted and sp.shift_octaves == pytest.approx(2.0)
    assert sp.shift_fit_octaves == pytest.approx(2.0, abs=1e-6)
    assert mup.grid_step_octaves == pytest.approx(1.0)
    # a shift of one 2x step is within the grid's resolution: not flagged
    one_step = lr_rows("sp", {256: 2.0**-6, 512: 2.0**-7, 1024: 2.0**-7}.get)
    assert not lr_optima(one_step)[0].shifted


# ----------------------------------------------------------------------------------- run_fit


def synthetic_sweep(path: Path) -> Path:
    rows = []
    for i, n in enumerate(np.logspace(6.5, 9, 8)):  # family at 20 tokens per parameter
        rows.append(row(f"fam-{i}", "family", n, 20 * n, float(chinchilla(n, 20 * n))))
    for C in (1e16, 1e17, 1e18):
        for j, n in enumerate(np.logspace(np.log10(math.sqrt(C / 6)) - 1.6,
                                          np.log10(math.sqrt(C / 6)) + 0.4, 6)):
            d = C / (6 * n)
            rows.append(row(f"iso-{C:.0e}-{j}", f"isoflop-{C:.0e}", n, d, float(chinchilla(n, d))))
    rows += lr_rows("mup", lambda d: 2.0**-7.4) + lr_rows("sp", {256: 2.0**-5, 512: 2.0**-6,
                                                                1024: 2.0**-7}.get)
    rows.append(row("oom-13b", "family", 1.3e10, 2.6e11, 1.9, status="failed", reason="OOM"))
    rows.append(row("nan-run", "family", 1e9, 2e10, float("nan")))
    return write_rows(path / "results.jsonl", rows)


def test_run_fit_writes_fit_json_and_pngs(tmp_path, capsys):
    sweep = synthetic_sweep(tmp_path / "sweep").parent
    out_dir = tmp_path / "fit"
    target = REPO / "configs" / "train" / "cerebras-gpt-1.3b.yaml"
    out = run_fit(sweep, form="both", predict=target, out_dir=out_dir, bootstrap=30)
    assert out["summary"] in capsys.readouterr().out
    for name in ("fit.json", "power_fit.png", "isoflop.png", "mup_lr.png"):
        data = (out_dir / name).read_bytes()
        assert len(data) > 5000, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(out_dir.glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert (out_dir / "fit.json").stat().st_mode & 0o777 == 0o666 & ~umask
    saved = json.loads((out_dir / "fit.json").read_text())
    assert {r["name"] for r in saved["results"]["rejected"]} == {"oom-13b", "nan-run"}
    assert saved["power"]["points"] == "family" and len(saved["power"]["C"]) == 8
    assert saved["chinchilla"]["alpha"] == pytest.approx(ALPHA, abs=0.02)
    assert len(saved["isoflop"]) == 3 and all(m["interior"] for m in saved["isoflop"])
    assert {s["parametrization"]: s["shifted"] for s in saved["lr_sweeps"]} == {
        "mup": False, "sp": True}
    forms = {t["form"]: t for t in saved["target"]}
    assert set(forms) == {"power", "chinchilla"}
    # lmfab's plan: the 1.3B preset trains 1.3e9 parameters on 26e9 tokens (2.4e20 FLOPs)
    t = forms["chinchilla"]
    assert t["n_params"] == pytest.approx(1.316e9, rel=0.01)
    assert t["flops"] == pytest.approx(t["flops_per_token"] * t["tokens"])
    assert t["loss"] == pytest.approx(float(chinchilla(t["n_params"], t["tokens"])), rel=0.01)
    assert t["loss_lo"] <= t["loss"] <= t["loss_hi"]
    assert "excluded 2" in out["summary"] and "oom-13b (failed: OOM)" in out["summary"]
    # a re-fit of the family alone removes the plots that no longer apply
    fam = [json.loads(x) for x in (sweep / "results.jsonl").read_text().splitlines()]
    only = write_rows(tmp_path / "fam" / "results.jsonl", [r for r in fam if r["group"] == "family"])
    run_fit(only, out_dir=out_dir, bootstrap=10, echo=False)
    assert (out_dir / "power_fit.png").exists() and not (out_dir / "isoflop.png").exists()


def test_run_fit_without_a_family_fits_the_isoflop_minima(tmp_path):
    rows = []
    for C in (1e15, 1e16, 1e17, 1e18):
        n_star = math.sqrt(C / 120)  # planted: 20 tokens per parameter, loss on Cerebras' law
        for j in range(-2, 3):
            n = n_star * 2.0**j
            rows.append(row(f"iso-{C:.0e}-{j}", f"isoflop-{C:.0e}", n, C / (6 * n),
                            float(cerebras(C)) + 0.03 * j**2))
    out = run_fit(write_rows(tmp_path / "results.jsonl", rows), out_dir=tmp_path / "fit",
                  bootstrap=20, echo=False)
    assert out["power"]["points"] == "isoflop minima"
    assert out["power"]["names"] == ["isoflop-1e+15", "isoflop-1e+16", "isoflop-1e+17",
                                     "isoflop-1e+18"]
    assert out["power"]["b"] == pytest.approx(B_EXP, rel=1e-3)
    assert out["isoflop_exponents"]["a"] == pytest.approx(0.5, abs=1e-6)


def test_run_fit_refuses_a_form_it_cannot_fit(tmp_path):
    rows = [row(f"fam-{i}", "family", 1e6 * 4**i, 2e7 * 4**i, 3.0 - 0.2 * i) for i in range(5)]
    path = write_rows(tmp_path / "results.jsonl", rows)
    with pytest.raises(ValueError, match="tokens-per-parameter ratios"):
        run_fit(path, form="chinchilla", out_dir=tmp_path / "fit", bootstrap=10, echo=False)
    out = run_fit(path, form="both", out_dir=tmp_path / "fit", bootstrap=10, echo=False)
    assert "skipped" in out["chinchilla"] and "chinchilla: skipped" in out["summary"]


def test_predict_target_with_a_power_law():
    C = np.logspace(17, 20, 6)
    fit = fit_power_law(C, cerebras(C), bootstrap=20)
    t = predict_target(fit, REPO / "configs" / "train" / "cerebras-gpt-1.3b.yaml")
    assert t["form"] == "power" and t["flops"] == pytest.approx(2.36e20, rel=0.01)
    # Cerebras' law at this budget: 2.01 (their 1.3B's Pile loss: 1.997)
    assert t["loss"] == pytest.approx(float(cerebras(t["flops"])), rel=1e-3)
    assert t["extrapolation"] == pytest.approx(2.36, rel=0.01)


def test_fit_and_plots_do_not_import_torch():
    code = ("import sys, lmfab.scaling.fit, lmfab.scaling.plots; "
            "sys.exit('torch' in sys.modules or 'lmfab.train.plan' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_a_downstream_accuracy_is_fitted_as_its_error(tmp_path):
    """``--metric TASK/acc`` fits 1 - acc with the same law; a run without that score is
    left out by name."""
    C, err = noisy_cerebras(seed=3, noise=0.0)
    err = err / 10  # errors in (0, 1)
    rows = [row(f"fam-{i}", "family", math.sqrt(c / 120), 20 * math.sqrt(c / 120), 3.0,
                downstream={"lmfab_choice/acc": 1 - e, "lmfab_choice/acc_norm": 0.5})
            for i, (c, e) in enumerate(zip(C, err, strict=True))]
    rows.append(row("no-scores", "family", 1e9, 2e10, 3.0))
    res = load_results(write_rows(tmp_path / "results.jsonl", rows), loss_key="lmfab_choice/acc")
    assert [r.name for r in res.rejected] == ["no-scores"]
    assert "lmfab_choice/acc" in res.rejected[0].reason
    out = run_fit(tmp_path, out_dir=tmp_path / "fit", loss_key="lmfab_choice/acc", bootstrap=10,
                  echo=False)
    assert out["power"]["b"] == pytest.approx(B_EXP, rel=1e-3)
    assert out["power"]["c"] == pytest.approx(C_IRR / 10, rel=1e-2)
    assert out["fitted_as"] == "1 - acc"


def test_a_perplexity_is_fitted_as_its_log_and_predicted_in_its_units(tmp_path):
    """``--metric TASK/perplexity`` fits log(ppl), a loss in nats; the target's prediction
    comes back as a perplexity, its interval too."""
    C, loss = noisy_cerebras(seed=4, noise=0.0)
    rows = [row(f"fam-{i}", "family", math.sqrt(c / 120), 20 * math.sqrt(c / 120), 3.0,
                downstream={"t/perplexity": math.exp(v)})
            for i, (c, v) in enumerate(zip(C, loss, strict=True))]
    rows.append(row("zero", "family", 1e9, 2e10, 3.0, downstream={"t/perplexity": 0.0}))
    write_rows(tmp_path / "results.jsonl", rows)
    target = REPO / "configs" / "train" / "cerebras-gpt-1.3b.yaml"
    out = run_fit(tmp_path, out_dir=tmp_path / "fit", loss_key="t/perplexity", bootstrap=20,
                  predict=target, echo=False)
    assert [r["name"] for r in out["results"]["rejected"]] == ["zero"]  # log(0): left out
    assert out["power"]["b"] == pytest.approx(B_EXP, rel=1e-3)
    t = out["target"][0]
    assert t["value"] == pytest.approx(math.exp(t["loss"]))
    assert t["value_lo"] <= t["value"] <= t["value_hi"]
    assert "t/perplexity" in out["summary"] and "log perplexity" in out["summary"]


def test_a_score_predicted_in_two_steps_through_the_loss(tmp_path):
    """``--against eval_loss``: the law is fitted on the loss, the score (in its fitted
    units) as a line in the loss; the target's loss from the law is carried to the score."""
    C, loss = noisy_cerebras(seed=5, noise=0.0)
    # log perplexity = 1.5 + 2 x loss, exactly; one run without the score
    rows = [row(f"fam-{i}", "family", math.sqrt(c / 120), 20 * math.sqrt(c / 120), v,
                downstream={"t/perplexity": math.exp(1.5 + 2 * v)})
            for i, (c, v) in enumerate(zip(C, loss, strict=True))]
    rows.append(row("no-score", "family", 1e9, 2e10, float(cerebras(6 * 1e9 * 2e10))))
    write_rows(tmp_path / "results.jsonl", rows)
    target = REPO / "configs" / "train" / "cerebras-gpt-1.3b.yaml"
    out = run_fit(tmp_path, out_dir=tmp_path / "fit", loss_key="t/perplexity",
                  against="eval_loss", bootstrap=50, predict=target, echo=False)
    assert len(out["power"]["C"]) == len(C) + 1  # the loss law has every run with a loss
    m = out["score_map"]
    assert (m["slope"], m["intercept"], m["r2"]) == (pytest.approx(2.0), pytest.approx(1.5),
                                                     pytest.approx(1.0))
    assert len(m["loss"]) == len(C)  # the run without the score is not on the line
    assert out["power"]["b"] == pytest.approx(B_EXP, abs=0.01)  # the law is the loss's
    t = out["target"][0]
    assert t["metric"] == "t/perplexity"
    assert t["value"] == pytest.approx(math.exp(1.5 + 2 * t["loss"]), rel=1e-6)
    # the interval carries the loss's own interval through the line
    assert t["value_lo"] <= math.exp(1.5 + 2 * t["loss_lo"]) * 1.0001
    assert t["value_hi"] >= math.exp(1.5 + 2 * t["loss_hi"]) * 0.9999
    assert "score_map.png" in out["files"] and (tmp_path / "fit" / "score_map.png").is_file()
    assert "t/perplexity as log perplexity (nats) = 1.5 + 2 x eval_loss" in out["summary"]
    with pytest.raises(ValueError, match="maps a downstream score"):
        run_fit(tmp_path, out_dir=tmp_path / "fit2", loss_key="eval_loss", against="eval_loss",
                echo=False)
    with pytest.raises(ValueError, match="3 runs with distinct losses"):
        fit_score_map([3.0, 3.0, 3.0], [1.0, 2.0, 3.0], metric="t/acc", against="eval_loss")
