"""``lmfab data tokenize``: documents -> byte-level BPE tokenizer -> packed token shards.

What it does, in three streaming passes over the input documents:

1. **Split.** Each document goes to ``val`` when ``u(text) < val_fraction``, where ``u`` is a
   blake2b hash of the seed and the text, read as a number in [0, 1). The split is therefore
   deterministic, independent of document order and of the other documents, and exact
   duplicates always land on the same side (no train/val leakage through copies). With two
   or more documents and no hash below the threshold, the document(s) with the smallest hash
   go to ``val``, so a small corpus still gets a validation split.
2. **Tokenizer.** Either load an existing ``tokenizer.json`` (it must contain the EOS token
   ``<|endoftext|>``), or train a GPT-2-style byte-level BPE with Hugging Face ``tokenizers``
   on the *train* documents only (ByteLevel pre-tokenizer without prefix space, ByteLevel
   decoder, the 256-byte initial alphabet so that any text is encodable, ``<|endoftext|>``
   as the only special token). Byte-level BPE without a normalizer is lossless:
   ``decode(encode(text)) == text`` for every string. The file is saved as
   ``out_dir/tokenizer.json``; its sha256 ties the shards to it (see ``shards.py``).
3. **Pack.** Documents are encoded in batches, each followed by EOS, concatenated per split
   into one stream (as GPT-2 / Cerebras-GPT pack pre-training data), and cut into
   non-overlapping windows of ``seq_len + 1`` tokens; the remainder at the end of a split is
   dropped. Windows are written as ``out_dir/{train,val}/shard_00000.tok ...`` of at most
   ``shard_tokens`` tokens each. A literal ``<|endoftext|>`` inside a document is encoded as
   ordinary text, so EOS ids in the shards always mark real document boundaries.

``out_dir/meta.json`` is written last and marks completion (DESIGN principle 8): a re-run
with the same inputs and parameters returns at once ("already tokenized"); a re-run with
different ones is refused, because its shards would silently mix with the old ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmfab import __version__
from lmfab.data.readers import iter_documents, list_files
from lmfab.data.shards import ShardWriter
from lmfab.data.shards import tokenizer_hash as file_sha256

EOS_TOKEN = "<|endoftext|>"
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.json"
META_FORMAT = "lmfab-tokens"
META_VERSION = 1
SPLITS = ("train", "val")
ENCODE_BATCH = 256
PROGRESS_EVERY = 1000


def tokenize_corpus(
    inputs: list[str],
    out_dir: str,
    *,
    seq_len: int,
    vocab_size: int | None = 8192,
    tokenizer: str | None = None,
    val_fraction: float = 0.02,
    seed: int = 0,
    min_frequency: int = 2,
    shard_tokens: int = 50_000_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (files or folders) into ``out_dir``; return the meta dict.

    With ``tokenizer`` (a ``tokenizer.json`` path) the file is used as is and ``vocab_size``
    / ``min_frequency`` are ignored; otherwise a BPE of ``vocab_size`` is trained.
    """
    window = seq_len + 1
    _check_args(inputs, seq_len, vocab_size, tokenizer, val_fraction, seed, min_frequency)
    if shard_tokens < window:
        raise ValueError(f"shard_tokens={shard_tokens} is smaller than one window ({window})")
    out = Path(out_dir)
    files = list_files(inputs)
    params = {
        "inputs": [str(p) for p in inputs],
        "input_files": [[str(f), f.stat().st_size] for f in files],
        "seq_len": seq_len,
        "tokenizer": file_sha256(tokenizer) if tokenizer else None,
        "vocab_size": None if tokenizer else vocab_size,
        "min_frequency": None if tokenizer else min_frequency,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
    }
    meta_path = out / META_NAME
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        changed = _diff_params(meta.get("params", {}), params)
        if not changed:
            print(f"already tokenized: {out} (meta.json matches; nothing to do)", file=sys.stderr)
            return meta
        raise ValueError(
            f"{out} already holds a finished tokenization made with different inputs or "
            f"parameters ({'; '.join(changed)}); choose a new out_dir, or delete {out} to "
            "redo it"
        )
    out.mkdir(parents=True, exist_ok=True)
    log = _Progress(progress)

    # 1. split
    is_val, sources = _assign_splits(files, seed, val_fraction, log)

    # 2. tokenizer
    tok_path = out / TOKENIZER_NAME
    if tokenizer:
        tok = _load_with_eos(tokenizer)
        if not (tok_path.exists() and os.path.samefile(tokenizer, tok_path)):
            shutil.copyfile(tokenizer, str(tok_path) + ".tmp")
            os.replace(str(tok_path) + ".tmp", tok_path)
    else:
        tok = _train_bpe(files, is_val, vocab_size, min_frequency, log)
        tok.save(str(tok_path) + ".tmp")
        os.replace(str(tok_path) + ".tmp", tok_path)
    tok_hash = file_sha256(tok_path)
    eos_id = tok.token_to_id(EOS_TOKEN)
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is just text

    # 3. encode and pack
    writers = {}
    for split in SPLITS:
        split_dir = out / split
        split_dir.mkdir(exist_ok=True)
        for stale in [*split_dir.glob("*.tok"), *split_dir.glob("*.tok.tmp")]:
            stale.unlink()  # leftovers of an interrupted run must not mix with this one
        writers[split] = ShardWriter(
            split_dir, window, tok_hash, vocab_size=n_vocab, shard_tokens=shard_tokens
        )
    docs_per_split: Counter[str] = Counter()
    bytes_per_split: Counter[str] = Counter()
    log.start("encode")
    for batch in _batches(iter_documents(files), ENCODE_BATCH, is_val):
        encodings = tok.encode_batch_fast([d.text for _, d, _ in batch], add_special_tokens=False)
        for (_, doc, val), enc in zip(batch, encodings, strict=True):
            split = "val" if val else "train"
            writers[split].add(enc.ids, append=eos_id)
            docs_per_split[split] += 1
            nbytes = len(doc.text.encode("utf-8"))
            bytes_per_split[split] += nbytes
            log.tick(nbytes)
    log.done()

    splits = {}
    for split in SPLITS:
        w = writers[split]
        w.close()
        splits[split] = {
            "documents": docs_per_split[split],
            "text_bytes": bytes_per_split[split],
            "tokens": w.tokens,
            "windows": w.windows,
            "tokens_in_windows": w.windows * window,
            "dropped_tokens": w.tokens - w.windows * window,
            "shards": w.n_shards,
            "sources": {s: c[split] for s, c in sorted(sources.items()) if c[split]},
        }
    if splits["train"]["windows"] == 0:
        raise ValueError(
            f"corpus too small for seq_len={seq_len}: the train split has "
            f"{splits['train']['tokens']} tokens, fewer than one window of {window}; "
            "add documents or lower seq_len"
        )
    if splits["val"]["windows"] == 0:
        raise ValueError(
            f"val split empty: its {splits['val']['documents']} document(s) give "
            f"{splits['val']['tokens']} tokens, fewer than one window of {window}; "
            "raise val_fraction or lower seq_len"
        )

    meta = {
        "format": META_FORMAT,
        "format_version": META_VERSION,
        "lmfab_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seq_len": seq_len,
        "window": window,
        "vocab_size": n_vocab,
        "vocab_size_requested": params["vocab_size"],
        "eos_token": EOS_TOKEN,
        "eos_id": eos_id,
        "dtype": "uint16" if n_vocab <= 2**16 else "uint32",
        "tokenizer_file": TOKENIZER_NAME,
        "tokenizer_hash": tok_hash,
        "tokenizer_trained": tokenizer is None,
        "inputs": params["inputs"],
        "params": params,
        "splits": splits,
        "sources": {
            s: {"documents": c["train"] + c["val"], "train": c["train"], "val": c["val"]}
            for s, c in sorted(sources.items())
        },
    }
    tmp = out / (META_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, meta_path)
    if progress:
        t, v = splits["train"], splits["val"]
        print(
            f"[tokenize] wrote {out}: train {t['windows']:,} windows in {t['shards']} shards, "
            f"val {v['windows']:,} windows; vocab {n_vocab}, eos_id {eos_id}",
            file=sys.stderr,
        )
    return meta


