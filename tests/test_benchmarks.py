"""The throughput benchmark runs end to end on a CPU (numbers there mean nothing; the code
path that produces docs/benchmarks.md's figures must not rot)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import CONFIGS, REPO


def test_train_throughput_isolates_impls_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"),
           "--config", str(CONFIGS / "train" / "tiny.yaml"), "--device", "cpu",
           "--impl", "lmfab-eager,hf-eager", "--steps", "2", "--warmup", "1",
           "--set", "runconfig.loss=fused", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in rows] == ["lmfab-eager", "hf-eager"]
    assert all(r["ok"] and r["tokens_per_s"] > 0 and len(r["step_ms"]) == 2 for r in rows)
    assert rows[0]["params"] == rows[1]["params"]  # same shapes on both sides
    assert rows[0]["pid"] != rows[1]["pid"]  # each impl in its own process
    assert "| lmfab-eager |" in proc.stdout and "| hf-eager |" in proc.stdout
