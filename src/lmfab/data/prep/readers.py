"""Document readers: turn files and folders of raw text into a stream of ``Document``.

Supported inputs, chosen by file suffix:

* ``.jsonl`` and ``.jsonl.zst`` -- one JSON object per line, the SlimPajama layout
  (``{"text": ..., "meta": {"redpajama_set_name": ...}}``). ``.zst`` files are decompressed
  as a stream and read line by line, so a file is never held in memory whole. Blank lines
  are ignored.
* ``.parquet`` -- one document per row of the ``text`` column (``meta`` too when present),
  read a row group at a time; needs ``pyarrow`` (the ``curate`` extra).
* ``.txt`` and ``.md`` -- the whole file is one document.

A folder is read recursively in sorted path order, so the document order (and everything
derived from it) is reproducible. Inside a folder, hidden files and files with other
suffixes are passed over (and counted in ``ReadStats.skipped_files``); a *file* named
explicitly with an unknown suffix is an error, and so is a folder with nothing to read.

A pipeline's scratch is never read: folders whose name starts with ``_`` (``_work/``) are
passed over, and in the output folder of ``lmfab data curate`` (``stats.json`` beside
``rejects.txt``) only the split folders (``train/``, ``holdout/``) hold documents -- its
``rejects.txt`` and ``near_dedup/clusters.jsonl`` are reports, not text.

A document's ``source`` is ``meta.redpajama_set_name`` when the record has it, else the file
name without its suffixes; the tokenizer records per-source counts from it.

Bad input (a line that is not a JSON object, a missing or non-string text field, bytes that
are not UTF-8) raises ``ValueError`` naming ``file:line``. With ``on_error="skip"`` such
records are skipped and counted in ``ReadStats`` instead, with the first few messages kept.

``select(line) -> bool`` (optional) skips records before they are decoded, so N workers can
split one file by line blocks (the curation pipeline does, :mod:`lmfab.data.curate`). A
document's ``meta`` is the record's ``meta`` mapping (or None); it does not take part in
equality.

No torch here: this is the offline pipeline.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

SUFFIXES = (".jsonl.zst", ".jsonl", ".parquet", ".txt", ".md")
# The split folders of a curation output (lmfab.data.curate.pipeline.SPLITS).
CURATE_SPLITS = ("train", "holdout")
_MAX_KEPT_ERRORS = 20
_BOM = "\ufeff"


@dataclass(frozen=True)
class Document:
    """One document: its text, a source name, and where it was read (1-based line)."""

    text: str
    source: str
    path: str
    line: int
    meta: dict | None = field(default=None, compare=False)


@dataclass
class ReadStats:
    """Counters filled in by ``iter_documents``; pass one in to read them afterwards."""

    files: int = 0
    documents: int = 0
    text_bytes: int = 0
    skipped: int = 0
    skipped_files: int = 0
    errors: list[str] = field(default_factory=list)

    def record_error(self, message: str) -> None:
        self.skipped += 1
        if len(self.errors) < _MAX_KEPT_ERRORS:
            self.errors.append(message)


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def list_files(paths: Iterable[str | os.PathLike], stats: ReadStats | None = None) -> list[Path]:
    """Expand files and folders (recursively, sorted) into the list of files to read."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found, passed = _folder_files(path)
            if stats is not None:
                stats.skipped_files += len(passed)
            if not found:
                what = (f"; passed over {len(passed)} file(s) with other suffixes, e.g. "
                        f"{passed[0].name}" if passed else "")
                raise ValueError(f"{path}: no input files in this folder (supported suffixes: "
                                 f"{', '.join(SUFFIXES)}){what}")
            files += found
        elif path.is_file():
            if _suffix(path) is None:
                raise ValueError(
                    f"{path}: unsupported input format; supported suffixes are "
                    f"{', '.join(SUFFIXES)}"
                )
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def is_curate_output(folder: Path) -> bool:
    """A finished ``lmfab data curate`` output folder (its report files are there)."""
    return (folder / "stats.json").is_file() and (folder / "rejects.txt").is_file()


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files to read, files passed over for their suffix) under ``folder``, sorted."""
    roots = [folder]
    if is_curate_output(folder):
        roots = [folder / s for s in CURATE_SPLITS if (folder / s).is_dir()]
    found: list[Path] = []
    passed: list[Path] = []
    for root in roots:
        for child in sorted(root.rglob("*")):
            rel = child.relative_to(folder)
            if not child.is_file() or any(p.startswith((".", "_")) for p in rel.parts[:-1]):
                continue
            if rel.parts[-1].startswith("."):
                continue
            (found if _suffix(child) is not None else passed).append(child)
    return found, passed


def iter_documents(
    paths: Iterable[str | os.PathLike],
    text_key: str = "text",
    *,
    on_error: str = "raise",
    stats: ReadStats | None = None,
    select: Callable[[int], bool] | None = None,
) -> Iterator[Document]:
    """Yield every document of ``paths`` (files or folders) in a reproducible order.

    ``on_error`` is ``"raise"`` (default: ValueError naming file:line) or ``"skip"`` (count
    the bad record in ``stats`` and go on).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else ReadStats()
    for path in list_files(paths, stats):
        stats.files += 1
        suffix = _suffix(path)
        if suffix in (".txt", ".md"):
            docs = _read_text_file(path, on_error, stats) if select is None or select(1) else ()
        elif suffix == ".parquet":
            docs = _read_parquet(path, text_key, on_error, stats, select)
        else:
            docs = _read_jsonl(path, text_key, on_error, stats, select)
        for doc in docs:
            stats.documents += 1
            stats.text_bytes += len(doc.text.encode("utf-8"))
            yield doc


