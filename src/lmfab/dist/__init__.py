"""Distributed execution: the world from the environment, relaunch, parallelize()."""

from lmfab.dist.parallel import parallelize
from lmfab.dist.world import World, all_reduce_mean, barrier, init_world, shutdown

__all__ = ["World", "all_reduce_mean", "barrier", "init_world", "parallelize", "shutdown"]
