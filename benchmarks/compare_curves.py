#!/usr/bin/env python
"""Compare the training-loss curves of runs: the same config on 1 and N devices at one
global batch should give the same curve within bf16 noise.

    python benchmarks/compare_curves.py RUN_DIR_A RUN_DIR_B [...] [--labels 1gpu,2gpu] \\
        [--png curves.png] [--json curves.json]

Reads each run's ``metrics.jsonl`` (train rows), prints a markdown table of the loss at every
step the runs have in common with the largest absolute difference from the first run, and a
summary line (max and mean |difference|). Exit status 1 when the runs share no logged step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def train_losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (is {run_dir} an lmfab run directory?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def compare(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Common steps and, per step, the largest |loss - loss of the first run|."""
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    diffs = [max(abs(c[s] - curves[0][s]) for c in curves[1:]) for s in steps]
    return steps, diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="lmfab run directories (two or more)")
    p.add_argument("--labels", default=None, help="comma-separated, one per run")
    p.add_argument("--png", default=None, help="write the curves as a plot here")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give two or more run directories")
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    curves = [train_losses(r) for r in args.runs]
    steps, diffs = compare(curves)
    if not steps:
        print("error: the runs share no logged training step", file=sys.stderr)
        return 1
    print("| step | " + " | ".join(labels) + " | max abs diff |")
    print("|---:|" + "---:|" * len(labels) + "---:|")
    for s, d in zip(steps, diffs, strict=True):
        print(f"| {s} | " + " | ".join(f"{c[s]:.4f}" for c in curves) + f" | {d:.4f} |")
    print(f"\n{len(steps)} common steps; max |diff| {max(diffs):.4f}, "
          f"mean |diff| {sum(diffs) / len(diffs):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"labels": labels, "runs": [str(r) for r in args.runs], "steps": steps,
             "losses": [[c[s] for s in steps] for c in curves], "max_abs_diff": diffs}, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, c in zip(labels, curves, strict=True):
            ax.plot(steps, [c[s] for s in steps], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
