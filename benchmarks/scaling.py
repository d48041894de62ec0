"""Data-parallel scaling: the same params file on 1, 2, 4, 8 devices, DDP and FSDP2.

    python benchmarks/scaling.py --params configs/train/cerebras-gpt-1.3b.yaml \
        --devices 1,2,4,8 --strategies ddp,fsdp --steps 30 --out runs/scaling \
        [--set train_input.data_dir=DATA ...]

Each point is a real ``lmfab run --num_devices N`` (torchrun underneath) at a fixed
*per-device* micro-batch with no accumulation, so the global batch grows with N (weak
scaling, and the hardest case: gradients cross the link after every micro-batch). With
``--global_batch G`` every point trains at global batch G instead, through gradient
accumulation (G / (micro x N) micro-batches per step, gradients reduced once per step): what
happens when the same params file, global batch and all, moves from 1 device to N; the table
then also gives the largest loss difference against the 1-device run. Throughput is the
median of the logged tokens/s after the first ``--warmup`` logged intervals (compilation
happens there); per-GPU throughput, efficiency against the 1-device point of the same
strategy, and peak memory (from ``torch.cuda.max_memory_allocated`` logged by the run, GPUs
only) go in a table, a JSON file and a PNG plot. Works on CPUs with gloo too (tiny configs), which is how CI and
machines without GPUs check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_point(args, n: int, strategy: str, micro: int) -> dict:
    batch = args.global_batch or micro * n
    model_dir = Path(args.out) / f"{strategy}-{n}"
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    cmd = [sys.executable, "-m", "lmfab", "run", "--params", args.params, "--mode", "train",
           "--model_dir", str(model_dir), "--num_devices", str(n), "--max_steps", str(args.steps),
           "--set", f"train_input.batch_size={batch}",
           "--set", f"train_input.micro_batch_size={micro}",
           "--set", f"eval_input.batch_size={n}", "--set", "eval_input.micro_batch_size=1",
           "--set", f"runconfig.parallel.strategy={strategy}", "--set", f"runconfig.log_steps={args.log_steps}",
           "--set", "runconfig.checkpoint_steps=0", "--set", "runconfig.tensorboard=false"]
    if not args.checkpoint:  # the end-of-run checkpoint: 15 GB for the 1.3B shape, 156 GB at 13B
        cmd += ["--set", "runconfig.checkpoint_at_end=false"]
    for s in args.set:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(f"[scaling] {strategy} x{n}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (Path(args.out) / f"{strategy}-{n}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"devices": n, "strategy": strategy, "error": proc.stderr.strip().splitlines()[-1:]}
    rows = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    timed = train[args.warmup:] or train[-1:]
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    mem = max((r.get("max_memory_gib") or 0.0) for r in train) or None
    return {"devices": n, "strategy": strategy, "tokens_per_s": tok_s,
            "losses": {r["step"]: r["loss"] for r in train},
            "tokens_per_s_per_device": tok_s / n, "mfu": timed[-1].get("mfu"),
            "peak_memory_gib": mem, "global_batch": batch, "micro_batch": micro,
            "accumulation": batch // (micro * n)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", required=True)
    p.add_argument("--devices", default="1,2")
    p.add_argument("--strategies", default="ddp,fsdp")
    p.add_argument("--micro_batch", type=int, help="per device (default: the params file's)")
    p.add_argument("--global_batch", type=int,
                   help="fixed global batch for every point, reached by accumulation (default: "
                        "micro-batch x devices, no accumulation)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log_steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="logged intervals to skip")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--baseline", help="scaling.json of an earlier run whose 1-device points "
                                      "serve as the efficiency base when this run has none")
    p.add_argument("--checkpoint", action="store_true",
                   help="save each point's end-of-run checkpoint (skipped by default)")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.micro_batch is None:
        sys.path.insert(0, str(REPO / "src"))
        from lmfab.config import load_config

        cfg = load_config(args.params, args.set)
        args.micro_batch = cfg.train_input.micro_batch_size or cfg.train_input.batch_size
    if args.global_batch:
        for n in args.devices.split(","):
            if args.global_batch % (args.micro_batch * int(n)):
                p.error(f"--global_batch {args.global_batch} is not a multiple of micro-batch "
                        f"{args.micro_batch} x {n} devices")
    points = [run_point(args, int(n), s, args.micro_batch)
              for s in args.strategies.split(",") for n in args.devices.split(",")]
    ones = [pt for pt in points if pt["devices"] == 1 and "error" not in pt]
    if args.baseline:  # 1-device points of an earlier run, for variants measured on N only
        for pt in json.loads(Path(args.baseline).read_text()):
            if pt["devices"] == 1 and "error" not in pt:
                pt["losses"] = {int(k): v for k, v in pt.get("losses", {}).items()}  # JSON keys
                ones.append(pt)
    base = {}
    for pt in ones:  # first of each strategy wins; one device is the same run under any
        base.setdefault(pt["strategy"], pt)
    for strategy in {pt["strategy"] for pt in points}:
        if strategy not in base and ones:
            base[strategy] = ones[0]
    same_batch = bool(args.global_batch)  # then the same training: losses comparable
    print("| strategy | devices | global batch | accumulation | tokens/s | tokens/s per device | "
          "efficiency vs 1 | MFU | peak mem GiB |" + (" max abs loss diff vs 1 |" if same_batch else "")
          + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if same_batch else ""))
    for pt in points:
        if "error" in pt:
            print(f"| {pt['strategy']} | {pt['devices']} | failed: {pt['error']} | | | | | | |"
                  + (" |" if same_batch else ""))
            continue
        b = base.get(pt["strategy"])
        eff = pt["tokens_per_s_per_device"] / b["tokens_per_s_per_device"] if b else None
        pt["efficiency"] = eff
        mfu = "-" if pt["mfu"] is None else f"{100 * pt['mfu']:.1f}%"
        mem = "-" if pt["peak_memory_gib"] is None else f"{pt['peak_memory_gib']:.1f}"
        print(f"| {pt['strategy']} | {pt['devices']} | {pt['global_batch']} | {pt['accumulation']} | "
              f"{pt['tokens_per_s']:,.0f} | {pt['tokens_per_s_per_device']:,.0f} | "
              f"{'-' if eff is None else f'{100 * eff:.1f}%'} | {mfu} | {mem} |"
              + (f" {loss_diff(pt, b)} |" if same_batch else ""))
    (Path(args.out) / "scaling.json").write_text(json.dumps(points, indent=1))
    plot(points, Path(args.out) / "scaling.png")
    return 0 if all("error" not in pt for pt in points) else 1


def loss_diff(pt: dict, base: dict | None) -> str:
    """Largest |loss difference| against the 1-device point at the steps both logged: at one
    global batch the runs train the same model on the same data, to rounding."""
    if base is None or base is pt:
        return "-"
    steps = sorted(set(pt["losses"]) & set(base["losses"]))
    if not steps:
        return "-"
    pt["max_abs_loss_diff"] = max(abs(pt["losses"][k] - base["losses"][k]) for k in steps)
    return f"{pt['max_abs_loss_diff']:.2e} ({len(steps)} steps)"


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in sorted({pt["strategy"] for pt in points}):
        pts = [pt for pt in points if pt["strategy"] == strategy and "error" not in pt]
        if pts:
            ax.plot([pt["devices"] for pt in pts], [pt["tokens_per_s_per_device"] for pt in pts],
                    marker="o", label=strategy)
    ax.set(xlabel="devices", ylabel="tokens/s per device", title="data-parallel scaling")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
