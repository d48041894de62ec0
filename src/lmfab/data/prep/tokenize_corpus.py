"""``lmfab data tokenize``: documents -> byte-level BPE tokenizer -> packed token shards.

The one-command path of the small fab (``make demo``), built from the two real pieces so
there is one code path:

1. **Tokenizer.** Either load an existing ``tokenizer.json`` (it must contain the EOS token
   ``<|endoftext|>``), or train a GPT-2-style byte-level BPE with
   ``lmfab.data.prep.bpe_train.train_tokenizer`` on the *train* documents only (the ones pack
   will not hold out), ``<|endoftext|>`` as the only special token. Byte-level BPE without
   a normalizer is lossless: ``decode(encode(text)) == text`` for every string. The file is
   saved as ``out_dir/tokenizer.json``; its sha256 ties the shards to it (``lmfab.data.shards``).
2. **Split and pack** with ``lmfab.data.prep.pack.pack_files`` at one ``seq_len``, into
   ``out_dir/{train,val}/shard_00000.tok ...`` (the flat layout of a single-MSL dataset).
   A document goes to ``val`` when ``split_hash(text, seed) < val_fraction`` (deterministic,
   independent of order, exact duplicates on the same side); with none below it the
   lowest-hash document(s) are held out, so a small corpus still gets a val split.
   Documents are encoded in batches (in worker processes for large inputs), each followed
   by EOS, concatenated per split and cut into windows of ``seq_len + 1`` tokens; a
   literal ``<|endoftext|>`` inside a document stays ordinary text, so EOS ids in the
   shards always mark real document boundaries.

``out_dir/meta.json`` is written last and marks completion (DESIGN principle 8): a re-run
with the same inputs and parameters returns at once ("already tokenized"); a re-run with
different ones is refused, because its shards would silently mix with the old ones. A
killed run resumes its encoding per input file (``out_dir/work/``, see ``prep/pack.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lmfab.atomic import atomic_path
from lmfab.data.prep.bpe_train import train_tokenizer
from lmfab.data.prep.encode import split_hash
from lmfab.data.prep.pack import (
    EOS_TOKEN,
    META_FORMAT,
    META_NAME,
    META_VERSION,
    TOKENIZER_NAME,
    WORK_NAME,
    finished_marker,
    load_checked_tokenizer,
    pack_files,
)
from lmfab.data.prep.readers import list_files
from lmfab.data.shards import tokenizer_hash as file_sha256

__all__ = ["EOS_TOKEN", "load_tokenizer", "read_meta", "split_hash", "tokenize_corpus"]
SPLITS = ("train", "val")


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
    processes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (files or folders) into ``out_dir``; return the meta dict.

    With ``tokenizer`` (a ``tokenizer.json`` path) the file is used as is and ``vocab_size``
    / ``min_frequency`` are ignored; otherwise a BPE of ``vocab_size`` is trained.
    ``processes``: encoding workers (default: all cores, or in-process for small inputs).
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
    meta = finished_marker(out / META_NAME, params, "tokenization")
    if meta is not None:
        print(f"already tokenized: {out} (meta.json matches; nothing to do)", file=sys.stderr)
        return meta
    tok_path = out / TOKENIZER_NAME
    if tokenizer:
        load_checked_tokenizer(tokenizer)
        out.mkdir(parents=True, exist_ok=True)
        if not (tok_path.exists() and os.path.samefile(tokenizer, tok_path)):
            with atomic_path(tok_path) as tmp:
                shutil.copyfile(tokenizer, tmp)
    else:
        train_tokenizer(
            files, tok_path, vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN], val_fraction=val_fraction, seed=seed, progress=progress,
        )
    metas = pack_files(
        files, {seq_len: out}, tok_path, val_fraction=val_fraction, seed=seed,
        processes=processes, shard_tokens=shard_tokens, work_dir=out / WORK_NAME,
        params=params, progress=progress,
        meta_extra={"vocab_size_requested": params["vocab_size"],
                    "tokenizer_trained": tokenizer is None},
    )
    shutil.rmtree(out / WORK_NAME, ignore_errors=True)
    return metas[seq_len]


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
