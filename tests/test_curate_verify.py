"""near_dedup.verify: exact -- candidate pairs checked by their true character-n-gram Jaccard."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmfab.data.curate import curate, recipe_from_dict
from lmfab.data.curate.dedup import intersection_size, near_dedup, verify_exact
from lmfab.data.curate.text import normalize
from tests.test_curate_pipeline import WORDS, _doc, read_output

# -- units: the verification logic on hand-made sets -----------------------------------------


def _sets(*ranges: tuple[int, int]):
    arrays = [np.arange(a, b, dtype=np.uint64) for a, b in ranges]
    calls = []

    def load(rows):
        calls.append(np.asarray(rows).tolist())
        return lambda i: arrays[i]

    return load, calls


def test_exact_rejects_what_signatures_accept():
    # one LSH bucket; 0 and 1 have equal signatures but J = 50/150; 0 and 2 have J = 1
    bands = np.array([[7, 1], [7, 2], [7, 3]], dtype=np.uint64)
    sig = np.array([[5] * 8, [5] * 8, [6] * 8], dtype=np.uint32)
    labels, _ = near_dedup(bands, sig, verify="signature", threshold=0.8)
    assert labels[0] == labels[1] != labels[2]  # signature agreement merges a J=0.33 pair
    load, calls = _sets((0, 100), (50, 150), (0, 100))
    labels, info = near_dedup(bands, None, verify="exact", threshold=0.8, load_sets=load)
    assert labels[0] == labels[2] != labels[1]
    assert calls == [[0, 1, 2]] and info["candidate_pairs"] == 3
    assert info["verified_pairs"] == 1 and info["exact_candidate_docs"] == 3


def test_exact_chain_size_bound_and_skips():
    # A-B and B-C have J = 90/110 = 0.82, A-C 80/120 = 0.67: one component through B (the
    # truth's definition: components of pairs >= threshold); D is too small to reach 0.8
    load, _ = _sets((0, 100), (10, 110), (20, 120), (0, 10))
    pairs = np.array(list(itertools.combinations(range(4), 2)), dtype=np.int64)
    kept, info = verify_exact(pairs, load(np.arange(4)), 0.8)
    assert kept.tolist() == [[0, 1], [1, 2]]
    assert info["exact_rejected_by_size"] == 3 and info["exact_intersections"] == 3
    bands = np.array([[1], [1], [1], [1]], dtype=np.uint64)
    labels, _ = near_dedup(bands, verify="exact", threshold=0.8, load_sets=load)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    # an already linked pair is not intersected again
    load, _ = _sets((0, 100), (0, 100), (0, 100))
    kept, info = verify_exact(np.array([[0, 1], [0, 2], [1, 2]]), load(np.arange(3)), 0.8)
    assert len(kept) == 2 and info["exact_skipped_linked"] == 1
    a, b = np.array([1, 3, 5, 9], dtype=np.uint64), np.array([2, 3, 9, 10], dtype=np.uint64)
    assert intersection_size(a, b) == 2 and intersection_size(a, b[:0]) == 0


def test_verify_setting_parses():
    base = {"read": {"inputs": ["x"]}, "write": {"output": "o"}}
    for value, mode in ((False, "none"), (True, "signature"), ("signature", "signature"),
                        ("exact", "exact")):
        r = recipe_from_dict({**base, "near_dedup": {"verify": value}})
        assert r.near_dedup.verify_mode() == mode
    with pytest.raises(Exception, match="near_dedup.verify"):
        recipe_from_dict({**base, "near_dedup": {"verify": "exakt"}})
    from lmfab.data.curate import load_recipe
    from tests.test_curate_pipeline import REPO

    r = load_recipe(REPO / "configs" / "data" / "default.yaml",
                    ["read.inputs=[x]", "write.output=o"])
    assert r.near_dedup.verify_mode() == "exact" and (r.near_dedup.bands, r.near_dedup.rows) == (16, 8)
    # SlimPajama's own parameters stay a named recipe; the default differs only in near_dedup
    o = load_recipe(REPO / "configs" / "data" / "slimpajama-original.yaml",
                    ["read.inputs=[x]", "write.output=o"])
    nd = o.near_dedup
    assert (nd.ngram, nd.num_perm, nd.bands, nd.rows, nd.verify_mode()) == (13, 128, 9, 13, "none")
    assert o.filter.min_chars == 200 and o.clean.normalization == "NFC"
    assert o.stages() == r.stages() and all(
        getattr(o, s) == getattr(r, s) for s in o.stages() if s != "near_dedup")


# -- end to end: planted near-duplicates, decoys just below the threshold, a chain -----------


def _grams(text: str, n: int = 13) -> set[str]:
    t = normalize(text)
    return {t[i : i + n] for i in range(len(t) - n + 1)}


def _change(rng: random.Random, text: str, positions: list[int]) -> str:
    words = text.split(" ")
    for i in positions:
        words[i] = rng.choice([w for w in WORDS[:80] if w != words[i]])
    return " ".join(words)


def _make(root: Path) -> tuple[list[str], list[str], set[frozenset]]:
    """Documents, ids and the true clusters (components of pairs with exact J >= 0.8)."""
    rng = random.Random(5)
    texts, ids = [], []
    for g in range(8):  # near-duplicates: 4 of 300 words changed (J ~0.9)
        base = _doc(rng, 300)
        texts += [base, _change(rng, base, rng.sample(range(300), 4))]
        ids += [f"near{g}-0", f"near{g}-1"]
    for g in range(8):  # decoys: 28 of 300 words changed (J ~0.6-0.75): candidates, not dups
        base = _doc(rng, 300)
        texts += [base, _change(rng, base, rng.sample(range(300), 28))]
        ids += [f"decoy{g}-0", f"decoy{g}-1"]
    for g in range(3):  # chains: A -> B (10 words of the first half), B -> C (second half)
        a = _doc(rng, 300)
        b = _change(rng, a, rng.sample(range(150), 10))
        c = _change(rng, b, rng.sample(range(150, 300), 10))
        texts += [a, b, c]
        ids += [f"chain{g}-a", f"chain{g}-b", f"chain{g}-c"]
    for u in range(10):
        texts.append(_doc(rng, 300))
        ids.append(f"u{u}")
    order = list(range(len(texts)))
    rng.shuffle(order)
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs.jsonl").write_text("".join(
        json.dumps({"text": texts[i], "meta": {"id": ids[i]}}) + "\n" for i in order))
    grams = [_grams(t) for t in texts]
    parent = list(range(len(texts)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    jac = {}
    for i, j in itertools.combinations(range(len(texts)), 2):
        jac[ids[i], ids[j]] = len(grams[i] & grams[j]) / len(grams[i] | grams[j])
        if jac[ids[i], ids[j]] >= 0.8:
            parent[find(j)] = find(i)
    comps: dict[int, set] = {}
    for i in range(len(texts)):
        comps.setdefault(find(i), set()).add(ids[i])
    # the corpus is what it claims to be
    for g in range(8):
        assert jac[f"near{g}-0", f"near{g}-1"] >= 0.85
        assert 0.55 < jac[f"decoy{g}-0", f"decoy{g}-1"] < 0.78
    for g in range(3):
        assert jac[f"chain{g}-a", f"chain{g}-b"] >= 0.8 and jac[f"chain{g}-b", f"chain{g}-c"] >= 0.8
        assert jac[f"chain{g}-a", f"chain{g}-c"] < 0.8
    return texts, ids, {frozenset(c) for c in comps.values() if len(c) > 1}


def _recipe(root: Path, out: Path, verify) -> object:
    # 32 x 4 bands: candidates from J ~0.5 up, so the decoys are LSH candidates
    return recipe_from_dict({
        "read": {"inputs": [str(root)], "task_mb": 0.05, "block_lines": 5},
        "filter": {}, "exact_dedup": {},
        "near_dedup": {"verify": verify, "bands": 32, "rows": 4, "batch_docs": 8},
        "write": {"output": str(out), "shard_docs": 20},
    })


def _clusters(out: Path) -> set[frozenset]:
    rows = [json.loads(x) for x in (out / "near_dedup" / "clusters.jsonl").read_text().split("\n")
            if x]
    return {frozenset(r["ids"]) for r in rows}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    _, _, truth = _make(base / "corpus")
    return base, truth


def test_exact_verify_finds_exactly_the_true_clusters(planted):
    base, truth = planted
    assert len(truth) == 8 + 3  # near pairs and chains; no decoy
    curate(_recipe(base / "corpus", base / "none", False), workers=1, progress=False)
    loose = _clusters(base / "none")
    assert loose != truth and any(any(i.startswith("decoy") for i in c) for c in loose)
    out = base / "exact"
    stats = curate(_recipe(base / "corpus", out, "exact"), workers=1, progress=False)
    assert _clusters(out) == truth
    info = stats["dedup"]
    assert info["verified_pairs"] == 8 + 2 * 3 and info["candidate_pairs"] > info["verified_pairs"]
    assert not (out / "_work" / "verify").exists()  # the n-gram sets are removed when done


def test_exact_verify_is_identical_across_workers_and_resume(planted, monkeypatch):
    base, _ = planted
    ref = base / "exact"
    out2 = base / "exact-w2"
    curate(_recipe(base / "corpus", out2, "exact"), workers=2, progress=False)
    assert read_output(out2) == read_output(ref)
    assert (out2 / "near_dedup" / "clusters.jsonl").read_bytes() == (
        ref / "near_dedup" / "clusters.jsonl").read_bytes()
    # killed inside the dedup phase, after the n-gram sets were written: resume
    import lmfab.data.curate.dedup as D

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    out3 = base / "exact-resumed"
    with monkeypatch.context() as m:
        m.setattr(D, "verify_exact", killed)
        with pytest.raises(KeyboardInterrupt):
            curate(_recipe(base / "corpus", out3, "exact"), workers=1, progress=False)
    assert list((out3 / "_work" / "verify").glob("*.done"))
    assert not (out3 / "_work" / "dedup.done").exists()
    curate(_recipe(base / "corpus", out3, "exact"), workers=1, progress=False)
    assert read_output(out3) == read_output(ref)
    assert (out3 / "near_dedup" / "clusters.jsonl").read_bytes() == (
        ref / "near_dedup" / "clusters.jsonl").read_bytes()
