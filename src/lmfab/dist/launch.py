"""``--num_devices N`` / ``--num_nodes M``: relaunch this command under torch.distributed.run.

The child processes get the same argv minus the launch flags, plus the environment that
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so the rest of lmfab sees
exactly what a user's own ``torchrun --nproc_per_node N -m lmfab run ...`` would give it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# A rank whose collective failed because another rank stopped (dist.world.PeerLost).
PEER_LOST = 5


def already_launched() -> bool:
    """Started as one rank of many: by torchrun, or by ``srun`` as one of several tasks."""
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS") or 1) > 1


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
    cmd = [sys.executable, "-m", "lmfab.dist.launch", f"--nproc_per_node={num_devices}"]
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
        code = _call(cmd, env)
        code = rank_exit_code(Path(exit_dir), code, num_ranks=num_devices)
        if code:
            report_failure(Path(exit_dir), code, num_nodes)
        return code


def _call(cmd: list[str], env: dict) -> int:
    """Run the launcher; a SIGTERM sent to this process goes on to it (and so to the ranks,
    which save at the step boundary); Ctrl-C reaches them from the terminal already, so
    here it is only not allowed to kill this process first."""
    proc = subprocess.Popen(cmd, env=env)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM,
                                              lambda s, f: proc.send_signal(s)),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda s, f: None)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _torchrun(argv: list[str]) -> int:
    """torch.distributed.run's main without its traceback: the first failed rank is written
    to ``$LMFAB_EXIT_DIR/failure.json`` for :func:`report_failure`."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        # The root cause, not its consequences: ranks that lost their peers (PEER_LOST) or
        # that the launcher stopped (SIGTERM) come after the rank that failed.
        causes = {r: f for r, f in e.failures.items()
                  if f.exitcode not in (PEER_LOST, -signal.SIGTERM)} or e.failures
        rank = min(causes, key=lambda r: (causes[r].timestamp, r))
        failure = causes[rank]
        exit_dir = os.environ.get("LMFAB_EXIT_DIR")
        if exit_dir:
            Path(exit_dir, "failure.json").write_text(json.dumps(
                {"rank": rank, "local_rank": failure.local_rank, "exitcode": failure.exitcode,
                 "signal": failure.signal_name() if failure.exitcode < 0 else None}))
        return 1
    except SignalException as e:  # this node was told to stop; the ranks saved and stopped
        return 128 + int(e.sigval)
    return 0


def report_failure(exit_dir: Path, code: int, num_nodes: int) -> None:
    """One line after a failed multi-process run: which rank failed first and how."""
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return  # stopped on request: the ranks said where they saved
    path = exit_dir / "failure.json"
    first = json.loads(path.read_text()) if path.is_file() else None
    resume = ("run the same command again" + (" on every node" if num_nodes > 1 else "")
              + " to resume from the newest complete checkpoint")
    if first is not None and first["exitcode"] == PEER_LOST and num_nodes > 1:
        why = "this node's ranks lost contact with a rank on another node (its log says why)"
    elif first is not None:
        how = (f"killed by {first['signal']}" if first["signal"]
               else f"exit code {first['exitcode']}")
        why = f"rank {first['rank']} failed first ({how}); the other ranks were stopped"
    else:
        why = f"the run failed (exit code {code})"
    print(f"lmfab: {why}; {resume}", file=sys.stderr, flush=True)


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


if __name__ == "__main__":  # what relaunch() runs: torchrun's arguments
    sys.exit(_torchrun(sys.argv[1:]))
