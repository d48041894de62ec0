"""``lmfab data pack``: documents -> token ids on all cores -> shards at one or more MSLs.

Two stages, so that the expensive one runs in parallel and resumes per file:

1. **Encode** (parallel, resumable). The main process reads each input file in order
   (``readers.iter_documents``), cuts it into chunks of about ``CHUNK_BYTES`` of text and
   hands them to a pool of worker processes (``spawn``; each loads ``tokenizer.json`` once,
   with Hugging Face's own thread pool off so a process is a core). A worker returns the
   chunk's ids, every document followed by EOS, plus per-document length, byte count and
   split hash. At most a few chunks per worker are in flight, so memory stays bounded,
   and results are consumed in submission order, so the output does not depend on the
   number of processes. Each file's results go to ``work/f<i>.bin`` (ids) and
   ``work/f<i>.npz`` (per-document arrays); ``work/f<i>.json`` is written last and marks
   the file done. A killed run resumes: files whose marker matches (path, size, mtime,
   tokenizer hash, seed, dtype, text key) are not encoded again; a file's half-written
   ``.tmp`` is discarded.
2. **Pack** (sequential, cheap). Per split, the files' documents are concatenated in input
   order -- one stream, EOS between documents, as GPT-2 / Cerebras-GPT pack pre-training
   data -- and cut, once per requested ``seq_len``, into windows of ``seq_len + 1`` tokens
   (``ShardWriter``); the tail shorter than a window is dropped. Every MSL directory
   (``out/seq2048/``, ``out/seq8192/``) is a complete dataset: ``tokenizer.json``,
   ``train/`` and ``val/`` shards and ``meta.json``, which ``train_input.data_dir`` can
   name directly. With ``doc_index`` each shard gets a ``.docs.npy`` sidecar of document
   start offsets (see ``lmfab.data.shards``). ``pack.json`` at the top is written last and marks
   the whole run done; the work files are then removed (``keep_work`` keeps them).

Splits: ``val_inputs`` files go to ``val`` whole (the curation pipeline's holdout);
otherwise a document is ``val`` when its seeded blake2b hash in [0, 1) is below
``val_fraction`` (order-independent; exact copies land on the same side). When no document
falls below it, the lowest-hash document(s) are held out, so small corpora still get a val
split.

Checked before any work: the tokenizer has the EOS token, its vocabulary fits the shard
dtype, the inputs exist. Corrupt or truncated input is a ``ValueError`` naming
``file:line``; an input that yields no documents is an error naming it. No torch here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmfab import __version__
from lmfab.atomic import atomic_path, atomic_write_json, read_done
from lmfab.data.prep.encode import (
    encode_files,
    file_key,
    load_result,
)
from lmfab.data.prep.progress import Progress
from lmfab.data.prep.readers import list_files
from lmfab.data.shards import ShardWriter, shard_dtype
from lmfab.data.shards import tokenizer_hash as file_sha256
from lmfab.faultpoint import fault

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_NAME = "tokenizer.json"
META_NAME = "meta.json"
META_FORMAT = "lmfab-tokens"
META_VERSION = 1
PACK_NAME = "pack.json"
WORK_NAME = "work"


def load_checked_tokenizer(path: str | os.PathLike, eos_token: str = EOS_TOKEN) -> Tokenizer:
    """Load ``tokenizer.json``; it must contain ``eos_token`` (lmfab ends documents with it)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({err})") from err
    if tok.token_to_id(eos_token) is None:
        raise ValueError(
            f"{path}: the tokenizer has no {eos_token!r} token; lmfab ends every document "
            "with it. Add it as a special token, or train one with `lmfab data tokenizer train`"
        )
    return tok


# -- the public entry point ------------------------------------------------------------------


