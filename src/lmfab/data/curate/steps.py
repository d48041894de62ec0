"""The per-document steps of a map task -- read, clean, filter -- each with its own counters.

A map task passes every document of its slice through the steps in order; a step may change
the document (clean rewrites the text) or drop it (filter), and counts, per source, the
documents and UTF-8 bytes that came in and went out, and its CPU time. This is datatrove's
``PipelineStep`` shape (one signature over a document stream, per-step statistics) cut down
to what the SlimPajama recipe needs; the global stages (dedup, mix, split) are not
per-document and live in :mod:`lmfab.data.curate.dedup` and the pipeline's plan.

* ``ReadStep`` counts what the reader yielded (in = out); its time is the reader's.
* ``CleanStep`` -- optional ftfy, then NFC / NFKC (:func:`text.clean`); the written text.
* ``FilterStep`` -- computes SlimPajama's normalized text (which exact dedup, MinHash and
  decontamination hash later, so it is computed once, here, whenever any of them runs), then
  keeps a document when its normalized length is within ``min_chars`` / ``max_chars`` and
  every named filter of :data:`text.FILTERS` accepts it.

A step whose recipe section is absent passes documents through and counts nothing, so the
statistics hold only the stages that ran. Counters serialize as ``{source: [docs_in,
bytes_in, docs_out, bytes_out]}`` in the map task's summary (``stats.py`` sums them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmfab.data.curate import text as T
from lmfab.data.curate.recipe import CleanStage, FilterStage, Recipe


@dataclass
class WorkDoc:
    """A document on its way through the steps; ``nbytes`` is the UTF-8 size of ``text``."""

    source: str
    text: str
    nbytes: int
    norm: str = ""  # SlimPajama-normalized text, set by FilterStep when a later stage needs it


@dataclass
class Counts:
    """One source's documents and bytes into and out of one step."""

    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0

    def as_list(self) -> list[int]:
        return [self.docs_in, self.bytes_in, self.docs_out, self.bytes_out]


class Step:
    """A per-document step: ``step(doc) -> keep?``, counted per source when ``counted``."""

    name = "step"

    def __init__(self, counted: bool) -> None:
        self.counted = counted
        self.by_source: dict[str, Counts] = {}
        self.seconds = 0.0

    def apply(self, doc: WorkDoc) -> bool:
        """Transform ``doc`` in place; return whether it goes on."""
        return True

    def __call__(self, doc: WorkDoc) -> bool:
        t0 = time.perf_counter()
        bytes_in = doc.nbytes
        keep = self.apply(doc)
        if self.counted:
            c = self.by_source.setdefault(doc.source, Counts())
            c.docs_in += 1
            c.bytes_in += bytes_in
            if keep:
                c.docs_out += 1
                c.bytes_out += doc.nbytes
        self.seconds += time.perf_counter() - t0
        return keep

    def counts(self) -> dict[str, list[int]]:
        """The counters as the task summary stores them: source -> [in, bytes, out, bytes]."""
        return {s: c.as_list() for s, c in self.by_source.items()}


class ReadStep(Step):
    name = "read"

    def __init__(self) -> None:
        super().__init__(counted=True)


class CleanStep(Step):
    name = "clean"

    def __init__(self, stage: CleanStage | None) -> None:
        super().__init__(counted=stage is not None)
        self.stage = stage

    def apply(self, doc: WorkDoc) -> bool:
        if self.stage is not None:
            text = T.clean(doc.text, self.stage.normalization, self.stage.ftfy)
            if text is not doc.text:  # unchanged text keeps its byte count
                doc.text, doc.nbytes = text, len(text.encode("utf-8"))
        return True


class FilterStep(Step):
    name = "filter"

    def __init__(self, stage: FilterStage | None, normalize: bool) -> None:
        super().__init__(counted=stage is not None)
        self.stage, self.normalize = stage, normalize

    def apply(self, doc: WorkDoc) -> bool:
        if self.normalize:
            doc.norm = T.normalize(doc.text)
        f = self.stage
        if f is None:
            return True
        n = len(doc.norm)
        return (n >= f.min_chars and (f.max_chars is None or n <= f.max_chars)
                and all(T.FILTERS[name](doc.text, doc.norm) for name in f.filters))


def build_steps(recipe: Recipe) -> tuple[ReadStep, CleanStep, FilterStep]:
    """The map task's steps for ``recipe``, in order."""
    normalize = any(getattr(recipe, s) is not None
                    for s in ("filter", "exact_dedup", "near_dedup", "split"))
    return ReadStep(), CleanStep(recipe.clean), FilterStep(recipe.filter, normalize)
