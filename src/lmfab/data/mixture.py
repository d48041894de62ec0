"""``MixtureLoader``: global batches drawn from several token datasets with exact weights.

A training run may draw from several packed datasets (sources, languages, curated mixes)
in fixed proportions. This loader keeps every property of ``BatchLoader`` (numpy only;
rank-aware; the data order independent of the world size; the whole state one integer)
and adds the one a mixture needs: over any run the rows drawn from each dataset follow the
weights as closely as integers allow.

**Which dataset a row comes from.** The global stream of rows (step ``k`` of batch ``B``
holds rows ``[k*B, (k+1)*B)``) is assigned to datasets by a periodic schedule. The weights
are read as exact fractions (``0.7`` is 7/10, ``0.3333333333333333`` is 1/3) and normalised to ``p_d``; the period ``L``
is the least common denominator (capped at ``MAX_PERIOD``, beyond which the weights are
rounded by largest remainder to multiples of ``1/MAX_PERIOD``), so each period holds
exactly ``n_d = p_d * L`` rows of dataset ``d``. Inside the period the order is the
Balinski-Young *quota method*: row ``j`` goes to the dataset with the largest
``n_d / (c_d + 1)`` among those still under their upper quota, where ``c_d`` counts its
rows so far. The quota method keeps every prefix within quota:
``floor(n * p_d) <= c_d(n) <= ceil(n * p_d)`` for every ``n`` -- a dataset is never more
than one row ahead of or behind its share, in every batch and over the whole run (tested).
A contiguous block of rows, hence every global batch, is as evenly mixed as possible.

**Which window.** The ``m``-th row drawn from dataset ``d`` is window
``perm_{d,e}[m % N_d]`` with ``e = m // N_d`` and ``perm_{d,e}`` a permutation seeded by
``(seed, d, e)``: each dataset is shuffled per epoch and visited completely before any of its
windows repeats, independently of the others (a small dataset simply runs more epochs).

**Ranks and resume.** Rank ``r`` of ``W`` takes the contiguous slice
``[r*B/W, (r+1)*B/W)`` of each global batch, as in ``BatchLoader``, so the union over ranks
does not depend on ``W``. Row ``j``'s dataset and window are pure functions of ``j``, so
``state_dict()`` is the stream position; ``load_state_dict`` restores it exactly, on any
world size and with any batch size (for a schedule that changes the batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from lmfab.data.loader import TokenDataset, check_batching
from lmfab.data.shards import ShardError

MAX_PERIOD = 1 << 16


def mixture_counts(weights: Sequence[float]) -> np.ndarray:
    """Rows per period for each dataset: exact for rational weights, else rounded."""
    if len(weights) == 0:
        raise ValueError("a mixture needs at least one dataset")
    fr = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float | Fraction | np.number):
            raise ValueError(f"mixture weight {w!r} is not a number")
        if not math.isfinite(float(w)) or w <= 0:
            raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
        f = Fraction(w) if isinstance(w, int | Fraction) else Fraction(repr(float(w)))
        near = f.limit_denominator(10**6)  # 0.333...3 is meant as 1/3
        fr.append(near if abs(near - f) <= f * Fraction(1, 10**12) else f)
    total = sum(fr)
    p = [f / total for f in fr]
    period = math.lcm(*(f.denominator for f in p))
    if period <= MAX_PERIOD:
        return np.array([int(f * period) for f in p], dtype=np.int64)
    exact = [f * MAX_PERIOD for f in p]  # largest remainder, every dataset keeps >= 1 row
    counts = np.array([max(1, math.floor(x)) for x in exact], dtype=np.int64)
    order = sorted(range(len(p)), key=lambda d: (-(exact[d] - math.floor(exact[d])), d))
    for d in order[: MAX_PERIOD - int(counts.sum())]:
        counts[d] += 1
    while counts.sum() > MAX_PERIOD:  # only when a tiny weight was lifted to one row
        counts[int(np.argmax(counts))] -= 1
    return counts


def quota_schedule(counts: np.ndarray) -> np.ndarray:
    """One period of dataset ids (len = counts.sum()) in Balinski-Young quota-method order."""
    n = [int(c) for c in counts]
    period = sum(n)
    c = [0] * len(n)
    out = np.empty(period, dtype=np.int32)
    for j in range(period):
        best, best_pri = -1, -1.0
        for d, nd in enumerate(n):
            if c[d] * period < (j + 1) * nd:  # under its upper quota after this row
                pri = nd / (c[d] + 1)
                if pri > best_pri:
                    best, best_pri = d, pri
        c[best] += 1
        out[j] = best
    return out


class MixtureLoader:
    """Deterministic, resumable, rank-aware batches from weighted datasets (module doc)."""

    def __init__(
        self,
        datasets: Sequence[TokenDataset],
        weights: Sequence[float],
        *,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        check_batching(global_batch, rank, world_size, seed)
        self.counts_per_period = mixture_counts(weights)
        first = datasets[0]
        for ds in datasets[1:]:
            if ds.window != first.window:
                raise ShardError(
                    f"{ds.split_dir}: seq_len {ds.seq_len} differs from {first.split_dir}'s "
                    f"{first.seq_len}; the datasets of one mixture must share one seq_len"
                )
            if ds.tokenizer_hash != first.tokenizer_hash:
                raise ShardError(
                    f"{ds.split_dir}: tokenizer {ds.tokenizer_hash[:12]} differs from "
                    f"{first.split_dir}'s {first.tokenizer_hash[:12]}; a mixture needs one tokenizer"
                )
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.global_batch, self.rank, self.world_size = int(global_batch), int(rank), int(world_size)
        self.local_batch = self.global_batch // self.world_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.window = first.window
        self.n_windows = [len(ds) for ds in self.datasets]
        self.period = int(self.counts_per_period.sum())
        self._sched = quota_schedule(self.counts_per_period)  # (period,) dataset id per row
        # rank of each period row among the rows of its dataset in the period
        self._nth = np.empty(self.period, dtype=np.int64)
        for d in range(len(self.datasets)):
            rows = np.flatnonzero(self._sched == d)
            self._nth[rows] = np.arange(rows.size)
        self._perm_cache: list[dict[int, np.ndarray]] = [{} for _ in self.datasets]
        self.position = 0

    # -- the stream -------------------------------------------------------------------------

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        cache = self._perm_cache[d]
        perm = cache.get(epoch)
        if perm is None:
            n = self.n_windows[d]
            if self.shuffle:
                perm = np.random.default_rng([self.seed, d, epoch]).permutation(n)
            else:
                perm = np.arange(n, dtype=np.int64)
            self._perm_cache[d] = {e: p for e, p in cache.items() if e >= epoch - 1}
            self._perm_cache[d][epoch] = perm
        return perm

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset id, window index) of global stream rows (int64 arrays of equal shape)."""
        rows = np.asarray(rows, dtype=np.int64)
        q, r = np.divmod(rows, self.period)
        ds = self._sched[r].astype(np.int64)
        m = q * self.counts_per_period[ds] + self._nth[r]  # m-th draw from its dataset
        win = np.empty_like(rows)
        for d in np.unique(ds):
            sel = ds == d
            n = self.n_windows[d]
            epochs, offsets = np.divmod(m[sel], n)
            out = np.empty(offsets.size, dtype=np.int64)
            for e in np.unique(epochs):
                here = epochs == e
                out[here] = self._perm(int(d), int(e))[offsets[here]]
            win[sel] = out
        return ds, win

    def window_indices(self, position: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(dataset ids, window indices) of this rank's slice of the batch at ``position``."""
        p = self.position if position is None else int(position)
        start = p + self.rank * self.local_batch
        return self.rows(start + np.arange(self.local_batch, dtype=np.int64))

    def next_batch(self) -> np.ndarray:
        """This rank's slice of the next global batch: int64 (global_batch // world_size, window)."""
        return self.next_batch_with_sources()[0]

    def next_batch_with_sources(self) -> tuple[np.ndarray, np.ndarray]:
        """Like ``next_batch``, plus the dataset id of every row (for per-source loss)."""
        ds, win = self.window_indices()
        batch = np.empty((ds.size, self.window), dtype=np.int64)
        for d in np.unique(ds):
            sel = ds == d
            batch[sel] = self.datasets[d].get(win[sel])
        self.position += self.global_batch
        return batch, ds

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    # -- accounting -------------------------------------------------------------------------

    def counts(self, position: int | None = None) -> np.ndarray:
        """Rows drawn from each dataset in the global stream before ``position``."""
        p = self.position if position is None else int(position)
        q, r = divmod(p, self.period)
        head = np.bincount(self._sched[:r], minlength=len(self.datasets))
        return q * self.counts_per_period + head

    @property
    def epochs(self) -> list[float]:
        """Epochs of each dataset consumed so far, for logging."""
        return [float(c) / n for c, n in zip(self.counts(), self.n_windows, strict=True)]

    # -- resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "mixture",
            "position": self.position,
            "seed": self.seed,
            "counts_per_period": [int(c) for c in self.counts_per_period],
            "n_windows": list(self.n_windows),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stream position; seed, weights, datasets and shuffle must match."""
        missing = {"position", "seed", "counts_per_period", "n_windows"} - set(state)
        if missing:
            raise ValueError(f"mixture loader state is missing {sorted(missing)}: {state!r}")
        mine = self.state_dict()
        for key, why in (
            ("seed", "the seed"),
            ("counts_per_period", "the mixture weights"),
            ("n_windows", "the datasets (their window counts)"),
            ("shuffle", "shuffle"),
        ):
            if key in state and list(np.atleast_1d(state[key])) != list(np.atleast_1d(mine[key])):
                raise ValueError(
                    f"cannot resume mixture loader: checkpoint has {key}={state[key]} but this "
                    f"run has {key}={mine[key]}; {why} changed, so the data order would not "
                    "continue"
                )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"mixture loader state has a negative position {position}")
        self.position = position
