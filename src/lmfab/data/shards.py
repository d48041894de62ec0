"""Token shards: the on-disk format between ``lmfab data tokenize`` and the training loader.

A shard is one flat array of token ids, already cut into training windows, behind a small
fixed header, so that the loader can ``np.memmap`` it and gather windows by index without
parsing anything. The header carries what a run must agree with before it trains on the
tokens: the window length and the hash of the tokenizer that produced the ids.

File format (``*.tok``), all integers little-endian::

    offset  size  field
         0     8  magic            b"LMFABTOK"
         8     4  version          uint32, = 1
        12     4  itemsize         uint32, 2 (tokens are uint16) or 4 (tokens are uint32)
        16     4  window           uint32, tokens per window = seq_len + 1
        20     4  reserved         uint32, = 0
        24     8  n_tokens         uint64, a multiple of window
        32    32  tokenizer_hash   32 raw bytes: sha256 of the tokenizer.json file's bytes
        64     -  tokens           n_tokens ids of the itemsize's dtype (little-endian)

The file size is therefore exactly ``64 + n_tokens * itemsize``; anything else is reported
as truncated (or as trailing garbage). A window holds ``seq_len + 1`` tokens because a
training example is ``inputs = w[:-1], targets = w[1:]``.

Writes go to ``<path>.tmp`` and are moved into place with ``os.replace``
(:mod:`lmfab.atomic`), so a shard that exists is complete: a crash leaves at worst a ``.tmp`` file, never a short ``.tok``.

``ShardWriter`` turns a stream of token ids (documents, each followed by EOS) into shards of
whole windows, as ``lmfab data pack`` / ``lmfab data tokenize`` pack them.

Optional document index (``ShardWriter(..., doc_index=True)``): beside ``shard_00000.tok`` a
sidecar ``shard_00000.docs.npy`` (a 1-D little-endian int64 ``.npy`` array) lists the offsets,
in the shard's flat token array, where a document starts; offset 0 is absent when the shard
begins inside a document carried over from the previous shard. Window ``w`` covers flat
offsets ``[w*window, (w+1)*window)``, so the starts inside a window give its document
boundaries for attention masking without scanning for EOS (EOS ids mark the same
boundaries, since a literal EOS string in a text is encoded as ordinary text). The sidecar
is written before its ``.tok``; ``read_doc_starts`` reads it.

This module is used by the offline pipeline and by the runtime loader; it imports numpy
only (no torch).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmfab.atomic import atomic_open

MAGIC = b"LMFABTOK"
FORMAT_VERSION = 1
HEADER_SIZE = 64
# magic, version, itemsize, window, reserved, n_tokens, tokenizer_hash
_HEADER = struct.Struct("<8sIIIIQ32s")
assert _HEADER.size == HEADER_SIZE

_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}

PathLike = str | os.PathLike


class ShardError(ValueError):
    """A token shard is malformed or does not match what the caller expects."""


@dataclass(frozen=True)
class ShardHeader:
    """The header of one shard. ``tokenizer_hash`` is the sha256 hex digest (64 chars)."""

    itemsize: int
    window: int
    n_tokens: int
    tokenizer_hash: str

    @property
    def n_windows(self) -> int:
        return self.n_tokens // self.window

    @property
    def dtype(self) -> np.dtype:
        """``uint16`` for itemsize 2, ``uint32`` for itemsize 4 (little-endian)."""
        return _DTYPES[self.itemsize]

    @property
    def seq_len(self) -> int:
        return self.window - 1


def tokenizer_hash(path: PathLike) -> str:
    """Return the sha256 hex digest of a file's bytes (used for ``tokenizer.json``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_bytes(hex_digest: str) -> bytes:
    try:
        raw = bytes.fromhex(hex_digest)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            f"tokenizer_hash must be a sha256 hex digest (64 hex characters), got {hex_digest!r}"
        )
    return raw


def _choose_dtype(tokens: np.ndarray, vocab_size: int | None, path: PathLike) -> np.dtype:
    """Pick uint16 or uint32 and check the ids fit; ``tokens`` is a 1-D integer array."""
    if tokens.size and tokens.dtype.kind == "i" and int(tokens.min()) < 0:
        raise ValueError(f"{path}: negative token id {int(tokens.min())}")
    top = int(tokens.max()) if tokens.size else -1
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"{path}: vocab_size must be positive, got {vocab_size}")
        if vocab_size > 2**32:
            raise ValueError(f"{path}: vocab_size {vocab_size} does not fit in uint32 tokens")
        if top >= vocab_size:
            raise ValueError(f"{path}: token id {top} is not below vocab_size={vocab_size}")
        return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]
    if top >= 2**32:
        raise ValueError(f"{path}: token id {top} does not fit in uint32 (must be < 2**32)")
    return _DTYPES[2] if top < 2**16 else _DTYPES[4]


