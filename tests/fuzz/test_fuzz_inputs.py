"""Text inputs, fuzzed: jsonl, jsonl.zst, parquet and txt files through the readers, and a
corpus through ``lmfab data tokenize``.

The readers' oracle is exact: the documents yielded are precisely the good records (a JSON
object whose ``text`` is a string), in order, so valid input is never dropped; a bad record
is a ValueError naming ``file:line`` (or, with ``on_error="skip"``, a counted skip)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import example, given
from hypothesis import strategies as st

from lmfab.data.prep.readers import ReadStats, iter_documents

from .oracle import assert_names, run_cli

texts = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
good = texts.map(lambda t: ("good", json.dumps({"text": t, "meta": {"redpajama_set_name": "S"}}),
                            t))
bad_lines = st.one_of(
    st.sampled_from(['{"text": 3}', '{"txt": "a"}', "[1, 2]", '"str"', "{bad json", '{"text": null}',
                     '{"text": ["a"]}', "1"]),
    st.binary(min_size=1, max_size=20).filter(lambda b: b"\n" not in b).map(
        lambda b: b.decode("latin-1")),
).map(lambda s: ("bad", s, None))
blank = st.sampled_from(["", "   "]).map(lambda s: ("blank", s, None))
invalid_utf8 = st.sampled_from([b"\xff\xfe", b'{"text": "\xc3"}', b"\x80abc"]).map(
    lambda b: ("utf8", b, None))


def _tmp(suffix: str) -> Path:
    d = Path(tempfile.mkdtemp())
    return d / f"in{suffix}"


def _as_bytes(line) -> bytes:
    return line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")


def _is_good(kind, line) -> bool:
    if kind == "good":
        return True
    if kind == "bad" and isinstance(line, str):  # a random line may happen to be valid JSON
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        return isinstance(rec, dict) and isinstance(rec.get("text"), str)
    return False


@given(lines=st.lists(st.one_of(good, good, bad_lines, blank, invalid_utf8), max_size=12),
       zst=st.booleans(), cut=st.one_of(st.none(), st.integers(0, 400)))
def test_jsonl_records(lines, zst, cut):
    raw = b"\n".join(_as_bytes(line) for _, line, _ in lines) + (b"\n" if lines else b"")
    path = _tmp(".jsonl.zst" if zst else ".jsonl")
    data = zstandard.ZstdCompressor().compress(raw) if zst else raw
    truncated = cut is not None and cut < len(data)
    path.write_bytes(data[:cut] if truncated else data)
    stats = ReadStats()
    try:
        docs = list(iter_documents([path], on_error="skip", stats=stats))
    except ValueError as err:
        assert zst and truncated, err  # only a cut zstd stream is a file-level error
        assert_names(err, str(path))
        return
    if truncated:
        return  # a cut plain file: what is left is read line by line, as checked below
    expected = [json.loads(line)["text"] for kind, line, _ in lines
                if isinstance(line, str) and _is_good(kind, line)]
    assert [d.text for d in docs] == expected
    try:
        strict = list(iter_documents([path]))
    except ValueError as err:
        assert_names(err, f"{path}:")
        assert stats.skipped > 0
    else:
        assert [d.text for d in strict] == expected and stats.skipped == 0


@given(data=st.binary(max_size=200), suffix=st.sampled_from([".txt", ".md", ".parquet",
                                                             ".jsonl.zst"]))
def test_random_bytes_files(data, suffix):
    path = _tmp(suffix)
    path.write_bytes(data)
    try:
        docs = list(iter_documents([path]))
    except ValueError as err:
        assert_names(err, str(path))
    else:
        if suffix in (".txt", ".md"):
            assert len(docs) == 1 and docs[0].text == data.decode("utf-8").removeprefix("\ufeff")


@given(rows=st.lists(st.one_of(st.none(), texts, st.integers(-(2**63), 2**63 - 1)), max_size=8),
       column=st.sampled_from(["text", "content"]))
def test_parquet_rows(rows, column):
    pa = pytest.importorskip("pyarrow", reason="parquet input needs the curate extra")
    import pyarrow.parquet as pq

    path = _tmp(".parquet")
    kinds = {type(r) for r in rows if r is not None}
    values = rows if len(kinds) <= 1 else [None if r is None else str(r) for r in rows]
    pq.write_table(pa.table({column: pa.array(values)}), path)
    stats = ReadStats()
    try:
        docs = list(iter_documents([path], on_error="skip", stats=stats))
    except ValueError as err:
        assert_names(err, str(path))
        assert column != "text" or (values and kinds - {str})
        return
    assert column == "text"
    assert [d.text for d in docs] == [v for v in values if isinstance(v, str)]


def test_empty_files_and_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files in this folder"):
        list(iter_documents([tmp_path / "empty"]))
    for suffix in (".jsonl", ".jsonl.zst", ".txt"):
        (tmp_path / f"e{suffix}").write_bytes(b"")
    docs = list(iter_documents([tmp_path / "e.jsonl", tmp_path / "e.jsonl.zst"]))
    assert docs == []
    assert [d.text for d in iter_documents([tmp_path / "e.txt"])] == [""]


@pytest.mark.slow
@given(lines=st.lists(st.one_of(good, good, good, bad_lines, invalid_utf8), min_size=1,
                      max_size=8))
@example(lines=[  # a val split too short for one window: the refusal must name seq_len
    ("good", json.dumps({"text": t, "meta": {"redpajama_set_name": "S"}}), t)
    for t in ("0", "001", "0203")
])
def test_tokenize_cli_on_fuzzed_corpora(lines):
    src = _tmp(".jsonl")
    src.write_bytes(b"\n".join(_as_bytes(line) for _, line, _ in lines) + b"\n")
    out = src.parent / "out"
    code, _, err = run_cli(["data", "tokenize", "--input", str(src), "--out", str(out),
                            "--seq-len", "8", "--vocab-size", "260", "--val-fraction", "0.3"],
                           str(src), str(out), "seq_len=")  # or the flag it is about
    if code == 0:
        assert (out / "meta.json").is_file()
    else:
        assert not (out / "meta.json").exists()  # nothing half-written passes for finished