def pack_corpus(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike,
    seq_lens: Sequence[int],
    val_fraction: float | None = None,
    val_inputs: Sequence[str] = (),
    seed: int = 0,
    processes: int | None = None,
    shard_tokens: int = 50_000_000,
    doc_index: bool = False,
    dtype: str = "auto",
    eos_token: str = EOS_TOKEN,
    text_key: str = "text",
    keep_work: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pack ``inputs`` into ``out_dir/seq<T>/`` for every T in ``seq_lens``; return pack.json.

    ``val_fraction`` defaults to 0.02, or to 0 when ``val_inputs`` are given.
    """
    seq_lens = sorted({int(t) for t in seq_lens})
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"seq_len must be one or more positive integers, got {seq_lens}")
    if val_fraction is None:
        val_fraction = 0.0 if val_inputs else 0.02
    if val_inputs and val_fraction:
        raise ValueError("give either val_inputs or val_fraction > 0, not both")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    tok = load_checked_tokenizer(tokenizer, eos_token)
    shard_dtype(tok.get_vocab_size(with_added_tokens=True), dtype)  # fail early if too small
    files, forced_val = _input_files(inputs, val_inputs)
    params = {
        "inputs": [str(p) for p in inputs],
        "val_inputs": [str(p) for p in val_inputs],
        "input_files": [[str(f), f.stat().st_size] for f in files],
        "tokenizer": file_sha256(tokenizer),
        "seq_lens": seq_lens,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "dtype": dtype,
        "doc_index": doc_index,
        "eos_token": eos_token,
        "text_key": text_key,
    }
    marker = out / PACK_NAME
    done = finished_marker(marker, params, "pack")
    if done is not None:
        if not keep_work:
            shutil.rmtree(out / WORK_NAME, ignore_errors=True)  # left by a kill after pack.json
        print(f"already packed: {out} (pack.json matches; nothing to do)", file=sys.stderr)
        return done
    out.mkdir(parents=True, exist_ok=True)
    _copy(tokenizer, out / TOKENIZER_NAME)
    msl_dirs = {t: out / f"seq{t}" for t in seq_lens}
    for d in msl_dirs.values():
        d.mkdir(exist_ok=True)
        _copy(out / TOKENIZER_NAME, d / TOKENIZER_NAME)
    metas = pack_files(
        files, msl_dirs, out / TOKENIZER_NAME, forced_val=forced_val, given=(inputs, val_inputs),
        val_fraction=val_fraction, seed=seed, processes=processes, shard_tokens=shard_tokens,
        doc_index=doc_index, dtype=dtype, eos_token=eos_token, text_key=text_key,
        work_dir=out / WORK_NAME, params=params, progress=progress,
    )
    done = {
        "format": "lmfab-pack",
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": params,
        "datasets": {f"seq{t}": {"seq_len": t, "splits": m["splits"]} for t, m in metas.items()},
    }
    atomic_write_json(marker, done)
    if not keep_work:
        shutil.rmtree(out / WORK_NAME, ignore_errors=True)
    return done


def pack_files(
    files: list[Path],
    msl_dirs: dict[int, Path],
    tokenizer_path: Path,
    *,
    forced_val: list[bool] | None = None,
    given: tuple[Sequence[str], Sequence[str]] | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    processes: int | None = None,
    shard_tokens: int = 50_000_000,
    doc_index: bool = False,
    dtype: str = "auto",
    eos_token: str = EOS_TOKEN,
    text_key: str = "text",
    work_dir: Path,
    params: dict[str, Any],
    meta_extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[int, dict[str, Any]]:
    """Encode ``files`` (resumable) and pack them into each ``msl_dirs[seq_len]``.

    Writes ``tokenizer.json``-tied shards and ``meta.json`` (last) into every MSL directory
    and returns the metas by seq_len. ``tokenizer_path`` must already be in its final place.
    """
    tok = load_checked_tokenizer(tokenizer_path, eos_token)
    eos_id = tok.token_to_id(eos_token)
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    dt = shard_dtype(n_vocab, dtype)
    tok_hash = file_sha256(tokenizer_path)
    forced_val = forced_val or [False] * len(files)
    log = Progress("pack", progress)
    work_dir.mkdir(parents=True, exist_ok=True)
    keys = [file_key(f, tok_hash, seed, dt, text_key) for f in files]
    encode_files(
        files, keys, work_dir, tokenizer_path, eos_id=eos_id, n_vocab=n_vocab, seed=seed,
        dtype=dt, text_key=text_key, processes=processes, log=log,
    )
    results = [load_result(work_dir, i) for i in range(len(files))]
    _check_sources(files, results, given)
    flags = _val_flags(results, forced_val, val_fraction)
    splits = ("train", "val") if (val_fraction > 0 or any(forced_val)) else ("train",)

    writers: dict[tuple[int, str], ShardWriter] = {}
    for t, d in msl_dirs.items():
        for split in splits:
            sd = d / split
            sd.mkdir(parents=True, exist_ok=True)
            for pattern in ("*.tok", "*.tok.tmp", "*.docs.npy", "*.docs.npy.tmp"):
                for stale in sd.glob(pattern):
                    stale.unlink()  # leftovers of an interrupted run must not mix with this one
            writers[t, split] = ShardWriter(
                sd, t + 1, tok_hash, vocab_size=n_vocab, shard_tokens=shard_tokens,
                dtype=dt, doc_index=doc_index,
            )
    docs: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    sources: dict[str, Counter] = {}
    log.start("pack", total=len(files))
    for i, res in enumerate(results):
        tokens = np.fromfile(work_dir / f"f{i:05d}.bin", dtype=dt)
        if tokens.size != int(res["lengths"].sum()):
            raise ValueError(f"{work_dir}/f{i:05d}.bin: size does not match its index; "
                             f"delete {work_dir} and re-run")
        for split in splits:
            sel = flags[i] if split == "val" else ~flags[i]
            if not sel.any():
                continue
            lens = res["lengths"][sel]
            stream = tokens if sel.all() else tokens[np.repeat(sel, res["lengths"])]
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            for t in msl_dirs:
                writers[t, split].add_stream(stream, starts)
            docs[split] += int(sel.sum())
            nbytes[split] += int(res["nbytes"][sel].sum())
            for s, c in zip(*np.unique(res["src"][sel], return_counts=True), strict=True):
                sources.setdefault(res["sources"][s], Counter())[split] += int(c)
        log.tick(int(res["nbytes"].sum()), len(res["lengths"]), files=1)
        fault("pack.write", file=i)  # tests: killed with some shards written
    log.done()

    metas = {}
    for t, d in msl_dirs.items():
        split_stats = {}
        for split in splits:
            w = writers[t, split]
            w.close()
            split_stats[split] = {
                "documents": docs[split],
                "text_bytes": nbytes[split],
                "tokens": w.tokens,
                "windows": w.windows,
                "tokens_in_windows": w.windows * (t + 1),
                "dropped_tokens": w.tokens - w.windows * (t + 1),
                "shards": w.n_shards,
                "sources": {s: c[split] for s, c in sorted(sources.items()) if c[split]},
            }
        _check_windows(split_stats, t)
        meta = {
            "format": META_FORMAT,
            "format_version": META_VERSION,
            "lmfab_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "seq_len": t,
            "window": t + 1,
            "vocab_size": n_vocab,
            "eos_token": eos_token,
            "eos_id": eos_id,
            "dtype": dt.name,
            "tokenizer_file": TOKENIZER_NAME,
            "tokenizer_hash": tok_hash,
            "doc_index": doc_index,
            **(meta_extra or {}),
            "inputs": params.get("inputs"),
            "params": params,
            "splits": split_stats,
            "sources": {
                s: {"documents": c["train"] + c["val"], "train": c["train"], "val": c["val"]}
                for s, c in sorted(sources.items())
            },
        }
        atomic_write_json(d / META_NAME, meta)
        metas[t] = meta
        if progress:
            tr = split_stats["train"]
            va = f", val {split_stats['val']['windows']:,} windows" if "val" in split_stats else ""
            print(f"[pack] wrote {d}: seq_len {t}, train {tr['windows']:,} windows in "
                  f"{tr['shards']} shards{va}; vocab {n_vocab}, eos_id {eos_id}", file=sys.stderr)
    return metas


# -- stage 2 helpers -------------------------------------------------------------------------


def _input_files(inputs, val_inputs) -> tuple[list[Path], list[bool]]:
    if isinstance(inputs, str | os.PathLike):
        raise TypeError("inputs must be a list of paths, not a single path")
    if not inputs:
        raise ValueError("no inputs given: pass at least one file or folder of documents")
    train = list_files(inputs)
    val = list_files(val_inputs) if val_inputs else []
    both = {str(f) for f in train} & {str(f) for f in val}
    if both:
        raise ValueError(f"files given both as input and as val input: {sorted(both)[:5]}")
    return train + val, [False] * len(train) + [True] * len(val)


def _check_sources(files, results, given) -> None:
    total = sum(r["documents"] for r in results)
    if total == 0:
        raise ValueError(f"no input documents found in {[str(f) for f in files] or 'the inputs'}")
    if given is None:
        return
    per_file = {str(f): r["documents"] for f, r in zip(files, results, strict=True)}
    for path in [*given[0], *given[1]]:
        p = Path(path)
        n = sum(c for f, c in per_file.items() if f == str(p) or Path(f).is_relative_to(p))
        if n == 0:
            raise ValueError(f"{path}: empty source (no documents); fix it or leave it out")


def _val_flags(results, forced_val, val_fraction) -> list[np.ndarray]:
    flags = []
    for r, forced in zip(results, forced_val, strict=True):
        n = len(r["u"])
        flags.append(np.ones(n, bool) if forced else r["u"] < val_fraction)
    if val_fraction > 0 and not any(forced_val):
        us = [r["u"] for r in results]
        n_docs = sum(len(u) for u in us)
        if n_docs < 2:
            raise ValueError("val split empty: only one input document; need at least two")
        if not any(f.any() for f in flags):  # hold out every copy of the lowest-hash document
            low = min(float(u.min()) for u in us if u.size)
            flags = [u == low for u in us]
        if all(f.all() for f in flags):
            raise ValueError(
                f"train split empty: all {n_docs} documents fell in val; lower val_fraction"
            )
    return flags


def _check_windows(stats: dict[str, dict], seq_len: int) -> None:
    window = seq_len + 1
    if stats["train"]["windows"] == 0:
        raise ValueError(
            f"corpus too small for seq_len={seq_len}: the train split has "
            f"{stats['train']['tokens']} tokens, fewer than one window of {window}; "
            "add documents or lower seq_len"
        )
    if "val" in stats and stats["val"]["windows"] == 0:
        raise ValueError(
            f"val split empty for seq_len={seq_len}: its {stats['val']['documents']} "
            f"document(s) give {stats['val']['tokens']} tokens, fewer than one window of "
            f"{window}; raise val_fraction or lower seq_len"
        )


def finished_marker(marker: Path, params: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The contents of a finished run's ``marker`` file (pack.json, meta.json) when it was
    made with ``params``; None when there is none; a ValueError naming what differs when it
    was made with other inputs or parameters (``what``: "pack", "tokenization")."""
    done = read_done(marker)
    if done is None:
        return None
    changed = diff_params(done.get("params", {}), params)
    if changed:
        out = marker.parent
        raise ValueError(
            f"{out} already holds a finished {what} made with different inputs or parameters "
            f"({'; '.join(changed)}); choose a new out_dir, or delete {out} to redo it"
        )
    return done


def diff_params(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two parameter dicts."""
    changed = []
    for key in new:
        if old.get(key) != new[key]:
            a, b = json.dumps(old.get(key)), json.dumps(new[key])
            changed.append(f"{key}: {a[:120]} -> {b[:120]}")
    return changed


def _copy(src: str | os.PathLike, dst: Path) -> None:
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
