"""Typed, strict schema of a curation recipe (``configs/data/*.yaml``).

A recipe is YAML with one section per stage; a section that is absent is a stage that does
not run (``read`` and ``write`` must be there; ``filter: {}`` runs a stage with its
defaults). The stage order is fixed -- read, clean, filter, exact_dedup, near_dedup, mix,
split, write -- because it is SlimPajama's (Soboleva et al. 2023, "SlimPajama: A 627B token
cleaned and deduplicated version of RedPajama", Cerebras blog / github.com/Cerebras/
modelzoo/.../data_preparation/slimpajama).

The schema is dataclasses converted by :mod:`lmfab.strict_yaml`'s strict converter (the one
params files use), so an unknown key fails with its path and a "did you mean" hint exactly
as a params file does; ``--set a.b=c`` overrides are applied to the raw mapping first
(``apply_overrides``). Cross-field rules are in :func:`check_recipe`. Every error is a
:class:`lmfab.data.errors.DataConfigError` prefixed with the recipe file. No torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmfab.data.errors import DataConfigError
from lmfab.strict_yaml import SchemaError, apply_overrides, read_yaml, to_dataclass

STAGES = ("read", "clean", "filter", "exact_dedup", "near_dedup", "mix", "split", "write")


@dataclass
class ReadStage:
    """Inputs: files or folders (jsonl, jsonl.zst, parquet, txt, md)."""

    inputs: list[str]
    text_key: str = "text"
    # A file is split into tasks of about this many uncompressed MB (line blocks), so one
    # big file still uses every worker. Depends on file sizes only, never on --workers.
    task_mb: float = 32.0
    block_lines: int = 256


@dataclass
class CleanStage:
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    ftfy: bool = False  # repair mojibake with ftfy (the curate extra); slow


@dataclass
class FilterStage:
    """SlimPajama's length rule on the normalized text, plus optional pluggable filters."""

    min_chars: int = 200
    max_chars: int | None = None
    filters: list[str] = field(default_factory=list)  # names from text.FILTERS


@dataclass
class ExactDedupStage:
    """Drop documents whose normalized text has been seen (first in input order kept)."""

    normalized: bool = True  # hash the SlimPajama-normalized text (else the cleaned text)


@dataclass
class NearDedupStage:
    """MinHash LSH over character n-grams of the normalized text (SlimPajama: 13, 128, 9x13)."""

    ngram: int = 13
    num_perm: int = 128
    bands: int = 9
    rows: int = 13
    seed: int = 1
    # one_permutation: one hash per n-gram, 128 bins, optimal densification (Li et al. 2012,
    # Shrivastava 2017) -- O(n) per document. permutations: 128 universal hashes
    # (a*h+b mod 2^61-1, as datasketch/SlimPajama) -- O(128 n), the reference.
    hashing: Literal["one_permutation", "permutations"] = "one_permutation"
    # verify: which LSH candidate pairs link documents. false: every candidate (SlimPajama).
    # true / signature: a pair whose signatures agree on >= threshold of the values (the
    # MinHash estimate). exact: a pair whose true n-gram Jaccard (the sets of 64-bit n-gram
    # hashes of the two normalized texts, computed for candidate documents only) is
    # >= threshold -- no false positive, so precision is exact and recall is the banding's.
    verify: bool | Literal["signature", "exact"] = False
    threshold: float = 0.8
    max_bucket_pairs: int = 64  # buckets larger than this are linked as a star, not all pairs
    clusters: bool = True  # write near_dedup/clusters.jsonl (one duplicate cluster a line)
    batch_docs: int = 512

    def verify_mode(self) -> str:
        """``none``, ``signature`` or ``exact`` (``verify: true`` is ``signature``)."""
        if self.verify is True:
            return "signature"
        return self.verify or "none"


@dataclass
class MixStage:
    """Per-source weights (epochs): 2.0 = every document twice, 0.5 = a seeded half."""

    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    seed: int = 0
    shuffle: bool = True


@dataclass
class SplitStage:
    """Hold out a fraction, then remove from train what matches holdout or eval sets."""

    holdout_fraction: float = 0.0005
    seed: int = 0
    eval_sets: list[str] = field(default_factory=list)  # files/folders; normalized SHA-256


