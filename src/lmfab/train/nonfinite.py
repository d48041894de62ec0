"""A non-finite loss or gradient: detected at its step, handled as ``runconfig.on_nonfinite``.

Every step, after backward and before the optimizer, the step's loss and the gradients'
global norm are checked (one scalar read from the device per step; under data parallelism
the ranks' verdicts are all-reduced, so every rank takes the same branch). A bad step
never reaches the weights. The policies:

* ``stop`` (default) -- stop with an error naming the step and the values (exit code 4);
  the weights are those of the step before, the checkpoints are untouched.
* ``skip`` -- drop this step's update (the batch is consumed, the step counter and the
  learning-rate schedule move on), log it, go on.
* ``rollback`` -- restore the newest checkpoint (weights, optimizer, RNG, data position)
  and replay from there, skipping the batch that produced the bad step; before the first
  checkpoint exists it acts as ``skip``.

Each event is one ``{"split": "event", "event": "nonfinite", ...}`` line in
``metrics.jsonl`` and one console line; never silent. A run that keeps failing stops:
``skip`` after 5 bad steps in a row, ``rollback`` after 5 failures at the same step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

MAX_IN_A_ROW = 5


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm, with the step and what to do."""


def _num(t: torch.Tensor) -> float:
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return float(t.detach().float().item())


class NonFiniteGuard:
    def __init__(self, policy: str, world, log, say) -> None:
        self.policy, self.world, self.log, self.say = policy, world, log, say
        self.in_a_row = 0
        self.failures: dict[int, int] = {}  # step -> times it failed (rollback)
        self.skip_batches: dict[int, int] = {}  # step -> batches to drop before it (rollback)

    def finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when this step's loss and gradient norm are finite on every rank."""
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        bad = (~torch.isfinite(loss.detach().float()) | ~torch.isfinite(grad_norm.float()))
        bad = bad.float().reshape(1)
        if self.world.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        ok = bad.item() == 0.0
        if ok:
            self.in_a_row = 0
        return ok

    def handle(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
               checkpoint) -> str:
        """Act on a bad ``step`` (its optimizer update was not applied). Returns the action
        taken: ``skip`` or ``rollback``; raises :class:`NonFiniteError` for ``stop``.
        ``checkpoint``: the newest complete checkpoint, or None."""
        loss_v, gn = _num(loss), _num(grad_norm)
        self.in_a_row += 1
        self.failures[step] = self.failures.get(step, 0) + 1
        action = self.policy
        if action == "rollback" and checkpoint is None:
            action = "skip"  # nothing to roll back to yet
        limit = None
        if action == "skip" and self.in_a_row >= MAX_IN_A_ROW:
            limit = f"{self.in_a_row} steps in a row"
        if action == "rollback" and self.failures[step] >= MAX_IN_A_ROW:
            limit = f"step {step} failed {self.failures[step]} times after rolling back"
        if limit:
            action = "stop"
        record = {"event": "nonfinite", "loss": str(loss_v), "grad_norm": str(gn),
                  "policy": self.policy, "action": action}
        if action == "rollback":
            record["to_checkpoint"] = str(checkpoint)
            self.skip_batches[step] = self.skip_batches.get(step, 0) + 1
        self.log.event(step, record)
        what = {"skip": "skipped its update", "rollback": f"rolling back to {checkpoint}, "
                "skipping its batch", "stop": "stopping"}[action]
        self.say(f"step {step}: non-finite loss {loss_v} / grad-norm {gn}: {what} "
                 f"(runconfig.on_nonfinite={self.policy})")
        if action == "stop":
            why = f" ({limit})" if limit else ""
            raise NonFiniteError(
                f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at "
                f"step {step} (loss {loss_v}, grad-norm {gn}){why}; the update was not applied "
                f"and the checkpoints are intact (newest: {checkpoint or 'none'}). Lower "
                "optimizer.learning_rate or set runconfig.on_nonfinite: skip | rollback")
        return action

    def batches_to_drop(self, step: int) -> int:
        """Batches to discard before computing ``step`` (those that failed it before)."""
        return self.skip_batches.get(step, 0)
