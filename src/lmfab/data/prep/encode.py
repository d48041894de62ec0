"""Stage 1 of ``lmfab data pack``: encode input files to token ids on all cores, per file.

With at least as many pending files as processes, each worker reads, encodes and writes
whole files. Otherwise the main process reads each input file in order
(``readers.iter_documents``), cuts it into chunks of about ``CHUNK_BYTES`` of text and
hands them to a pool of worker processes
(``spawn``; each loads ``tokenizer.json`` once, with Hugging Face's own thread pool off so
that a process is a core, and encodes with tiktoken where that is provably the same
tokenizer (:mod:`lmfab.data.prep.tiktoken_bpe`), else with HF's ``encode_batch_fast``;
``LMFAB_ENCODER=hf`` forces HF). A worker returns the chunk's ids,
every document followed by EOS, plus per-document length, byte count and split hash. At most
``3 * processes`` chunks are in flight, so memory stays bounded, and results are consumed in
submission order, so the output does not depend on the number of processes.

Each file's results go to ``work/f<i>.bin`` (ids in the shard dtype) and ``work/f<i>.npz``
(per-document ``lengths`` incl. EOS, split hash ``u``, ``nbytes``, source index ``src``);
``work/f<i>.json`` is written last and marks the file done. A re-run skips files whose
marker matches (path, size, mtime, tokenizer hash, seed, dtype, text key) and discards
half-written ``.tmp`` files; when reading fails, the files already read whole are still
finished. Empty texts are skipped (they would be a lone EOS) and counted. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmfab.atomic import AtomicFile, atomic_open, atomic_write_json
from lmfab.data.prep.progress import Progress
from lmfab.data.prep.readers import iter_documents
from lmfab.data.prep.tiktoken_bpe import tiktoken_encoding
from lmfab.faultpoint import fault

CHUNK_BYTES = 1 << 20  # text per encode task
CHUNK_DOCS = 2048
INLINE_BELOW = 8 << 20  # auto: inputs smaller than this (on disk) are encoded in-process
WORK_VERSION = 1


def split_hash(text: str, seed: int) -> float:
    """The document's position in [0, 1) used for the train/val split."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(16, "little"))
    return int.from_bytes(h.digest(), "little") / 2.0**64


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, eos_id: int, n_vocab: int, seed: int, one_thread: bool):
    if one_thread:  # one process = one core; HF's rayon pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as err:  # noqa: BLE001 -- raising here would make Pool respawn forever
        _WORKER["error"] = f"{tokenizer_path}: cannot load the tokenizer in a worker: {err}"
        return
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is just text
    # GPT-2-style BPE: the same tokens through tiktoken, ~3.8x faster (prep/tiktoken_bpe.py).
    fast = None if os.environ.get("LMFAB_ENCODER") == "hf" else tiktoken_encoding(tokenizer_path)
    _WORKER.update(tok=tok, fast=fast, eos=eos_id, n_vocab=n_vocab, seed=seed,
                   path=tokenizer_path)


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Worker: (uint32 ids with EOS after each text, lengths incl. EOS, split hash, bytes)."""
    if "error" in _WORKER:
        raise RuntimeError(_WORKER["error"])
    tok, fast, eos = _WORKER["tok"], _WORKER["fast"], _WORKER["eos"]
    if fast is not None:
        ids = [fast.encode_ordinary(t) for t in texts]
    else:
        ids = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for x in ids:
        out[pos : pos + len(x)] = x
        pos += len(x)
        out[pos] = eos
        pos += 1
    if out.size and int(out.max()) >= _WORKER["n_vocab"]:
        raise ValueError(f"{_WORKER['path']}: token id {int(out.max())} is not below the "
                         f"vocabulary size {_WORKER['n_vocab']}")
    seed = _WORKER["seed"]
    u = np.fromiter((split_hash(t, seed) for t in texts), dtype=np.float64, count=len(texts))
    nb = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return out, lengths, u, nb


def resolve_processes(processes: int | None, files: Sequence[Path]) -> int:
    """``None``: every core, or 1 (in-process) when the inputs are small."""
    if processes is not None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        return processes
    if sum(f.stat().st_size for f in files) < INLINE_BELOW:
        return 1
    return os.cpu_count() or 1


def encode_files(
    files: list[Path], keys: list[dict], work_dir: Path, tokenizer_path: Path, *,
    eos_id: int, n_vocab: int, seed: int, dtype: np.dtype, text_key: str,
    processes: int | None, log: Progress,
) -> None:
    """Stage 1: encode every file without a matching done marker into ``work_dir``."""
    for stale in work_dir.glob("*.tmp"):
        stale.unlink()
    pending = [i for i in range(len(files)) if read_marker(work_dir, i) != keys[i]]
    n = resolve_processes(processes, [files[i] for i in pending]) if pending else 1
    log.start(f"encode ({n} process{'es' if n > 1 else ''})", total=len(files),
              done=len(files) - len(pending))
    if not pending:
        log.done()
        return
    init = (str(tokenizer_path), eos_id, n_vocab, seed)
    if n > 1 and len(pending) >= n:
        _encode_whole_files(files, keys, pending, work_dir, init, dtype, text_key, n, log)
        return
    pool = None
    if n > 1:
        pool = multiprocessing.get_context("spawn").Pool(n, _init_worker, (*init, True))
    else:
        _init_worker(*init, processes == 1)
    inflight: deque = deque()
    try:
        for i in pending:
            fw = _FileWork(work_dir, i, keys[i], dtype)
            for texts, src in _chunks(files[i], text_key, fw):
                job = pool.apply_async(encode_chunk, (texts,)) if pool else encode_chunk(texts)
                inflight.append((fw, job, src))
                while len(inflight) > 3 * n:
                    _drain(inflight.popleft(), log)
            inflight.append((fw, None, None))  # end of file
        while inflight:
            _drain(inflight.popleft(), log)
        if pool:
            pool.close()
    except Exception:
        _salvage(inflight, log)  # files read whole before the error still get their markers
        raise
    finally:
        if pool:
            pool.terminate()
            pool.join()
        for fw, _, _ in inflight:
            fw.abort()
        _WORKER.clear()
    log.done()


def encode_file(i: int, path: Path, key: dict, work_dir: Path, dtype: np.dtype,
                text_key: str) -> tuple[int, int]:
    """Worker: read, encode and write one whole input file; (text bytes, documents)."""
    fw = _FileWork(work_dir, i, key, dtype)
    nbytes = ndocs = 0
    try:
        for texts, src in _chunks(path, text_key, fw):
            ids, lengths, u, nb = encode_chunk(texts)
            fw.append(ids, lengths, u, nb, src)
            nbytes, ndocs = nbytes + int(nb.sum()), ndocs + len(lengths)
        fw.finish()
    except BaseException:
        fw.abort()
        raise
    return nbytes, ndocs


def _encode_whole_files(files, keys, pending, work_dir, init, dtype, text_key, n, log) -> None:
    """At least as many files as processes: each worker reads and encodes whole files, so no
    single reader process limits the rate. Every file's output is its own, so the result is
    the same as the chunked path's for any number of processes."""
    pool = multiprocessing.get_context("spawn").Pool(n, _init_worker, (*init, True))
    try:
        jobs = [pool.apply_async(encode_file, (i, files[i], keys[i], work_dir, dtype, text_key))
                for i in pending]
        for job in jobs:
            nbytes, ndocs = job.get()
            log.tick(nbytes, ndocs, files=1)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    log.done()