def load_tokenizer(
    data_dir_or_json: str | os.PathLike, *, encode_special_tokens: bool = True
) -> Tokenizer:
    """Load ``tokenizer.json`` from a tokenized data dir, or from a path to the file itself.

    By default the tokenizer encodes a literal ``<|endoftext|>`` in its input as ordinary
    text, exactly as ``tokenize_corpus`` did for the training data; use the EOS id (from
    ``token_to_id`` or meta.json) to insert a real document boundary.
    """
    path = Path(data_dir_or_json)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (run `lmfab data tokenize`)")
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = encode_special_tokens
    return tok


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``meta.json`` of a finished tokenization (error if the run did not finish)."""
    path = Path(data_dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a finished tokenization "
            "(run `lmfab data tokenize` to create or complete it)"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != META_FORMAT or meta.get("format_version") != META_VERSION:
        raise ValueError(f"{path}: not an lmfab tokenization meta file (format v{META_VERSION})")
    return meta


# -- helpers ---------------------------------------------------------------------------------


def _check_args(inputs, seq_len, vocab_size, tokenizer, val_fraction, seed, min_frequency):
    if isinstance(inputs, str | os.PathLike):
        raise TypeError("inputs must be a list of paths, not a single path")
    if not inputs:
        raise ValueError("no inputs given: pass at least one file or folder of documents")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokenizer is None:
        if vocab_size is None or vocab_size < 257:
            raise ValueError(
                f"vocab_size must be >= 257 (256 byte tokens + EOS) to train a tokenizer, "
                f"got {vocab_size}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    elif not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _diff_params(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two parameter dicts."""
    changed = []
    for key in new:
        if old.get(key) != new[key]:
            a, b = json.dumps(old.get(key)), json.dumps(new[key])
            changed.append(f"{key}: {a[:120]} -> {b[:120]}")
    return changed


