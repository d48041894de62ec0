"""Helpers of the fault-injection suite: subprocess runs of ``lmfab``, kills, comparisons.

The fast subset (a few trials of each fault) runs in every ``make test``; ``make faults``
sets ``LMFAB_FAULTS_FULL=1`` for the full campaign: more trials, and the tests marked
``faults_full`` (skipped otherwise, with that reason).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmfab import checkpoint as ckpt

from ..conftest import CONFIGS, REPO, tiny_overrides

FULL = os.environ.get("LMFAB_FAULTS_FULL") == "1"
TINY = CONFIGS / "train" / "tiny.yaml"
SEED = int(os.environ.get("LMFAB_FAULTS_SEED", "0"))


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    for item in items:
        if "faults_full" in item.keywords:
            item.add_marker(pytest.mark.skip(
                reason="full fault campaign only: make faults (LMFAB_FAULTS_FULL=1)"))


def trials(fast: int, full: int) -> int:
    return full if FULL else fast


def env(**extra: str) -> dict[str, str]:
    """The child's environment: this worktree's lmfab first, one thread (deterministic)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"),
         "PYTHONUNBUFFERED": "1"}
    e.pop("LMFAB_FAULT", None)
    e.update(extra)
    return e


def lmfab(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmfab", *args]


def train_cmd(model_dir: Path, data: Path, *more: str, **sets) -> list[str]:
    cmd = lmfab("run", "--params", str(TINY), "--mode", "train", "--model_dir", str(model_dir),
                *more)
    for s in tiny_overrides(data, **sets):
        cmd += ["--set", s]
    return cmd


class Proc:
    """A child process in its own session (so a kill reaches it and its children only),
    its output in files under ``log_dir``."""

    def __init__(self, cmd: list[str], log_dir: Path, name: str, **env_extra: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out, self.err = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=o, stderr=e,
                                      start_new_session=True)

    def wait(self, timeout: float) -> int:
        return self.p.wait(timeout=timeout)

    def kill(self, sig: int = signal.SIGKILL, group: bool = True) -> None:
        if self.p.poll() is None:
            if group:
                os.killpg(self.p.pid, sig)
            else:
                self.p.send_signal(sig)

    def kill_tree(self) -> None:
        """SIGKILL this process and every descendant, as a lost node (torchrun starts each
        rank in a session of its own, so a process-group kill would miss them)."""
        pids, todo = [], [self.p.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    todo += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()


def run(cmd: list[str], timeout: float = 300, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True,
                          timeout=timeout)


def wait_for(predicate, timeout: float, proc: Proc | None = None, poll: float = 0.01) -> bool:
    """Poll until ``predicate()``; False if ``proc`` ended first or the time ran out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.p.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def train_steps_logged(model_dir: Path) -> int:
    """The highest training step in metrics.jsonl (0: none yet)."""
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("split") == "train":
            steps.append(rec["step"])
    return max(steps)


def final_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(model_dir) / "model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "state.json", "config.yaml",
                    "rng_rank0.pt")


def assert_checkpoints_sound(model_dir: Path) -> Path | None:
    """Every ``step_*`` folder is complete and the newest loads; half-written ones are only
    hidden ``.step_*.tmp`` folders, never listed. Returns the newest."""
    listed = ckpt.list_checkpoints(model_dir)
    for path in listed:
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        assert not missing, f"{path} is listed but lacks {missing}"
        assert not path.name.startswith(".")
    newest = ckpt.latest_checkpoint(model_dir)
    if newest is not None:
        load_file(str(newest / "model.safetensors"))
        torch.load(newest / "optimizer.pt", weights_only=True)
        assert ckpt.read_state(newest)["step"] == int(newest.name.split("_")[1])
    return newest


@pytest.fixture(autouse=True)
def _fresh_fault_points(monkeypatch):
    """Each test starts with no fault fired yet in this process (they fire once each)."""
    from lmfab import faultpoint

    monkeypatch.setattr(faultpoint, "_fired", set())
    monkeypatch.setattr(faultpoint, "_counts", {})
    monkeypatch.delenv(faultpoint.ENV, raising=False)
