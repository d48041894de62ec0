"""A faster encoder for GPT-2-style byte-level BPE tokenizers, through tiktoken.

Hugging Face ``tokenizers`` is the reference: it trains our vocabularies and is what every
other part of lmfab loads. Its encode rate, though, caps ``lmfab data pack`` at about
2.8 MB/s per core on the CI-class CPU (dev/LOG.md), and tiktoken's byte-level BPE
runs the same algorithm about 3.8x faster. So, for a ``tokenizer.json`` whose pipeline is
exactly GPT-2's (no normalizer, ByteLevel pre-tokenizer with GPT-2's split regex and no
prefix space, a BPE model without dropout, unknown token or byte fallback), the pack
workers encode with a tiktoken ``Encoding`` built from the same vocabulary.

Equivalence. tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF
applies the merge with the lowest index in its merge list. With rank = token id this is
the same procedure when ids grow with merge order, which is how BPE training assigns them;
:func:`tiktoken_encoding` checks it for every merge and returns None otherwise (HF is used).
A test compares both encoders token for token on the shipped corpus; literal special-token
text is encoded as plain text in both (``encode_ordinary``).
"""

from __future__ import annotations

import json
from pathlib import Path

# GPT-2's pre-tokenizer split, as in HF's ByteLevel(use_regex=True) and tiktoken's r50k_base.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def tiktoken_encoding(tokenizer_json: str | Path):
    """A tiktoken Encoding equivalent to this tokenizer.json, or None where it may not be."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (spec.get("normalizer") is not None or model.get("type") != "BPE"
            or model.get("dropout") or model.get("unk_token") or model.get("byte_fallback")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
            or not pre.get("use_regex", True)):
        return None
    decode = _byte_decoder()
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    ranks: dict[bytes, int] = {}
    for token, idx in model["vocab"].items():
        if token in special:
            continue
        try:
            ranks[bytes(decode[ch] for ch in token)] = idx
        except KeyError:  # a character outside the byte alphabet: not byte-level
            return None
    vocab = model["vocab"]
    last = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        idx = vocab.get(left + right)
        if idx is None or idx <= last:  # ids must follow merge order (rank = priority)
            return None
        last = idx
    try:
        return tiktoken.Encoding("lmfab-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                 special_tokens=special)
    except ValueError:
        return None
