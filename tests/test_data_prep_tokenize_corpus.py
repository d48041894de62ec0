"""``tokenize_corpus`` on a slice of the shipped sample: tokenizer, packing, meta, re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmfab.data.loader import TokenDataset
from lmfab.data.prep.readers import iter_documents
from lmfab.data.prep.tokenize_corpus import (
    EOS_TOKEN,
    load_tokenizer,
    read_meta,
    split_hash,
    tokenize_corpus,
)
from lmfab.data.shards import read_header, tokenizer_hash

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "books.jsonl.zst"
SEQ_LEN, VOCAB, VAL, SEED = 64, 512, 0.1, 0
EXTRA = [  # non-ASCII and a literal EOS string, which must stay ordinary text
    "Ünïcödé façade — naïve café, “quotes”, 日本語のテキスト, مرحبا بالعالم, emoji 🙂🚀.\n",
    "A document that mentions <|endoftext|> in its text, and tabs\tand\r\nCRLF.",
]


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(
                json.dumps({"text": t, "meta": {"redpajama_set_name": "Books"}}, ensure_ascii=False)
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~300 KB: the first 9 KB of each sample document, plus EXTRA."""
    texts = EXTRA + [d.text[:9000] for d in iter_documents([SAMPLE])]
    assert len(texts) > 30 and 250_000 < sum(map(len, texts)) < 350_000
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", texts), texts


def _tokenize(corpus, out, **changes):
    """tokenize_corpus on the module's corpus with its standard parameters, ``changes`` applied."""
    kwargs = {"seq_len": SEQ_LEN, "vocab_size": VOCAB, "val_fraction": VAL, "seed": SEED,
              "progress": False, **changes}
    return tokenize_corpus([str(corpus[0])], str(out), **kwargs)


@pytest.fixture(scope="module")
def tokenized(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "out"
    return out, _tokenize(corpus, out)


def test_sample_is_shipped():
    docs = list(iter_documents([SAMPLE]))
    assert len(docs) == 33 and {d.source for d in docs} == {"Books"}
    assert 2_000_000 < sum(len(d.text) for d in docs) < 5_000_000


def test_meta_and_files(tokenized, corpus):
    out, meta = tokenized
    assert meta == read_meta(out) == json.loads((out / "meta.json").read_text())
    assert meta["seq_len"] == SEQ_LEN and meta["window"] == SEQ_LEN + 1
    assert 257 <= meta["vocab_size"] <= VOCAB and meta["dtype"] == "uint16"
    assert meta["tokenizer_hash"] == tokenizer_hash(out / "tokenizer.json")
    tok = load_tokenizer(out)
    assert tok.token_to_id(EOS_TOKEN) == meta["eos_id"]
    assert tok.get_vocab_size() == meta["vocab_size"]
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] + val["documents"] == len(corpus[1]) and val["documents"] >= 1
    assert meta["sources"] == {
        "Books": {"documents": len(corpus[1]), "train": train["documents"], "val": val["documents"]}
    }
    for split in ("train", "val"):
        s = meta["splits"][split]
        shards = sorted((out / split).glob("*.tok"))
        assert len(shards) == s["shards"] >= 1 and shards[0].name == "shard_00000.tok"
        headers = [read_header(p) for p in shards]
        assert all(h.window == SEQ_LEN + 1 and h.itemsize == 2 for h in headers)
        assert all(h.tokenizer_hash == meta["tokenizer_hash"] for h in headers)
        assert sum(h.n_windows for h in headers) == s["windows"]
        assert 0 <= s["tokens"] - s["windows"] * (SEQ_LEN + 1) < SEQ_LEN + 1
    assert not list(out.rglob("*.tmp"))


def test_tokenizer_round_trip(tokenized, corpus):
    tok = load_tokenizer(tokenized[0] / "tokenizer.json")
    samples = [*corpus[1][:5], EXTRA[0], "x", " leading space", "  \n\n trailing  "]
    for text in samples:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert max(ids) < tok.get_vocab_size()


def decoded_documents(out, meta, split, texts):
    """(documents decoded from the split's EOS-separated stream, documents expected there)."""
    keep = (lambda u: u < VAL) if split == "val" else (lambda u: u >= VAL)
    expected = [t for t in texts if keep(split_hash(t, SEED))]
    ds = TokenDataset(out / split, window=SEQ_LEN + 1, tokenizer_hash=meta["tokenizer_hash"])
    stream = ds.get(np.arange(len(ds))).reshape(-1)  # windows are consecutive stream cuts
    cuts = np.flatnonzero(stream == meta["eos_id"])
    starts = np.concatenate([[0], cuts + 1])[: len(cuts)]
    tok = load_tokenizer(out)
    return [tok.decode(stream[a:b].tolist()) for a, b in zip(starts, cuts, strict=True)], expected


