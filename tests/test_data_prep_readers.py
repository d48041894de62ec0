"""Document readers: jsonl, jsonl.zst, text folders, and errors that name file:line."""

from __future__ import annotations

import json

import pytest
import zstandard

from lmfab.data.prep.readers import Document, ReadStats, iter_documents

RECORDS = [
    {"text": "first doc", "meta": {"redpajama_set_name": "Books"}},
    {"text": "second: héllo wörld, مرحبا 🙂"},
    {"text": "", "meta": {"redpajama_set_name": "Code"}},
]


def jsonl_bytes(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def test_jsonl(tmp_path):
    path = tmp_path / "part-0.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS) + b"\n   \n")  # trailing blank lines are ignored
    stats = ReadStats()
    docs = list(iter_documents([path], stats=stats))
    assert docs == [
        Document("first doc", "Books", str(path), 1),
        Document(RECORDS[1]["text"], "part-0", str(path), 2),
        Document("", "Code", str(path), 3),
    ]
    assert stats.files == 1 and stats.documents == 3 and stats.skipped == 0
    assert stats.text_bytes == sum(len(r["text"].encode()) for r in RECORDS)


def test_jsonl_zst_streams_multiple_frames(tmp_path):
    path = tmp_path / "part-00000.jsonl.zst"
    cctx = zstandard.ZstdCompressor(level=3)
    # two concatenated frames, as `cat a.zst b.zst` would make
    path.write_bytes(cctx.compress(jsonl_bytes(RECORDS[:2])) + cctx.compress(jsonl_bytes(RECORDS)))
    docs = list(iter_documents([str(path)]))
    assert [d.text for d in docs] == [r["text"] for r in RECORDS[:2] + RECORDS]
    assert docs[1].source == "part-00000" and docs[4].line == 5


def test_custom_text_key(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"content": "x"}\n', encoding="utf-8")
    assert [d.text for d in iter_documents([path], text_key="content")] == ["x"]


def test_text_folder_is_recursive_and_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed\n", encoding="utf-8")
    (tmp_path / "a.md").write_text("\ufeff# title\nbody", encoding="utf-8")
    (tmp_path / "c.txt").write_text("naïve café", encoding="utf-8")
    (tmp_path / "notes.csv").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")
    stats = ReadStats()
    docs = list(iter_documents([tmp_path], stats=stats))
    assert [(d.text, d.source, d.line) for d in docs] == [
        ("# title\nbody", "a", 1),
        ("zed\n", "z", 1),
        ("naïve café", "c", 1),
    ]
    assert [d.path for d in docs] == [str(tmp_path / p) for p in ("a.md", "b/z.txt", "c.txt")]
    assert stats.skipped_files == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"text": "ok"', "bad JSON"),
        (b'{"txt": "no text key"}', "'text' is missing"),
        (b'{"text": 5}', "not a string"),
        (b'["a list"]', "expected a JSON object"),
        (b'{"text": "bad \xff byte"}', "invalid UTF-8"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n' + line + b'\n{"text": "d"}\n')
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        list(iter_documents([path]))
    stats = ReadStats()
    docs = list(iter_documents([path], on_error="skip", stats=stats))
    assert [d.text for d in docs] == ["a", "b", "d"] and docs[2].line == 4
    assert stats.skipped == 1 and stats.documents == 3
    assert "bad.jsonl:3" in stats.errors[0]


def test_bad_utf8_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"line one\nline two \xc3\x28\n")
    with pytest.raises(ValueError, match=r"t\.txt:2: invalid UTF-8"):
        list(iter_documents([path]))
    stats = ReadStats()
    assert list(iter_documents([path], on_error="skip", stats=stats)) == []
    assert stats.skipped == 1


def test_unknown_suffix_and_missing_input(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"a,b")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported.*\.jsonl\.zst, \.jsonl"):
        list(iter_documents([path]))
    with pytest.raises(FileNotFoundError, match="nope"):
        list(iter_documents([tmp_path / "nope.jsonl"]))
    with pytest.raises(ValueError, match="on_error"):
        list(iter_documents([tmp_path], on_error="ignore"))
