"""``--num_devices N`` / ``--num_nodes M``: relaunch this command under torch.distributed.run.

The child processes get the same argv minus the launch flags, plus the environment that
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so the rest of lmfab sees
exactly what a user's own ``torchrun --nproc_per_node N -m lmfab run ...`` would give it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def already_launched() -> bool:
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def relaunch(
    argv: list[str],
    *,
    num_devices: int,
    num_nodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int = 29500,
) -> int:
    """Run ``python -m lmfab <argv>`` under torch.distributed.run; return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_devices}"]
    if num_nodes == 1 and master_addr is None:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={num_nodes}",
            f"--node_rank={node_rank}",
            f"--master_addr={master_addr or '127.0.0.1'}",
            f"--master_port={master_port}",
        ]
    cmd += ["-m", "lmfab", *argv]
    env = dict(os.environ)
    if num_devices > 1 and "OMP_NUM_THREADS" not in env:
        # CPU processes share the cores instead of oversubscribing them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_devices))
    with tempfile.TemporaryDirectory(prefix="lmfab-exit-") as exit_dir:
        env["LMFAB_EXIT_DIR"] = exit_dir
        code = subprocess.call(cmd, env=env)
        return rank_exit_code(Path(exit_dir), code, num_ranks=num_devices)


def record_rank_code(code: int) -> None:
    """Tell ``relaunch`` how this rank ended: a handled error's code (2: bad input, 3: out
    of memory), or 0 once every rank of the run, on every node, has finished its work
    (``run_mode`` agrees on that in one collective before tearing down). A no-op outside
    ``--num_devices`` (no ``LMFAB_EXIT_DIR``)."""
    exit_dir = os.environ.get("LMFAB_EXIT_DIR")
    if exit_dir:
        Path(exit_dir, f"rank{os.environ.get('RANK', '0')}").write_text(str(code))


def rank_exit_code(exit_dir: Path, launcher_code: int, num_ranks: int | None = None) -> int:
    """This node's exit code from torchrun's and the ranks' records (``record_rank_code``).

    torchrun exits 1 whatever stopped a rank. A rank that stopped on an error lmfab handled
    left its code: the lowest such rank's code is the run's, so scripts see the same codes as
    on one device. If instead all ``num_ranks`` ranks of this node recorded 0 (which each
    does only once all ranks of the run have finished), the failure came after the work was
    done and saved (a crash while tearing the process group down, seen rarely with gloo on
    CPUs): a warning, and 0."""
    if launcher_code == 0:
        return 0
    codes = {}
    for f in exit_dir.glob("rank*"):
        text = f.read_text().strip()
        if f.name[4:].isdigit() and text.isdigit():
            codes[int(f.name[4:])] = int(text)
    failed = {rank: code for rank, code in codes.items() if code}
    if failed:
        return failed[min(failed)]
    if num_ranks and len(codes) >= num_ranks:
        print(f"lmfab: warning: torchrun exited {launcher_code} after all {num_ranks} ranks had "
              "finished their work (a process failed while shutting down); the run's results "
              "and checkpoints are complete", file=sys.stderr)
        return 0
    return launcher_code