def test_eos_separates_documents_in_order(tokenized, corpus):
    out, meta = tokenized
    seen = []
    for split in ("train", "val"):
        decoded, expected = decoded_documents(out, meta, split, corpus[1])
        assert len(expected) == meta["splits"][split]["documents"]
        assert len(decoded) in (len(expected) - 1, len(expected))  # the tail may be dropped
        assert decoded == expected[: len(decoded)]
        seen += decoded
    assert EXTRA[1] in seen  # a literal "<|endoftext|>" in a text is not a document boundary


def test_rerun_skips_and_changed_parameters_fail(tokenized, corpus, capsys):
    out, meta = tokenized
    shard = out / "train" / "shard_00000.tok"
    mtime = shard.stat().st_mtime_ns
    again = _tokenize(corpus, out)
    assert again == meta and shard.stat().st_mtime_ns == mtime
    assert "already tokenized" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"seq_len: 64 -> 32.*choose a new out_dir"):
        _tokenize(corpus, out, seq_len=32)


def test_existing_tokenizer_reproduces_the_shards(tokenized, corpus, tmp_path):
    out, meta = tokenized
    meta2 = _tokenize(corpus, tmp_path / "again", vocab_size=8192,
                      tokenizer=str(out / "tokenizer.json"))
    assert meta2["tokenizer_hash"] == meta["tokenizer_hash"] and not meta2["tokenizer_trained"]
    assert meta2["splits"] == meta["splits"]
    for split in ("train", "val"):
        for shard in sorted((out / split).glob("*.tok")):
            assert (tmp_path / "again" / split / shard.name).read_bytes() == shard.read_bytes()


def test_tokenizer_without_eos_is_refused(corpus, tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["some text to train on"], trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        ValueError, match=r"tokenizer\.json: the tokenizer has no '<\|endoftext\|>'"
    ):
        tokenize_corpus(
            [str(corpus[0])],
            str(tmp_path / "out"),
            seq_len=SEQ_LEN,
            tokenizer=str(tmp_path / "tokenizer.json"),
            progress=False,
        )
    assert not (tmp_path / "out" / "meta.json").exists()


def test_small_or_empty_corpora_are_clear_errors(tmp_path, capsys):
    long_doc, short_doc = "The quick brown fox jumps over the lazy dog. " * 100, "hi"
    # a seed for which the short document is the one held out
    seed = next(s for s in range(100) if split_hash(short_doc, s) < split_hash(long_doc, s))
    two = write_jsonl(tmp_path / "two.jsonl", [long_doc, short_doc])
    with pytest.raises(ValueError, match=r"val split empty for seq_len=\d+: its 1 document\(s\)"):
        tokenize_corpus(
            [str(two)],
            str(tmp_path / "a"),
            seq_len=16,
            vocab_size=300,
            val_fraction=0.001,
            seed=seed,
        )
    assert "docs/s" in capsys.readouterr().err  # progress lines go to stderr
    with pytest.raises(ValueError, match=r"corpus too small for seq_len=100000"):
        tokenize_corpus(
            [str(two)],
            str(tmp_path / "b"),
            seq_len=100_000,
            vocab_size=300,
            val_fraction=0.001,
            seed=seed,
            progress=False,
        )
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no input documents"):
        tokenize_corpus([str(empty)], str(tmp_path / "c"), seq_len=16, progress=False)
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        tokenize_corpus([str(two)], str(tmp_path / "d"), seq_len=16, vocab_size=100)


def test_training_is_deterministic(tokenized, corpus, tmp_path):
    out, meta = tokenized
    meta2 = _tokenize(corpus, tmp_path / "again")
    assert meta2["tokenizer_hash"] == meta["tokenizer_hash"]
    assert meta2["splits"] == meta["splits"]


def test_many_shards_and_stale_leftovers(tokenized, corpus, tmp_path):
    out, meta = tokenized
    window = SEQ_LEN + 1
    stale = tmp_path / "small" / "train" / "shard_99999.tok"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over by an interrupted run")
    meta2 = _tokenize(corpus, tmp_path / "small", vocab_size=8192,
                      tokenizer=str(out / "tokenizer.json"), shard_tokens=100 * window + 7)
    assert not stale.exists()
    train = meta2["splits"]["train"]
    shards = sorted((tmp_path / "small" / "train").glob("*.tok"))
    assert len(shards) == train["shards"] == -(-train["windows"] // 100) > 1
    assert [read_header(p).n_windows for p in shards[:-1]] == [100] * (len(shards) - 1)
    one = TokenDataset(out / "train")
    many = TokenDataset(tmp_path / "small" / "train")
    np.testing.assert_array_equal(many.get(np.arange(len(many))), one.get(np.arange(len(one))))