def write_shard(
    path: PathLike,
    tokens: np.ndarray,
    window: int,
    tokenizer_hash: str,
    *,
    vocab_size: int | None = None,
    dtype: np.dtype | None = None,
) -> ShardHeader:
    """Write ``tokens`` (1-D, or 2-D of shape (n_windows, window)) as a shard, atomically.

    The dtype is uint16 when every id fits (``max < 65536``, or ``vocab_size <= 65536`` when
    ``vocab_size`` is given), else uint32; an explicit ``dtype`` (uint16/uint32) overrides
    that choice. Returns the header that was written.
    """
    path = Path(path)
    if not isinstance(window, int | np.integer) or window < 2 or window >= 2**32:
        raise ValueError(f"{path}: window must be an integer in [2, 2**32), got {window!r}")
    window = int(window)
    hash_raw = _hash_bytes(tokenizer_hash)
    tokens = np.asarray(tokens)
    if tokens.ndim == 2 and tokens.shape[1] == window:
        tokens = tokens.reshape(-1)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D or (n, {window}), got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"{path}: tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size % window:
        raise ValueError(
            f"{path}: {tokens.size} tokens is not a multiple of window={window} "
            f"(remainder {tokens.size % window}); cut the stream into whole windows first"
        )
    chosen = _choose_dtype(tokens, vocab_size, path)
    if dtype is not None:
        dtype = np.dtype(dtype).newbyteorder("<")
        if dtype not in (_DTYPES[2], _DTYPES[4]):
            raise ValueError(f"{path}: dtype must be uint16 or uint32, got {dtype}")
        if tokens.size and int(tokens.max()) >= 2 ** (8 * dtype.itemsize):
            raise ValueError(f"{path}: token id {int(tokens.max())} does not fit in {dtype.name}")
    else:
        dtype = chosen
    data = np.ascontiguousarray(tokens, dtype=dtype)
    header = ShardHeader(dtype.itemsize, window, int(data.size), tokenizer_hash.lower())
    raw = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, window, 0, data.size, hash_raw)

    with atomic_open(path, fsync=True) as f:
        f.write(raw)
        f.write(memoryview(data).cast("B"))
    return header


