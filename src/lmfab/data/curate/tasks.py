"""The per-task work of the pipeline: functions an executor runs anywhere (picklable args).

Each function takes the run's context (recipe, work folder) and one named task record
(``MapTask``, ``ShingleTask``, ``ScatterTask``, ``GatherTask``):

* ``map_task`` -- one slice of one input file through the per-document steps of
  :mod:`lmfab.data.curate.steps` (read -> clean -> filter, each with its counters), and
  the keys the global stages need (normalized SHA-256 prefix, MinHash band keys and, with verification,
  signatures). Writes ``map/tNNNNN.docs.jsonl.zst`` (the surviving documents),
  ``tNNNNN.npz`` (their keys) and ``tNNNNN.json`` (per-stage, per-source counters), then
  the ``tNNNNN.done`` marker. The text is read and normalized once for all stages.
* ``scatter_task`` -- one map task's documents into per-output-shard bucket files, each line
  prefixed by its global rank in the final (shuffled) order.
* ``gather_task`` -- one output shard: its buckets from every task, sorted by rank, written
  as ``jsonl.zst``.

Every file is written atomically (:mod:`lmfab.atomic`); the done marker is written last, so
a killed run leaves either a complete task or none (resume = skip the marked ones).
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zstandard

from lmfab.atomic import atomic_open, atomic_write_bytes, read_done, write_done
from lmfab.data.curate import text as T
from lmfab.data.curate.recipe import Recipe
from lmfab.data.curate.steps import WorkDoc, build_steps
from lmfab.data.prep.readers import ReadStats, iter_documents

MAX_BATCH_CHARS = 4_000_000


class _Rejects(ReadStats):
    """ReadStats that also keeps every bad record's ``file:line: reason`` message."""

    def __init__(self) -> None:
        super().__init__()
        self.all_errors: list[str] = []

    def record_error(self, message: str) -> None:
        super().record_error(message)
        self.all_errors.append(message)


@dataclass(frozen=True)
class MapTask:
    """One slice of one input file: lines in blocks ``k`` (mod ``slices``) of ``block_lines``."""

    index: int  # position in the run's task list; names its work files tNNNNN
    file: int  # position of ``path`` in the sorted input files (the ordinal's high bits)
    path: str
    slice: int
    slices: int


@dataclass(frozen=True)
class ShingleTask:
    """Exact verification's n-gram sets for the candidate rows ``local`` of map task ``index``."""

    index: int
    local: list[int]


@dataclass(frozen=True)
class ScatterTask:
    """Map task ``index``'s planned copies into (split, shard) buckets."""

    index: int
    keep_meta: bool


@dataclass(frozen=True)
class GatherTask:
    """One output shard: ``<output>/<split_name>/part-<shard>.jsonl.zst`` from all buckets."""

    split_name: str
    split_id: int
    shard: int
    n_tasks: int
    output: str
    level: int  # zstd compression level


class KeptDoc(NamedTuple):
    """A document that passed the map task's steps, with what the later stages need."""

    ordinal: int  # (file << 40) | line: its place in the input order
    source: str
    text: str  # the cleaned text, as written out
    norm: str  # the SlimPajama-normalized text (hashed by dedup and split), or ""
    id: str
    meta: dict | None
    nbytes: int  # UTF-8 bytes of ``text``


