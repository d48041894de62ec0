"""``lmfab.atomic``: a file appears whole or not at all; done markers say what finished."""

from __future__ import annotations

import json

import pytest

from lmfab.atomic import (
    AtomicFile,
    atomic_open,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_done,
    tmp_path,
    write_done,
)


def test_writes_replace_whole_and_leave_no_tmp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"x": "é"})
    assert p.read_text(encoding="utf-8") == '{\n  "x": "é"\n}\n'
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and not tmp_path_exists(p)
    with atomic_path(tmp_path / "b.bin") as tmp:
        assert tmp == tmp_path / "b.bin.tmp"
        tmp.write_bytes(b"b")
    assert (tmp_path / "b.bin").read_bytes() == b"b"


def test_an_error_leaves_the_old_file_and_no_tmp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError), atomic_open(p, fsync=True) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert p.read_text() == "old" and not tmp_path_exists(p)
    f = AtomicFile(tmp_path / "c.bin")
    f.file.write(b"partial")
    f.abort()
    assert list(tmp_path.iterdir()) == [p]


def test_done_markers(tmp_path):
    m = tmp_path / "t00000.done"
    assert read_done(m) is None
    write_done(m)
    assert read_done(m) == {}
    write_done(m, {"n": 3})
    assert read_done(m) == {"n": 3} and json.loads(m.read_text()) == {"n": 3}


def tmp_path_exists(p) -> bool:
    return tmp_path(p).exists()
