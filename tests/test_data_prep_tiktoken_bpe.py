"""The tiktoken fast path of `lmfab data pack` gives Hugging Face's tokens exactly."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from lmfab.data.prep.bpe_train import make_pre_tokenizer
from lmfab.data.prep.readers import iter_documents
from lmfab.data.prep.tiktoken_bpe import tiktoken_encoding

from .conftest import SAMPLE


def test_tiktoken_matches_hf_token_for_token(tiny_data):
    tok_file = tiny_data / "tokenizer.json"
    fast = tiktoken_encoding(tok_file)
    assert fast is not None
    hf = Tokenizer.from_file(str(tok_file))
    hf.encode_special_tokens = True
    texts = [d.text for d in iter_documents([SAMPLE / "books.jsonl.zst"])]
    texts += ["naïve café — ∑ 1/2 “quotes” 日本語 العربية  \t\n  end", "a <|endoftext|> b", " "]
    for text in texts:
        assert fast.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids


def test_not_used_where_it_could_differ(tiny_data, tmp_path):
    spec = json.loads((tiny_data / "tokenizer.json").read_text())
    marks = dict(spec, pre_tokenizer=json.loads(make_pre_tokenizer("gpt2-marks").__getstate__()))
    (tmp_path / "marks.json").write_text(json.dumps(marks))
    assert tiktoken_encoding(tmp_path / "marks.json") is None  # another split regex
    merges = spec["model"]["merges"]
    shuffled = dict(spec, model=dict(spec["model"], merges=[merges[1], merges[0], *merges[2:]]))
    (tmp_path / "order.json").write_text(json.dumps(shuffled))
    assert tiktoken_encoding(tmp_path / "order.json") is None  # ids not in merge order


def test_pack_output_is_the_same_with_either_encoder(tiny_data, tmp_path, monkeypatch):
    from lmfab.data.prep.pack import pack_corpus

    def pack(name: str) -> bytes:
        out = tmp_path / name
        pack_corpus([str(SAMPLE / "books.jsonl.zst")], str(out),
                    tokenizer=str(tiny_data / "tokenizer.json"), seq_lens=[32],
                    val_fraction=0.05, processes=1, progress=False)
        return b"".join(p.read_bytes() for p in sorted((out / "seq32" / "train").glob("*.tok")))

    fast = pack("fast")
    monkeypatch.setenv("LMFAB_ENCODER", "hf")
    assert pack("hf") == fast and len(fast) > 1000
