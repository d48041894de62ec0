"""``lmfab data tokenizer train``: a byte-level BPE from a streamed, weighted corpus sample.

The tokenizer is GPT-2's kind: Hugging Face ``tokenizers`` BPE over the ByteLevel
pre-tokenizer (no prefix space), the 256-byte initial alphabet so any text is encodable, a
ByteLevel decoder, no normalizer -- ``decode(encode(text)) == text`` for every string.
``pre_tokenizer="gpt2-marks"`` keeps combining marks inside words (GPT-2's regex splits
diacritised Arabic at every vowel sign, which no vocabulary can repair; see docs/data.md).
Special tokens come first in the vocabulary, in the order given (EOS ``<|endoftext|>``,
optionally PAD ``<|pad|>`` and others).

**Sampling.** The corpus is read twice as a stream and never held in memory; the BPE
trainer keeps only word counts. Pass 1 counts the bytes of every *group* -- a document's
source (``meta.redpajama_set_name``) or its language (``detect_lang``: the majority script
of its letters). Pass 2 feeds the trainer a sample in which group ``g`` has the share
``w_g / sum(w)`` of ``sample_bytes``: a group larger than its share is down-sampled (a
document is kept when a seeded hash of its text falls below the rate); a smaller one is
up-sampled by repeating its documents ``floor(rate)`` times plus one more with probability
``frac(rate)`` -- for BPE this is the same as scaling that group's pair counts, which is
how a small language gets its fair share of merges (Jais trained its tokenizer on equal
Arabic and English). Without ``sample_bytes``, a weighted sample is the largest one that
needs no repetition. Without weights, the sample keeps the corpus's own proportions.

**Held-out documents.** With ``val_fraction`` > 0 the documents that ``lmfab data pack``
would put in ``val`` for the same ``seed`` (seeded hash below ``val_fraction``; the
lowest-hash document when none is) are left out, so held-out loss and the fertility report
on held-out text are not flattered. No torch here.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmfab.atomic import atomic_path
from lmfab.data.prep.encode import split_hash
from lmfab.data.prep.pack import EOS_TOKEN
from lmfab.data.prep.progress import Progress
from lmfab.data.prep.readers import Document, iter_documents, list_files

PAD_TOKEN = "<|pad|>"
PRETOKENIZERS = ("gpt2", "gpt2-marks")
# GPT-2's split, with combining marks (\p{M}) kept inside words: diacritised Arabic
# (harakat are marks, not letters) would otherwise be cut at every vowel sign.
_MARKS_SPLIT = (r"'(?:[sdmt]|ll|ve|re)| ?[\p{L}\p{M}]+| ?\p{N}+| ?[^\s\p{L}\p{M}\p{N}]+"
                r"|\s+(?!\S)|\s+")
GROUPINGS = ("source", "lang")
LANG_SAMPLE_CHARS = 20_000
_ARABIC = re.compile(
    r"[\u0620-\u064A\u066E-\u06D3\u06D5\u06EE\u06EF\u06FA-\u06FF\u0750-\u077F"
    r"\u08A0-\u08C9\uFB50-\uFDFF\uFE70-\uFEFC]"
)
_LATIN_EXT = re.compile(r"[\u00C0-\u02AF\u1E00-\u1EFF]")  # incl. IPA
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# non-ASCII characters outside the Latin and Arabic blocks (tested with str.isalpha)
_OTHER = re.compile(
    r"[^\x00-\x7F\u00C0-\u02AF\u1E00-\u1EFF\u0600-\u06FF\u0750-\u077F\u08A0-\u08FF"
    r"\uFB50-\uFDFF\uFE70-\uFEFF]"
)
_BATCH = 256


def detect_lang(text: str) -> str:
    """``ar`` / ``en`` / ``other`` / ``none`` by the majority script of the letters.

    ``ar`` when Arabic-script letters are at least half of the letters (the threshold the
    shared corpus uses for ``lang: ar``), ``en`` when Latin-script letters are (in this
    corpus Latin-script text is English prose, markup and code), ``other`` for any other
    majority, ``none`` without letters. Only the first ``LANG_SAMPLE_CHARS`` are looked at.
    """
    head = text[:LANG_SAMPLE_CHARS]
    ascii_bytes = head.encode("ascii", "ignore")
    latin = len(ascii_bytes) - len(ascii_bytes.translate(None, _ASCII_LETTERS))
    latin += _LATIN_EXT.subn("", head)[1]
    arabic = _ARABIC.subn("", head)[1]
    other = sum(1 for c in _OTHER.findall(head) if c.isalpha())
    letters = latin + arabic + other
    if letters == 0:
        return "none"
    if 2 * arabic >= letters:
        return "ar"
    if 2 * latin >= letters:
        return "en"
    return "other"


def group_of(doc: Document, by: str) -> str:
    """The document's group for ``by`` in ``GROUPINGS``."""
    if by == "source":
        return doc.source
    if by == "lang":
        return detect_lang(doc.text)
    raise ValueError(f"unknown grouping {by!r}; choose one of {', '.join(GROUPINGS)}")


