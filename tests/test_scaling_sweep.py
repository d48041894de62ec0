"""Plans and sweeps: the Cerebras-GPT table reproduced, plans that `lmfab run` takes, and a
tiny CPU sweep that is killed, resumes without redoing finished points, and collects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmfab.scaling.plan import PlanError, plan
from lmfab.scaling.sweep import SweepError, expand, run_sweep

REPO = Path(__file__).resolve().parents[1]

# Cerebras-GPT Table 1 (arXiv 2304.03208): size -> (n_layer, d_model, n_head, d_ff, batch).
CEREBRAS = {111e6: (10, 768, 12, 3072, 120), 256e6: (14, 1088, 17, 4352, 264),
            590e6: (18, 1536, 12, 6144, 264), 1.3e9: (24, 2048, 16, 8192, 528),
            2.7e9: (32, 2560, 32, 10240, 528), 6.7e9: (32, 4096, 32, 16384, 1040),
            13e9: (40, 5120, 40, 20480, 1080)}


@pytest.mark.parametrize("size", sorted(CEREBRAS))
def test_plan_reproduces_the_cerebras_gpt_family(size):
    p = plan(family="cerebras-gpt", params=size)
    m = p.model
    assert (m["n_layer"], m["d_model"], m["n_head"], m["d_ff"], p.batch_size) == CEREBRAS[size]
    assert p.tokens_per_param == pytest.approx(20, rel=0.01)
    assert abs(p.n_params / size - 1) < 0.06  # the published names round the counts


def test_plan_from_flops_spends_the_budget_at_20_tokens_per_param():
    p = plan(family="cerebras-gpt", flops=1e20)
    assert p.flops == pytest.approx(1e20, rel=0.02)
    assert 15 < p.tokens_per_param < 25
    assert p.flops == pytest.approx(p.flops_per_token * p.tokens)
    # Between the 590M and 1.3B anchors: the shape lies between theirs.
    assert 590e6 < p.n_params < 1.3e9 and 18 <= p.model["n_layer"] <= 24


def test_plan_from_tokens_and_tokens_per_param():
    p = plan(family="cerebras-gpt", tokens=2.6e10, tokens_per_param=10)
    assert p.n_params == pytest.approx(2.6e9, rel=0.1)
    assert p.tokens == pytest.approx(2.6e10, rel=0.01)


def test_plan_refuses_bad_budgets():
    with pytest.raises(PlanError, match="exactly one"):
        plan(family="cerebras-gpt", flops=1e18, params=1e8)
    with pytest.raises(PlanError, match="smallest shape"):
        plan(family="cerebras-gpt", flops=1e9)
    with pytest.raises(PlanError, match="positive"):
        plan(family="cerebras-gpt", params=-5)
    with pytest.raises(PlanError, match="unknown family 'cerebras'.*cerebras-gpt"):
        plan(family="cerebras", params=1e8)


def test_lmfab_plan_writes_a_params_file_that_lmfab_run_takes(tmp_path, tiny_data):
    f = tmp_path / "plan.yaml"
    lmfab = [sys.executable, "-m", "lmfab"]
    proc = subprocess.run([*lmfab, "plan", "--params", "3e6", "--family", "subscale",
                           "--data-dir", str(tiny_data), "-o", str(f)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    p = plan(family="subscale", params=3e6)
    assert f"{p.n_params:,}" in proc.stdout and "tokens/parameter" in proc.stdout
    raw = yaml.safe_load(f.read_text())
    assert list(raw) == ["model", "optimizer", "train_input", "runconfig"]
    assert raw["runconfig"]["max_steps"] == p.steps
    # the dry run opens the data: the tiny shards are packed at seq_len 32
    proc = subprocess.run([*lmfab, "run", "--params", str(f), "--dry-run",
                           "--set", "train_input.seq_len=32"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{p.n_params:,}" in proc.stdout  # lmfab run counts what the plan counted
    assert f"{p.batch_size * 32:,} tokens/step" in proc.stdout


def test_lmfab_plan_bad_budget_is_one_message_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "lmfab", "plan", "--flops", "1e9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "smallest shape" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_predicts_loss_from_a_fit(tmp_path):
    from lmfab.scaling.fit import fit_power_law
    from lmfab.scaling.plan import predicted_loss

    C = [1e17 * 2**i for i in range(8)]
    noise = [1.002, 0.998, 1.001, 0.999, 1.003, 0.997, 1.0, 1.001]
    law = fit_power_law(C, [((c / 5.984e22) ** -0.0737 + 0.5066) * e for c, e in zip(C, noise, strict=True)],
                        bootstrap=50)
    (tmp_path / "fit.json").write_text(json.dumps({"power": law.to_dict()}))
    got = predicted_loss(tmp_path, 1e20)
    assert got["loss"] == pytest.approx((1e20 / 5.984e22) ** -0.0737 + 0.5066, rel=0.01)
    assert got["lo"] < got["loss"] < got["hi"]


# -- a tiny sweep on the CPU ---------------------------------------------------------------


def _tiny_sweep(tmp_path: Path, data: Path, sizes=(1.5e4, 3e4, 6e4, 1.2e5)) -> Path:
    fam = {"name": "tiny", "tokens_per_param": 0.5, "seq_len": 32, "vocab_size": 512,
           "warmup_tokens": 2000, "min_layers": 1,
           "model": {"pos": "learned", "mlp": "gelu", "norm": "layernorm"},
           "anchors": [{"params": 2e4, "n_layer": 1, "d_model": 32, "d_head": 16,
                        "batch_size": 8, "learning_rate": 3e-3},
                       {"params": 2e5, "n_layer": 3, "d_model": 64, "d_head": 16,
                        "batch_size": 8, "learning_rate": 3e-3}]}
    (tmp_path / "tiny-family.yaml").write_text(yaml.safe_dump(fam))
    base = {"model": {"preset": "tiny-learned"}, "optimizer": {},
            "train_input": {"data_dir": str(data), "batch_size": 8, "seq_len": 32},
            "eval_input": {"batch_size": 8, "max_batches": 2},
            "runconfig": {"log_steps": 20, "checkpoint_steps": 20, "tensorboard": False}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": "base.yaml", "out": str(tmp_path / "out"),
             "groups": [{"name": "fam", "family": str(tmp_path / "tiny-family.yaml"),
                         "params": list(sizes)}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_expands_grids_with_joint_axes_and_parametrizations():
    spec, points = expand(REPO / "configs/sweeps/subscale-mup-lr.yaml")
    assert len(points) == 3 * 2 * 7
    by = {(p.params["model"]["d_model"], "mup" if p.params["model"]["mup_base_d_model"]
           else "sp") for p in points}
    assert by == {(w, k) for w in (64, 192, 512) for k in ("mup", "sp")}
    p = next(p for p in points if p.name == "lr-d_model512-sp-peak_lr0.0156")
    assert p.params["model"]["n_head"] == 16 and p.params["model"]["init_std"] == 0.02
    assert p.params["optimizer"]["learning_rate"][0]["end"] == pytest.approx(1.56e-2)
    q = next(p for p in points if p.name == "lr-d_model192-mup-peak_lr0.0156")
    assert q.params["model"]["attn_score_scale"] == "inv_d_head"
    assert q.params["model"]["init_std"] == 0.08 and q.params["model"]["embedding_mult"] == 10


def test_sweep_file_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"base": str(REPO / "configs/train/tiny.yaml"),
                                 "groups": [{"name": "g", "axes": {"model.mlp": ["nope"]}}]}))
    with pytest.raises(ValueError, match=r"groups\[0\].*model.mlp"):
        expand(f)
    f.write_text(yaml.safe_dump({"base": "x.yaml", "groupz": []}))
    with pytest.raises(SweepError, match="unknown key.*groupz"):
        expand(f)
    f.write_text(yaml.safe_dump({"base": str(REPO / "configs/train/tiny.yaml"),
                                 "groups": [{"name": "g", "axes": {"peak_lr": [1e-3]}}]}))
    with pytest.raises(SweepError, match="--only.*nothere"):
        expand(f, only=["nothere"])


@pytest.mark.slow
def test_sweep_is_killed_resumes_and_collects(tmp_path, tiny_data):
    path = _tiny_sweep(tmp_path, tiny_data)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "import sys; from lmfab.scaling.sweep import run_sweep; "
           f"run_sweep({str(path)!r})"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    first_done = None
    deadline = time.time() + 240
    for line in proc.stdout:  # kill the whole sweep (and its run) once one point finished
        if ": ok in" in line:
            first_done = line.split("] ")[1].split(":")[0]
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "no point finished"
    proc.wait()
    assert first_done is not None
    log_before = (out / "points" / first_done / "run.log").read_text()

    rows = run_sweep(path)
    assert [r["status"] for r in rows] == ["done"] * 4, rows
    # The finished point was not run again; every point reports its accounting.
    assert (out / "points" / first_done / "run.log").read_text() == log_before
    flops = [r["flops"] for r in rows]
    assert flops == sorted(flops) and flops[-1] > 4 * flops[0]
    from lmfab.config import load_config
    from lmfab.train.plan import plan_run

    for r in rows:  # the run plan's own accounting of the params file each point ran
        cfg = load_config(out / "points" / r["name"] / "params.yaml")
        rp = plan_run(cfg, device_type="cpu")
        assert r["tokens"] == rp.tokens_per_step * cfg.runconfig.max_steps
        assert r["flops"] == pytest.approx(rp.flops_per_token * r["tokens"])
        assert 0 < r["eval_loss"] < 7 and r["bpb"] > 0 and r["epochs"] > 0
    table = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [t["name"] for t in table] == [r["name"] for r in rows]
    assert (out / "results.csv").read_text().count("\n") == 5

    # A re-run does nothing and reports the same table.
    again = run_sweep(path)
    assert [r["eval_loss"] for r in again] == [r["eval_loss"] for r in rows]

    # ... and the fit reads it: larger runs, lower loss, a falling law.
    from lmfab.scaling.fit import run_fit

    fit = run_fit(out, out_dir=tmp_path / "fit", bootstrap=50, echo=False)
    assert fit["power"]["b"] > 0 and (tmp_path / "fit" / "power_fit.png").stat().st_size > 1000

    # `lmfab eval --tasks` on a point's final checkpoint, after the sweep: --collect puts its
    # scores in that point's row (the sweep was trained without eval_input.tasks).
    from lmfab.cli import main

    name = rows[-1]["name"]
    assert main(["eval", "--model-dir", str(out / "runs" / name), "--tasks", "lmfab_choice",
                 "--limit", "4", "--bootstrap-iters", "0"]) == 0
    got = {r["name"]: r.get("downstream") for r in run_sweep(path, collect_only=True)}
    assert set(got[name]) == {"lmfab_choice/acc", "lmfab_choice/acc_norm"}
    assert 0 <= got[name]["lmfab_choice/acc"] <= 1
    assert all(v is None for k, v in got.items() if k != name)


@pytest.mark.slow
def test_sweep_records_failed_points_and_goes_on(tmp_path, tiny_data):
    path = _tiny_sweep(tmp_path, tiny_data, sizes=(1.5e4,))
    spec = yaml.safe_load(path.read_text())
    spec["groups"].append({"name": "broken", "family": spec["groups"][0]["family"],
                           "params": [1.5e4], "set": {"train_input.data_dir": "/nonexistent"}})
    path.write_text(yaml.safe_dump(spec))
    rows = run_sweep(path)
    status = {r["name"]: r["status"] for r in rows}
    assert status["broken-params1.5e04"] == "unfinished"
    assert [s for n, s in status.items() if n.startswith("fam")] == ["done"]
    broken = next(r for r in rows if r["group"] == "broken")
    assert "nonexistent" in broken["reason"]


def test_isoflop_group_spends_one_budget_at_every_size(tmp_path):
    from lmfab.scaling.sweep import collect_point

    f = tmp_path / "iso.yaml"
    f.write_text(yaml.safe_dump({
        "base": str(REPO / "configs/train/subscale.yaml"),
        "groups": [{"name": "isoflop-1e15", "family": "subscale", "flops": 1e15,
                    "params": [0.8e6, 1.75e6, 3.45e6]}]}))
    spec, points = expand(f)
    rows = [collect_point(p, tmp_path / "none") for p in points]
    assert [r["status"] for r in rows] == ["missing"] * 3
    sizes = [r["n_params"] for r in rows]
    assert sizes == sorted(sizes) and sizes[-1] > 4 * sizes[0]
    for r in rows:  # the whole budget, to within one step of tokens
        assert r["flops"] == pytest.approx(1e15, rel=0.01)
    tpp = [r["tokens"] / r["n_params"] for r in rows]
    assert tpp[0] > 10 * tpp[-1]  # small models see many more tokens per parameter


def test_lmfab_plan_with_a_proxy_carries_its_mup_hyperparameters(tmp_path, tiny_data):
    f = tmp_path / "plan.yaml"
    proc = subprocess.run([sys.executable, "-m", "lmfab", "plan", "--params", "111e6",
                           "--proxy", str(REPO / "configs/train/subscale.yaml"),
                           "--data-dir", str(tiny_data), "-o", str(f)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "muTransfer: model.mup_base_d_model: None -> 64" in proc.stdout
    m = yaml.safe_load(f.read_text())["model"]
    assert (m["n_layer"], m["d_model"]) == (10, 768)  # the planned shape stays
    assert m["init_std"] == 0.08 and m["attn_score_scale"] == "inv_d_head"