def _fail(message: str, on_error: str, stats: ReadStats) -> None:
    if on_error == "raise":
        raise ValueError(message)
    stats.record_error(message)


def _read_text_file(path: Path, on_error: str, stats: ReadStats) -> Iterator[Document]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        _fail(f"{path}:{line}: invalid UTF-8 ({err.reason} at byte {err.start})", on_error, stats)
        return
    if text.startswith(_BOM):
        text = text[1:]
    yield Document(text=text, source=_stem(path), path=str(path), line=1)


def _open_lines(path: Path) -> Iterator[bytes]:
    """Iterate a (possibly zstd-compressed) file's lines as bytes, streaming."""
    with open(path, "rb") as raw:
        if _suffix(path) == ".jsonl.zst":
            yield from _zstd_lines(raw, path)
        else:
            yield from raw


def _zstd_lines(raw: io.BufferedIOBase, path: Path) -> Iterator[bytes]:
    """Lines of a zstd stream of one or more frames; corrupt or truncated data is an error.

    (A stream reader would end a truncated file quietly at the last whole block, losing
    documents without a word; here an unfinished last frame raises.)
    """
    dobj, fed, tail = zstandard.ZstdDecompressor().decompressobj(), False, b""
    while chunk := raw.read(1 << 20):
        while chunk:
            try:
                data = dobj.decompress(chunk)
            except zstandard.ZstdError as err:
                raise ValueError(f"{path}: corrupt zstd data: {err}") from err
            fed = True
            chunk = b""
            if dobj.eof:  # the frame ended; more bytes are the next frame
                chunk = dobj.unused_data
                dobj, fed = zstandard.ZstdDecompressor().decompressobj(), False
            if data:
                lines = (tail + data).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    yield line + b"\n"
    if fed and not dobj.eof:
        raise ValueError(f"{path}: truncated zstd data (the last frame is incomplete)")
    if tail:
        yield tail


def _read_jsonl(
    path: Path, text_key: str, on_error: str, stats: ReadStats, select: Callable | None = None
) -> Iterator[Document]:
    stem = _stem(path)
    for lineno, raw in enumerate(_open_lines(path), start=1):
        if select is not None and not select(lineno):
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            _fail(
                f"{path}:{lineno}: invalid UTF-8 ({err.reason} at column {err.start + 1})",
                on_error,
                stats,
            )
            continue
        if lineno == 1 and line.startswith(_BOM):
            line = line[1:]
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            _fail(f"{path}:{lineno}: bad JSON: {err.msg} (column {err.colno})", on_error, stats)
            continue
        if not isinstance(record, dict):
            _fail(
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}",
                on_error,
                stats,
            )
            continue
        text = record.get(text_key)
        if not isinstance(text, str):
            what = "missing" if text_key not in record else f"not a string ({type(text).__name__})"
            keys = ", ".join(sorted(record)[:8])
            _fail(
                f"{path}:{lineno}: text key {text_key!r} is {what}; keys: {keys}", on_error, stats
            )
            continue
        meta = record.get("meta")
        source = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        yield Document(
            text=text,
            source=str(source) if source else stem,
            path=str(path),
            line=lineno,
            meta=meta if isinstance(meta, dict) else None,
        )


def _read_parquet(
    path: Path, text_key: str, on_error: str, stats: ReadStats, select: Callable | None = None
) -> Iterator[Document]:
    """Rows of a parquet file as documents (row numbers are 1-based, like lines)."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow "
                         "(pip install 'lmfab[curate]')") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except (pyarrow.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file: {err}") from None
    if text_key not in names:
        raise ValueError(f"{path}: no column {text_key!r}; columns: {', '.join(names)}")
    cols = [text_key] + (["meta"] if "meta" in names else [])
    stem, row = _stem(path), 0
    for g in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(g, columns=cols).to_pydict()
        except (pyarrow.ArrowException, OSError) as err:
            raise ValueError(f"{path}: row group {g} unreadable: {err}") from None
        metas = table.get("meta") or [None] * len(table[text_key])
        for text, meta in zip(table[text_key], metas, strict=True):
            row += 1
            if select is not None and not select(row):
                continue
            if not isinstance(text, str):
                what = "null" if text is None else f"not a string ({type(text).__name__})"
                _fail(f"{path}:{row}: text column {text_key!r} is {what}", on_error, stats)
                continue
            meta = meta if isinstance(meta, dict) else None
            source = (meta or {}).get("redpajama_set_name")
            yield Document(text=text, source=str(source) if source else stem, path=str(path),
                           line=row, meta=meta)