def _drain(item: tuple, log: Progress) -> None:
    fw, job, src = item
    if job is None:
        fw.finish()
        log.tick(0, 0, files=1)
        return
    ids, lengths, u, nb = job.get() if hasattr(job, "get") else job
    fw.append(ids, lengths, u, nb, src)
    log.tick(int(nb.sum()), len(lengths))


def _salvage(inflight: deque, log: Progress) -> None:
    ended = {id(item[0]) for item in inflight if item[1] is None}
    try:
        while inflight and id(inflight[0][0]) in ended:
            _drain(inflight.popleft(), log)
    except Exception:  # noqa: BLE001 -- the original error is the one to report
        pass


def _chunks(path: Path, text_key: str, fw: _FileWork) -> Iterator[tuple[list[str], list[int]]]:
    texts: list[str] = []
    src: list[int] = []
    size = 0
    for doc in iter_documents([path], text_key):
        if not doc.text:
            fw.empty += 1  # an empty text would be a lone EOS: skipped, counted
            continue
        texts.append(doc.text)
        src.append(fw.source_index(doc.source))
        size += len(doc.text)
        if size >= CHUNK_BYTES or len(texts) >= CHUNK_DOCS:
            yield texts, src
            texts, src, size = [], [], 0
    if texts:
        yield texts, src


