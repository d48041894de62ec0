"""Learning-rate schedules: a constant, or a piecewise list like the Model Zoo's schedulers.

A list of segments (``linear`` / ``cosine`` from ``start`` to ``end`` over ``steps``,
``constant`` at ``start``) is laid end to end; past the last segment the rate holds its
final value. The rate is a pure function of the step, so resume needs no schedule state.
"""

from __future__ import annotations

import math

from lmfab.config.schema import LRSegment


class LRSchedule:
    def __init__(self, learning_rate: float | list[LRSegment]):
        self.segments = (
            [LRSegment("constant", 1, float(learning_rate))]
            if isinstance(learning_rate, int | float)
            else list(learning_rate)
        )

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        for seg in self.segments:
            if step < seg.steps:
                return _segment_lr(seg, step)
            step -= seg.steps
        last = self.segments[-1]
        return last.start if last.end is None else last.end

    @property
    def peak(self) -> float:
        return max(max(s.start, s.end if s.end is not None else s.start) for s in self.segments)


def _segment_lr(seg: LRSegment, t: int) -> float:
    if seg.schedule == "constant" or seg.end is None:
        return seg.start
    frac = t / seg.steps
    if seg.schedule == "linear":
        return seg.start + (seg.end - seg.start) * frac
    # cosine: start at t=0, end at t=steps
    return seg.end + 0.5 * (seg.start - seg.end) * (1.0 + math.cos(math.pi * frac))
