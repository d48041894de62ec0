"""Token shard format: round trips, header fields, atomic writes, and clear errors."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from lmfab.data.shards import (
    HEADER_SIZE,
    MAGIC,
    ShardError,
    ShardHeader,
    ShardWriter,
    open_shard,
    read_header,
    tokenizer_hash,
    write_shard,
)

HASH = hashlib.sha256(b"tokenizer").hexdigest()


@pytest.mark.parametrize(
    ("top", "vocab_size", "itemsize"),
    [
        (1000, None, 2),
        (65535, None, 2),
        (65536, None, 4),
        (70000, None, 4),
        (100, 65536, 2),
        (100, 65537, 4),
    ],
)
def test_round_trip(tmp_path, top, vocab_size, itemsize):
    window = 9
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, top + 1, size=window * 13, dtype=np.int64)
    tokens[5] = top
    path = tmp_path / "a.tok"
    written = write_shard(path, tokens, window, HASH, vocab_size=vocab_size)
    header, mm = open_shard(path)
    assert header == written == read_header(path)
    assert header == ShardHeader(
        itemsize=itemsize, window=window, n_tokens=tokens.size, tokenizer_hash=HASH
    )
    assert header.n_windows == 13 and header.seq_len == window - 1
    assert header.dtype == (np.uint16 if itemsize == 2 else np.uint32)
    assert mm.shape == (13, window) and mm.dtype == header.dtype
    np.testing.assert_array_equal(np.asarray(mm).reshape(-1), tokens)
    assert path.stat().st_size == HEADER_SIZE + tokens.size * itemsize
    assert not (tmp_path / "a.tok.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tok"]


def test_header_layout_is_as_documented(tmp_path):
    path = tmp_path / "s.tok"
    write_shard(path, np.arange(12).reshape(3, 4), 4, HASH)
    raw = path.read_bytes()
    magic, version, itemsize, window, reserved, n_tokens = struct.unpack("<8sIIIIQ", raw[:32])
    assert (magic, version, itemsize, window, reserved, n_tokens) == (MAGIC, 1, 2, 4, 0, 12)
    assert raw[32:64] == bytes.fromhex(HASH)
    assert np.frombuffer(raw[64:], dtype="<u2").tolist() == list(range(12))


def test_empty_shard_opens(tmp_path):
    path = tmp_path / "e.tok"
    write_shard(path, np.zeros(0, dtype=np.int64), 5, HASH)
    header, mm = open_shard(path)
    assert header.n_windows == 0 and mm.shape == (0, 5)


def test_write_errors(tmp_path):
    path = tmp_path / "x.tok"
    with pytest.raises(ValueError, match=r"x\.tok.*not a multiple of window=4"):
        write_shard(path, np.arange(10), 4, HASH)
    with pytest.raises(ValueError, match="vocab_size=100"):
        write_shard(path, np.array([1, 2, 100, 3]), 4, HASH, vocab_size=100)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        write_shard(path, np.array([1, 2, 2**32, 3], dtype=np.uint64), 4, HASH)
    with pytest.raises(ValueError, match="negative"):
        write_shard(path, np.array([1, -2, 3, 4]), 4, HASH)
    with pytest.raises(ValueError, match="sha256"):
        write_shard(path, np.arange(4), 4, "abc")
    assert list(tmp_path.iterdir()) == []


def _good(tmp_path, name="s.tok"):
    path = tmp_path / name
    write_shard(path, np.arange(40), 8, HASH)
    return path


def test_bad_magic(tmp_path):
    path = _good(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[:8] = b"NOTATOKS"
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"s\.tok: not an lmfab token shard"):
        open_shard(path)


def test_truncated(tmp_path):
    path = _good(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(ShardError, match=r"s\.tok: truncated: expected 144 bytes, found 141"):
        read_header(path)
    path.write_bytes(raw[:20])
    with pytest.raises(ShardError, match=r"s\.tok: truncated.*64-byte header"):
        read_header(path)
    path.write_bytes(raw + b"\0\0")
    with pytest.raises(ShardError, match=r"s\.tok: size mismatch"):
        read_header(path)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (8, 2, "unknown shard format version 2"),
        (12, 3, "bad itemsize 3"),
        (16, 7, "n_tokens=40 is not a multiple of window=7"),
    ],
)
def test_bad_header_fields(tmp_path, offset, value, message):
    path = _good(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"s\.tok: " + message):
        open_shard(path)


def test_shard_error_is_value_error():
    assert issubclass(ShardError, ValueError)


def test_tokenizer_hash(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b'{"model": {}}')
    assert tokenizer_hash(path) == hashlib.sha256(b'{"model": {}}').hexdigest()


def test_offline_modules_do_not_import_torch():
    code = (
        "import sys; import lmfab.data.shards, lmfab.data.loader, lmfab.data.prep.readers, "
        "lmfab.data.prep.tokenize_corpus; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shard_writer_cuts_whole_windows(tmp_path):
    writer = ShardWriter(tmp_path, 4, HASH, vocab_size=1000, shard_tokens=9)  # 2 windows/shard
    docs = [list(range(1, 6)), [7, 8], list(range(10, 17))]
    for doc in docs:
        writer.add(doc, append=0)
    writer.close()
    stream = [t for doc in docs for t in [*doc, 0]]  # 17 tokens -> 4 windows, 1 dropped
    assert (writer.tokens, writer.windows, writer.n_shards) == (17, 4, 2)
    shards = sorted(tmp_path.glob("*.tok"))
    assert [p.name for p in shards] == ["shard_00000.tok", "shard_00001.tok"]
    got = np.concatenate([np.asarray(open_shard(p)[1]).reshape(-1) for p in shards])
    assert got.tolist() == stream[:16]
    with pytest.raises(ValueError, match="smaller than one window"):
        ShardWriter(tmp_path, 4, HASH, vocab_size=1000, shard_tokens=3)
