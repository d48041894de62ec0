"""``lmfab data tokenizer report``: tokenizer fertility per source and per language.

Fertility is how many tokens a tokenizer spends on a text: **tokens per word** (words are
whitespace-separated strings, the usual definition; it is what makes a language expensive
to train on and to serve) and **bytes per token** (UTF-8 bytes over tokens; the
compression, comparable across scripts). Both are computed per group -- a document's
source and its language (``bpe_train.detect_lang``, by script) -- and over all documents,
for one or several ``tokenizer.json`` side by side: lmfab's own, or any Hugging Face one
(a GPT-2 file included; special tokens are not added, a literal ``<|endoftext|>`` counts as
text).

The documents are a seeded sample capped at ``max_bytes`` per group: pass 1 counts each
group's bytes, pass 2 keeps a document for group ``g`` when its sample hash is below
``max_bytes / bytes_g``, so every group's figure is a uniform sample of that group.
``split="val"`` measures only the documents that ``pack`` / ``tokenizer train`` hold out
for the same ``val_fraction`` and ``seed`` (text the tokenizer never saw).

Outputs: the rows as a dict, and with ``out_dir`` a ``report.md`` table, ``report.json`` and
``fertility.png`` (a bar chart; matplotlib, imported only here). No torch.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lmfab.data.prep.bpe_train import detect_lang, sample_hash
from lmfab.data.prep.encode import split_hash
from lmfab.data.prep.progress import Progress
from lmfab.data.prep.readers import iter_documents, list_files

SPLITS = ("all", "train", "val")


def tokenizer_label(spec: str) -> tuple[str, str]:
    """``"label=path"`` or ``"path"`` -> (label, path); a ``tokenizer.json`` is named by its folder."""
    label, sep, path = spec.partition("=")
    if sep and not Path(spec).exists():
        return label, path
    p = Path(spec)
    return (p.parent.name or p.stem) if p.name == "tokenizer.json" else p.stem, spec


def fertility_report(
    tokenizers: Sequence[str],
    inputs: Sequence[str | os.PathLike],
    *,
    max_bytes: int = 2_000_000,
    split: str = "all",
    val_fraction: float = 0.02,
    seed: int = 0,
    text_key: str = "text",
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure fertility of ``tokenizers`` on ``inputs``; write the report into ``out_dir``."""
    if not tokenizers:
        raise ValueError("give at least one tokenizer.json")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    toks: dict[str, Tokenizer] = {}
    for spec in tokenizers:
        label, path = tokenizer_label(spec)
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if label in toks:
            raise ValueError(f"two tokenizers are labelled {label!r}; name them LABEL=PATH")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({err})") from err
        tok.encode_special_tokens = True
        toks[label] = tok
    files = list_files(inputs)
    log = Progress("report", progress)

    def keep(text: str) -> bool:
        if split == "all":
            return True
        return (split_hash(text, seed) < val_fraction) == (split == "val")

    # pass 1: bytes per group
    avail: Counter[tuple[str, str]] = Counter()
    log.start("count groups")
    for doc in iter_documents(files, text_key):
        if doc.text and keep(doc.text):
            b = len(doc.text.encode("utf-8"))
            for g in (("source", doc.source), ("lang", detect_lang(doc.text)), ("all", "all")):
                avail[g] += b
            log.tick(b, 1)
    log.done()
    if not avail:
        raise ValueError(f"no documents in {[str(f) for f in files]} for split={split!r}")
    rate = {g: min(1.0, max_bytes / b) for g, b in avail.items()}

    # pass 2: the sample, then every tokenizer on it
    texts: list[str] = []
    member: list[list[tuple[str, str]]] = []
    # a group none of whose documents falls under its rate (a few documents larger than the
    # cap) is measured on its lowest-hash document rather than left out of the table
    lowest: dict[tuple[str, str], tuple[float, int, str, list]] = {}
    log.start("sample")
    for i, doc in enumerate(iter_documents(files, text_key)):
        if not doc.text or not keep(doc.text):
            continue
        r = sample_hash(doc.text, seed)
        all_gs = [("source", doc.source), ("lang", detect_lang(doc.text)), ("all", "all")]
        gs = [g for g in all_gs if r < rate[g]]
        if gs:
            texts.append(doc.text)
            member.append(gs)
            log.tick(len(doc.text.encode("utf-8")), 1)
        for g in all_gs:
            if g not in lowest or r < lowest[g][0]:
                lowest[g] = (r, i, doc.text, gs)
    sampled = {g for gs in member for g in gs}
    extra: dict[int, tuple[str, list]] = {}
    for g, (_, i, text, gs) in lowest.items():
        if g in sampled:
            continue
        if gs:  # sampled for another group: it counts for this one too (gs is in member)
            gs.append(g)
        else:
            extra.setdefault(i, (text, []))[1].append(g)
    for text, gs in extra.values():
        texts.append(text)
        member.append(gs)
    log.done()
    nbytes = [len(t.encode("utf-8")) for t in texts]
    nwords = [len(t.split()) for t in texts]
    rows = []
    for label, tok in toks.items():
        log.start(f"encode with {label}")
        ntok = [len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        log.tick(sum(nbytes), len(texts))
        log.done()
        acc: dict[tuple[str, str], Counter] = {}
        for i, gs in enumerate(member):
            for g in gs:
                c = acc.setdefault(g, Counter())
                c["docs"] += 1
                c["bytes"] += nbytes[i]
                c["words"] += nwords[i]
                c["tokens"] += ntok[i]
        for (grouping, group), c in sorted(acc.items(), key=_order):
            rows.append({
                "tokenizer": label, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                "grouping": grouping, "group": group, "docs": c["docs"], "bytes": c["bytes"],
                "words": c["words"], "tokens": c["tokens"],
                "tokens_per_word": c["tokens"] / c["words"] if c["words"] else None,
                "bytes_per_token": c["bytes"] / c["tokens"] if c["tokens"] else None,
            })
    report = {"split": split, "seed": seed, "val_fraction": val_fraction,
              "max_bytes": max_bytes, "inputs": [str(p) for p in inputs], "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (out / "report.md").write_text(format_table(rows) + "\n", encoding="utf-8")
        plot_fertility(rows, out / "fertility.png")
    return report


def _order(item) -> tuple:
    (grouping, group), _ = item
    return ({"source": 0, "lang": 1, "all": 2}[grouping], group)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per group, ``tokens/word | bytes/token`` per tokenizer."""
    labels = list(dict.fromkeys(r["tokenizer"] for r in rows))
    vocab = {r["tokenizer"]: r["vocab_size"] for r in rows}
    keys = list(dict.fromkeys((r["grouping"], r["group"]) for r in rows))
    cell = {(r["tokenizer"], r["grouping"], r["group"]): r for r in rows}
    head = "| group | docs | MB | " + " | ".join(
        f"{t} ({vocab[t]:,}) tok/word | B/tok" for t in labels) + " |"
    lines = [head, "|---|---:|---:|" + "---:|---:|" * len(labels)]
    for grouping, group in keys:
        any_row = next(cell[t, grouping, group] for t in labels if (t, grouping, group) in cell)
        vals = []
        for t in labels:
            r = cell.get((t, grouping, group))
            vals += [_fmt(r and r["tokens_per_word"]), _fmt(r and r["bytes_per_token"])]
        name = group if grouping == "source" else f"{grouping}:{group}"
        lines.append(f"| {name} | {any_row['docs']:,} | {any_row['bytes'] / 1e6:.2f} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot_fertility(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Two bar panels (tokens/word, bytes/token): groups on x, one bar per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["tokenizer"] for r in rows))
    keys = list(dict.fromkeys((r["grouping"], r["group"]) for r in rows))
    cell = {(r["tokenizer"], r["grouping"], r["group"]): r for r in rows}
    names = [g if k == "source" else f"{k}:{g}" for k, g in keys]
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(keys) + 2), 7), sharex=True)
    for ax, metric, title in ((axes[0], "tokens_per_word", "tokens per word (lower is better)"),
                              (axes[1], "bytes_per_token", "bytes per token (higher is better)")):
        for i, t in enumerate(labels):
            ys = [(cell.get((t, k, g)) or {}).get(metric) or 0.0 for k, g in keys]
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, ys, width=width, label=t)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[1].set_xticks(range(len(keys)), names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
