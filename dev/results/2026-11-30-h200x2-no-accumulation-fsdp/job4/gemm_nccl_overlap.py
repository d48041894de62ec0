"""How much a GEMM slows down while an NCCL collective runs beside it, and whether leaving SMs
to NCCL helps. Run on 2+ GPUs of one host:

    torchrun --nproc_per_node 2 benchmarks/gemm_nccl_overlap.py [--json out.json]

Why: in lmfab's 2-GPU profiles without gradient accumulation the GEMMs take longer than on
one GPU (1.3B under FSDP2: 287 against 257 ms of GEMMs per step). cuBLAS's Hopper GEMMs are
persistent: they launch one thread block per SM, each working through a fixed list of tiles.
NCCL's kernels hold some SMs while a gradient collective runs, so the blocks that find no
free SM start only when one frees up, and the GEMM ends late (a second "wave").
``torch._C._set_sm_carveout_experimental(k)`` asks cuBLASLt for GEMMs sized for k fewer SMs.

For each training shape's GEMM (the 1.3B and 124M MLP's first layer over one micro-batch),
with no carve-out and with k = 8, 16, 32 SMs left free, it times (CUDA events, median of 7
rounds, each round 20 GEMMs in a row):

- ``alone``: the GEMMs with nothing beside them;
- ``beside``: the same GEMMs while a stream of bf16 all-reduces (64 MB each, about as long as
  the GEMMs together) runs on another stream on every rank;
- ``nccl``: the all-reduces alone.

cuBLASLt is made the preferred BLAS library (``torch.backends.cuda.preferred_blas_library``)
since the carve-out is a cuBLASLt setting; the first row per shape is the default library
for reference. Prints a markdown table on rank 0; NCCL_MAX_CTAS in the environment sets how
many SMs NCCL takes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

SHAPES = {"1.3B fc": (24576, 2048, 8192), "124M fc": (32768, 768, 3072)}


def timed(fn, rounds: int = 7) -> float:
    """Median over rounds of fn()'s GPU time on the current stream, ms."""
    out = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def measure(name: str, shape: tuple[int, int, int], n_gemms: int, buf: torch.Tensor,
            comm: torch.cuda.Stream) -> list[dict]:
    m, k, n = shape
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)

    def gemms():
        for _ in range(n_gemms):
            torch.mm(a, b)

    # as many all-reduces as last about as long as the GEMMs
    torch.backends.cuda.preferred_blas_library("cublas")
    torch._C._set_sm_carveout_experimental(None)
    n_ar = max(1, round(timed(gemms) / timed(lambda: dist.all_reduce(buf))))

    def reduces():
        for _ in range(n_ar):
            dist.all_reduce(buf)

    nccl_ms = timed(reduces)
    rows = []
    for lib, carve in [("cublas", None), ("cublaslt", None), ("cublaslt", 8),
                       ("cublaslt", 16), ("cublaslt", 32)]:
        torch.backends.cuda.preferred_blas_library(lib)
        torch._C._set_sm_carveout_experimental(carve)
        alone = timed(gemms)
        beside, both = [], []  # the GEMMs' own span while NCCL runs; until both have ended
        for _ in range(7):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            dist.barrier()
            torch.cuda.synchronize()
            ev[0].record()
            comm.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(comm):
                reduces()
            gemms()
            ev[1].record()
            torch.cuda.current_stream().wait_stream(comm)
            ev[2].record()
            torch.cuda.synchronize()
            beside.append(ev[0].elapsed_time(ev[1]))
            both.append(ev[0].elapsed_time(ev[2]))
        beside_ms = statistics.median(beside)
        rows.append({"shape": name, "blas": lib, "carveout": carve or 0,
                     "gemm_alone_ms": alone / n_gemms, "gemm_beside_nccl_ms": beside_ms / n_gemms,
                     "slowdown": beside_ms / alone, "nccl_alone_ms": nccl_ms,
                     "both_ms": statistics.median(both), "serial_ms": alone + nccl_ms})
    torch._C._set_sm_carveout_experimental(None)
    torch.backends.cuda.preferred_blas_library("cublas")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--gemms", type=int, default=20)
    args = p.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    comm = torch.cuda.Stream()
    buf = torch.ones(32 * 1024 * 1024, dtype=torch.bfloat16, device="cuda")  # 64 MB
    rows = [r for name, shape in SHAPES.items()
            for r in measure(name, shape, args.gemms, buf, comm)]
    if rank == 0:
        print(f"NCCL_MAX_CTAS={os.environ.get('NCCL_MAX_CTAS', '(NCCL default)')}, "
              f"{dist.get_world_size()} GPUs, {args.gemms} GEMMs per round")
        print("| shape | BLAS | SMs left free | GEMM alone ms | GEMM beside NCCL ms | "
              "slowdown | NCCL alone ms | both ms | one after the other ms |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['shape']} | {r['blas']} | {r['carveout']} | {r['gemm_alone_ms']:.3f} | "
                  f"{r['gemm_beside_nccl_ms']:.3f} | {r['slowdown']:.2f}x | "
                  f"{r['nccl_alone_ms']:.2f} | {r['both_ms']:.2f} | {r['serial_ms']:.2f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"nccl_max_ctas": os.environ.get("NCCL_MAX_CTAS"), "rows": rows}, f,
                          indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
