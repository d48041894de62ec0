"""The distributed world, read from the environment.

One code path for 1 and N devices: ``torchrun`` (or ``lmfab run --num_devices N``, which
relaunches itself under torch.distributed's launcher) sets RANK, WORLD_SIZE and LOCAL_RANK;
SLURM's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are honoured when those are absent.
Without them the world is a single process. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def world_size_from_env() -> int:
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def select_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("runconfig.device=cuda but no CUDA device is visible")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_world(device: str = "auto", backend: str = "auto") -> World:
    """Read the world from the environment and, for more than one process, join the group."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = world_size_from_env()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    dev = select_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and int(os.environ.get("SLURM_NNODES", "1")) > 1:
            raise RuntimeError(
                "a multi-node SLURM job without MASTER_ADDR: launch one torchrun per node "
                "(examples/slurm_multinode.sbatch) or export MASTER_ADDR/MASTER_PORT"
            )
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            device_id=dev if dev.type == "cuda" else None,
        )
    return World(rank, world_size, local_rank, dev)


class PeerLost(RuntimeError):
    """A collective failed because another rank stopped (crashed, killed, its node lost)."""


def peer_lost(error: BaseException, world: World) -> PeerLost | None:
    """The error to report for a communication failure of a distributed run, else None."""
    text = str(error)
    if not world.distributed or not isinstance(error, RuntimeError) or isinstance(
            error, PeerLost):
        return None
    markers = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
               "NCCL error", "ProcessGroupGloo", "gloo", "timed out", "Timed out")
    if not isinstance(error, dist.DistError) and not any(m in text for m in markers):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:200]  # gloo's source line
    return PeerLost(
        f"rank {world.rank} lost contact with the other ranks ({first}): another rank "
        "stopped (crashed, killed, or its node was lost); its own log says why. Run the same "
        "command again (on every node) to resume from the newest complete checkpoint")


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_mean(values: list[float], world: World) -> list[float]:
    """Mean over ranks of a few scalars (one collective)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world.world_size).tolist()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
