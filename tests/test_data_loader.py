"""Runtime loader: determinism, rank slicing, epochs, exact resume, header validation."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from lmfab.data.loader import BatchLoader, TokenDataset, iterate_eval
from lmfab.data.shards import ShardError, write_shard

HASH = hashlib.sha256(b"tok").hexdigest()
OTHER = hashlib.sha256(b"other").hexdigest()
WINDOW = 5
SIZES = (7, 5, 11)  # windows per shard: 23 in all, so batches of 6 straddle epochs
N = sum(SIZES)


def make_split(root, sizes=SIZES, window=WINDOW, hashes=None):
    """Shards whose window g holds tokens g*window .. g*window+window-1 (g = global index)."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        tokens = np.arange(start * window, (start + n) * window)
        write_shard(root / f"shard_{i:05d}.tok", tokens, window, (hashes or {}).get(i, HASH))
        start += n
    return root


def ids(batch):
    """Global window indices of a batch built by make_split."""
    return (batch[:, 0] // WINDOW).tolist()


@pytest.fixture
def ds(tmp_path):
    return TokenDataset(make_split(tmp_path / "train"), window=WINDOW, tokenizer_hash=HASH)


def test_dataset_basics(ds):
    assert len(ds) == ds.n_windows == N
    assert ds.window == WINDOW and ds.tokenizer_hash == HASH and ds.seq_len == WINDOW - 1
    got = ds.get(np.array([0, 6, 7, 12, 22, 3, 12]))
    assert got.dtype == np.int64 and got.shape == (7, WINDOW)
    assert ids(got) == [0, 6, 7, 12, 22, 3, 12]
    np.testing.assert_array_equal(got[1], np.arange(6 * WINDOW, 7 * WINDOW))
    assert ds.get(np.array([], dtype=np.int64)).shape == (0, WINDOW)
    with pytest.raises(IndexError):
        ds.get(np.array([N]))


def test_empty_shard_in_the_middle(tmp_path):
    d = TokenDataset(make_split(tmp_path / "s", sizes=(3, 0, 4)))
    assert len(d) == 7 and ids(d.get(np.arange(7))) == list(range(7))


def batches(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def test_deterministic_and_seeded(ds):
    a = batches(BatchLoader(ds, global_batch=6, seed=1), 8)
    b = batches(BatchLoader(ds, global_batch=6, seed=1), 8)
    c = batches(BatchLoader(ds, global_batch=6, seed=2), 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].shape == (6, WINDOW) and a[0].dtype == np.int64


def test_no_shuffle_is_sequential(ds):
    loader = BatchLoader(ds, global_batch=6, shuffle=False)
    flat = sum((ids(b) for b in batches(loader, 5)), [])
    assert flat == [p % N for p in range(30)]


@pytest.mark.parametrize("world_size", [2, 3, 6])
def test_ranks_partition_the_global_batch(ds, world_size):
    steps = 9  # 54 positions: crosses two epoch boundaries (23, 46)
    single = batches(BatchLoader(ds, global_batch=6, seed=3), steps)
    ranks = [
        batches(BatchLoader(ds, global_batch=6, rank=r, world_size=world_size, seed=3), steps)
        for r in range(world_size)
    ]
    for k in range(steps):
        assert ranks[0][k].shape == (6 // world_size, WINDOW)
        np.testing.assert_array_equal(np.concatenate([r[k] for r in ranks]), single[k])


def test_each_epoch_visits_every_window_once(ds):
    loader = BatchLoader(ds, global_batch=6, seed=5)
    flat = sum((ids(b) for b in batches(loader, 12)), [])  # 72 positions > 3 epochs
    for e in range(3):
        assert sorted(flat[e * N : (e + 1) * N]) == list(range(N))
    assert flat[:N] != flat[N : 2 * N]  # a fresh permutation each epoch
    assert loader.epoch == pytest.approx(72 / N)


def test_epoch_order_matches_the_documented_rule(ds):
    loader = BatchLoader(ds, global_batch=6, seed=9)
    flat = sum((ids(b) for b in batches(loader, 8)), [])
    expected = [int(np.random.default_rng([9, p // N]).permutation(N)[p % N]) for p in range(48)]
    assert flat == expected


def test_global_batch_larger_than_dataset(ds):
    loader = BatchLoader(ds, global_batch=50, seed=0)
    flat = ids(loader.next_batch())
    assert sorted(flat[:N]) == list(range(N)) and sorted(flat[N : 2 * N]) == list(range(N))


def test_resume_is_exact(ds):
    full = batches(BatchLoader(ds, global_batch=6, seed=4), 10)
    first = BatchLoader(ds, global_batch=6, seed=4)
    head = batches(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state == {"position": 24, "seed": 4, "n_windows": N, "shuffle": True}
    resumed = BatchLoader(ds, global_batch=6, seed=4)
    resumed.load_state_dict(state)
    tail = batches(resumed, 6)
    for x, y in zip(head + tail, full, strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_on_more_ranks(ds):
    full = batches(BatchLoader(ds, global_batch=6, seed=4), 7)
    first = BatchLoader(ds, global_batch=6, seed=4)
    batches(first, 3)
    state = first.state_dict()
    ranks = []
    for r in range(2):
        loader = BatchLoader(ds, global_batch=6, rank=r, world_size=2, seed=4)
        loader.load_state_dict(state)
        ranks.append(batches(loader, 4))
    for k in range(4):
        np.testing.assert_array_equal(np.concatenate([ranks[0][k], ranks[1][k]]), full[3 + k])


def test_load_state_dict_rejects_a_different_order(ds, tmp_path):
    state = BatchLoader(ds, global_batch=6, seed=4).state_dict()
    with pytest.raises(ValueError, match="seed=4.*seed=5"):
        BatchLoader(ds, global_batch=6, seed=5).load_state_dict(state)
    other = TokenDataset(make_split(tmp_path / "other", sizes=(3,)))
    with pytest.raises(ValueError, match="n_windows=23.*n_windows=3"):
        BatchLoader(other, global_batch=6, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        BatchLoader(ds, global_batch=6, seed=4, shuffle=False).load_state_dict(state)


def test_loader_argument_errors(ds):
    with pytest.raises(ValueError, match="not divisible by world_size=4"):
        BatchLoader(ds, global_batch=6, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, global_batch=6, rank=2, world_size=2)


def test_iterate_eval(ds):
    whole = list(iterate_eval(ds, batch=6, max_batches=None))
    assert [ids(b) for b in whole] == [list(range(k * 6, k * 6 + 6)) for k in range(3)]
    capped = list(iterate_eval(ds, batch=6, max_batches=2))
    n = len(ds) // 6  # the cap takes batches spread over the split, not its first two
    assert n > 2 and len(capped) == 2
    assert np.array_equal(capped[0], whole[0]) and np.array_equal(capped[1], whole[n // 2])
    assert len(list(iterate_eval(ds, batch=6, max_batches=10 * n))) == n
    r0 = list(iterate_eval(ds, batch=6, max_batches=None, rank=0, world_size=2))
    r1 = list(iterate_eval(ds, batch=6, max_batches=None, rank=1, world_size=2))
    assert len(r0) == len(r1) == 3
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([r0[k], r1[k]]), whole[k])
        assert not set(ids(r0[k])) & set(ids(r1[k]))
    with pytest.raises(ValueError, match="fewer than one eval batch"):
        list(iterate_eval(ds, batch=24, max_batches=None))


def test_window_mismatch_is_clear(tmp_path):
    split = make_split(tmp_path / "train")
    with pytest.raises(
        ShardError,
        match=r"shard_00000\.tok: seq_len mismatch: shards were packed "
        r"with seq_len=4 \(window 5\) but the config asks for "
        r"seq_len=7",
    ):
        TokenDataset(split, window=8)


def test_tokenizer_mismatch_is_clear(tmp_path):
    split = make_split(tmp_path / "train")
    with pytest.raises(ShardError, match=f"tokenizer mismatch.*{HASH}.*{OTHER}"):
        TokenDataset(split, tokenizer_hash=OTHER)


def test_shards_that_disagree(tmp_path):
    split = make_split(tmp_path / "a", hashes={2: OTHER})
    with pytest.raises(ShardError, match=r"shard_00002\.tok: tokenizer hash"):
        TokenDataset(split)
    b = make_split(tmp_path / "b", sizes=(2,))
    write_shard(b / "shard_00001.tok", np.arange(12), 6, HASH)
    with pytest.raises(ShardError, match=r"shard_00001\.tok: window 6 \(seq_len=5\) differs"):
        TokenDataset(b)


def test_missing_or_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        TokenDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no token shards \(\*\.tok\)"):
        TokenDataset(tmp_path / "empty")


def test_a_token_id_past_the_vocabulary_is_refused_naming_shard_and_window(tmp_path):
    # tokens are g*5 .. g*5+4 for window g: with a vocabulary of 60, windows 0-11 are in
    # range and window 12 (ids 60-64, the first window of the third shard) is not
    split = make_split(tmp_path / "train")
    ds = TokenDataset(split, window=WINDOW, tokenizer_hash=HASH, vocab_size=60)
    assert ds.get(np.arange(12)).max() == 59
    with pytest.raises(ShardError, match=r"shard_00002\.tok: window 0 holds token id 60 "
                                         r"\(position 0\), not below model\.vocab_size=60"):
        ds.get(np.array([3, 12, 1]))
    # without a vocabulary (the data tools) nothing is checked
    assert TokenDataset(split, window=WINDOW, tokenizer_hash=HASH).get(np.array([12])).max() == 64