def make_pre_tokenizer(kind: str = "gpt2"):
    """``gpt2``: GPT-2's ByteLevel split; ``gpt2-marks``: the same keeping marks in words."""
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "gpt2-marks":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_MARKS_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"unknown pre-tokenizer {kind!r}; choose one of {', '.join(PRETOKENIZERS)}")


def parse_weights(spec: str | dict[str, float] | None) -> dict[str, float] | None:
    """``"Arabic=1,Books=0.5,*=1"`` -> dict; ``*`` is the weight of every unnamed group."""
    if spec is None or isinstance(spec, dict):
        return spec
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.rpartition("=")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not sep or not name or not math.isfinite(w) or w < 0:
            raise ValueError(f"bad weight {part!r} in {spec!r}: expected NAME=NUMBER (>= 0)")
        weights[name] = w
    if not weights:
        raise ValueError(f"no weights in {spec!r}")
    return weights


def sample_hash(text: str, seed: int) -> float:
    """A second seeded hash in [0, 1), independent of ``split_hash``, for sampling."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=b"lmfab-sample",
                        salt=seed.to_bytes(16, "little"))
    return int.from_bytes(h.digest(), "little") / 2.0**64


class _Holdout:
    """Which documents are held out (pack's val rule), decided after one streaming pass."""

    def __init__(self, val_fraction: float, seed: int) -> None:
        self.val_fraction, self.seed = val_fraction, seed
        self.any_below = False
        self.low = math.inf

    def see(self, text: str) -> float:
        u = split_hash(text, self.seed)
        self.any_below |= u < self.val_fraction
        self.low = min(self.low, u)
        return u

    def held_out(self, u: float) -> bool:
        if self.val_fraction <= 0:
            return False
        return u < self.val_fraction if self.any_below else u == self.low


def group_bytes(
    files: Sequence[Path], by: str, holdout: _Holdout, text_key: str, log: Progress
) -> tuple[dict[str, int], dict[str, int]]:
    """Pass 1: bytes and documents per group of the documents not held out."""
    below: list[tuple[str, int]] = []  # documents under val_fraction
    lowest: list[tuple[str, int]] = []  # the lowest-hash document(s), pack's fallback
    low = math.inf
    nbytes: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    log.start("count groups")
    for doc in iter_documents(files, text_key):
        if not doc.text:
            continue
        u, g, b = holdout.see(doc.text), group_of(doc, by), len(doc.text.encode("utf-8"))
        nbytes[g] += b
        docs[g] += 1
        if u < holdout.val_fraction:
            below.append((g, b))
        if u < low:
            low, lowest = u, [(g, b)]
        elif u == low:
            lowest.append((g, b))
        log.tick(b, 1)
    log.done()
    if not docs:
        raise ValueError(f"no input documents found in {[str(f) for f in files] or 'the inputs'}")
    if holdout.val_fraction > 0:
        for g, b in below or lowest:  # subtract the held-out documents
            nbytes[g] -= b
            docs[g] -= 1
    return dict(nbytes), dict(docs)


def sampling_rates(
    available: dict[str, int], weights: dict[str, float] | None, sample_bytes: int | None
) -> dict[str, float]:
    """Per-group rate (expected copies of each document) for the requested sample."""
    total = sum(available.values())
    if total == 0:
        raise ValueError("no training documents left after holding out the val split")
    if weights is None:
        rate = 1.0 if sample_bytes is None else min(1.0, sample_bytes / total)
        return {g: rate for g in available}
    unknown = sorted(set(weights) - set(available) - {"*"})
    if unknown:
        raise ValueError(
            f"weight given for {unknown}, which has no documents (an empty source); "
            f"groups found: {sorted(available)}"
        )
    missing = sorted(set(available) - set(weights))
    if missing and "*" not in weights:
        raise ValueError(
            f"no weight for group(s) {missing}; give one for every group of {sorted(available)} "
            "or a default with *=W (0 leaves a group out)"
        )
    w = {g: weights.get(g, weights.get("*", 0.0)) for g in available}
    w = {g: v for g, v in w.items() if available[g] > 0}
    norm = sum(w.values())
    if norm <= 0:
        raise ValueError(f"all weights are 0: {weights}")
    share = {g: v / norm for g, v in w.items()}
    if sample_bytes is None:  # the largest sample with no document repeated
        sample_bytes = min(available[g] / s for g, s in share.items() if s > 0)
    return {g: share.get(g, 0.0) * sample_bytes / available[g] if available[g] else 0.0
            for g in available}


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (EOS_TOKEN,),
    by: str = "source",
    weights: str | dict[str, float] | None = None,
    sample_bytes: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    pre_tokenizer: str = "gpt2",
    text_key: str = "text",
    progress: bool = True,
) -> dict[str, Any]:
    """Train a byte-level BPE on a weighted stream sample of ``inputs``; save ``out_path``.

    Returns a summary: per group, the bytes available, the rate and the bytes sampled.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    if not special_tokens:
        raise ValueError("special_tokens must include the EOS token")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size must be >= {256 + len(special_tokens)} (256 byte tokens + "
            f"{len(special_tokens)} special), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}; choose one of {', '.join(GROUPINGS)}")
    if sample_bytes is not None and sample_bytes < 1:
        raise ValueError(f"sample_bytes must be positive, got {sample_bytes}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    weights = parse_weights(weights)
    pre = make_pre_tokenizer(pre_tokenizer)
    files = list_files(inputs)
    log = Progress("tokenizer", progress)
    holdout = _Holdout(val_fraction, seed)
    available, docs = group_bytes(files, by, holdout, text_key, log)
    if not sum(available.values()):
        names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise ValueError(f"{names}: no training text left after holding out the val split "
                         f"(val_fraction {val_fraction}, {sum(docs.values())} documents with "
                         "text); give more documents or a smaller val fraction")
    rates = sampling_rates(available, weights, sample_bytes)
    sampled: Counter[str] = Counter()

    def texts() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in iter_documents(files, text_key):
            if not doc.text or holdout.held_out(split_hash(doc.text, seed)):
                continue
            g = group_of(doc, by)
            rate = rates[g]
            copies = int(rate) + (sample_hash(doc.text, seed) < rate - int(rate))
            nb = len(doc.text.encode("utf-8"))
            sampled[g] += copies * nb
            log.tick(nb * copies, copies)
            batch.extend([doc.text] * copies)
            if len(batch) >= _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    log.start("train BPE")
    tok.train_from_iterator(texts(), trainer=trainer)
    log.done()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tok.save(str(tmp))
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        # BPE stops when no pair is left that occurs min_frequency times: the sample is small
        print(f"warning: {out}: the vocabulary has {got} tokens, not the {vocab_size} "
              f"requested: {sum(sampled.values()) / 1e6:.2f} MB of text has no more pairs "
              f"occurring {min_frequency}+ times (give more text or a smaller --vocab-size; "
              "model.vocab_size must be at least the tokenizer's)", file=sys.stderr)
    return {
        "tokenizer": str(out),
        "vocab_size": got,
        "vocab_size_requested": vocab_size,
        "special_tokens": {t: tok.token_to_id(t) for t in special_tokens},
        "by": by,
        "weights": weights,
        "pre_tokenizer": pre_tokenizer,
        "val_fraction": val_fraction,
        "seed": seed,
        "groups": {
            g: {"documents": docs[g], "bytes": available[g], "rate": round(rates[g], 6),
                "sampled_bytes": sampled[g]}
            for g in sorted(available)
        },
        "sample_bytes": sum(sampled.values()),
    }
