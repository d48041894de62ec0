"""Progress of the offline data commands on stderr: a tqdm bar on a terminal, plain lines in logs.

One implementation for ``lmfab data tokenize | tokenizer | pack | curate``. A command runs
in phases (count, sample, encode, pack; curation's map / scatter / gather stages); each
phase counts units (input files, or curation tasks) against a known total when there is
one, plus documents and bytes of text.

* **On a terminal** the phase is a `tqdm <https://github.com/tqdm/tqdm>`_ bar redrawn in
  place: units done / total, rate and ETA, with documents and MB as its postfix.
* **Otherwise** (a log file, CI, a pipe) nothing is redrawn -- no ``\\r`` ever reaches the
  file: one plain line every ``LOG_EVERY`` seconds with the same figures and the ETA.

Either way the phase ends with one final line: ``[pack] encode done 3/3 files, 1,204 docs,
5.2 MB in 1.9s (634 docs/s, 2.74 MB/s)``. The ETA is the remaining units at the phase's
mean rate so far, so it is only as good as the units are even in size.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY = 10.0  # seconds between plain lines when stderr is not a terminal


def _eta(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress of one command, phase by phase: ``start``, ``tick`` as work is done, ``done``.

    ``docs=False`` for counters of tasks only (the curation executors): then documents and
    bytes are left out of the lines.
    """

    def __init__(self, name: str, enabled: bool, *, docs: bool = True) -> None:
        self.name, self.enabled, self.show_docs = name, enabled, docs
        self.tty = enabled and sys.stderr.isatty()
        self.bar: tqdm | None = None
        self.start("", 0)

    def start(self, phase: str, total: int = 0, done: int = 0, unit: str = "files") -> None:
        """Begin a phase; ``total`` units (0: unknown), ``done`` of them already finished."""
        self._close_bar()
        self.phase, self.total, self.files, self.unit = phase, total, done, unit
        self.docs = self.nbytes = 0
        self._resumed = done  # finished before this run: not part of the rate
        self.t0 = self.last = time.perf_counter()
        if self.tty and phase:
            self.bar = tqdm(total=total or None, initial=done, desc=f"[{self.name}] {phase}",
                            unit=f" {unit}" if total else " docs", file=sys.stderr,
                            mininterval=0.5, dynamic_ncols=True, leave=False)

    def tick(self, nbytes: int = 0, docs: int = 0, files: int = 0) -> None:
        """Count finished work: bytes of text, documents, units (files or tasks)."""
        self.nbytes += nbytes
        self.docs += docs
        self.files += files
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(files if self.total else docs)
            if self.show_docs:
                self.bar.set_postfix_str(f"{self.docs:,} docs, {self.nbytes / 1e6:,.1f} MB",
                                         refresh=False)
            return
        now = time.perf_counter()
        if not self.tty and now - self.last >= LOG_EVERY:
            self.last = now
            self._line()

    def done(self) -> None:
        """End the phase with its final line."""
        self._close_bar()
        if self.enabled:
            self._line(final=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, final: bool = False) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        parts = [f"[{self.name}] {self.phase}{' done' if final else ''}"]
        if self.total:
            parts.append(f" {self.files}/{self.total} {self.unit}")
            new = self.files - self._resumed
            if not final and 0 < new and self.files < self.total:
                parts.append(f", ETA {_eta((self.total - self.files) * dt / new)}")
            parts.append(",")
        mb = self.nbytes / 1e6
        if self.show_docs:
            parts.append(f" {self.docs:,} docs, {mb:,.1f} MB in {dt:.1f}s "
                         f"({self.docs / dt:,.0f} docs/s, {mb / dt:,.2f} MB/s)")
        else:
            parts.append(f" {dt:.1f}s")
        print("".join(parts), file=sys.stderr, flush=True)
