"""``MixtureLoader``: exact weights (quota property), ranks, resume, per-dataset epochs."""

from __future__ import annotations

import numpy as np
import pytest

from lmfab.data.loader import TokenDataset
from lmfab.data.mixture import MixtureLoader, mixture_counts, quota_schedule
from lmfab.data.shards import ShardError, write_shard

HASH_A, HASH_B = "a" * 64, "b" * 64
WINDOW = 5


def make_dataset(path, n_windows, base, window=WINDOW, tok_hash=HASH_A, shards=2):
    """Window i of the dataset holds base + i in every position (so rows identify windows)."""
    path.mkdir(parents=True)
    ids = np.repeat(base + np.arange(n_windows), window).reshape(n_windows, window)
    for k, part in enumerate(np.array_split(ids, shards)):
        write_shard(path / f"shard_{k:05d}.tok", part, window, tok_hash, vocab_size=100_000)
    return TokenDataset(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return [make_dataset(root / "a", 37, 0), make_dataset(root / "b", 11, 1000),
            make_dataset(root / "c", 5, 2000)]


def within_quota(sched: np.ndarray, counts: np.ndarray, periods: int = 1) -> bool:
    full = np.tile(sched, periods)
    total, n = int(counts.sum()), np.arange(1, full.size + 1)
    for d, nd in enumerate(counts):
        c = np.cumsum(full == d)
        if (c < (n * nd) // total).any() or (c > -((-n * nd) // total)).any():
            return False
    return True


def test_schedule_keeps_every_prefix_within_quota():
    rng = np.random.default_rng(0)
    cases = [[0.7, 0.3], [1, 1, 1], [0.5209, 0.2672, 0.0518, 0.0467, 0.0458, 0.0419, 0.0257]]
    cases += [list(rng.integers(1, 60, rng.integers(2, 7))) for _ in range(40)]
    for w in cases:
        counts = mixture_counts(w)
        sched = quota_schedule(counts)
        assert np.array_equal(np.bincount(sched, minlength=len(w)), counts)
        assert within_quota(sched, counts, periods=3), w
    assert list(mixture_counts([0.7, 0.3])) == [7, 3]
    assert list(mixture_counts([1 / 3] * 3)) == [1, 1, 1]
    assert mixture_counts([0.123456789, 0.5]).sum() == 1 << 16  # rounded beyond MAX_PERIOD
    for bad in ([], [1, 0], [1, -2], [float("nan"), 1], ["x", 1]):
        with pytest.raises(ValueError):
            mixture_counts(bad)


def which(batch: np.ndarray) -> np.ndarray:
    return batch[:, 0] // 1000  # dataset id from the window contents


def test_weights_are_honoured_exactly_and_each_dataset_cycles(datasets):
    loader = MixtureLoader(datasets, [0.6, 0.3, 0.1], global_batch=10, seed=3)
    rows = np.concatenate([loader.next_batch() for _ in range(50)])  # 500 rows
    ds, ids = which(rows), rows[:, 0] % 1000
    assert np.array_equal(np.bincount(ds), [300, 150, 50])
    for step in range(50):  # every batch: exactly 6 / 3 / 1
        assert np.array_equal(np.bincount(ds[step * 10 : (step + 1) * 10], minlength=3), [6, 3, 1])
    for d, n in enumerate([37, 11, 5]):  # each epoch of each dataset visits every window once
        seen = ids[ds == d]
        for e in range(seen.size // n):
            assert sorted(seen[e * n : (e + 1) * n]) == list(range(n))
    assert np.array_equal(loader.counts(), [300, 150, 50])
    assert loader.epochs == pytest.approx([300 / 37, 150 / 11, 50 / 5])
    _, src = MixtureLoader(datasets, [2, 1, 1], global_batch=8).next_batch_with_sources()
    assert np.array_equal(np.bincount(src, minlength=3), [4, 2, 2])


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_independent_of_world_size(datasets, world):
    def run(rank, w):
        loader = MixtureLoader(datasets, [5, 3, 2], global_batch=8, rank=rank, world_size=w, seed=1)
        return [loader.next_batch() for _ in range(12)]
    one = run(0, 1)
    parts = [run(r, world) for r in range(world)]
    for step in range(12):
        assert np.array_equal(np.concatenate([p[step] for p in parts]), one[step])


def test_resume_is_exact_across_world_sizes_and_batch_sizes(datasets):
    ref = MixtureLoader(datasets, [0.5, 0.25, 0.25], global_batch=8, seed=7)
    batches = [ref.next_batch() for _ in range(20)]
    first = MixtureLoader(datasets, [0.5, 0.25, 0.25], global_batch=8, seed=7)
    for _ in range(9):
        first.next_batch()
    state = first.state_dict()
    assert state["position"] == 72
    halves = []
    for rank in range(2):
        resumed = MixtureLoader(datasets, [0.5, 0.25, 0.25], global_batch=8, rank=rank,
                                world_size=2, seed=7)
        resumed.load_state_dict(dict(state))
        halves.append([resumed.next_batch() for _ in range(11)])
    for k in range(11):
        assert np.array_equal(np.concatenate([halves[0][k], halves[1][k]]), batches[9 + k])
    bigger = MixtureLoader(datasets, [0.5, 0.25, 0.25], global_batch=16, seed=7)
    bigger.load_state_dict(state)  # a schedule that doubles the batch continues the stream
    assert np.array_equal(bigger.next_batch(), np.concatenate(batches[9:11]))


def test_resume_refuses_a_different_mixture(datasets, tmp_path):
    loader = MixtureLoader(datasets, [1, 1, 1], global_batch=6)
    state = loader.state_dict()
    for kwargs, msg in (({"weights": [2, 1, 1]}, "mixture weights"),
                        ({"seed": 5}, "seed"),
                        ({"shuffle": False}, "shuffle")):
        other = MixtureLoader(datasets, kwargs.pop("weights", [1, 1, 1]), global_batch=6, **kwargs)
        with pytest.raises(ValueError, match=msg):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        loader.load_state_dict({"position": 3})


def test_bad_mixtures_are_clear_errors(datasets, tmp_path):
    other_len = make_dataset(tmp_path / "w", 4, 0, window=7)
    other_tok = make_dataset(tmp_path / "t", 4, 0, tok_hash=HASH_B)
    with pytest.raises(ShardError, match="share one seq_len"):
        MixtureLoader([datasets[0], other_len], [1, 1], global_batch=2)
    with pytest.raises(ShardError, match="one tokenizer"):
        MixtureLoader([datasets[0], other_tok], [1, 1], global_batch=2)
    with pytest.raises(ValueError, match="2 datasets but 1 weights"):
        MixtureLoader(datasets[:2], [1], global_batch=2)
    with pytest.raises(ValueError, match="divisible"):
        MixtureLoader(datasets, [1, 1, 1], global_batch=3, world_size=2)
