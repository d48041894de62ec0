"""A NaN loss injected at step 5 (the ``train.step`` fault point poisons the loss before
backward, so the gradients are NaN too) under each ``runconfig.on_nonfinite`` policy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lmfab import checkpoint as ckpt
from lmfab.cli import main
from lmfab.config import load_config
from lmfab.dist.world import World
from lmfab.train.loop import run_mode
from lmfab.train.nonfinite import NonFiniteGuard

from ..conftest import tiny_overrides
from .conftest import TINY


def _records(model_dir):
    return [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]


def _events(model_dir):
    return [r for r in _records(model_dir) if r["split"] == "event"]


def _train(model_dir, data, policy, steps=8, every=3):
    sets = tiny_overrides(data, **{"runconfig.max_steps": steps,
                                   "runconfig.checkpoint_steps": every,
                                   "runconfig.on_nonfinite": policy})
    return run_mode(load_config(TINY, sets), mode="train", model_dir=model_dir)


def _finite(path):
    return all(torch.isfinite(t).all() for t in load_file(str(path / "model.safetensors")).values())


def test_stop_names_the_step_and_keeps_the_checkpoints(tiny_data, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setenv("LMFAB_FAULT", "train.step[step=5]:nan")
    argv = ["run", "--params", str(TINY), "--mode", "train", "--model_dir", str(tmp_path / "r")]
    for s in tiny_overrides(tiny_data, **{"runconfig.max_steps": 8,
                                          "runconfig.checkpoint_steps": 3}):
        argv += ["--set", s]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "non-finite loss at step 5" in err and "on_nonfinite" in err
    assert "Traceback" not in err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")] == ["step_00000003"]
    assert _finite(ckpt.latest_checkpoint(tmp_path / "r"))
    (event,) = _events(tmp_path / "r")
    assert event["step"] == 5 and event["action"] == "stop" and event["loss"] == "nan"


def test_skip_drops_the_update_and_goes_on(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFAB_FAULT", "train.step[step=5]:nan")
    _train(tmp_path / "r", tiny_data, "skip")
    (event,) = _events(tmp_path / "r")
    assert event["step"] == 5 and event["action"] == "skip"
    train_steps = [r["step"] for r in _records(tmp_path / "r") if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 6, 7, 8]  # no loss line for the skipped step
    final = ckpt.latest_checkpoint(tmp_path / "r")
    assert final.name == "step_00000008" and _finite(final)
    optim = torch.load(final / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optim["state"].values()} == {7}  # 8 steps, 7 updates


def test_rollback_restores_the_checkpoint_and_skips_the_batch(tiny_data, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("LMFAB_FAULT", "train.step[step=5]:nan")
    _train(tmp_path / "r", tiny_data, "rollback")
    (event,) = _events(tmp_path / "r")
    assert event["step"] == 5 and event["action"] == "rollback"
    assert event["to_checkpoint"].endswith("step_00000003")
    train = [r for r in _records(tmp_path / "r") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    first, replay = [r["loss"] for r in train if r["step"] == 4]
    assert first == replay  # the replay from the checkpoint is exact
    state = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "r"))
    assert state["step"] == 8 and _finite(ckpt.latest_checkpoint(tmp_path / "r"))
    # one batch more was read than steps were taken: the offending one was skipped
    assert state["loader"]["state"]["position"] == 9 * 8


def test_rollback_before_any_checkpoint_skips(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFAB_FAULT", "train.step[step=2]:nan")
    _train(tmp_path / "r", tiny_data, "rollback", steps=4, every=3)
    (event,) = _events(tmp_path / "r")
    assert event["step"] == 2 and event["policy"] == "rollback" and event["action"] == "skip"


def test_a_non_finite_gradient_with_a_finite_loss_is_caught():
    world = World(0, 1, 0, torch.device("cpu"))
    guard = NonFiniteGuard("stop", world, log=None, say=print)
    assert guard.finite(torch.tensor(2.5), torch.tensor(1.0))
    assert not guard.finite(torch.tensor(2.5), torch.tensor(math.inf))
    assert not guard.finite(torch.tensor(math.nan), torch.tensor(1.0))


@pytest.mark.parametrize("policy", ["skip", pytest.param("rollback",
                                                          marks=pytest.mark.faults_full)])
def test_a_run_that_keeps_failing_stops(tiny_data, tmp_path, monkeypatch, policy):
    # skip: steps 2-6 all bad; rollback: step 5 bad after every rollback
    monkeypatch.setenv("LMFAB_FAULT", ";".join(f"train.step[step={s}]:nan" for s in range(2, 7))
                       if policy == "skip" else
                       ";".join(f"train.step[step=5,after={k}]:nan" for k in range(1, 7)))
    from lmfab.train.nonfinite import NonFiniteError

    with pytest.raises(NonFiniteError, match="5 steps in a row|5 times after rolling back"):
        _train(tmp_path / "r", tiny_data, policy, steps=7, every=3)