class _FileWork:
    """One input file's encoded output, written atomically (:mod:`lmfab.atomic`): the ids
    stream into ``f<i>.bin.tmp`` and every file is in place before the ``.json`` marker."""

    def __init__(self, work_dir: Path, index: int, key: dict, dtype: np.dtype) -> None:
        self.base = work_dir / f"f{index:05d}"
        self.key, self.dtype = key, dtype
        self.ids = AtomicFile(f"{self.base}.bin", fsync=True)
        self.lengths: list[np.ndarray] = []
        self.u: list[np.ndarray] = []
        self.nb: list[np.ndarray] = []
        self.src: list[np.ndarray] = []
        self.sources: dict[str, int] = {}
        self.empty = 0

    def source_index(self, name: str) -> int:
        return self.sources.setdefault(name, len(self.sources))

    def append(self, ids, lengths, u, nb, src) -> None:
        self.ids.file.write(memoryview(np.ascontiguousarray(ids, dtype=self.dtype)).cast("B"))
        self.lengths.append(lengths)
        self.u.append(u)
        self.nb.append(nb)
        self.src.append(np.asarray(src, dtype=np.int32))

    def finish(self) -> None:
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
        arrays = {
            "lengths": cat(self.lengths, np.int64), "u": cat(self.u, np.float64),
            "nbytes": cat(self.nb, np.int64), "src": cat(self.src, np.int32),
        }
        with atomic_open(f"{self.base}.npz") as f:
            np.savez(f, **arrays)
        self.ids.commit()
        fault("pack.encode", file=self.base.name)  # tests: killed with the marker unwritten
        marker = {
            "key": self.key,
            "documents": int(arrays["lengths"].size),
            "empty_documents": self.empty,
            "tokens": int(arrays["lengths"].sum()),
            "text_bytes": int(arrays["nbytes"].sum()),
            "sources": list(self.sources),
        }
        atomic_write_json(Path(f"{self.base}.json"), marker)  # the file's done marker, last

    def abort(self) -> None:
        self.ids.abort()


def file_key(path: Path, tok_hash: str, seed: int, dtype: np.dtype, text_key: str) -> dict:
    st = path.stat()
    return {"version": WORK_VERSION, "path": str(path), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "tokenizer": tok_hash, "seed": seed,
            "dtype": dtype.name, "text_key": text_key}


def read_marker(work_dir: Path, i: int) -> dict | None:
    path = work_dir / f"f{i:05d}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_result(work_dir: Path, i: int) -> dict[str, Any]:
    marker = json.loads((work_dir / f"f{i:05d}.json").read_text(encoding="utf-8"))
    with np.load(work_dir / f"f{i:05d}.npz") as z:
        arrays = {k: z[k] for k in ("lengths", "u", "nbytes", "src")}
    return {**marker, **arrays}

