"""SIGKILL inside each curation stage, ``data pack`` and ``data tokenizer train``: the re-run
finishes, its output equals an uninterrupted run's byte for byte, and no document is lost
or duplicated.

Kills come from fault points between two tasks of a stage or just before a phase's done
marker (``curate.task``, ``curate.phase``, ``pack.encode``, ``pack.write``), and, in the full
campaign, at seeded random moments of the whole command.
"""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
import zstandard

from lmfab.data.prep.readers import iter_documents

from ..conftest import REPO, SAMPLE
from .conftest import SEED, Proc, lmfab

RECIPE = REPO / "configs" / "data" / "default.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three jsonl files of ~80 documents each cut from the shipped sample, with exact and
    near duplicates across files; every document carries a unique label in meta."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    paras = []
    for doc in iter_documents([str(SAMPLE / "books.jsonl.zst")]):
        buf = ""
        for para in doc.text.split("\n\n"):
            buf += para + "\n\n"
            if len(buf) > 600:
                paras.append(buf.strip())
                buf = ""
        if len(paras) > 400:
            break
    docs = paras[:240]
    docs += [docs[rng.randrange(240)] for _ in range(12)]  # exact copies
    for _ in range(12):  # near copies: one word changed
        words = docs[rng.randrange(240)].split(" ")
        words[rng.randrange(len(words))] = "changed"
        docs.append(" ".join(words))
    rng.shuffle(docs)
    for f in range(3):
        with open(root / f"part{f}.jsonl", "w") as out:
            for k, text in enumerate(docs[f::3]):
                out.write(json.dumps({"text": text, "meta": {"label": f"f{f}-{k}"}}) + "\n")
    return root


def _curate_cmd(corpus, out, workers=1):
    return lmfab("data", "curate", str(RECIPE), "--workers", str(workers),
                 "--set", f"read.inputs=[{corpus}]", "--set", f"write.output={out}",
                 "--set", "read.task_mb=0.02", "--set", "write.shard_docs=40",
                 "--set", "split.holdout_fraction=0.1")


def _read_zst(path):
    data = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 30)
    return [json.loads(x) for x in data.decode().splitlines()]


