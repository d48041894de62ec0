"""``pack_corpus``: several MSLs from one stream, processes, doc index, resume, robustness."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers

from lmfab.cli import main
from lmfab.data.loader import TokenDataset
from lmfab.data.prep import encode as encode_mod
from lmfab.data.prep.bpe_train import train_tokenizer
from lmfab.data.prep.encode import split_hash
from lmfab.data.prep.pack import EOS_TOKEN, pack_corpus
from lmfab.data.prep.readers import iter_documents
from lmfab.data.shards import open_shard, read_doc_starts, read_header

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "books.jsonl.zst"
ARABIC = "بسم الله الرحمن الرحيم. الحمد لله رب العالمين. هذا نص عربي قصير للاختبار.\n"


def write_jsonl(path: Path, texts: list[str], source: str = "Books") -> Path:
    lines = "".join(
        json.dumps({"text": t, "meta": {"redpajama_set_name": source}}, ensure_ascii=False) + "\n"
        for t in texts
    ).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(lines) if path.suffix == ".zst" else lines)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three files (one zst), two sources, ~120 KB, plus a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("pack")
    books = [d.text[:4000] for d in iter_documents([SAMPLE])][:24]
    (root / "in").mkdir()
    files = [
        write_jsonl(root / "in" / "a.jsonl", books[:12]),
        write_jsonl(root / "in" / "b.jsonl.zst", books[12:] + ["x", "has <|endoftext|> inside"]),
        write_jsonl(root / "in" / "c.jsonl", [ARABIC * (i + 1) for i in range(8)], "Arabic"),
    ]
    tok = root / "tokenizer.json"
    train_tokenizer([str(root / "in")], tok, vocab_size=400, progress=False)
    texts = books + ["x", "has <|endoftext|> inside"] + [ARABIC * (i + 1) for i in range(8)]
    return root, files, tok, texts


def stream(ds_dir: Path) -> np.ndarray:
    ds = TokenDataset(ds_dir)
    return ds.get(np.arange(len(ds))).reshape(-1)


def test_several_msls_share_one_stream_with_doc_index(corpus):
    root, _, tok, texts = corpus
    done = pack_corpus([str(root / "in")], root / "out", tokenizer=tok, seq_lens=[64, 16],
                       val_fraction=0.1, processes=1, doc_index=True, progress=False)
    assert set(done["datasets"]) == {"seq16", "seq64"} and (root / "out" / "pack.json").exists()
    assert not (root / "out" / "work").exists()  # removed after success
    t = Tokenizer.from_file(str(tok))
    t.encode_special_tokens = True
    eos = t.token_to_id(EOS_TOKEN)
    for split in ("train", "val"):
        expected = [x for x in texts if (split_hash(x, 0) < 0.1) == (split == "val")]
        full = np.concatenate([t.encode(x).ids + [eos] for x in expected])
        for seq in (16, 64):
            d = root / "out" / f"seq{seq}"
            meta = json.loads((d / "meta.json").read_text())
            assert meta["seq_len"] == seq and meta["doc_index"] and meta["eos_id"] == eos
            assert (d / "tokenizer.json").read_bytes() == tok.read_bytes()
            s = stream(d / split)
            assert s.size == meta["splits"][split]["windows"] * (seq + 1)
            np.testing.assert_array_equal(s, full[: s.size])  # one stream, cut per MSL
            assert meta["splits"][split]["documents"] == len(expected)
            assert full.size - s.size == meta["splits"][split]["dropped_tokens"] < seq + 1
            for shard in sorted((d / split).glob("*.tok")):
                _, arr = open_shard(shard)
                flat = np.asarray(arr).reshape(-1)
                starts = read_doc_starts(shard)
                after_eos = np.flatnonzero(flat[:-1] == eos) + 1
                assert set(after_eos) <= set(starts) <= set(after_eos) | {0}
    assert json.loads((root / "out" / "seq16" / "meta.json").read_text())["sources"]["Arabic"][
        "documents"] == 8


def test_processes_give_identical_shards(corpus, tmp_path):
    root, _, tok, _ = corpus
    kw = dict(tokenizer=tok, seq_lens=[32], val_fraction=0.1, progress=False)
    pack_corpus([str(root / "in")], tmp_path / "one", processes=1, **kw)
    pack_corpus([str(root / "in")], tmp_path / "two", processes=2, **kw)
    for split in ("train", "val"):
        for shard in sorted((tmp_path / "one" / "seq32" / split).glob("*.tok")):
            other = tmp_path / "two" / "seq32" / split / shard.name
            assert other.read_bytes() == shard.read_bytes()


def test_one_file_on_two_processes_is_chunked_and_identical(corpus, tmp_path):
    """Fewer files than processes: the main process reads, workers encode chunks."""
    _, _, tok, _ = corpus
    kw = dict(tokenizer=tok, seq_lens=[32], val_fraction=0.1, progress=False)
    pack_corpus([str(SAMPLE)], tmp_path / "one", processes=1, **kw)
    pack_corpus([str(SAMPLE)], tmp_path / "two", processes=2, **kw)
    shards = sorted((tmp_path / "one" / "seq32" / "train").glob("*.tok"))
    assert shards
    for shard in shards:
        assert (tmp_path / "two" / "seq32" / "train" / shard.name).read_bytes() == shard.read_bytes()


KILL_AFTER_TWO_FILES = """
import os, signal, sys
from lmfab.data.prep import encode
from lmfab.data.prep.pack import pack_corpus
real, done = encode._FileWork.finish, []
def finish(self):
    real(self)
    done.append(self.base.name)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup code runs
