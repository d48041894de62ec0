"""Runtime token loader: memory-mapped shards, rank-aware batches, exact resume.

Design (numpy only; the training loop turns batches into torch tensors):

* ``TokenDataset`` sees a split directory of ``*.tok`` shards (see ``lmfab.data.shards``) as
  one array of ``n_windows`` windows of ``window = seq_len + 1`` tokens, addressed by a
  global window index (shards in name order, cumulative offsets). All shards must agree on
  the window and on the tokenizer hash, and may be checked against the run's config.
* ``BatchLoader`` reads an infinite *stream* of windows: epoch ``e`` visits the windows in the
  order ``perm_e = np.random.default_rng([seed, e]).permutation(n)``, and stream position
  ``p`` is window ``perm_{p // n}[p % n]``. Step ``k`` consumes the global batch of positions
  ``[k*B, (k+1)*B)``; rank ``r`` of ``W`` takes the contiguous slice
  ``[r*B/W, (r+1)*B/W)`` of it, and every rank advances by ``B``.

Consequences, each covered by a test:

* the union of the ranks' slices is the same global batch whatever the world size, so a
  run's data order does not depend on the device count (DESIGN principle 2);
* the whole loader state is one integer, the stream position, so ``state_dict`` /
  ``load_state_dict`` resume bit-exactly, even with a different world size;
* every epoch visits every window exactly once; batches may straddle epochs (no windows are
  dropped and no partial batches exist).

``iterate_eval`` is the evaluation counterpart: consecutive, unshuffled global batches from
the start of the split, sliced per rank, with the trailing partial batch dropped so that all
ranks see the same number of batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmfab.data.shards import ShardError, ShardHeader, open_shard


class TokenDataset:
    """All windows of one split directory, addressable by global window index."""

    def __init__(
        self,
        split_dir: str | os.PathLike,
        *,
        window: int | None = None,
        tokenizer_hash: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.split_dir = Path(split_dir)
        # ids at or above it are refused per batch, naming the shard: on a GPU an embedding
        # lookup past the table is a device-side assert that names nothing
        self.vocab_size = vocab_size
        if not self.split_dir.is_dir():
            raise FileNotFoundError(_missing_split(self.split_dir))
        paths = sorted(self.split_dir.glob("*.tok"), key=lambda p: p.name)
        if not paths:
            raise FileNotFoundError(
                f"no token shards (*.tok) in {self.split_dir} "
                "(run `lmfab data tokenize` to create them)"
            )

        self.paths: list[Path] = paths
        self.headers: list[ShardHeader] = []
        self._shards: list[np.ndarray] = []
        first: ShardHeader | None = None
        for path in paths:
            header, tokens = open_shard(path)
            if first is None:
                first = header
                _check_expected(path, header, window, tokenizer_hash)
            else:
                if header.window != first.window:
                    raise ShardError(
                        f"{path}: window {header.window} (seq_len={header.window - 1}) differs "
                        f"from {paths[0].name}'s window {first.window} "
                        f"(seq_len={first.window - 1}); a split must be packed with one seq_len"
                    )
                if header.tokenizer_hash != first.tokenizer_hash:
                    raise ShardError(
                        f"{path}: tokenizer hash {header.tokenizer_hash} differs from "
                        f"{paths[0].name}'s {first.tokenizer_hash}; a split must use one tokenizer"
                    )
            self.headers.append(header)
            self._shards.append(tokens)

        assert first is not None
        self._window = first.window
        self._tokenizer_hash = first.tokenizer_hash
        counts = np.array([h.n_windows for h in self.headers], dtype=np.int64)
        # starts[i] = global index of shard i's first window
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._n_windows = int(counts.sum())
        if self._n_windows == 0:
            raise ShardError(f"{self.split_dir}: the shards hold no windows")

    # -- properties -------------------------------------------------------------------------

    @property
    def n_windows(self) -> int:
        return self._n_windows

    @property
    def window(self) -> int:
        return self._window

    @property
    def seq_len(self) -> int:
        return self._window - 1

    @property
    def tokenizer_hash(self) -> str:
        return self._tokenizer_hash

    @property
    def n_tokens(self) -> int:
        return self._n_windows * self._window

    def __len__(self) -> int:
        return self._n_windows

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.split_dir)!r}, shards={len(self.paths)}, "
            f"n_windows={self._n_windows}, window={self._window})"
        )

    # -- access -----------------------------------------------------------------------------

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Gather windows by global index: returns int64 of shape (len(indices), window)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((idx.size, self._window), dtype=np.int64)
        if idx.size == 0:
            return out
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self._n_windows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"window index {bad} out of range [0, {self._n_windows})")
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1  # (N,)
        if len(self._shards) == 1:
            out[:] = self._shards[0][idx]
        else:
            for s in np.unique(shard_of):
                rows = np.nonzero(shard_of == s)[0]
                out[rows] = self._shards[s][idx[rows] - self._starts[s]]  # (rows, window)
        if self.vocab_size is not None and int(out.max()) >= self.vocab_size:
            row, col = (int(v[0]) for v in np.nonzero(out >= self.vocab_size))
            s = int(shard_of[row])
            raise ShardError(
                f"{self.paths[s]}: window {int(idx[row] - self._starts[s])} holds token id "
                f"{int(out[row, col])} (position {col}), not below model.vocab_size="
                f"{self.vocab_size}: a damaged shard, or one packed with a larger vocabulary")
        return out


def _missing_split(split_dir: Path) -> str:
    """Why ``split_dir`` is not there, and what to give instead."""
    data_dir = split_dir.parent
    if not data_dir.exists():
        return (f"data_dir not found: {data_dir} (make it with `lmfab data tokenize` or "
                "`lmfab data pack`)")
    if not data_dir.is_dir():
        return f"data_dir {data_dir} is a file, not a folder of token shards"
    packed = sorted(p.name for p in data_dir.glob("seq*") if (p / split_dir.name).is_dir())
    if packed:  # `lmfab data pack` writes one dataset per sequence length
        return (f"{data_dir} holds {len(packed)} datasets packed by `lmfab data pack`, one per "
                f"sequence length ({', '.join(p + '/' for p in packed)}): set data_dir to one "
                f"of them, e.g. {data_dir / packed[0]}")
    if split_dir.exists():
        return f"{split_dir} is a file, not a folder of token shards"
    return (f"token split directory not found: {split_dir} (run `lmfab data tokenize` to "
            "create it)")


def _check_expected(
    path: Path, header: ShardHeader, window: int | None, tokenizer_hash: str | None
) -> None:
    if window is not None and header.window != window:
        raise ShardError(
            f"{path}: seq_len mismatch: shards were packed with seq_len={header.window - 1} "
            f"(window {header.window}) but the config asks for seq_len={window - 1} "
            f"(window {window}); re-tokenize with --seq_len {window - 1} or change the config"
        )
    if tokenizer_hash is not None and header.tokenizer_hash != tokenizer_hash.lower():
        raise ShardError(
            f"{path}: tokenizer mismatch: shards were written with tokenizer sha256 "
            f"{header.tokenizer_hash} but {tokenizer_hash.lower()} was expected; "
            "the shards and the tokenizer come from different tokenizations"
        )


def check_batching(global_batch: int, rank: int, world_size: int, seed: int) -> None:
    """The arguments every loader shares: a rank of the world, a batch that splits evenly."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if global_batch % world_size:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by world_size={world_size}"
        )
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