def map_task(recipe: Recipe, work: str, task: MapTask) -> dict:
    """Read, clean, filter one slice of one file; hash what later stages need."""
    work_dir = Path(work) / "map"
    tid = f"t{task.index:05d}"
    done = work_dir / f"{tid}.done"
    if read_done(done) is not None:
        return json.loads((work_dir / f"{tid}.json").read_text())
    r = recipe
    k, n_slices, block = task.slice, task.slices, r.read.block_lines
    select = (lambda line: ((line - 1) // block) % n_slices == k) if n_slices > 1 else (
        lambda line: True)
    rejects = _Rejects()
    docs = iter_documents([task.path], r.read.text_key, on_error="skip", stats=rejects,
                          select=select)
    read, clean, filt = steps = build_steps(r)
    kept: list[KeptDoc] = []
    t_prev = time.perf_counter()
    for doc in docs:
        read.seconds += time.perf_counter() - t_prev  # the reader's time
        d = WorkDoc(doc.source, doc.text, len(doc.text.encode("utf-8")))
        keep = read(d) and clean(d) and filt(d)
        t_prev = time.perf_counter()
        if keep:
            doc_id = (doc.meta or {}).get("id") or f"{doc.path}:{doc.line}"
            kept.append(KeptDoc((task.file << 40) | doc.line, doc.source, d.text, d.norm,
                                str(doc_id), doc.meta, d.nbytes))
    secs: dict[str, float] = defaultdict(float)
    if read.by_source:  # every step saw the documents, so each has a time
        secs.update({step.name: step.seconds for step in steps})
    arrays = _hash_kept(r, kept, secs)
    sources = sorted({row.source for row in kept} | set(read.by_source))
    src_index = {s: i for i, s in enumerate(sources)}
    arrays["source"] = np.array([src_index[row.source] for row in kept], dtype=np.int32)
    arrays["ordinal"] = np.array([row.ordinal for row in kept], dtype=np.int64)
    arrays["nbytes"] = np.array([row.nbytes for row in kept], dtype=np.int64)
    t0 = time.perf_counter()
    _write_docs(work_dir / f"{tid}.docs.jsonl.zst", kept)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(work_dir / f"{tid}.npz", buf.getvalue())
    secs["write_intermediate"] += time.perf_counter() - t0
    summary = {
        "index": task.index, "n": len(kept), "sources": sources,
        "counts": {step.name: step.counts() for step in steps},
        "rejects": rejects.all_errors, "seconds": dict(secs),
    }
    atomic_write_bytes(work_dir / f"{tid}.json", json.dumps(summary).encode())
    write_done(done)
    return summary


def _hash_kept(r: Recipe, kept: list[KeptDoc], secs: dict) -> dict:
    arrays: dict[str, np.ndarray] = {}
    if r.exact_dedup is not None or r.split is not None:
        t0 = time.perf_counter()
        normalized = r.exact_dedup is None or r.exact_dedup.normalized
        raw = b"".join(T.sha256_128(row.norm if normalized else row.text) for row in kept)
        arrays["exact"] = np.frombuffer(raw, dtype=np.uint64).reshape(len(kept), 2).copy()
        secs["exact_dedup"] += time.perf_counter() - t0
    nd = r.near_dedup
    if nd is not None:
        from lmfab.data.curate.minhash import MinHasher

        t0 = time.perf_counter()
        mh = MinHasher(nd.ngram, nd.num_perm, nd.bands, nd.rows, nd.seed, nd.hashing)
        keep_sig = nd.verify_mode() == "signature"
        bands, sigs = [], []
        i = 0
        while i < len(kept):  # batches bounded by documents and by characters
            j, chars = i, 0
            while j < len(kept) and j - i < nd.batch_docs and (chars < MAX_BATCH_CHARS or j == i):
                chars += len(kept[j].norm)
                j += 1
            sig = mh.signatures([row.norm for row in kept[i:j]])
            bands.append(mh.band_keys(sig))
            if keep_sig:
                sigs.append(sig)
            i = j
        arrays["bands"] = (np.concatenate(bands) if bands
                           else np.zeros((0, nd.bands), dtype=np.uint64))
        if keep_sig:
            arrays["sig"] = (np.concatenate(sigs) if sigs
                             else np.zeros((0, nd.num_perm), dtype=np.uint32))
        secs["near_dedup"] += time.perf_counter() - t0
    return arrays


def shingle_task(recipe: Recipe, work: str, task: ShingleTask) -> int:
    """Exact verification: the n-gram sets of the candidate documents of map task ``index``.

    ``task.local`` are row numbers (sorted) in the task's document file. Each document's
    normalized text is re-derived from the written text (``normalize(clean(x))`` is what
    the map task hashed), its n-gram hashes -- the 64-bit hashes MinHash uses -- are sorted
    and made unique, and appended to ``verify/tNNNNN.u64`` (raw little-endian uint64,
    written as it goes: memory is one batch); ``verify/tNNNNN.npz`` holds ``local`` and
    the offsets of each document's run. Disk: 8 B per distinct n-gram, ~8 B per character
    of each candidate document; the dedup process memory-maps the file.
    """
    from lmfab.data.curate.minhash import MinHasher

    base = Path(work) / "verify"
    index, local = task.index, task.local
    tid = f"t{index:05d}"
    done = base / f"{tid}.done"
    if read_done(done) is not None:
        return 0
    nd = recipe.near_dedup
    with open(Path(work) / "map" / f"{tid}.docs.jsonl.zst", "rb") as raw:
        data = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read()
    lines = data.split(b"\n")  # JSON escapes newlines inside strings: one record a line
    del data
    texts = [T.normalize(json.loads(lines[i])["text"]) for i in local]  # candidates only
    del lines
    mh = MinHasher(nd.ngram, nd.num_perm, nd.bands, nd.rows, nd.seed, nd.hashing)
    counts = np.zeros(len(texts), dtype=np.int64)
    with atomic_open(base / f"{tid}.u64") as f:
        i = 0
        while i < len(texts):
            j, chars = i, 0
            while j < len(texts) and (chars < MAX_BATCH_CHARS or j == i):
                chars += len(texts[j])
                j += 1
            hashes, doc = mh.feature_hashes(texts[i:j])
            bounds = np.searchsorted(doc, np.arange(j - i + 1))
            for d in range(j - i):
                u = np.sort(hashes[bounds[d] : bounds[d + 1]])  # faster than np.unique
                u = u[np.concatenate(([True], u[1:] != u[:-1]))]
                counts[i + d] = len(u)
                f.write(u.astype("<u8", copy=False).tobytes())
            i = j
    buf = io.BytesIO()
    np.savez(buf, local=np.asarray(local, dtype=np.int64),
             offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64))
    atomic_write_bytes(base / f"{tid}.npz", buf.getvalue())
    write_done(done)
    return len(local)


