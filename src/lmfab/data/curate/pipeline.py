"""``curate``: the SlimPajama recipe end to end, resumable, on any executor.

Phases (each resumable through markers under ``<output>/_work``):

1. map      -- parallel over tasks (slices of input files): read, clean, filter, hash
               (:func:`lmfab.data.curate.tasks.map_task`)
2. dedup    -- one process over the keys of all documents: exact, then near (LSH +
               connected components); writes ``near_dedup/clusters.jsonl``
               (:mod:`lmfab.data.curate.dedup`)
3. plan     -- one process, vectorized: mix (copies per source weight, seeded), split
               (seeded holdout per copy), decontaminate (train copies whose normalized
               SHA-256 is in the holdout or an eval set are removed), and each copy's rank
               in the shuffled output and its shard
4. scatter  -- parallel over map tasks: documents into (split, shard) buckets
5. gather   -- parallel over output shards: buckets in rank order -> ``<split>/part-N.jsonl.zst``

Then ``stats.json`` and the per-source byte-reduction table (SlimPajama's). Tasks depend on
the recipe and the input sizes only, so any executor and worker count gives byte-identical
output, and a killed run resumes with identical output. The resolved recipe is stored in
``_work/recipe.json``; resuming with a different recipe is an error (delete the output).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lmfab.atomic import atomic_write_bytes, read_done, write_done
from lmfab.data.curate import tasks as K
from lmfab.data.curate.dedup import global_dedup
from lmfab.data.curate.executor import make_executor
from lmfab.data.curate.recipe import Recipe, recipe_to_dict
from lmfab.data.curate.stats import build_stats, format_table
from lmfab.data.errors import DataConfigError
from lmfab.data.prep.readers import list_files
from lmfab.faultpoint import fault

SPLITS = ("train", "holdout")


def _list_inputs(paths: list[str]) -> list[str]:
    """Input files in a reproducible order (the readers' suffixes, parquet included)."""
    return sorted({str(f) for f in list_files(paths)})


def _estimated_bytes(path: str) -> int:
    size = Path(path).stat().st_size
    if path.endswith(".zst"):
        import zstandard

        with open(path, "rb") as f:
            head = f.read(18)
        try:
            content = zstandard.frame_content_size(head)
        except zstandard.ZstdError:
            content = -1
        return content if content > 0 else 5 * size
    return 3 * size if path.endswith(".parquet") else size


def plan_tasks(recipe: Recipe) -> list[K.MapTask]:
    files = _list_inputs(recipe.read.inputs)
    if not files:
        raise DataConfigError(f"read.inputs: no input files found in {recipe.read.inputs}")
    tasks = []
    for fi, path in enumerate(files):
        slices = 1
        if not path.endswith((".txt", ".md")):
            slices = max(1, math.ceil(_estimated_bytes(path) / (recipe.read.task_mb * 1e6)))
        for k in range(slices):
            tasks.append(K.MapTask(index=len(tasks), file=fi, path=path, slice=k,
                                   slices=slices))
    return tasks


def _u01(ordinal: np.ndarray, salt: np.ndarray | int, seed: int) -> np.ndarray:
    """Deterministic uniform [0, 1) per (ordinal, salt, seed), from fmix64."""
    from lmfab.data.curate.minhash import fmix64

    x = ordinal.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.asarray(salt, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)
    x ^= np.uint64((seed * 0xA0761D6478BD642F) & 0xFFFFFFFFFFFFFFFF)
    return (fmix64(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _eval_keys(paths: list[str]) -> np.ndarray:
    from lmfab.data.curate import text as T
    from lmfab.data.prep.readers import iter_documents

    raw = b"".join(T.sha256_128(T.normalize(d.text)) for d in iter_documents(paths))
    return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)


def _isin_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), dtype=bool)
    v = np.dtype((np.void, 16))
    return np.isin(np.ascontiguousarray(a).view(v).ravel(), np.ascontiguousarray(b).view(v).ravel())


