"""A one-line progress bar on stderr for the offline data commands (no dependencies).

Redrawn in place on a terminal (every 0.5 s), one line every 10 s otherwise (logs, CI), and
a final line per phase: files done / total when known, documents, MB of text, docs/s, MB/s.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (redrawn on a terminal, a line per 10 s otherwise)."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name, self.enabled = name, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start("", 0)

    def start(self, phase: str, total: int = 0, done: int = 0) -> None:
        self.phase, self.total, self.files = phase, total, done
        self.docs = self.nbytes = 0
        self.t0 = self.last = time.perf_counter()

    def tick(self, nbytes: int, docs: int, files: int = 0) -> None:
        self.nbytes += nbytes
        self.docs += docs
        self.files += files
        now = time.perf_counter()
        if self.enabled and now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            self._line()

    def done(self) -> None:
        if self.enabled:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        mb = self.nbytes / 1e6
        bar = ""
        if self.total:
            k = int(20 * min(self.files / self.total, 1.0))
            bar = f"[{'#' * k}{'.' * (20 - k)}] {self.files}/{self.total} files, "
        text = (f"[{self.name}] {self.phase}{' done' if final else ''} {bar}"
                f"{self.docs:,} docs, {mb:,.1f} MB in {dt:.1f}s "
                f"({self.docs / dt:,.0f} docs/s, {mb / dt:,.2f} MB/s)")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + text, end=end, file=sys.stderr, flush=True)