def _write_docs(path: Path, kept: list[KeptDoc]) -> None:
    with atomic_open(path) as raw, zstandard.ZstdCompressor(level=1).stream_writer(raw) as out:
        for row in kept:
            rec = {"text": row.text, "source": row.source, "id": row.id, "meta": row.meta}
            out.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))


def read_docs(path: Path) -> list[dict]:
    with open(path, "rb") as raw:
        data = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read()
    # split on "\n" only: str.splitlines() would also cut at U+2028 / U+0085 inside text
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line]


def _output_record(doc: dict, keep_meta: bool) -> str:
    meta = dict(doc["meta"] or {}) if keep_meta else {}
    meta.setdefault("redpajama_set_name", doc["source"])
    return json.dumps({"text": doc["text"], "meta": meta}, ensure_ascii=False)


def scatter_task(work: str, task: ScatterTask) -> int:
    """Write task ``index``'s planned copies into bucket files, one per (split, shard)."""
    base, index, keep_meta = Path(work), task.index, task.keep_meta
    done = base / "scatter" / f"t{index:05d}.done"
    if read_done(done) is not None:
        return 0
    plan = np.load(base / "plan.npz")
    sel = plan["task"] == index
    local, split, shard, rank = (plan[k][sel] for k in ("local", "split", "shard", "rank"))
    docs = read_docs(base / "map" / f"t{index:05d}.docs.jsonl.zst")
    out_dir = base / "scatter" / f"t{index:05d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
    lines = {}
    for li, sp, sh, rk in zip(local.tolist(), split.tolist(), shard.tolist(), rank.tolist(),
                              strict=True):
        if li not in lines:
            lines[li] = _output_record(docs[li], keep_meta)
        buckets[(sp, sh)].append(f"{rk}\t{lines[li]}\n")
    for (sp, sh), rows in buckets.items():
        atomic_write_bytes(out_dir / f"{sp}-{sh:05d}.txt", "".join(rows).encode("utf-8"))
    write_done(done)
    return len(local)


def gather_task(work: str, task: GatherTask) -> int:
    """Concatenate one output shard's buckets in rank order into a jsonl.zst file."""
    base = Path(work)
    split_name, split_id, shard = task.split_name, task.split_id, task.shard
    done = base / "gather" / f"{split_name}-{shard:05d}.done"
    if read_done(done) is not None:
        return 0
    rows: list[tuple[int, str]] = []
    for t in range(task.n_tasks):
        path = base / "scatter" / f"t{t:05d}" / f"{split_id}-{shard:05d}.txt"
        if path.exists():
            for line in path.read_bytes().decode("utf-8").split("\n"):
                if not line:
                    continue
                rk, rec = line.split("\t", 1)
                rows.append((int(rk), rec))
    rows.sort(key=lambda x: x[0])
    out = Path(task.output) / split_name / f"part-{shard:05d}.jsonl.zst"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(rec + "\n" for _, rec in rows).encode("utf-8")
    atomic_write_bytes(out, zstandard.ZstdCompressor(level=task.level).compress(data))
    (base / "gather").mkdir(exist_ok=True)
    write_done(done)
    return len(rows)
