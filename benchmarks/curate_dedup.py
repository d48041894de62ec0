"""Near-dedup quality (F1 vs exact Jaccard truth) and throughput per core: lmfab vs datatrove.

    python benchmarks/curate_dedup.py --bench ../shared/corpus/dedup-bench \
        [--lmfab oph,oph-verify,perm] [--datatrove char13,word5] [--workers 1] [--json out.json]

Both tools run here, in this process's machine, with SlimPajama's parameters: 128 hashes as
9 bands x 13 rows, character 13-grams of the normalized text, threshold ~0.8.

* lmfab: ``curate`` with read -> filter (200 normalized chars) -> exact -> near -> write on
  ``docs.jsonl.zst``; variants ``oph`` (one-permutation hashing, the default), ``oph-verify``
  (candidates verified by signature agreement >= 0.8), ``oph-exact`` (candidates verified by
  their exact character-13-gram Jaccard >= 0.8, ``near_dedup.verify: exact``), ``perm``
  (128 universal hashes), and a ``-bXrY`` suffix for other banding (``oph-verify-b16r8``:
  16 bands x 8 rows; ``oph-exact-b16r8`` is ``configs/data/default.yaml``'s).
* datatrove (pip install datatrove; not a dependency of lmfab): MinhashDedupSignature ->
  Buckets -> Cluster, ``MinhashConfig(n_grams, num_buckets=9, hashes_per_bucket=13)``,
  32-bit sha1 shingle hashes (datatrove 0.10.1 passes ``str`` to xxhash 4, which refuses
  it), text normalization limited to lowercase / punctuation / whitespace (its number and
  diacritic folding off). ``char13`` passes a tokenizer that splits the text into
  characters, so its features are exactly character 13-grams; ``word5`` is datatrove's
  usual setting (word 5-grams, words split on whitespace) -- different features, stated as
  such. datatrove gets only the eligible documents (>= 200 normalized chars, prepared
  here, not timed), since its length filter is not part of its MinHash pipeline.

Scores: ``shared/corpus/score_dedup.py`` at threshold 0.8 over eligible documents
(cluster-level pair precision / recall / F1 and documents kept vs ideal).
Throughput: documents/s and MB/s per core of the signature stage (read + normalize + hash)
and of the whole dedup, from wall-clock time with ``--workers`` processes; ``CPU s`` is the
user + system CPU time of the run (this process and its children), which a busy machine
inflates less than wall-clock time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]


def _scorer(bench: Path):
    spec = importlib.util.spec_from_file_location("score_dedup", bench.parent / "score_dedup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _docs(bench: Path) -> list[dict]:
    with open(bench / "docs.jsonl.zst", "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(x) for x in data.split(b"\n") if x]


def _write_cluster_file(path: Path, clusters: list[list[str]]) -> None:
    with open(path, "w") as f:
        for k, ids in enumerate(clusters):
            for i in ids:
                f.write(json.dumps({"id": i, "cluster": k}) + "\n")


def run_lmfab(bench: Path, variant: str, workers: int, tmp: Path) -> dict:
    from lmfab.data.curate import curate, recipe_from_dict

    parts = variant.split("-")  # e.g. oph, oph-verify, perm, oph-verify-b16r8, oph-exact-b16r8
    near = {"hashing": "permutations" if parts[0] == "perm" else "one_permutation",
            "verify": "exact" if "exact" in parts else "verify" in parts}
    for part in parts[1:]:
        if part.startswith("b") and "r" in part:
            bands, rows = part[1:].split("r")
            near.update(bands=int(bands), rows=int(rows))
    out = tmp / f"lmfab-{variant}"
    recipe = recipe_from_dict({
        "read": {"inputs": [str(bench / "docs.jsonl.zst")], "task_mb": 16},
        "filter": {"min_chars": 200}, "exact_dedup": {}, "near_dedup": near,
        "write": {"output": str(out)},
    })
    t0, c0 = time.perf_counter(), _cpu()
    stats = curate(recipe, workers=workers, progress=False)
    wall, cpu_total = time.perf_counter() - t0, _cpu() - c0
    rows = [json.loads(x) for x in (out / "near_dedup" / "clusters.jsonl").read_text().split("\n") if x]
    pred = tmp / f"lmfab-{variant}.clusters.jsonl"
    _write_cluster_file(pred, [r["ids"] for r in rows])
    cpu = stats["cpu_seconds"]
    return {"tool": f"lmfab {variant}", "pred": pred, "wall_total": wall, "cpu_total": cpu_total,
            "wall_signature": stats["wall_seconds"]["map"],
            "cpu_minhash_only": cpu.get("near_dedup", 0.0), "cpu": cpu,
            "wall_dedup": stats["wall_seconds"]["dedup"], "dedup_info": stats.get("dedup")}


def run_datatrove(bench: Path, variant: str, docs: list[dict], tmp: Path, scorer) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Split(WordTokenizer):
        def __init__(self, chars: bool):
            super().__init__("xx")
            self.chars = chars

        def word_tokenize(self, text):
            return list(text) if self.chars else text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    base = tmp / f"dt-{variant}"
    inp = base / "input"
    inp.mkdir(parents=True)
    eligible = [d for d in docs if len(scorer.simplify(d["text"])) >= 200]
    with open(inp / "docs.jsonl", "w") as f:
        for d in eligible:
            f.write(json.dumps({"text": d["text"], "id": d["meta"]["id"]}) + "\n")
    chars = variant == "char13"
    cfg = MinhashConfig(n_grams=13 if chars else 5, num_buckets=9, hashes_per_bucket=13, seed=1,
                        norm_config=TextNormConfig(norm_unicode_diacritics=False, norm_numbers=False),
                        hash_config=HashConfig(precision=32, hash_fc="sha1"))
    times = {}
    t0, c0 = time.perf_counter(), _cpu()
    LocalPipelineExecutor(pipeline=[JsonlReader(str(inp)), MinhashDedupSignature(
        str(base / "sigs"), config=cfg, language=Split(chars))], tasks=1, workers=1,
        logging_dir=str(base / "logs1")).run()
    times["signature"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(base / "sigs"), str(base / "buckets"),
                          config=cfg)], tasks=cfg.num_buckets, workers=1,
                          logging_dir=str(base / "logs2")).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(base / "buckets"), str(base / "ids"),
                          config=cfg, save_cluster_id=True)], tasks=1,
                          logging_dir=str(base / "logs3")).run()
    times["buckets_cluster"] = time.perf_counter() - t1
    cpu_total = _cpu() - c0
    clusters: dict[int, list[str]] = {}
    cfile = base / "ids" / "000000.clusters"
    if cfile.exists():
        raw = cfile.read_bytes()
        for doc, cid in struct.iter_unpack("<II", raw):
            clusters.setdefault(cid, []).append(eligible[doc]["meta"]["id"])
    pred = tmp / f"dt-{variant}.clusters.jsonl"
    _write_cluster_file(pred, list(clusters.values()))
    return {"tool": f"datatrove {variant}", "pred": pred,
            "wall_total": times["signature"] + times["buckets_cluster"], "cpu_total": cpu_total,
            "wall_signature": times["signature"], "eligible_only": True,
            "mb": sum(len(d["text"].encode()) for d in eligible) / 1e6, "docs": len(eligible)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default=str(REPO.parent / "shared" / "corpus" / "dedup-bench"))
    ap.add_argument("--lmfab", default="oph,oph-verify,perm")
    ap.add_argument("--datatrove", default="char13,word5")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    bench = Path(args.bench)
    scorer = _scorer(bench)
    docs = _docs(bench)
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    header = (f"{datetime.date.today()} | {platform.processor() or platform.machine()} "
              f"{_cpu_model()} | nproc {os.cpu_count()} | workers {args.workers} | "
              f"{len(docs)} docs, {mb:.1f} MB | python {platform.python_version()} | "
              f"lmfab {_commit()} | datatrove {_version('datatrove')}")
    print(header, file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        runs = [("lmfab", v) for v in args.lmfab.split(",") if v]
        runs += [("datatrove", v) for v in args.datatrove.split(",") if v]
        for tool, v in runs:
            print(f"{tool} {v} ...", file=sys.stderr)
            if tool == "lmfab":
                r = run_lmfab(bench, v, args.workers, tmp)
            else:
                r = run_datatrove(bench, v, docs, tmp, scorer)
            s = scorer.score(str(bench / "docs.jsonl.zst"), str(bench / "truth.jsonl.zst"),
                             clusters=str(r.pop("pred")))
            r["score"] = {"cluster_level": s["cluster_level"], "kept": s["kept"]}
            print(json.dumps(r, default=str), file=sys.stderr)  # nothing lost if a later run fails
            results.append(r)
    print(header)
    print("\n| tool | P | R | F1 | kept (ideal) | signature s | total s | CPU s | "
          "MB/s/core (signature) | MB/s/core (total) | docs/s/core (total) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cores = args.workers
    for r in results:
        c, k = r["score"]["cluster_level"], r["score"]["kept"]
        cores_r = 1 if r["tool"].startswith("datatrove") else cores
        mb_r, n_r = r.get("mb", mb), r.get("docs", len(docs))
        print(f"| {r['tool']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
              f"{k['kept']} ({k['ideal']}) | {r['wall_signature']:.1f} | {r['wall_total']:.1f} | "
              f"{r['cpu_total']:.1f} | "
              f"{mb_r / r['wall_signature'] / cores_r:.2f} | {mb_r / r['wall_total'] / cores_r:.2f} | "
              f"{n_r / r['wall_total'] / cores_r:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=1,
                                              default=str))


def _cpu() -> float:
    """CPU-seconds (user + system) of this process and its finished children."""
    import resource

    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("\n"):
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


if __name__ == "__main__":
    main()
