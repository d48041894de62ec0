"""Atomic file writes and done markers: a file that exists is complete.

Every resumable step of lmfab (curation tasks, encoding, packing, token shards) relies on
two rules (DESIGN principle 8):

* **A file appears whole or not at all.** It is written to ``<path>.tmp`` beside its final
  name and moved into place with ``os.replace``, which is atomic on POSIX file systems (the
  temporary file is in the same folder, so on the same file system). A crash leaves at
  worst a ``*.tmp`` file, never a short file under the real name; on an exception inside
  :func:`atomic_open` / :func:`atomic_path` the temporary file is removed. The temporary
  name is fixed (``.tmp`` appended), so a step can sweep its folder's leftovers with
  ``glob("*.tmp")`` before it starts.
* **A done marker is written last.** :func:`write_done` writes a small JSON file (optionally
  holding the step's summary) once everything the step produced is in place;
  :func:`read_done` returns that summary, or None when the step has not finished, so a
  re-run skips finished work instead of redoing it.

``fsync=True`` also flushes the data to the disk before the rename, for files whose loss
after a power failure would go unnoticed (token shards). The module imports only the
standard library, so every layer can use it (the offline data pipeline runs without torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike

__all__ = [
    "AtomicFile",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_done",
    "tmp_path",
    "write_done",
]


def tmp_path(path: PathLike) -> Path:
    """The temporary name ``path`` is written under: ``<path>.tmp`` in the same folder."""
    return Path(str(path) + ".tmp")


class AtomicFile:
    """An open temporary file that becomes ``path`` on :meth:`commit`, or vanishes on :meth:`abort`.

    For writers that keep a file open across many calls (the encoder appends a file's ids
    batch by batch); otherwise use :func:`atomic_open`.
    """

    def __init__(self, path: PathLike, mode: str = "wb", *, fsync: bool = False,
                 **open_kwargs: Any) -> None:
        if not mode.startswith(("w", "x")):
            raise ValueError(f"AtomicFile writes a new file; mode {mode!r} is not a write mode")
        self.path, self.tmp, self.fsync = Path(path), tmp_path(path), fsync
        self.file: IO = open(self.tmp, mode, **open_kwargs)  # noqa: SIM115 -- commit/abort close it

    def commit(self) -> None:
        """Close the temporary file and move it to ``path``."""
        if self.fsync:
            self.file.flush()
            os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and remove the temporary file; ``path`` is left as it was."""
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *, fsync: bool = False,
                **open_kwargs: Any) -> Iterator[IO]:
    """``with atomic_open(p) as f: ...`` writes ``p`` whole when the block ends, else not at all."""
    f = AtomicFile(path, mode, fsync=fsync, **open_kwargs)
    try:
        yield f.file
    except BaseException:
        f.abort()
        raise
    f.commit()


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield the temporary path for a writer that takes a file name (``tok.save(str(tmp))``,
    ``shutil.copyfile``); it is moved to ``path`` when the block ends, removed on an error."""
    tmp = tmp_path(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2,
                      ensure_ascii: bool = False) -> None:
    """Write ``obj`` as JSON (UTF-8, a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + "\n")


def write_done(path: PathLike, info: dict[str, Any] | None = None) -> None:
    """Mark a step finished: write its done marker ``path`` (JSON ``info``) atomically, last."""
    atomic_write_json(path, info or {}, indent=None)


def read_done(path: PathLike) -> dict[str, Any] | None:
    """A finished step's marker contents; None when the marker is absent (not finished)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return json.loads(text)