def _outputs(out):
    """Every output file but the scratch, and stats.json less its timings and worker count:
    {relative path: bytes}."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and rel.parts[0] != "_work" and rel.name != "stats.json":
            files[str(rel)] = p.read_bytes()
    stats = json.loads((out / "stats.json").read_text())
    for key in ("wall_seconds", "cpu_seconds", "executor"):  # timings, the worker count
        stats.pop(key, None)
    files["stats.json"] = json.dumps(stats, sort_keys=True).encode()
    return files


def _labels(out):
    return [d["meta"]["label"] for split in ("train", "holdout")
            for part in sorted((out / split).glob("*.jsonl.zst")) for d in _read_zst(part)]


@pytest.fixture(scope="module")
def curated(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "ref"
    p = Proc(_curate_cmd(corpus, out), out.parent, "ref")
    assert p.wait(300) == 0, p.text()[-3000:]
    labels = _labels(out)
    assert len(labels) == len(set(labels)) > 200  # the dedup removed the copies, once each
    return _outputs(out), labels


CURATE_POINTS = [("curate.task", "map_task", 5), ("curate.task", "shingle_task", 1),
                 ("curate.phase", "dedup", 1), ("curate.phase", "plan", 1),
                 ("curate.task", "scatter_task", 5), ("curate.task", "gather_task", 2)]
FAST_POINTS = {"scatter_task"}


def _resume_equal(cmd, out, tmp_path, reference, labels):
    p = Proc(cmd, tmp_path, "rerun")
    assert p.wait(300) == 0, p.text()[-3000:]
    got = _outputs(out)
    assert got.keys() == reference.keys()
    assert [k for k in got if got[k] != reference[k]] == []
    assert _labels(out) == labels  # none lost, none twice


@pytest.mark.slow
@pytest.mark.parametrize("point,stage,after", [
    pytest.param(*x, marks=() if x[1] in FAST_POINTS else pytest.mark.faults_full)
    for x in CURATE_POINTS])
def test_curate_killed_in_a_stage_resumes_to_the_same_output(point, stage, after, corpus,
                                                             curated, tmp_path):
    out = tmp_path / "out"
    cmd = _curate_cmd(corpus, out)
    p = Proc(cmd, tmp_path, "killed", LMFAB_FAULT=f"{point}[stage={stage},after={after}]:kill")
    assert p.wait(300) == -signal.SIGKILL, p.text()[-3000:]
    assert not (out / "stats.json").exists()
    _resume_equal(cmd, out, tmp_path, *curated)


@pytest.mark.slow
@pytest.mark.faults_full
@pytest.mark.parametrize("trial", range(8))
def test_curate_killed_at_random_resumes_to_the_same_output(trial, corpus, curated, tmp_path):
    rng = random.Random(SEED * 1000 + trial)
    out = tmp_path / "out"
    workers = 2 if trial % 2 else 1  # also the process pool: the kill takes its workers too
    cmd = _curate_cmd(corpus, out, workers)
    for k in range(rng.choice((1, 2))):
        p = Proc(cmd, tmp_path, f"killed{k}")
        # after the imports (~the first progress line), a random moment of the stages
        assert _wait_line(p, "curate:", 120)
        time.sleep(rng.uniform(0, 1.5))
        p.kill()
        p.wait(60)
    _resume_equal(cmd, out, tmp_path, *curated)


def _wait_line(p: Proc, text: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in p.err.read_text() or p.p.poll() is not None:
            return True
        time.sleep(0.01)
    return False


# ---- data pack and tokenizer train -------------------------------------------------------

def _pack_cmd(corpus, tok, out):
    return lmfab("data", "pack", "--input", str(corpus), "--tokenizer", str(tok), "--out",
                 str(out), "--seq-len", "32,64", "--processes", "1", "--shard-tokens", "20000",
                 "--doc-index")


def _pack_outputs(out):
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and "work" not in p.relative_to(out).parts:
            data = p.read_bytes()
            if p.name.endswith(".json"):
                obj = json.loads(data)
                obj.pop("created", None)
                data = json.dumps(obj, sort_keys=True).encode()
            files[str(p.relative_to(out))] = data
    return files


@pytest.fixture(scope="module")
def packed(corpus, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "ref"
    p = Proc(_pack_cmd(corpus, tiny_data / "tokenizer.json", out), out.parent, "ref")
    assert p.wait(300) == 0, p.text()[-3000:]
    return _pack_outputs(out)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [
    "pack.encode[file=f00001]:kill",
    pytest.param("pack.write[file=1]:kill", marks=pytest.mark.faults_full),
    pytest.param("random", marks=pytest.mark.faults_full)])
def test_pack_killed_resumes_to_the_same_shards(fault, corpus, tiny_data, packed, tmp_path):
    out = tmp_path / "out"
    cmd = _pack_cmd(corpus, tiny_data / "tokenizer.json", out)
    if fault == "random":
        for k in range(4):
            p = Proc(cmd, tmp_path, f"killed{k}")
            assert _wait_line(p, "[pack]", 120)
            time.sleep(random.Random(SEED + k).uniform(0, 0.8))
            p.kill()
            p.wait(60)
    else:
        p = Proc(cmd, tmp_path, "killed", LMFAB_FAULT=fault)
        assert p.wait(300) == -signal.SIGKILL, p.text()[-3000:]
        assert not (out / "pack.json").exists()
    p = Proc(cmd, tmp_path, "rerun")
    assert p.wait(300) == 0, p.text()[-3000:]
    got = _pack_outputs(out)
    assert got.keys() == packed.keys()
    assert [k for k in got if got[k] != packed[k]] == []
    meta = json.loads(got["seq32/meta.json"])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 264


def _tok_cmd(corpus, out):
    return lmfab("data", "tokenizer", "train", "--input", str(corpus), "--out", str(out),
                 "--vocab-size", "400")


@pytest.mark.slow
@pytest.mark.faults_full
@pytest.mark.parametrize("trial", range(5))
def test_tokenizer_train_killed_reruns_to_the_same_file(trial, corpus, tmp_path):
    ref = tmp_path / "ref.json"
    p = Proc(_tok_cmd(corpus, ref), tmp_path, "ref")
    t0 = time.monotonic()
    assert p.wait(300) == 0, p.text()[-3000:]
    took = time.monotonic() - t0
    out = tmp_path / "tok.json"
    p = Proc(_tok_cmd(corpus, out), tmp_path, "killed")
    time.sleep(random.Random(SEED * 1000 + trial).uniform(0.3, 1.0) * took)
    p.kill()
    p.wait(60)
    assert not out.exists() or out.read_bytes() == ref.read_bytes()  # whole or absent
    p = Proc(_tok_cmd(corpus, out), tmp_path, "rerun")
    assert p.wait(300) == 0, p.text()[-3000:]
    assert out.read_bytes() == ref.read_bytes()
    assert not (tmp_path / "tok.json.tmp").exists()