def _by_source(arrays: dict, rows: np.ndarray, n_sources: int) -> list[list[int]]:
    """[[docs, bytes] per source] of the given rows."""
    src = arrays["source"][rows]
    docs = np.bincount(src, minlength=n_sources)
    nbytes = np.bincount(src, weights=arrays["nbytes"][rows], minlength=n_sources)
    return [[int(d), int(b)] for d, b in zip(docs, nbytes, strict=True)]


def _plan(recipe: Recipe, arrays: dict, keep: np.ndarray, sources: list[str]) -> dict:
    """Mix, split, decontaminate, shuffle: one row per output copy, in task order."""
    ordinal, src = arrays["ordinal"], arrays["source"]
    idx = np.flatnonzero(keep)
    mix = recipe.mix
    if mix is not None:
        w = np.array([mix.weights.get(s, mix.default_weight) for s in sources])[src[idx]]
        copies = np.floor(w).astype(np.int64)
        copies += _u01(ordinal[idx], 0xC0FFEE, mix.seed) < (w - np.floor(w))
    else:
        copies = np.ones(len(idx), dtype=np.int64)
    row = np.repeat(idx, copies)
    copy = np.arange(len(row)) - np.repeat(np.cumsum(copies) - copies, copies)
    split = np.zeros(len(row), dtype=np.int64)
    info = {"mix_copies": int(len(row)), "mix_by_source": _by_source(arrays, row, len(sources))}
    if recipe.split is not None:
        sp = recipe.split
        split[_u01(ordinal[row], copy + 1, sp.seed) < sp.holdout_fraction] = 1
        ex = arrays["exact"]
        banned = ex[row[split == 1]]
        if sp.eval_sets:
            banned = np.concatenate([banned, _eval_keys(sp.eval_sets)])
        contaminated = (split == 0) & _isin_rows(ex[row], banned)
        info["decontaminated"] = int(contaminated.sum())
        info["decontaminated_by_source"] = _by_source(arrays, row[contaminated], len(sources))
        row, copy, split = row[~contaminated], copy[~contaminated], split[~contaminated]
    if mix is not None and mix.shuffle:
        key = _u01(ordinal[row], copy + 7, mix.seed + 1)
    else:
        key = ordinal[row] * 1024.0 + copy  # input order
    rank = np.zeros(len(row), dtype=np.int64)
    shard = np.zeros(len(row), dtype=np.int64)
    for s in range(len(SPLITS)):
        m = np.flatnonzero(split == s)
        order = m[np.lexsort((ordinal[row[m]], key[m]))]
        rank[order] = np.arange(len(order))
        shard[order] = np.arange(len(order)) // recipe.write.shard_docs
    return {"row": row, "copy": copy, "split": split, "rank": rank, "shard": shard,
            "info": info}


