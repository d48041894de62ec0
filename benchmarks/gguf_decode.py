"""GGUF export quality and CPU decode speed: llama.cpp at f32 / f16 / q8_0 / q4_0 beside lmfab.

For each tensor type the run is exported with ``lmfab.export.gguf`` and loaded with llama.cpp
(``llama-cpp-python``). Reported per type:

- file size;
- top-1 agreement: the share of held-out positions where llama.cpp's next-token argmax is
  lmfab's fp32 argmax;
- bits per byte on the held-out split: mean next-token NLL (nats) / ln 2 / (UTF-8 bytes per
  token of that split, from the packed data's meta.json), llama.cpp's logits beside lmfab's;
- (llama.cpp's KV cache is kept f32, GGML type 0, so each row shows its weights' rounding
  only; llama.cpp's default is f16);
- decode tokens/s at batch 1: greedy generation of ``--new`` tokens after a short prompt,
  llama.cpp with its KV cache, beside lmfab's own KV-cached ``infer.generate.run_batch``
  (eager fp32 on the CPU) and its no-cache reference ``infer.generate.sample``.

Usage (a run trained on the shipped sample, see docs/export.md)::

    python benchmarks/gguf_decode.py --model-dir runs/gguf-bench --data-dir runs/data/sample \\
        [--windows 32] [--new 100] [--threads 2] [--out-dir runs/gguf-bench/exports] [--json x]

Prints a markdown table to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def val_windows(data_dir: Path, seq_len: int, n: int) -> list[list[int]]:
    from lmfab.data.loader import TokenDataset

    ds = TokenDataset(data_dir / "val")  # windows of seq_len + 1 tokens: keep seq_len
    idx = np.arange(0, len(ds), max(1, len(ds) // n))[:n]
    return [row[:seq_len].astype(np.int64).tolist() for row in ds.get(idx)]


def bytes_per_token(data_dir: Path) -> float:
    meta = json.loads((data_dir / "meta.json").read_text())
    split = meta["splits"]["val"]
    return split["text_bytes"] / split["tokens"]


def _timed(fn, n) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def nll_and_argmax(logits: np.ndarray, ids: list[int]) -> tuple[float, np.ndarray]:
    """Summed next-token NLL over positions 0..T-2, and the argmax at every position."""
    x = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    nll = float((lse - x[np.arange(len(x)), ids[1:]]).sum())
    return nll, logits.argmax(-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", "--model_dir", required=True)
    ap.add_argument("--data-dir", "--data_dir", required=True, help="packed data with a val split")
    ap.add_argument("--types", default="f32,f16,q8_0,q4_0")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows scored")
    ap.add_argument("--new", type=int, default=100, help="tokens generated for the speed figure")
    ap.add_argument("--repeat", type=int, default=3,
                    help="decode timings repeated, the fastest kept (a shared CPU is noisy)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out-dir", "--out_dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import llama_cpp

    from lmfab.export.gguf import export_gguf
    from lmfab.infer.generate import Request, load_trained, run_batch, sample

    torch.set_num_threads(args.threads)
    model_dir, data_dir = Path(args.model_dir), Path(args.data_dir)
    out_dir = Path(args.out_dir or model_dir / "exports")
    model, tok, ckpt = load_trained(model_dir)
    T = model.cfg.max_seq_len
    windows = val_windows(data_dir, T, args.windows)
    bpt = bytes_per_token(data_dir)
    n_pos = sum(len(w) - 1 for w in windows)
    log(f"{len(windows)} held-out windows of {T} tokens, {bpt:.3f} bytes/token")

    ref_nll, ref_top = 0.0, []
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w]))[0].float().numpy()
            nll, top = nll_and_argmax(logits, w)
            ref_nll += nll
            ref_top.append(top[:-1])
    ref_bpb = ref_nll / n_pos / math.log(2) / bpt

    prompt = tok.encode("ROMEO.").ids
    n_new = min(args.new, T - len(prompt))

    def cached(n):  # lmfab generate's path: KV cache, greedy, no stop token
        run_batch(model, tok, [Request(prompt, max_new_tokens=n, stop_token_ids=[])])

    def reference(n):  # the no-cache reference: the whole window every step
        sample(model, torch.tensor([prompt]), max_new_tokens=n, temperature=0.0)

    def fastest(fn):  # decode tokens/s, prompt excluded: (t(n) - t(1)) over n - 1 steps
        fn(4)  # warm-up
        best_n = min(_timed(fn, n_new) for _ in range(args.repeat))
        best_1 = min(_timed(fn, 1) for _ in range(args.repeat))
        return (n_new - 1) / max(best_n - best_1, 1e-9)

    size = (ckpt / "model.safetensors").stat().st_size
    rows = [{"impl": "lmfab generate (KV cache, fp32)", "type": "fp32", "bytes": size,
             "top1": 1.0, "bpb": ref_bpb, "tokens_per_s": fastest(cached)},
            {"impl": "lmfab reference (no cache, fp32)", "type": "fp32", "bytes": size,
             "top1": 1.0, "bpb": ref_bpb, "tokens_per_s": fastest(reference)}]
    for qtype in args.types.split(","):
        e = export_gguf(model_dir, out_dir / f"model-{qtype}.gguf", qtype=qtype,
                        warn=lambda m: log(m))
        llm = llama_cpp.Llama(model_path=str(e.path), n_ctx=T, n_batch=T, n_threads=args.threads,
                              logits_all=True, type_k=0, type_v=0, verbose=False)
        nll_sum, agree = 0.0, 0
        for w, top_ref in zip(windows, ref_top, strict=True):
            llm.reset()
            llm.eval(w)
            nll, top = nll_and_argmax(np.array(llm.scores[: len(w)]), w)
            nll_sum += nll
            agree += int((top[:-1] == top_ref).sum())
        # decode speed: llama.cpp's KV-cached greedy loop, prompt excluded from the timing
        best = math.inf
        for _ in range(args.repeat):
            llm.reset()
            llm.eval(prompt)
            t0 = time.perf_counter()
            for _ in range(n_new):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            best = min(best, time.perf_counter() - t0)
        tps = n_new / best
        rows.append({"impl": "llama.cpp", "type": qtype, "bytes": e.path.stat().st_size,
                     "top1": agree / n_pos, "bpb": nll_sum / n_pos / math.log(2) / bpt,
                     "tokens_per_s": tps})
        log(f"{qtype}: {rows[-1]}")
        del llm

    env = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
           "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
           "model_dir": str(model_dir), "checkpoint": ckpt.name, "windows": len(windows),
           "positions": n_pos, "new_tokens": args.new, "params": model.num_params()}
    print(f"{env['date']}, {env['cores']}-core CPU, {args.threads} threads, torch {env['torch']}, "
          f"llama-cpp-python {env['llama_cpp_python']}; {env['params']:,} parameters, "
          f"{n_pos:,} held-out positions, decode {args.new} tokens at batch 1 "
          f"(fastest of {args.repeat})\n")
    print("| impl | type | file size | top-1 agreement with lmfab fp32 | bits/byte (val) "
          "| decode tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['type']} | {r['bytes'] / 1e6:.2f} MB | {100 * r['top1']:.2f}% "
              f"| {r['bpb']:.4f} | {r['tokens_per_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
