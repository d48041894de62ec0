"""Two gloo ranks on the CPU: one rank killed or raising mid-step, one of two simulated
nodes killed, and SLURM's variables. The survivor exits within a bounded time (the
subprocess timeouts below: a hang fails the test), a message names what failed, and a
restart resumes to the weights of one process at the same global batch."""

from __future__ import annotations

import signal
import socket

import pytest
import torch

from lmfab.config import load_config
from lmfab.train.loop import run_mode

from ..conftest import tiny_overrides
from .conftest import (
    TINY,
    Proc,
    assert_checkpoints_sound,
    final_weights,
    train_cmd,
    train_steps_logged,
    wait_for,
)

STEPS = 10
SETS = {"runconfig.max_steps": STEPS, "runconfig.checkpoint_steps": 2}
BOUND_S = 120  # a survivor must be gone this long after the failure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    """The reference: one process, the same global batch (2 accumulation steps)."""
    root = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    run_mode(load_config(TINY, tiny_overrides(tiny_data, **SETS)), mode="train",
             model_dir=root / "run")
    return final_weights(root / "run")


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.faults_full
@pytest.mark.parametrize("action", ["kill", "raise"])
def test_a_failed_rank_stops_the_other_and_a_restart_resumes(action, tiny_data, tmp_path,
                                                             one_process):
    model_dir = tmp_path / "run"
    cmd = train_cmd(model_dir, tiny_data, "--num_devices", "2", **SETS)
    p = Proc(cmd, tmp_path, "failed", LMFAB_FAULT=f"train.step[rank=1,step=5]:{action}")
    rc = p.wait(300)  # startup included; the test fails (no hang) if this expires
    text = p.text()
    assert rc != 0 and "rank 1 failed first" in text, text[-3000:]
    assert ("killed by SIGKILL" if action == "kill" else "exit code 1") in text
    assert "ChildFailedError" not in text  # torchrun's own traceback is replaced by the line
    assert assert_checkpoints_sound(model_dir).name == "step_00000004"
    p = Proc(train_cmd(model_dir, tiny_data, "--num_devices", "2", **SETS), tmp_path, "again")
    assert p.wait(300) == 0, p.text()[-3000:]
    assert "resumed from" in p.text()
    _close(final_weights(model_dir), one_process)


def _node(model_dir, data, rank, port, tmp_path, name):
    cmd = train_cmd(model_dir, data, "--num-nodes", "2", "--node-rank", str(rank),
                    "--master-addr", "127.0.0.1", "--master-port", str(port), **SETS)
    return Proc(cmd, tmp_path, f"{name}{rank}")


@pytest.mark.slow
@pytest.mark.faults_full
def test_two_nodes_match_one_process_survive_a_lost_node_and_resume(tiny_data, tmp_path,
                                                                     one_process):
    model_dir = tmp_path / "run"  # both "nodes" see one folder, as a shared file system
    port = _free_port()
    nodes = [_node(model_dir, tiny_data, k, port, tmp_path, "first") for k in (0, 1)]
    assert wait_for(lambda: train_steps_logged(model_dir) >= 5, 300, nodes[0]), \
        nodes[0].text()[-3000:]
    nodes[1].kill_tree()  # the whole node: its launcher, torchrun's agent and the rank
    rc = nodes[0].wait(BOUND_S)
    text = nodes[0].text()
    assert rc != 0 and "lost contact" in text and "another node" in text, text[-3000:]
    assert "Traceback" not in text
    nodes[1].wait(60)
    assert_checkpoints_sound(model_dir)
    port = _free_port()
    nodes = [_node(model_dir, tiny_data, k, port, tmp_path, "again") for k in (0, 1)]
    for n in nodes:
        assert n.wait(300) == 0, n.text()[-3000:]
    assert "resumed from" in nodes[0].text() and "on 2 x cpu" in nodes[0].text()
    _close(final_weights(model_dir), one_process)


def test_slurm_variables_give_the_world(monkeypatch):
    from lmfab.dist.launch import already_launched
    from lmfab.dist.world import world_size_from_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not already_launched()  # one task (sbatch): --num-devices launches the ranks
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert already_launched() and world_size_from_env() == 4  # srun -n 4: each task a rank


@pytest.mark.slow
@pytest.mark.faults_full
def test_two_slurm_tasks_train_like_one_process(tiny_data, tmp_path, one_process):
    model_dir = tmp_path / "run"
    port = str(_free_port())
    procs = [Proc(train_cmd(model_dir, tiny_data, **SETS), tmp_path, f"task{k}",
                  SLURM_PROCID=str(k), SLURM_NTASKS="2", SLURM_LOCALID=str(k),
                  SLURM_NNODES="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
             for k in (0, 1)]
    for p in procs:
        assert p.wait(300) == 0, p.text()[-3000:]
    assert "on 2 x cpu" in procs[0].text()
    _close(final_weights(model_dir), one_process)


@pytest.mark.slow
@pytest.mark.faults_full
def test_sigterm_to_a_two_process_run_saves_on_every_rank_and_resumes(tiny_data, tmp_path,
                                                                      one_process):
    """SLURM's preemption: SIGTERM to the launcher reaches both ranks, which agree on one
    step boundary, save there and exit 143."""
    model_dir = tmp_path / "run"
    cmd = train_cmd(model_dir, tiny_data, "--num_devices", "2", **SETS)
    p = Proc(cmd, tmp_path, "stopped")
    assert wait_for(lambda: train_steps_logged(model_dir) >= 3, 300, p), p.text()[-3000:]
    p.kill(signal.SIGTERM, group=False)
    assert p.wait(BOUND_S) == 143, p.text()[-3000:]
    lines = [x for x in p.text().splitlines() if "stopped after step" in x]
    assert len(lines) == 1, p.text()[-3000:]
    step = int(lines[0].split("stopped after step ")[1].split()[0])
    assert assert_checkpoints_sound(model_dir).name == f"step_{step:08d}"
    assert (model_dir / "checkpoints" / f"step_{step:08d}" / "rng_rank1.pt").is_file()
    p = Proc(cmd, tmp_path, "again")
    assert p.wait(300) == 0, p.text()[-3000:]
    _close(final_weights(model_dir), one_process)
