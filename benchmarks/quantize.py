"""Weight-only quantization: memory, quality and decode speed of int8 / int4 against the
unquantized model, and the int4 weight memory of the BTLM-3B-8K shape.

    python benchmarks/quantize.py --model-dir runs/x --device cuda --json quantize.json
    python benchmarks/quantize.py --model-dir runs/x --device cpu --schemes none,int8,int4
    python benchmarks/quantize.py --model configs/models/llama-110m.yaml --device cpu \
        --schemes none,int8,int4,int4-unpacked        # random weights: memory and speed only
    python benchmarks/quantize.py --btlm --device cuda        # configs/models/btlm-3b-8k.yaml

Per scheme (``none`` is the model in its serving dtype: bf16 on CUDA, fp32 on the CPU):
weight bytes (quantized tensors counted by their parts), peak device memory while loading
and evaluating (CUDA), bits per byte on the run's held-out split (``eval_input``'s, the
first ``--windows`` windows, the split's bytes per token from its meta.json) and greedy
decode tokens/s at batch 1 (lmfab's cached decode, compiled on CUDA). ``--model`` takes a
preset with random weights instead (no bits per byte). ``int4-unpacked`` (CPU) is int4 as a
torchao without the packed CPU int4 tensor runs it: one int4 value per byte
(``IntxWeightOnlyConfig``), the form lmfab used before the packed kernel.

``--btlm``: the BTLM-3B-8K shape, random init in bf16 on the device, int4 weights; its
weight and peak memory beside the paper's "3B parameters in 3 GB of memory" (Dey et al.
2023, arXiv 2309.11568, with 4-bit weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfab.infer.generate import Request, TokenIdsOnly, run_batch  # noqa: E402
from lmfab.infer.quantize import quantize_model, weight_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_tps(model, device, n=64, prompt_len=32, compile=None) -> float:
    prompt_len = min(prompt_len, model.cfg.max_seq_len // 4)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    n = min(n, model.cfg.max_seq_len - prompt_len - 1)

    def run(k):
        run_batch(model, TokenIdsOnly(), [Request(prompt, max_new_tokens=k, stop_token_ids=[])],
                  compile=compile)

    run(n), run(1)  # warm-up (compilation)
    times = {}
    for k in (n, 1):
        ts = []
        for _ in range(3):
            sync(device)
            t = time.perf_counter()
            run(k)
            sync(device)
            ts.append(time.perf_counter() - t)
        times[k] = sorted(ts)[1]
    return (n - 1) / max(times[n] - times[1], 1e-9)


@torch.no_grad()
def held_out_bpb(model, model_dir, windows: int, device) -> float | None:
    from lmfab.checkpoint import read_run_config, resolve_checkpoint
    from lmfab.train.loop import bytes_per_token, open_eval_split

    cfg = read_run_config(resolve_checkpoint(model_dir))
    ds = open_eval_split(cfg)
    bpt = bytes_per_token(cfg)
    n = min(windows, len(ds))
    total, count = 0.0, 0
    for start in range(0, n, 8):
        batch = torch.from_numpy(ds.get(list(range(start, min(start + 8, n)))).astype("int64"))
        batch = batch.to(device)
        logits = model(batch[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count / math.log(2) / bpt if bpt else None


def load(args, scheme: str, device):
    """(model, quantize report) for one scheme, from --model-dir or a random --model."""
    from lmfab.infer import quantize
    from lmfab.infer.generate import load_for_inference

    name = "int4" if scheme == "int4-unpacked" else scheme
    if scheme == "int4-unpacked":
        if device.type != "cpu":
            raise SystemExit("int4-unpacked is the CPU fallback; use int4 on cuda")
        packed, quantize._cpu_int4_config = quantize._cpu_int4_config, lambda: None
    try:
        if args.model_dir:
            model, _, _, report = load_for_inference(args.model_dir, device=str(device),
                                                     quantize=None if name == "none" else name)
            return model, report
        from lmfab.config.load import load_model_config
        from lmfab.models import build_model, materialize

        model = materialize(build_model(load_model_config(args.model)), device, seed=0).eval()
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
        return model, None if name == "none" else quantize_model(model, name)
    finally:
        if scheme == "int4-unpacked":
            quantize._cpu_int4_config = packed


def one_scheme(args, scheme: str, device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, report = load(args, scheme, device)
    row = {"scheme": scheme, "weight_bytes": weight_bytes(model),
           "layers": None if report is None else report.summary(),
           "bpb": held_out_bpb(model, args.model_dir, args.windows, device)
           if args.model_dir else None,
           "decode_tokens_per_s": decode_tps(model, device, args.new_tokens)}
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
    del model
    return row


def btlm(device) -> dict:
    from lmfab.config.load import load_model_config
    from lmfab.models import build_model

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = load_model_config(REPO / "configs" / "models" / "btlm-3b-8k.yaml")
    model = build_model(cfg)
    model.to_empty(device=device)
    model = model.to(torch.bfloat16)
    model.init_weights(torch.Generator(device=device).manual_seed(0))
    model.eval()
    bf16_bytes, params = weight_bytes(model), model.num_params()
    report = quantize_model(model, "int4")
    gc.collect()
    out = {"params": params, "bf16_weight_bytes": bf16_bytes,
           "int4_weight_bytes": weight_bytes(model), "layers": report.summary(),
           "claim": "3B parameters in 3 GB (BTLM paper, 4-bit)"}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["decode_tokens_per_s"] = decode_tps(model, device, n=32, prompt_len=32)
        out["peak_bytes_decoding"] = torch.cuda.max_memory_allocated()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="a trained run (its held-out split gives bits/byte)")
    ap.add_argument("--model", help="a model preset with random weights instead of --model-dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--schemes", default="none,int8,int4")
    ap.add_argument("--windows", type=int, default=256, help="held-out windows to score")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--btlm", action="store_true", help="also the BTLM-3B-8K int4 figure")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if not a.model_dir and not a.model and not a.btlm:
        ap.error("give --model-dir or --model, and/or --btlm")
    if a.model_dir and a.model:
        ap.error("--model-dir or --model, not both")
    device = torch.device(a.device)
    torch.manual_seed(0)
    import torchao

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "torchao": torchao.__version__,
           "threads": torch.get_num_threads(), "model_dir": a.model_dir, "model": a.model,
           "date": time.strftime("%Y-%m-%d")}
    rows = ([one_scheme(a, s, device) for s in a.schemes.split(",")]
            if a.model_dir or a.model else [])
    result = {"env": env, "results": rows}
    print(f"\n{env['device']} | torch {env['torch']} | torchao {env['torchao']} | "
          f"{env['date']}\n")
    if rows:
        base = rows[0]
        print("| scheme | weight MiB | x | peak MiB | bits/byte | Δ bpb | decode tok/s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            d = (None if r["bpb"] is None or base["bpb"] is None else r["bpb"] - base["bpb"])
            peak = f"{r['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in r else "-"
            bpb = "-" if r["bpb"] is None else f"{r['bpb']:.4f}"
            delta = "-" if d is None else f"{d:+.4f}"
            print(f"| {r['scheme']} | {r['weight_bytes'] / 2**20:.2f} | "
                  f"{r['weight_bytes'] / base['weight_bytes']:.2f} | {peak} | {bpb} | "
                  f"{delta} | {r['decode_tokens_per_s']:.1f} |")
    if a.btlm:
        b = result["btlm"] = btlm(device)
        print(f"\nBTLM-3B-8K shape: bf16 weights {b['bf16_weight_bytes'] / 1e9:.2f} GB, int4 "
              f"weights {b['int4_weight_bytes'] / 1e9:.2f} GB ({b['layers']})"
              + (f", peak while decoding {b['peak_bytes_decoding'] / 1e9:.2f} GB, "
                 f"{b['decode_tokens_per_s']:.1f} tok/s" if "peak_bytes_decoding" in b else "")
              + f"; the paper: {b['claim']}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
