"""Per-stage, per-source statistics of a curation run and SlimPajama's byte-reduction table.

``stats.json`` holds, for every stage that ran and every source, documents and bytes in,
removed and out (bytes are UTF-8 bytes of the text), the seconds each stage spent inside the
map tasks (summed over workers: CPU-seconds), and wall-clock seconds per phase. The printed
table is the one SlimPajama published per source: bytes in, the share removed by the
filter, by exact and by near dedup, and bytes out.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from lmfab.data.curate.recipe import STAGES, Recipe


def _entry(din: int, bin_: int, dout: int, bout: int) -> dict:
    return {"docs_in": din, "bytes_in": bin_, "docs_removed": din - dout,
            "bytes_removed": bin_ - bout, "docs_out": dout, "bytes_out": bout}


def _counts(arrays: dict, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    src = arrays["source"][mask]
    return (np.bincount(src, minlength=n),
            np.bincount(src, weights=arrays["nbytes"][mask], minlength=n).astype(np.int64))


def build_stats(recipe: Recipe, summaries: list[dict], sources: list[str], arrays: dict,
                dec: dict, plan: dict, plan_info: dict) -> dict:
    n_src = len(sources)
    stages: dict[str, dict[str, dict]] = {}
    for stage in ("read", "clean", "filter"):
        if stage != "read" and getattr(recipe, stage) is None:
            continue
        acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for sm in summaries:
            for src, c in sm["counts"].get(stage, {}).items():
                for i in range(4):
                    acc[src][i] += c[i]
        stages[stage] = {s: _entry(*acc[s]) for s in sources}
    alive = np.ones(len(arrays["ordinal"]), dtype=bool)
    for stage, mask in (("exact_dedup", dec["exact_keep"]), ("near_dedup", dec["near_keep"])):
        if getattr(recipe, stage) is None:
            continue
        din, bin_ = _counts(arrays, alive, n_src)
        dout, bout = _counts(arrays, mask, n_src)
        stages[stage] = {s: _entry(int(din[i]), int(bin_[i]), int(dout[i]), int(bout[i]))
                         for i, s in enumerate(sources)}
        alive = mask
    din, bin_ = _counts(arrays, alive, n_src)
    mixed = plan_info["mix_by_source"]
    if recipe.mix is not None:
        stages["mix"] = {s: _entry(int(din[i]), int(bin_[i]), *mixed[i])
                         for i, s in enumerate(sources)}
    rows, split = plan["row"], plan["split"]
    if recipe.split is not None:
        dec_src = plan_info.get("decontaminated_by_source", [[0, 0]] * n_src)
        stages["split"] = {s: _entry(mixed[i][0], mixed[i][1], mixed[i][0] - dec_src[i][0],
                                     mixed[i][1] - dec_src[i][1]) for i, s in enumerate(sources)}
    written = {}
    for sid, name in enumerate(("train", "holdout")):
        d, b = _counts(arrays, rows[split == sid], n_src)
        written[name] = {s: {"docs": int(d[i]), "bytes": int(b[i])} for i, s in enumerate(sources)}
    din_w = [sum(written[x][s]["docs"] for x in written) for s in sources]
    bin_w = [sum(written[x][s]["bytes"] for x in written) for s in sources]
    stages["write"] = {s: _entry(din_w[i], bin_w[i], din_w[i], bin_w[i])
                       for i, s in enumerate(sources)}
    secs: dict[str, float] = defaultdict(float)
    for sm in summaries:
        for k, v in sm["seconds"].items():
            secs[k] += v
    read_bytes = sum(e["bytes_in"] for e in stages["read"].values())
    return {
        "stages": {k: stages[k] for k in STAGES if k in stages},
        "written": written,
        "rejects": sum(len(sm["rejects"]) for sm in summaries),
        "dedup": dec.get("info", {}),
        "plan": {k: v for k, v in plan_info.items() if not k.endswith("by_source")},
        "cpu_seconds": dict(secs),
        "input_bytes": read_bytes,
    }


def format_table(stats: dict) -> str:
    """SlimPajama's table (bytes per source and stage) and a per-stage document table."""
    st = stats["stages"]
    sources = list(st["read"])
    cols = [s for s in ("filter", "exact_dedup", "near_dedup", "split") if s in st]
    head = ["source", "docs in", "MB in"] + [f"-{c} %" for c in cols] + ["docs out", "MB out",
                                                                        "bytes kept %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, pick) -> str:
        r0 = pick(st["read"])
        cells = [name, f"{r0['docs_in']:,}", f"{r0['bytes_in'] / 1e6:.2f}"]
        for c in cols:
            e = pick(st[c])
            cells.append(f"{100 * e['bytes_removed'] / max(r0['bytes_in'], 1):.1f}")
        w = pick(st["write"])
        cells += [f"{w['docs_out']:,}", f"{w['bytes_out'] / 1e6:.2f}",
                  f"{100 * w['bytes_out'] / max(r0['bytes_in'], 1):.1f}"]
        return "| " + " | ".join(cells) + " |"

    for s in sources:
        lines.append(row(s, lambda stage, s=s: stage[s]))

    def total(stage: dict) -> dict:  # a stage with no source (no document read) sums to 0
        return {k: sum(e[k] for e in stage.values()) for k in _entry(0, 0, 0, 0)}

    lines.append(row("**total**", total))
    lines.append("")
    lines.append("| stage | docs in | docs removed | docs out | MB in | MB out |")
    lines.append("|---|---|---|---|---|---|")
    for name, stage in st.items():
        t = total(stage)
        lines.append(f"| {name} | {t['docs_in']:,} | {t['docs_removed']:,} | {t['docs_out']:,} "
                     f"| {t['bytes_in'] / 1e6:.2f} | {t['bytes_out'] / 1e6:.2f} |")
    if stats.get("rejects"):
        lines.append(f"\n{stats['rejects']} bad records skipped (see rejects.txt)")
    return "\n".join(lines)