@dataclass
class WriteStage:
    output: str
    shard_docs: int = 10000
    compression_level: int = 3
    keep_meta: bool = True


@dataclass
class Recipe:
    read: ReadStage
    write: WriteStage
    clean: CleanStage | None = None
    filter: FilterStage | None = None
    exact_dedup: ExactDedupStage | None = None
    near_dedup: NearDedupStage | None = None
    mix: MixStage | None = None
    split: SplitStage | None = None

    def stages(self) -> list[str]:
        """The stages this recipe runs, in pipeline order."""
        return [s for s in STAGES if getattr(self, s) is not None]


def _fix_dicts(raw: dict) -> tuple[dict, dict | None]:
    """The converter knows no ``dict`` type: check mix.weights here, hand it over as is."""
    mix = raw.get("mix")
    if isinstance(mix, dict) and "weights" in mix:
        weights = mix["weights"]
        if weights is None:
            weights = {}
        if not isinstance(weights, dict):
            raise DataConfigError(f"mix.weights: expected a mapping source -> weight, got {weights!r}")
        for k, v in weights.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise DataConfigError(f"mix.weights.{k}: expected a number >= 0, got {v!r}")
        rest = {k: v for k, v in mix.items() if k != "weights"}
        return {**raw, "mix": rest}, {str(k): float(v) for k, v in weights.items()}
    return raw, None


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    """Convert and check a raw mapping; errors are prefixed with ``source`` (the file)."""
    try:
        for name in STAGES:  # `filter: {}` or `filter:` (null) both mean "run with defaults"
            if name in raw and raw[name] is None and name not in ("read", "write"):
                raw = {**raw, name: {}}
        raw, weights = _fix_dicts(raw)
        recipe = to_dataclass(raw, Recipe, "")
        if weights is not None:
            recipe.mix.weights = weights
        check_recipe(recipe)
    except SchemaError as e:
        raise DataConfigError(f"{source}: {e}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """Read a recipe YAML, apply ``--set`` overrides, convert and check it."""
    try:
        raw = apply_overrides(read_yaml(path), list(overrides))
    except SchemaError as e:
        raise DataConfigError(str(e)) from None
    return recipe_from_dict(raw, source=str(path))


def check_recipe(r: Recipe) -> None:
    if not r.read.inputs:
        raise DataConfigError("read.inputs: at least one input file or folder is required")
    if r.read.task_mb <= 0 or r.read.block_lines <= 0:
        raise DataConfigError("read.task_mb and read.block_lines: must be positive")
    if r.filter is not None:
        from lmfab.data.curate.text import FILTERS

        if r.filter.min_chars < 0:
            raise DataConfigError(f"filter.min_chars: must be >= 0, got {r.filter.min_chars}")
        for i, name in enumerate(r.filter.filters):
            if name not in FILTERS:
                raise DataConfigError(
                    f"filter.filters[{i}]: unknown filter {name!r}; known: {', '.join(FILTERS)}"
                )
    n = r.near_dedup
    if n is not None:
        if n.ngram <= 0 or n.num_perm <= 0 or n.bands <= 0 or n.rows <= 0:
            raise DataConfigError("near_dedup.ngram, num_perm, bands, rows: must be positive")
        if n.bands * n.rows > n.num_perm:
            raise DataConfigError(
                f"near_dedup: bands x rows = {n.bands * n.rows} exceeds num_perm={n.num_perm}"
            )
        if n.hashing == "one_permutation" and n.num_perm & (n.num_perm - 1):
            raise DataConfigError(
                f"near_dedup.num_perm={n.num_perm}: one_permutation needs a power of two"
            )
        if not 0.0 < n.threshold <= 1.0:
            raise DataConfigError(f"near_dedup.threshold: must be in (0, 1], got {n.threshold}")
    if r.split is not None and not 0.0 <= r.split.holdout_fraction < 1.0:
        raise DataConfigError("split.holdout_fraction: must be in [0, 1)")
    if r.mix is not None and r.mix.default_weight < 0:
        raise DataConfigError("mix.default_weight: must be >= 0")
    if r.write.shard_docs <= 0:
        raise DataConfigError("write.shard_docs: must be positive")


def recipe_to_dict(r: Recipe) -> dict:
    return dataclasses.asdict(r)
