"""Recipe schema, normalization and MinHash units of the curation pipeline."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmfab.data.curate import load_recipe, recipe_from_dict
from lmfab.data.curate.dedup import candidate_pairs, exact_groups
from lmfab.data.curate.minhash import MinHasher, agreement
from lmfab.data.curate.text import normalize, normalize_reference
from lmfab.data.errors import DataConfigError
from tests.test_curate_pipeline import REPO


def test_recipe_strict_and_overrides(tmp_path):
    path = REPO / "configs" / "data" / "slimpajama-original.yaml"
    r = load_recipe(path, ["read.inputs=[a, b]", f"write.output={tmp_path}",
                           "near_dedup.bands=8", "mix.weights={Books: 2}"])
    assert r.read.inputs == ["a", "b"] and r.near_dedup.bands == 8
    assert r.mix.weights == {"Books": 2.0} and r.stages()[-1] == "write"
    with pytest.raises(DataConfigError, match=r"near_dedup\.row: unknown key.*did you mean 'rows'"):
        load_recipe(path, [f"write.output={tmp_path}", "near_dedup.row=3"])
    with pytest.raises(DataConfigError, match="bands x rows = 130 exceeds num_perm=128"):
        load_recipe(path, [f"write.output={tmp_path}", "read.inputs=[x]", "near_dedup.bands=10"])
    with pytest.raises(DataConfigError, match=r"write\.output: expected a string"):
        load_recipe(path, ["read.inputs=[x]"])
    with pytest.raises(DataConfigError, match=r"filter\.filters\[0\]: unknown filter"):
        recipe_from_dict({"read": {"inputs": ["x"]}, "write": {"output": "o"},
                          "filter": {"filters": ["nope"]}})
    with pytest.raises(DataConfigError, match=r"mix\.weights\.A: expected a number"):
        recipe_from_dict({"read": {"inputs": ["x"]}, "write": {"output": "o"},
                          "mix": {"weights": {"A": "x"}}})


def test_cli_turns_a_bad_recipe_into_one_message(tmp_path, capsys):
    from lmfab.cli import main

    path = REPO / "configs" / "data" / "default.yaml"
    rc = main(["data", "curate", str(path), "--set", f"write.output={tmp_path}",
               "--set", "near_dedup.row=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"lmfab: error: {path}: near_dedup.row: unknown key")
    rc = main(["data", "curate", str(tmp_path / "missing.yaml")])
    assert rc == 2 and "missing.yaml: file not found" in capsys.readouterr().err


def test_steps_count_per_source_and_stage():
    from lmfab.data.curate.steps import WorkDoc, build_steps

    r = recipe_from_dict({"read": {"inputs": ["x"]}, "write": {"output": "o"},
                          "clean": {}, "filter": {"min_chars": 5}})
    read, clean, filt = build_steps(r)
    docs = [("A", "Cafe\u0301 au lait"), ("A", "tiny"), ("B", "long enough text")]
    kept = []
    for source, text in docs:
        d = WorkDoc(source, text, len(text.encode("utf-8")))
        if read(d) and clean(d) and filt(d):
            kept.append(d)
    assert [d.text for d in kept] == ["Caf\u00e9 au lait", "long enough text"]  # NFC, 1 byte less
    assert kept[0].norm == "café au lait"
    assert read.counts() == {"A": [2, 18, 2, 18], "B": [1, 16, 1, 16]}
    assert clean.counts() == {"A": [2, 18, 2, 17], "B": [1, 16, 1, 16]}
    assert filt.counts() == {"A": [2, 17, 1, 13], "B": [1, 16, 1, 16]}
    bare = build_steps(recipe_from_dict({"read": {"inputs": ["x"]}, "write": {"output": "o"}}))
    d = WorkDoc("A", "x", 1)
    assert all(step(d) for step in bare) and d.norm == ""
    assert [step.counts() for step in bare[1:]] == [{}, {}]  # absent stages count nothing


def test_normalize_matches_slimpajama_formula():
    rng = random.Random(0)
    alphabet = "aZ9 \t\n\r\x0b\x0c\x1c\x85\u00a0\u2028\u3000.,!?'\"-_()[]{}éÉİK\u212aﬁ\u0301مرحبا🙂"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert normalize(text) == normalize_reference(text)


def _jaccard(a: str, b: str, n: int = 13) -> float:
    sa = {a[i : i + n] for i in range(len(a) - n + 1)}
    sb = {b[i : i + n] for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


@pytest.mark.parametrize("hashing", ["one_permutation", "permutations"])
def test_minhash_estimates_jaccard(hashing):
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(2000)]
    base = " ".join(rng.choice(words) for _ in range(600))
    docs = [base]
    for frac in (0.02, 0.05, 0.1, 0.3):
        w = base.split(" ")
        docs.append(" ".join(x if rng.random() > frac else rng.choice(words) for x in w))
    mh = MinHasher(hashing=hashing)
    sig = mh.signatures(docs)
    est = agreement(sig, np.zeros(4, dtype=np.int64), np.arange(1, 5))
    true = np.array([_jaccard(base, d) for d in docs[1:]])
    assert np.abs(est - true).max() < 0.12, (est, true)
    # the same text gives the same signature in any batch; short texts are one feature
    again = mh.signatures(["short", docs[2], "", "short"])
    assert (again[1] == sig[2]).all() and (again[0] == again[3]).all()
    assert (again[0] != again[2]).any()


def test_band_keys_and_candidates():
    mh = MinHasher()
    rng = random.Random(2)
    a = "".join(rng.choice("abcdefghij ") for _ in range(3000))
    b = a[:1500] + "Z" + a[1501:]
    sig = mh.signatures([a, b, a[::-1]])
    bands = mh.band_keys(sig)
    assert bands.shape == (3, 9)
    pairs = candidate_pairs(bands)
    assert pairs.tolist() == [[0, 1]]
    keys = np.array([[1, 2], [3, 4], [1, 2], [3, 4], [5, 6]], dtype=np.uint64)
    assert exact_groups(keys).tolist() == [0, 1, 0, 1, 4]


def test_parquet_and_text_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lmfab.data.curate import curate
    from tests.test_curate_pipeline import decoded_rows

    table = pa.table({"text": ["first parquet doc", None, "third"],
                      "meta": [{"id": "p1", "redpajama_set_name": "Pq"}, None, None]})
    pq.write_table(table, tmp_path / "in.parquet")
    (tmp_path / "notes.txt").write_text("a text file")
    r = recipe_from_dict({"read": {"inputs": [str(tmp_path / "in.parquet"),
                                              str(tmp_path / "notes.txt")]},
                          "write": {"output": str(tmp_path / "o")}})
    stats = curate(r, workers=1, progress=False)
    rows = decoded_rows(tmp_path / "o", "train")
    assert [x["text"] for x in rows] == ["first parquet doc", "third", "a text file"]
    assert rows[0]["meta"] == {"id": "p1", "redpajama_set_name": "Pq"}
    assert stats["rejects"] == 1 and "in.parquet:2" in (tmp_path / "o" / "rejects.txt").read_text()
