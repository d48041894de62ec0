"""End-to-end curation: planted near-duplicates, rejects, stats, resume, worker invariance, no torch."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from lmfab.data.curate import curate, recipe_from_dict
from lmfab.data.curate import tasks as K

REPO = Path(__file__).resolve().parents[1]
WORDS = ["".join(random.Random(i).choice("abcdefghijklmnop") for _ in range(3 + i % 6))
         for i in range(4000)]


def _doc(rng: random.Random, n_words: int = 400) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _mutate(rng: random.Random, text: str, n: int) -> str:
    """Replace exactly ``n`` words by different words."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = rng.choice([w for w in WORDS[:50] if w != words[i]])
    return " ".join(words)


def make_corpus(root: Path) -> dict:
    """Two sources; 30 planted clusters of 3 near-duplicates (4 of 400 words changed, J ~0.93),
    30 unique documents, 2 exact copies, 3 short documents, 2 bad lines."""
    rng = random.Random(0)
    groups, a, b = [], [], []
    for g in range(30):
        base = _doc(rng)
        members = [base, _mutate(rng, base, 4), _mutate(rng, base, 4)]
        groups.append([f"g{g}-{k}" for k in range(3)])
        for k, text in enumerate(members):
            (a if (g + k) % 2 else b).append({"text": text, "meta": {"id": f"g{g}-{k}"}})
    for u in range(30):
        a.append({"text": _doc(rng), "meta": {"id": f"u{u}"}})
    a.append({"text": a[0]["text"], "meta": {"id": "exact-copy"}})
    b.append({"text": "Too short. " * 5, "meta": {"id": "short"}})
    for name, rows in (("alpha", a), ("beta", b)):
        for r in rows:
            r["meta"]["redpajama_set_name"] = name.capitalize()
    (root / "alpha").mkdir(parents=True)
    (root / "beta").mkdir()
    lines = [json.dumps(r) for r in a]
    lines.insert(5, "{not json")
    (root / "alpha" / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    data = ("\n".join(json.dumps(r) for r in b) + '\n{"meta": {}}\n').encode()
    (root / "beta" / "part-0.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    return {"groups": groups}


def recipe(inputs: list[str], output: Path, **extra) -> object:
    raw = {
        "read": {"inputs": inputs, "task_mb": 0.2, "block_lines": 7},
        "clean": {}, "filter": {"min_chars": 200}, "exact_dedup": {},
        "near_dedup": {"batch_docs": 16},
        "mix": {"weights": {"Beta": 1.5}, "seed": 3},
        "split": {"holdout_fraction": 0.1},
        "write": {"output": str(output), "shard_docs": 25},
    }
    for key, value in extra.items():
        raw[key] = value
    return recipe_from_dict(raw)


def read_output(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.rglob("*.jsonl.zst")) if "_work" not in p.parts}


def decoded_rows(out: Path, split: str) -> list[dict]:
    rows = []
    for p in sorted((out / split).glob("*.jsonl.zst")):
        text = zstandard.ZstdDecompressor().decompress(p.read_bytes(), max_output_size=1 << 30)
        rows += [json.loads(x) for x in text.decode().split("\n") if x]
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> tuple[Path, dict]:
    root, _ = corpus
    out = tmp_path_factory.mktemp("ref") / "out"
    stats = curate(recipe([str(root)], out), workers=1, progress=False)
    return out, stats


def test_planted_near_duplicates(corpus, reference_run):
    _, truth = corpus
    out, stats = reference_run
    clusters = [json.loads(x) for x in (out / "near_dedup" / "clusters.jsonl").read_text().split("\n") if x]
    found = {frozenset(c["ids"]) for c in clusters}
    g0 = set(truth["groups"][0]) | {"exact-copy"}
    expected = {frozenset(g) for g in truth["groups"][1:]} | {frozenset(g0)}
    assert found == expected  # every planted cluster, nothing else merged
    kept_ids = {r["meta"]["id"] for s in ("train", "holdout") for r in decoded_rows(out, s)}
    assert {f"u{u}" for u in range(30)} <= kept_ids
    assert "short" not in kept_ids and "exact-copy" not in kept_ids
    for g in truth["groups"]:
        assert len(kept_ids & set(g)) == 1
    st = stats["stages"]
    assert sum(e["docs_removed"] for e in st["filter"].values()) == 1
    assert sum(e["docs_removed"] for e in st["exact_dedup"].values()) == 1
    assert sum(e["docs_removed"] for e in st["near_dedup"].values()) == 60
    assert stats["rejects"] == 2
    rejects = (out / "rejects.txt").read_text()
    assert "part-0.jsonl:6: bad JSON" in rejects and "part-0.jsonl.zst:" in rejects
    # mix: Beta weight 1.5 -> between 1x and 2x of its documents
    mix = st["mix"]["Beta"]
    assert mix["docs_in"] <= mix["docs_out"] <= 2 * mix["docs_in"]


def test_split_is_decontaminated(reference_run):
    out, stats = reference_run
    from lmfab.data.curate.text import normalize

    train = {normalize(r["text"]) for r in decoded_rows(out, "train")}
    holdout = {normalize(r["text"]) for r in decoded_rows(out, "holdout")}
    assert holdout and not train & holdout
    assert stats["written"]["holdout"]
    assert json.loads((out / "stats.json").read_text())["stages"]["write"]


def test_workers_and_resume_give_identical_output(corpus, reference_run, tmp_path, monkeypatch):
    root, _ = corpus
    ref = read_output(reference_run[0])
    out2 = tmp_path / "two_workers"
    curate(recipe([str(root)], out2), workers=2, progress=False)
    assert read_output(out2) == ref
    # a run killed during the write phase, then resumed
    out3 = tmp_path / "killed"
    real, calls = K.gather_task, []

    def dying(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(K, "gather_task", dying)
    with pytest.raises(KeyboardInterrupt):
        curate(recipe([str(root)], out3), workers=1, progress=False)
    monkeypatch.setattr(K, "gather_task", real)
    # drop one map marker too: that task is redone
    (out3 / "_work" / "map" / "t00001.done").unlink()
    curate(recipe([str(root)], out3), workers=1, progress=False)
    assert read_output(out3) == ref
    assert (out3 / "near_dedup" / "clusters.jsonl").read_bytes() == (
        reference_run[0] / "near_dedup" / "clusters.jsonl").read_bytes()


def test_changed_recipe_refuses_to_resume(corpus, reference_run):
    from lmfab.data.errors import DataConfigError

    root, _ = corpus
    with pytest.raises(DataConfigError, match="different recipe"):
        curate(recipe([str(root)], reference_run[0], filter={"min_chars": 10}), workers=1,
               progress=False)


def test_subset_of_stages(corpus, tmp_path):
    root, truth = corpus
    r = recipe_from_dict({"read": {"inputs": [str(root)]}, "near_dedup": {},
                          "write": {"output": str(tmp_path / "o")}})
    assert r.stages() == ["read", "near_dedup", "write"]
    stats = curate(r, workers=1, progress=False)
    # without the filter the short doc stays; without exact dedup the copy joins cluster 0
    assert sum(e["docs_out"] for e in stats["stages"]["write"].values()) == 30 + 30 + 1
    rows = decoded_rows(tmp_path / "o", "train")
    assert [r["meta"]["id"] for r in rows][:3] == ["g0-1", "g1-0", "g2-1"]  # input order


def test_cli_runs_without_torch(corpus, tmp_path):
    root, _ = corpus
    recipe_path = REPO / "configs" / "data" / "default.yaml"
    code = (
        "import sys; from lmfab.cli import main; "
        f"rc = main(['data', 'curate', {str(recipe_path)!r}, '--workers', '1', "
        f"'--set', 'read.inputs=[{root}]', '--set', 'write.output={tmp_path / 'o'}']); "
        "assert rc == 0, rc; "
        "assert 'torch' not in sys.modules, 'the offline pipeline imported torch'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| **total** |" in res.stdout
    assert (tmp_path / "o" / "stats.json").exists()