def _save_npz(path: Path, **arrays) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def curate(recipe: Recipe, *, executor: str = "local", workers: int | None = None,
           address: str | None = None, progress: bool = True) -> dict:
    """Run ``recipe``; resume from ``<write.output>/_work`` markers. Returns the stats dict."""
    out = Path(recipe.write.output)
    work = out / "_work"
    (work / "map").mkdir(parents=True, exist_ok=True)
    resolved = json.dumps(recipe_to_dict(recipe), sort_keys=True)
    stored = work / "recipe.json"
    if stored.exists() and stored.read_text() != resolved:
        raise DataConfigError(f"{out}: holds the output of a different recipe; delete it or choose "
                          f"another write.output (stored recipe: {stored})")
    atomic_write_bytes(stored, resolved.encode())
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    t_start = time.perf_counter()
    tasks = plan_tasks(recipe)
    log(f"curate: {len(tasks)} map tasks over {len({t.path for t in tasks})} files; "
        f"stages: {' -> '.join(recipe.stages())}")
    ex = make_executor(executor, workers, address, progress)
    try:
        t0 = time.perf_counter()
        summaries = ex.map(K.map_task, [(recipe, str(work), t) for t in tasks],
                           "read/clean/filter/hash")
        wall = {"map": time.perf_counter() - t0}
        sources = sorted({s for sm in summaries for s in sm["sources"]})
        arrays = _load_arrays(work, summaries, sources)
        t0 = time.perf_counter()
        dec = _dedup_phase(recipe, work, arrays, summaries, log, ex)
        wall["dedup"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        keep = dec["near_keep"]
        plan_path = work / "plan.npz"
        if read_done(work / "plan.done") is None:
            p = _plan(recipe, arrays, keep, sources)
            offsets = np.concatenate(([0], np.cumsum([s["n"] for s in summaries])))
            task_of = np.searchsorted(offsets, p["row"], side="right") - 1
            _save_npz(plan_path, task=task_of, local=p["row"] - offsets[task_of],
                      row=p["row"], split=p["split"], shard=p["shard"], rank=p["rank"])
            fault("curate.phase", stage="plan")  # tests: killed before the marker
            write_done(work / "plan.done", p["info"])
        plan = dict(np.load(plan_path))
        plan_info = read_done(work / "plan.done")
        (work / "scatter").mkdir(exist_ok=True)
        ex.map(K.scatter_task,
               [(str(work), K.ScatterTask(t.index, recipe.write.keep_meta)) for t in tasks],
               "mix/split: scatter")
        shards = [(name, s, int(plan["shard"][plan["split"] == s].max()) + 1
                   if (plan["split"] == s).any() else 0) for s, name in enumerate(SPLITS)]
        gathers = [(str(work), K.GatherTask(split_name=name, split_id=s, shard=k,
                                            n_tasks=len(tasks), output=str(out),
                                            level=recipe.write.compression_level))
                   for name, s, n in shards for k in range(n)]
        ex.map(K.gather_task, gathers, "write: gather shards")
        wall["mix_split_write"] = time.perf_counter() - t0
    finally:
        ex.close()
    stats = build_stats(recipe, summaries, sources, arrays, dec, plan, plan_info)
    stats["wall_seconds"] = {**wall, "total": time.perf_counter() - t_start}
    stats["executor"] = {"kind": executor, "workers": ex.workers}
    stats["tasks"] = len(tasks)
    rejects = [m for s in summaries for m in s["rejects"]]
    atomic_write_bytes(out / "rejects.txt", "".join(m + "\n" for m in rejects).encode())
    atomic_write_bytes(out / "stats.json", json.dumps(stats, indent=1).encode())
    if progress:
        print(format_table(stats))
    _refuse_empty(out, stats, rejects)
    return stats


def _refuse_empty(out: Path, stats: dict, rejects: list[str]) -> None:
    """A curation that writes no document is an error that says where they went."""
    if any(v["docs"] for split in stats["written"].values() for v in split.values()):
        return
    read = sum(e["docs_in"] for e in stats["stages"].get("read", {}).values())
    removed = [f"{name} removed {n:,}" for name, stage in stats["stages"].items()
               if (n := sum(e["docs_removed"] for e in stage.values()))]
    why = [f"{read:,} documents read"] + removed
    if rejects:
        why.append(f"{len(rejects):,} bad records skipped (first: {rejects[0]}; all in "
                   f"{out / 'rejects.txt'})")
    raise DataConfigError(f"{out}: no documents left to write: {'; '.join(why)}. Check "
                          "read.inputs and read.text_key, or loosen the filters "
                          f"({out / 'stats.json'} has the table)")


def _load_arrays(work: Path, summaries: list[dict], sources: list[str]) -> dict:
    parts: dict[str, list] = {}
    for sm in summaries:
        with np.load(work / "map" / f"t{sm['index']:05d}.npz") as z:
            remap = np.array([sources.index(s) for s in sm["sources"]] or [0], dtype=np.int32)
            for key in z.files:
                a = z[key]
                parts.setdefault(key, []).append(remap[a] if key == "source" else a)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _shingle_loader(recipe: Recipe, work: Path, summaries: list[dict], ex):
    """``load(task_rows) -> sets`` for ``verify: exact``: n-gram sets of candidate documents.

    One ``shingle_task`` per map task that holds candidates (parallel, resumable), then the
    sets are memory-mapped from ``_work/verify/tNNNNN.u64``: the dedup process reads them
    through the page cache instead of holding them.
    """
    offsets = np.concatenate(([0], np.cumsum([s["n"] for s in summaries])))

    def load(rows: np.ndarray):
        load.set_bytes = 0
        rows = np.unique(rows)
        task = np.searchsorted(offsets, rows, side="right") - 1
        jobs = [(recipe, str(work), K.ShingleTask(int(summaries[t]["index"]),
                                                  (rows[task == t] - offsets[t]).tolist()))
                for t in np.unique(task).tolist()]
        (work / "verify").mkdir(exist_ok=True)
        ex.map(K.shingle_task, jobs, "near_dedup: exact verify (n-gram sets)")
        where: dict[int, tuple[np.ndarray, int, int]] = {}
        for t in np.unique(task).tolist():
            tid = f"t{summaries[t]['index']:05d}"
            with np.load(work / "verify" / f"{tid}.npz") as z:
                local, off = z["local"], z["offsets"]
            path = work / "verify" / f"{tid}.u64"
            values = (np.memmap(path, dtype="<u8", mode="r") if off[-1]
                      else np.zeros(0, dtype=np.uint64))
            load.set_bytes += 8 * int(off[-1])
            for k, row in enumerate((local + offsets[t]).tolist()):
                where[row] = (values, int(off[k]), int(off[k + 1]))

        def sets(row: int) -> np.ndarray:
            values, start, end = where[row]
            return values[start:end]

        return sets

    return load


def _dedup_phase(recipe: Recipe, work: Path, arrays: dict, summaries: list[dict], log,
                 ex) -> dict:
    path = work / "dedup.npz"
    info = read_done(work / "dedup.done")
    if info is not None:
        return {**dict(np.load(path)), "info": info}
    n = len(arrays["ordinal"])
    if recipe.exact_dedup is None and recipe.near_dedup is None:
        dec = {"exact_keep": np.ones(n, bool), "near_keep": np.ones(n, bool),
               "cluster": np.full(n, -1, np.int64), "info": {}}
    else:
        exact_verify = (recipe.near_dedup is not None
                        and recipe.near_dedup.verify_mode() == "exact")
        loader = _shingle_loader(recipe, work, summaries, ex) if exact_verify else None
        dec = global_dedup(arrays["ordinal"],
                           arrays.get("exact") if recipe.exact_dedup is not None else None,
                           arrays.get("bands"), arrays.get("sig"), recipe.near_dedup, loader)
        if loader is not None and hasattr(loader, "set_bytes"):
            dec["info"]["exact_set_bytes"] = loader.set_bytes  # n-gram sets on disk
    log(f"[dedup] {json.dumps(dec['info'])}")
    if recipe.near_dedup is not None and recipe.near_dedup.clusters:
        _write_clusters(work.parent / "near_dedup" / "clusters.jsonl", summaries, work,
                        arrays["ordinal"], dec["cluster"])
    _save_npz(path, exact_keep=dec["exact_keep"], near_keep=dec["near_keep"],
              cluster=dec["cluster"])
    fault("curate.phase", stage="dedup")  # tests: killed before the marker
    write_done(work / "dedup.done", dec["info"])
    shutil.rmtree(work / "verify", ignore_errors=True)  # the n-gram sets: 8 B per n-gram
    return dec


def _write_clusters(path: Path, summaries: list[dict], work: Path, ordinal: np.ndarray,
                    cluster: np.ndarray) -> None:
    """One duplicate cluster a line: {"cluster": k, "ids": [...], "kept": id} in input order."""
    members = np.flatnonzero(cluster >= 0)
    ids: list[str] = []
    if len(members):
        for sm in summaries:  # ids live in the document files; read only the ids
            ids += [d["id"] for d in K.read_docs(work / "map" / f"t{sm['index']:05d}.docs.jsonl.zst")]
    order = members[np.lexsort((ordinal[members], cluster[members]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    lines, groups = [], {}
    for i in order.tolist():
        groups.setdefault(int(cluster[i]), []).append(i)
    for k, (_, rows) in enumerate(sorted(groups.items(), key=lambda g: ordinal[g[1][0]])):
        lines.append(json.dumps({"cluster": k, "ids": [ids[i] for i in rows], "kept": ids[rows[0]]},
                                ensure_ascii=False))
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))
