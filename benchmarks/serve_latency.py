"""Serving latency under a mixed load: continuous batching against batch-at-a-time.

    python benchmarks/serve_latency.py --model configs/models/cerebras-gpt-111m.yaml \
        --long-tokens 96 --short 8 --short-tokens 8 --every 0.25 --json serve.json

One long request (``--long-tokens`` new tokens) starts; while it decodes, ``--short``
requests of ``--short-tokens`` arrive one every ``--every`` seconds. Each request's latency
is submit -> completion through :class:`lmfab.serve.batcher.Batcher`, the server's own
scheduler (no HTTP: what is measured is the scheduling), random weights of a model preset,
greedy. Two modes in the same run: ``continuous`` (requests join the running batch between
decode steps, lmfab's default) and ``batch-at-a-time`` (``continuous=False``: arrivals wait
for the running batch to end, the scheduler lmfab had before). Printed: median and worst
latency of the short requests, the long one's, and the wall time of the whole load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfab.config.load import load_model_config  # noqa: E402
from lmfab.infer.generate import Request, TokenIdsOnly  # noqa: E402
from lmfab.models import build_model, materialize  # noqa: E402
from lmfab.serve.batcher import Batcher  # noqa: E402


async def one_load(model, args, continuous: bool) -> dict:
    batcher = Batcher(model, TokenIdsOnly(), max_batch_size=args.max_batch, compile=args.compile,
                      continuous=continuous)
    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size

    def prompt(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    async def run(req: Request, name: str, out: dict):
        t0 = time.perf_counter()
        job = batcher.submit(req)
        while True:
            item = await job.pieces.get()
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, str):
                out[name] = time.perf_counter() - t0
                return

    lat: dict[str, float] = {}
    start = time.perf_counter()
    try:
        tasks = [asyncio.create_task(run(Request(prompt(args.prompt), args.long_tokens,
                                                 stop_token_ids=[]), "long", lat))]
        for i in range(args.short):
            await asyncio.sleep(args.every)
            tasks.append(asyncio.create_task(run(Request(prompt(args.prompt), args.short_tokens,
                                                         stop_token_ids=[]), f"s{i}", lat)))
        await asyncio.gather(*tasks)
    finally:
        batcher.close()
    shorts = [lat[f"s{i}"] for i in range(args.short)]
    return {"mode": "continuous" if continuous else "batch-at-a-time",
            "short_median_s": statistics.median(shorts), "short_max_s": max(shorts),
            "long_s": lat["long"], "wall_s": time.perf_counter() - start,
            "batches": batcher.batches, "joined": batcher.joined}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="configs/models/cerebras-gpt-111m.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens of every request")
    ap.add_argument("--long-tokens", type=int, default=96)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--every", type=float, default=0.25, help="seconds between short arrivals")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--compile", default=None, help="decode compile mode (default: CUDA only)")
    ap.add_argument("--json")
    a = ap.parse_args()
    device = torch.device(a.device)
    cfg = load_model_config(a.model)
    model = materialize(build_model(cfg), device, seed=0).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
           f"cpu ({platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads)",
           "torch": torch.__version__, "model": a.model, "params": model.num_params(),
           "date": time.strftime("%Y-%m-%d"), **{k: v for k, v in vars(a).items()
                                                   if k not in ("json", "model")}}
    asyncio.run(one_load(model, a, True))  # warm-up (and compilation on CUDA)
    rows = [asyncio.run(one_load(model, a, c)) for c in (False, True)]
    print(f"\n{env['device']} | torch {env['torch']} | {a.model} ({env['params'] / 1e6:.1f}M) "
          f"| {env['date']}\n1 request of {a.long_tokens} tokens, then {a.short} of "
          f"{a.short_tokens} every {a.every} s, prompts of {a.prompt}\n")
    print("| scheduler | short median s | short worst s | long s | whole load s | joined |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['short_median_s']:.2f} | {r['short_max_s']:.2f} | "
              f"{r['long_s']:.2f} | {r['wall_s']:.2f} | {r['joined']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