class BatchLoader:
    """Deterministic, resumable training batches for one rank (see the module docstring)."""

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        check_batching(global_batch, rank, world_size, seed)
        self.dataset = dataset
        self.global_batch = int(global_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.local_batch = self.global_batch // self.world_size
        self.n_windows = len(dataset)
        self.position = 0
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (stream position / n_windows), for logging."""
        return self.position / self.n_windows

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                perm = np.arange(self.n_windows, dtype=np.int64)
            # keep at most two epochs: the current one and the one a batch straddles into
            self._perm_cache = {e: p for e, p in self._perm_cache.items() if e >= epoch - 1}
            self._perm_cache[epoch] = perm
        return perm

    def window_indices(self, position: int | None = None) -> np.ndarray:
        """Global window indices of this rank's slice of the batch at ``position``."""
        p = self.position if position is None else int(position)
        pos = p + self.rank * self.local_batch + np.arange(self.local_batch, dtype=np.int64)
        epochs = pos // self.n_windows
        offsets = pos % self.n_windows
        out = np.empty_like(pos)
        for e in np.unique(epochs):  # one epoch, or more when the batch straddles a boundary
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out

    def next_batch(self) -> np.ndarray:
        """This rank's slice of the next global batch: int64 (global_batch // world_size, window)."""
        batch = self.dataset.get(self.window_indices())
        self.position += self.global_batch
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "n_windows": self.n_windows,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stream position; the data order (seed, n_windows, shuffle) must match."""
        missing = {"position", "seed", "n_windows"} - set(state)
        if missing:
            raise ValueError(f"loader state is missing {sorted(missing)}: {state!r}")
        for key, mine in (("seed", self.seed), ("n_windows", self.n_windows)):
            if int(state[key]) != mine:
                raise ValueError(
                    f"cannot resume data loader: checkpoint has {key}={state[key]} but this run "
                    f"has {key}={mine}; resuming would not continue the same data order"
                    + (" (the token shards changed)" if key == "n_windows" else "")
                )
        if "shuffle" in state and bool(state["shuffle"]) != self.shuffle:
            raise ValueError(
                f"cannot resume data loader: checkpoint has shuffle={state['shuffle']} but "
                f"this run has shuffle={self.shuffle}"
            )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"loader state has a negative position {position}")
        self.position = position


def iterate_eval(
    dataset: TokenDataset,
    *,
    batch: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Yield this rank's slices of unshuffled global eval batches of ``batch``.

    The split holds ``n = len // batch`` whole batches, batch ``j`` being windows
    ``[j*batch, (j+1)*batch)`` (a trailing partial batch is dropped so every rank yields the
    same number). Uncapped, all ``n`` are yielded in order. Capped at ``max_batches = m < n``,
    the ``m`` batches ``j = floor(i*n/m)`` are, evenly spaced over the split: a split is in
    source order (documents of one input file after another), so its first ``m`` batches
    would all come from the first source, and the split's bytes per token would not describe
    them. Rank ``r`` gets the contiguous slice ``[r*batch/W, (r+1)*batch/W)`` of each.
    Raises ValueError when not even one batch fits.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank/world_size: rank={rank}, world_size={world_size}")
    if batch < 1 or batch % world_size:
        raise ValueError(f"eval batch={batch} must be positive and divisible by {world_size}")
    n_batches = len(dataset) // batch
    if n_batches == 0:
        raise ValueError(
            f"{dataset.split_dir}: {len(dataset)} windows is fewer than one eval batch of "
            f"{batch}; lower the eval batch size or make the split larger"
        )
    total = n_batches
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    per = batch // world_size
    local = rank * per + np.arange(per, dtype=np.int64)
    for i in range(n_batches):
        yield dataset.get(i * total // n_batches * batch + local)
