"""Tokenize-and-pack throughput: ``lmfab data pack`` per core and its scaling in processes,
beside Hugging Face ``tokenizers``' own batched rate measured in the same run.

    python benchmarks/pack_throughput.py --input ../shared/corpus --max_mb 40 \\
        [--tokenizer tokenizer.json] [--processes 1,2] [--repeat 2] [--out dev/results/X]

What is measured (MB = 10^6 bytes of UTF-8 document text):

* ``hf-1thread``: ``Tokenizer.encode_batch_fast`` over the in-memory texts with
  ``TOKENIZERS_PARALLELISM=false`` -- the per-core ceiling of the tokenizer itself (no
  reading, no writing).
* ``hf-rayon``: the same with HF's rayon thread pool on (all cores, one process).
* ``pack-pN``: ``lmfab.data.prep.pack.pack_corpus`` end to end with N encoding processes: read
  ``jsonl.zst``, encode, write work files, pack into shards of one MSL, ``meta.json``.
  Per core = rate / N; scaling = rate / rate(p1).
* MB per CPU-second: the same work over the CPU time spent (the process and its reaped
  workers), which other load on a shared machine does not change much; wall-clock rates
  and scaling do depend on it, so the load average before each run is recorded.

The input is a deterministic sample of ``--max_mb`` of documents taken round-robin over
the sources and written as 8 ``jsonl.zst`` files (so every process has whole files of the
same mix). Without ``--tokenizer`` a 32,768-token BPE is trained on the sample first (not
timed). Each figure is the best of ``--repeat`` runs, since other work on a shared machine
only ever slows a run down; the load average before each run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from itertools import zip_longest
from pathlib import Path

import zstandard

from lmfab.data.prep.bpe_train import train_tokenizer
from lmfab.data.prep.pack import pack_corpus
from lmfab.data.prep.readers import iter_documents, list_files


def build_sample(inputs: list[str], max_bytes: int, out: Path, n_files: int = 8) -> list[str]:
    """Round-robin over the top-level inputs' files until ``max_bytes`` of text."""
    per_source = []
    for given in inputs:
        p = Path(given)
        subdirs = sorted(d for d in p.iterdir() if d.is_dir()) if p.is_dir() else []
        groups = [list_files([d]) for d in subdirs if list_files([d])] or [list_files([p])]
        per_source += [iter_documents(g) for g in groups]
    texts, total = [], 0
    for docs in zip_longest(*per_source):
        for d in docs:
            if d is not None and d.text and total < max_bytes:
                texts.append(d.text)
                total += len(d.text.encode("utf-8"))
        if total >= max_bytes:
            break
    out.mkdir(parents=True, exist_ok=True)
    cctx = zstandard.ZstdCompressor(level=3)
    for k in range(n_files):
        lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                        for t in texts[k::n_files])
        (out / f"part-{k:05d}.jsonl.zst").write_bytes(cctx.compress(lines.encode()))
    return texts


def hf_rate(tokenizer: str, texts: list[str], parallel: bool) -> tuple[float, float]:
    """(wall s, CPU s) of encode_batch_fast in a fresh process (the env var is read there)."""
    code = (
        "import sys, time, json\n"
        "from tokenizers import Tokenizer\n"
        "texts = json.load(open(sys.argv[2]))\n"
        "tok = Tokenizer.from_file(sys.argv[1]); tok.encode_special_tokens = True\n"
        "tok.encode_batch_fast(texts[:50], add_special_tokens=False)\n"
        "t, c = time.perf_counter(), time.process_time()\n"
        "for i in range(0, len(texts), 512):\n"
        "    tok.encode_batch_fast(texts[i:i + 512], add_special_tokens=False)\n"
        "print(time.perf_counter() - t, time.process_time() - c)\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if parallel else "false"}
    try:
        out = subprocess.run([sys.executable, "-c", code, tokenizer, f.name], env=env,
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", default=["../shared/corpus"])
    ap.add_argument("--tokenizer", help="tokenizer.json (default: train a 32k BPE on the sample)")
    ap.add_argument("--max_mb", type=float, default=40.0)
    ap.add_argument("--processes", default=None, help="e.g. 1,2 (default: 1..all cores)")
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", help="folder for results JSON (default: print only)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    procs = [int(x) for x in args.processes.split(",")] if args.processes else list(
        range(1, cores + 1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = build_sample(args.input, int(args.max_mb * 1e6), tmp / "in")
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        tok = args.tokenizer
        if tok is None:
            tok = str(tmp / "tokenizer.json")
            train_tokenizer([str(tmp / "in")], tok, vocab_size=32768, sample_bytes=20_000_000,
                            progress=False)
        print(f"sample: {len(texts):,} documents, {mb:.1f} MB; tokenizer {tok}", file=sys.stderr)
        rows = []

        def record(name: str, n: int, fn) -> None:
            runs, loads = [], []
            for _ in range(args.repeat):
                loads.append(os.getloadavg()[0])
                runs.append(fn())
            wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            rows.append({"impl": name, "processes": n, "mb_per_s": mb / wall,
                         "mb_per_s_per_core": mb / wall / n, "mb_per_cpu_s": mb / cpu,
                         "wall_s": [r[0] for r in runs], "cpu_s": [r[1] for r in runs],
                         "load_before": loads})
            print(f"{name:>12}: {mb / wall:6.2f} MB/s, {mb / wall / n:5.2f} MB/s per core, "
                  f"{mb / cpu:5.2f} MB per CPU-second (load before: "
                  f"{', '.join(f'{x:.2f}' for x in loads)})", file=sys.stderr)

        record("hf-1thread", 1, lambda: hf_rate(tok, texts, parallel=False))
        record("hf-rayon", cores, lambda: hf_rate(tok, texts, parallel=True))
        for n in procs:
            def run(n=n) -> tuple[float, float]:
                out = tmp / f"out-{n}-{time.perf_counter_ns()}"
                t, c = time.perf_counter(), cpu_seconds()
                pack_corpus([str(tmp / "in")], out, tokenizer=tok, seq_lens=[args.seq_len],
                            val_fraction=0.0, processes=n, progress=False)
                return time.perf_counter() - t, cpu_seconds() - c
            record(f"pack-p{n}", n, run)
    base = next(r["mb_per_s"] for r in rows if r["impl"] == "pack-p1") if 1 in procs else None
    for r in rows:
        r["scaling_vs_p1"] = r["mb_per_s"] / base if base and r["impl"].startswith("pack") else None
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_count": cores, "python": platform.python_version(),
        "sample_mb": mb, "documents": len(texts), "inputs": args.input, "tokenizer": tok,
        "seq_len": args.seq_len, "repeat": args.repeat, "rows": rows,
    }
    print("| impl | processes | MB/s | MB/s per core | MB per CPU-s | scaling vs pack-p1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        sc = f"{r['scaling_vs_p1']:.2f}×" if r["scaling_vs_p1"] else ""
        print(f"| {r['impl']} | {r['processes']} | {r['mb_per_s']:.2f} | "
              f"{r['mb_per_s_per_core']:.2f} | {r['mb_per_cpu_s']:.2f} | {sc} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pack_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