def read_header(path: PathLike) -> ShardHeader:
    """Read and validate a shard's header (and its size against the header)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
        size = os.fstat(f.fileno()).st_size
    if len(raw) < HEADER_SIZE:
        if raw[: len(MAGIC)] != MAGIC[: len(raw)]:
            raise ShardError(f"{path}: not an lmfab token shard (bad magic)")
        raise ShardError(
            f"{path}: truncated: file is {size} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    magic, version, itemsize, window, _reserved, n_tokens, hash_raw = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path}: not an lmfab token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: unknown shard format version {version} (this lmfab reads version "
            f"{FORMAT_VERSION}); re-tokenize with this lmfab or upgrade it"
        )
    if itemsize not in _DTYPES:
        raise ShardError(f"{path}: bad itemsize {itemsize} (must be 2 or 4)")
    if window < 2:
        raise ShardError(f"{path}: bad window {window} (must be at least 2)")
    if n_tokens % window:
        raise ShardError(f"{path}: n_tokens={n_tokens} is not a multiple of window={window}")
    expected = HEADER_SIZE + n_tokens * itemsize
    if size < expected:
        raise ShardError(f"{path}: truncated: expected {expected} bytes, found {size}")
    if size > expected:
        raise ShardError(
            f"{path}: size mismatch: expected {expected} bytes, found {size} "
            "(trailing data after the tokens)"
        )
    return ShardHeader(itemsize, window, n_tokens, hash_raw.hex())


def open_shard(path: PathLike) -> tuple[ShardHeader, np.ndarray]:
    """Validate a shard and memory-map its tokens as a read-only (n_windows, window) array."""
    header = read_header(path)
    shape = (header.n_windows, header.window)
    if header.n_tokens == 0:  # mmap cannot map zero bytes
        return header, np.empty(shape, dtype=header.dtype)
    tokens = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=shape)
    return header, tokens


class ShardWriter:
    """Append token ids as one stream; write it as ``shard_00000.tok ...`` of whole windows.

    Each shard holds ``shard_tokens`` rounded down to whole windows; ``close()`` writes the
    last, shorter shard and drops the tail that does not fill a window. Counters: ``tokens``
    (all appended), ``windows`` and ``n_shards`` (written).
    """

    def __init__(
        self,
        out_dir: PathLike,
        window: int,
        tokenizer_hash: str,
        *,
        vocab_size: int,
        shard_tokens: int,
        prefix: str = "shard_",
        dtype: str | np.dtype | None = None,
        doc_index: bool = False,
    ) -> None:
        if shard_tokens < window:
            raise ValueError(f"shard_tokens={shard_tokens} is smaller than one window ({window})")
        self.out_dir, self.window, self.tokenizer_hash = Path(out_dir), window, tokenizer_hash
        self.vocab_size, self.prefix = vocab_size, prefix
        self.dtype = shard_dtype(vocab_size, dtype)
        self.per_shard = (shard_tokens // window) * window
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.tokens = self.windows = self.n_shards = 0
        self.doc_index = doc_index
        self._starts: list[np.ndarray] = []  # global stream offsets of document starts
        self._written = 0  # stream tokens already in shards

    def add(self, ids: Sequence[int] | np.ndarray, append: int | None = None) -> None:
        """Append one document: ``ids`` (a sequence of ints), then ``append`` (e.g. EOS)."""
        arr = np.empty(len(ids) + (append is not None), dtype=self.dtype)
        arr[: len(ids)] = ids
        if append is not None:
            arr[-1] = append
        self.add_stream(arr, np.zeros(1, dtype=np.int64))

    def add_stream(self, tokens: np.ndarray, doc_starts: np.ndarray | None = None) -> None:
        """Append a ready stream of ids (documents already EOS-terminated).

        ``doc_starts``: offsets within ``tokens`` where documents start (for the doc index).
        Ids must already be below ``vocab_size`` (callers check; this casts to the dtype).
        """
        if self.doc_index and doc_starts is not None and len(doc_starts):
            self._starts.append(np.asarray(doc_starts, dtype=np.int64) + self.tokens)
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        if not arr.size:
            return
        self.buffer.append(arr)
        self.buffered += arr.size
        self.tokens += arr.size
        while self.buffered >= self.per_shard:
            self._flush(self.per_shard)

    def _flush(self, n: int) -> None:
        stream = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        path = self.out_dir / f"{self.prefix}{self.n_shards:05d}.tok"
        if self.doc_index:
            starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
            inside = (starts >= self._written) & (starts < self._written + n)
            _write_npy(path.with_suffix(".docs.npy"), starts[inside] - self._written)
            self._starts = [starts[starts >= self._written + n]]
        write_shard(
            path, stream[:n], self.window, self.tokenizer_hash,
            vocab_size=self.vocab_size, dtype=self.dtype,
        )
        rest = stream[n:]
        self.buffer = [rest] if rest.size else []
        self.buffered = rest.size
        self._written += n
        self.n_shards += 1
        self.windows += n // self.window

    def close(self) -> None:
        n = (self.buffered // self.window) * self.window
        if n:
            self._flush(n)
        self.buffer, self.buffered = [], 0  # the tail shorter than a window is dropped
        self._starts = []


def shard_dtype(vocab_size: int, dtype: str | np.dtype | None = None) -> np.dtype:
    """The token dtype for ``vocab_size``: ``None``/"auto" picks uint16 when it fits, else uint32.

    An explicit dtype too small for the vocabulary is an error (ids would wrap around).
    """
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]
    try:
        dt = np.dtype(dtype).newbyteorder("<")
    except TypeError as err:
        raise ValueError(f"unknown token dtype {dtype!r}; use auto, uint16 or uint32") from err
    if dt not in (_DTYPES[2], _DTYPES[4]):
        raise ValueError(f"token dtype must be uint16 or uint32, got {dtype!r}")
    limit = 2 ** (8 * dt.itemsize)
    if vocab_size > limit:
        raise ValueError(
            f"vocabulary of {vocab_size} tokens does not fit in {dt.name} shards (ids must be "
            f"< {limit}); use dtype uint32 (or auto)"
        )
    return dt


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.save(f, np.ascontiguousarray(array, dtype="<i8"))


def read_doc_starts(shard_path: PathLike) -> np.ndarray:
    """Document start offsets (int64, within the shard's flat tokens) from the sidecar."""
    path = Path(shard_path).with_suffix(".docs.npy")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no document index beside {shard_path} (pack with --doc_index)"
        )
    try:
        starts = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ShardError(f"{path}: unreadable document index: {err}") from err
    if starts.ndim != 1 or starts.dtype.kind != "i":
        raise ShardError(f"{path}: document index must be a 1-D integer array")
    return starts
