"""Ctrl-C and SIGTERM during training: stop at the next step boundary, with a checkpoint.

SIGTERM is what SLURM (preemption, ``scancel``, the end of the time limit), Kubernetes and
torchrun send before they kill a job; SIGINT is Ctrl-C. While :class:`StopOnSignal` is
active either one only sets a flag: the step in flight finishes, the loop saves a
checkpoint at that step, prints one line (the step, where it saved, how to resume) and
raises :class:`Interrupted`, which ``lmfab`` turns into exit code 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by it). Running the
same command again resumes from that checkpoint, bit-exactly. A second Ctrl-C stops at
once (the checkpoint of the step boundary is then not written; the newest earlier one is
intact).

With several processes the ranks must stop at the same step, or the save (a collective)
would hang: each step boundary starts an asynchronous all-reduce (max) of the ranks' flags
and reads the previous boundary's result, so every rank decides on the same value one step
after the signal, without waiting for the device in the current step.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

from lmfab.dist.world import World

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):  # noqa: N818 -- a stop the user asked for, not an error
    """Training stopped by a signal after saving ``path`` at ``step``."""

    def __init__(self, signum: int, step: int, path) -> None:
        self.signum, self.step, self.path = signum, step, path
        self.code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}")


class StopOnSignal:
    """Context manager: SIGINT / SIGTERM set a flag that :meth:`requested` reports at a step
    boundary (the same answer on every rank). Handlers are installed only in the main
    thread (Python delivers signals there) and restored on exit."""

    def __init__(self, world: World, say, log) -> None:
        self.world, self.say, self.log = world, say, log
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._pending = None  # (work, tensor) of the last boundary's all-reduce

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._pending is not None and exc[0] is None:  # every rank issued it: finish it
            self._pending[0].wait()
        self._pending = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if not self.signum:
            self.signum = signum
            if self.world.is_main:
                print(f"lmfab: {signal.Signals(signum).name} received: saving a checkpoint "
                      "at the end of this step, then stopping (Ctrl-C again: stop at once)",
                      file=sys.stderr, flush=True)

    def interrupted(self, step: int, end: int, path) -> Interrupted:
        """The exception to raise once ``path`` (the checkpoint at ``step``) is saved; says
        the one line and logs the event."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        self.log.event(step, {"event": "interrupted", "signal": name, "checkpoint": str(path)})
        self.say(f"lmfab: {name}: stopped after step {step} of {end}; checkpoint saved in "
                 f"{path}; run the same command again to resume from it")
        return Interrupted(self.signum or signal.SIGTERM, step, path)

    def requested(self) -> int:
        """The signal to stop for (0: go on), agreed by all ranks."""
        if not self.world.distributed:
            return self.signum
        decided = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            decided = int(flag.item())
            self._pending = None
            if decided:
                self.signum = decided  # also on a rank that got no signal itself
        if not decided:
            flag = torch.tensor([float(self.signum)], device=self.world.device)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return decided