def split_hash(text: str, seed: int) -> float:
    """The document's position in [0, 1) used for the train/val split."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(16, "little"))
    return int.from_bytes(h.digest(), "little") / 2.0**64


def _assign_splits(files, seed, val_fraction, log) -> tuple[np.ndarray, dict[str, Counter]]:
    """Pass 1: per-document val flag (in reading order) and per-source split counts."""
    u: list[float] = []
    src: list[str] = []
    log.start("split")
    for doc in iter_documents(files):
        u.append(split_hash(doc.text, seed))
        src.append(doc.source)
        log.tick(len(doc.text.encode("utf-8")))
    log.done()
    if not u:
        raise ValueError(f"no input documents found in {[str(f) for f in files] or 'the inputs'}")
    if len(u) < 2:
        raise ValueError("val split empty: only one input document; need at least two")
    us = np.asarray(u)
    is_val = us < val_fraction
    if not is_val.any():
        is_val = us == us.min()  # every copy of the lowest-hash document
    if is_val.all():
        raise ValueError(
            f"train split empty: all {len(u)} documents fell in val; lower val_fraction"
        )
    sources: dict[str, Counter] = {}
    for name, val in zip(src, is_val, strict=True):
        sources.setdefault(name, Counter())["val" if val else "train"] += 1
    return is_val, sources


def _batches(docs, size: int, is_val: np.ndarray) -> Iterator[list]:
    """Group documents into lists of (index, doc, is_val) of at most ``size``."""
    batch = []
    for i, doc in enumerate(docs):
        if i >= len(is_val):
            raise RuntimeError("the inputs changed while being tokenized")
        batch.append((i, doc, bool(is_val[i])))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _load_with_eos(path: str) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOS_TOKEN) is None:
        raise ValueError(
            f"{path}: the tokenizer has no {EOS_TOKEN!r} token; lmfab ends every document "
            "with it. Add it as a special token, or omit --tokenizer to train one"
        )
    return tok


def _train_bpe(files, is_val, vocab_size, min_frequency, log) -> Tokenizer:
    """Pass 2: train a byte-level BPE on the train documents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[list[str]]:
        for batch in _batches(iter_documents(files), ENCODE_BATCH, is_val):
            for _, doc, _ in batch:
                log.tick(len(doc.text.encode("utf-8")))
            yield [doc.text for _, doc, val in batch if not val]

    log.start("train tokenizer")
    tok.train_from_iterator(texts(), trainer=trainer, length=int((~is_val).sum()))
    log.done()
    return tok


class _Progress:
    """Progress lines on stderr: one per PROGRESS_EVERY documents and one per phase."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.phase, self.docs, self.nbytes, self.t0 = "", 0, 0, time.perf_counter()

    def start(self, phase: str) -> None:
        self.phase, self.docs, self.nbytes, self.t0 = phase, 0, 0, time.perf_counter()

    def tick(self, nbytes: int) -> None:
        self.docs += 1
        self.nbytes += nbytes
        if self.docs % PROGRESS_EVERY == 0:
            self._line()

    def done(self) -> None:
        self._line(final=True)

    def _line(self, final: bool = False) -> None:
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        mb = self.nbytes / 1e6
        print(
            f"[tokenize] {self.phase}{' done' if final else ''}: {self.docs:,} docs, "
            f"{mb:,.1f} MB in {dt:.1f}s ({self.docs / dt:,.0f} docs/s, {mb / dt:,.1f} MB/s)",
            file=sys.stderr,
            flush=True,
        )
