"""SIGKILL, SIGTERM and SIGINT at seeded random moments of a CPU training run.

Every trial trains the same tiny run as an uninterrupted reference, kills it (at a random
step and sub-step moment, or inside a checkpoint write through the ``checkpoint.write``
fault point), checks the run folder (every listed checkpoint complete, the newest loads, a
half-written one is never listed), runs the same command again until it finishes, and
requires the final weights to be bit-identical to the reference's.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from lmfab import checkpoint as ckpt

from .conftest import (
    SEED,
    Proc,
    assert_bit_identical,
    assert_checkpoints_sound,
    final_weights,
    train_cmd,
    train_steps_logged,
    trials,
    wait_for,
)

STEPS, EVERY = 24, 4
SETS = {"runconfig.max_steps": STEPS, "runconfig.checkpoint_steps": EVERY,
        "runconfig.keep_checkpoints": 2}


def report(record: dict) -> None:
    """Append a trial's record to $LMFAB_FAULTS_REPORT (make faults sets it)."""
    path = os.environ.get("LMFAB_FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    p = Proc(train_cmd(root / "run", tiny_data, **SETS), root, "ref")
    assert p.wait(300) == 0, p.text()[-3000:]
    return final_weights(root / "run")


def _finish(cmd, model_dir, tmp_path, name) -> None:
    newest = ckpt.latest_checkpoint(model_dir)
    p = Proc(cmd, tmp_path, name)
    assert p.wait(300) == 0, p.text()[-3000:]
    if newest is not None:  # else killed before the first save: a fresh start
        assert f"resumed from {newest}" in p.text()


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(trials(2, 21)))
def test_sigkill_then_resume_is_bit_identical(trial, tiny_data, tmp_path, reference):
    rng = random.Random(SEED * 1000 + trial)
    model_dir = tmp_path / "run"
    cmd = train_cmd(model_dir, tiny_data, **SETS)
    kind = "checkpoint_write" if trial % 3 == 0 else "random"
    kills = []
    for attempt in range(1 if kind == "checkpoint_write" else rng.choice((1, 2))):
        if kind == "checkpoint_write":
            at = rng.randrange(EVERY, STEPS, EVERY)  # a periodic save, not the final one
            p = Proc(cmd, tmp_path, f"kill{attempt}",
                     LMFAB_FAULT=f"checkpoint.write[step={at}]:kill")
            p.wait(300)
            assert p.p.returncode == -signal.SIGKILL, p.text()[-3000:]
            half = ckpt.checkpoint_root(model_dir) / f".step_{at:08d}.tmp"
            assert (half / "model.safetensors").is_file()  # killed mid-write, for real
            assert not (half / "state.json").exists()
        else:
            target = min(STEPS - 1, train_steps_logged(model_dir) + rng.randint(1, STEPS // 2))
            p = Proc(cmd, tmp_path, f"kill{attempt}")
            assert wait_for(lambda t=target: train_steps_logged(model_dir) >= t, 300, p), \
                p.text()[-3000:]
            delay = rng.uniform(0, 0.1)
            wait_for(lambda: False, delay)
            p.kill()
            p.wait(60)
        newest = assert_checkpoints_sound(model_dir)
        halves = sorted(x.name for x in ckpt.checkpoint_root(model_dir).glob(".step_*"))
        kills.append({"after_step": train_steps_logged(model_dir),
                      "newest": newest.name if newest else None, "half_written": halves,
                      "rc": p.p.returncode})
        if kind == "checkpoint_write":
            assert newest is None or newest.name != f"step_{at:08d}"
    _finish(cmd, model_dir, tmp_path, "resume")
    assert_checkpoints_sound(model_dir)
    assert_bit_identical(final_weights(model_dir), reference)
    report({"test": "sigkill_training", "trial": trial, "kind": kind, "kills": kills,
            "bit_identical": True})


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.faults_full)])
def test_signal_saves_at_the_step_boundary_and_resumes_bit_exactly(sig, tiny_data, tmp_path,
                                                                    reference):
    model_dir = tmp_path / "run"
    cmd = train_cmd(model_dir, tiny_data, **SETS)
    p = Proc(cmd, tmp_path, "stopped")
    target = random.Random(SEED + sig).randint(2, STEPS - 4)
    assert wait_for(lambda: train_steps_logged(model_dir) >= target, 300, p), p.text()[-3000:]
    p.kill(sig, group=False)
    assert p.wait(120) == 128 + sig, p.text()[-3000:]
    text = p.text()
    lines = [x for x in text.splitlines() if "stopped after step" in x]
    assert len(lines) == 1, text[-3000:]
    step = int(lines[0].split("stopped after step ")[1].split()[0])
    assert step >= target and f"step_{step:08d}" in lines[0]
    assert "run the same command again to resume" in lines[0]
    assert "Traceback" not in text
    assert assert_checkpoints_sound(model_dir).name == f"step_{step:08d}"
    events = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()
              if '"event"' in x]
    assert events[-1]["event"] == "interrupted" and events[-1]["step"] == step
    _finish(cmd, model_dir, tmp_path, "resume")
    assert_bit_identical(final_weights(model_dir), reference)
    report({"test": "signal", "signal": signal.Signals(sig).name, "stopped_at": step,
            "rc": 128 + sig, "bit_identical": True})