encode._FileWork.finish = finish
pack_corpus([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], seq_lens=[32], val_fraction=0.1,
            processes=1, progress=False)
"""


def test_killed_run_resumes_per_file(corpus, tmp_path, monkeypatch):
    root, files, tok, _ = corpus
    kw = dict(tokenizer=tok, seq_lens=[32], val_fraction=0.1, processes=1, progress=False)
    pack_corpus([str(root / "in")], tmp_path / "clean", **kw)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_FILES, str(root / "in"), str(out),
                        str(tok)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    work = out / "work"
    assert sorted(p.name for p in work.glob("*.json")) == ["f00000.json", "f00001.json"]
    assert not (out / "pack.json").exists() and not (out / "seq32" / "meta.json").exists()
    (work / "f00002.bin.tmp").write_bytes(b"half written")  # whatever the kill left
    mtime = (work / "f00000.bin").stat().st_mtime_ns
    encoded = []
    real_chunks = encode_mod._chunks
    monkeypatch.setattr(encode_mod, "_chunks", lambda p, *a: encoded.append(p.name) or
                        real_chunks(p, *a))
    pack_corpus([str(root / "in")], out, keep_work=True, **kw)
    assert encoded == ["c.jsonl"] and (work / "f00000.bin").stat().st_mtime_ns == mtime
    assert not list(work.glob("*.tmp"))
    for split in ("train", "val"):
        np.testing.assert_array_equal(stream(out / "seq32" / split),
                                      stream(tmp_path / "clean" / "seq32" / split))
    again = pack_corpus([str(root / "in")], out, keep_work=True, **kw)
    assert again == json.loads((out / "pack.json").read_text())
    with pytest.raises(ValueError, match=r"seq_lens: \[32\] -> \[48\].*choose a new out_dir"):
        pack_corpus([str(root / "in")], out, **{**kw, "seq_lens": [48]})


def test_val_inputs_are_the_val_split(corpus, tmp_path):
    root, files, tok, _ = corpus
    done = pack_corpus([str(files[0]), str(files[1])], tmp_path / "o", tokenizer=tok,
                       seq_lens=[16], val_inputs=[str(files[2])], processes=1, progress=False)
    splits = done["datasets"]["seq16"]["splits"]
    assert splits["val"]["sources"] == {"Arabic": 8} and "Arabic" not in splits["train"]["sources"]


def test_bad_inputs_are_clear_errors_and_nothing_is_marked_done(corpus, tmp_path):
    root, files, tok, _ = corpus
    kw = dict(tokenizer=tok, seq_lens=[16], processes=1, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad JSON"):
        pack_corpus([str(files[0]), str(bad)], tmp_path / "o1", **kw)
    assert (tmp_path / "o1" / "work" / "f00000.json").exists()  # the good file stays done
    assert not (tmp_path / "o1" / "work" / "f00001.json").exists()
    assert not list((tmp_path / "o1").rglob("meta.json")) and not (tmp_path / "o1" / "pack.json").exists()
    trunc = tmp_path / "t.jsonl.zst"
    trunc.write_bytes(files[1].read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"t\.jsonl\.zst: (truncated zstd|.*bad JSON)"):
        pack_corpus([str(trunc)], tmp_path / "o2", **kw)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty source"):
        pack_corpus([str(files[0]), str(empty)], tmp_path / "o3", **kw)
    with pytest.raises(ValueError, match="no input documents"):
        pack_corpus([str(empty)], tmp_path / "o4", **kw)
    with pytest.raises(ValueError, match=r"corpus too small for seq_len=100000"):
        pack_corpus([str(files[0])], tmp_path / "o5", **{**kw, "seq_lens": [100_000]})
    assert not (tmp_path / "o5" / "pack.json").exists()
    with pytest.raises(FileNotFoundError):
        pack_corpus([str(tmp_path / "missing.jsonl")], tmp_path / "o6", **kw)


def word_tokenizer(path: Path, n: int, eos: bool = True) -> Path:
    vocab = {f"w{i}": i for i in range(n)}
    vocab["[UNK]"] = n
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(path))
    return path


def test_tokenizer_without_eos_and_vocab_beyond_dtype(corpus, tmp_path):
    root, files, _, _ = corpus
    no_eos = word_tokenizer(tmp_path / "noeos.json", 10, eos=False)
    with pytest.raises(ValueError, match=r"noeos\.json: the tokenizer has no '<\|endoftext\|>'"):
        pack_corpus([str(files[0])], tmp_path / "a", tokenizer=no_eos, seq_lens=[8])
    assert not (tmp_path / "a").exists()  # refused before anything was written
    big = word_tokenizer(tmp_path / "big.json", 70_000)
    with pytest.raises(ValueError, match=r"70002 tokens does not fit in uint16"):
        pack_corpus([str(files[0])], tmp_path / "b", tokenizer=big, seq_lens=[8], dtype="uint16")
    assert not (tmp_path / "b").exists()
    docs = write_jsonl(tmp_path / "w.jsonl", [" ".join(f"w{i}" for i in range(k, 69_999, 97))
                                               for k in range(20)])
    pack_corpus([str(docs)], tmp_path / "c", tokenizer=big, seq_lens=[8], processes=1,
                progress=False)
    header = read_header(next((tmp_path / "c" / "seq8" / "train").glob("*.tok")))
    assert header.itemsize == 4 and int(stream(tmp_path / "c" / "seq8" / "train").max()) > 65535


def test_cli_pack(corpus, tmp_path, capsys):
    root, _, tok, _ = corpus
    rc = main(["data", "pack", "--input", str(root / "in"), "--tokenizer", str(tok),
               "--out", str(tmp_path / "o"), "--seq_len", "16,32", "--processes", "1"])
    assert rc == 0 and (tmp_path / "o" / "seq16" / "train").is_dir()
    assert "docs/s" in capsys.readouterr().err
    rc = main(["data", "pack", "--input", str(root / "in"), "--tokenizer", str(tok),
               "--out", str(tmp_path / "o2"), "--seq_len", "16", "--dtype", "uint16",
               "--val_fraction", "1.5"])
    assert rc == 2 and "val_fraction must be in [0, 1)" in capsys.readouterr().err


def test_offline_pipeline_does_not_import_torch():
    code = ("import sys; import lmfab.data.prep.pack, lmfab.data.prep.bpe_train, "
            "lmfab.data.prep.fertility, lmfab.data.mixture, lmfab.data.prep.tokenize_corpus; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
