#!/usr/bin/env python
"""Training throughput of lmfab's GPT against Hugging Face's GPT2LMHeadModel, same run.

Both models get the same shapes (from an lmfab params YAML), the same micro-batch of random
token ids, fp32 master weights under bf16 autocast (CUDA; fp32 on CPU), and the same step:
forward + backward, gradient clipping, AdamW step, zero_grad. No gradient accumulation.

Implementations (``--impl``, comma-separated, run in the given order):

- ``lmfab``        built as lmfab's loop builds it (``materialize(build_model(..., kernels=...))``,
                   ``build_optimizer`` with fused AdamW on CUDA, ``parallelize`` with
                   ``runconfig.parallel.compile=true``, i.e. ``torch.compile(model)``);
- ``lmfab-eager``  the same without compile;
- ``hf-eager``     ``transformers.GPT2LMHeadModel`` with ``attn_implementation="sdpa"``;
- ``hf-compile``   the same under ``torch.compile``.

Each impl runs in a fresh Python process when several are given (``--no_isolate``: one
process), with inductor caches off, so no impl inherits another's compiled state.

Timing: warm-up steps (compilation happens there) are excluded; each timed step is bracketed
by CUDA events (wall clock on CPU) and the median step time gives tokens/s =
micro_batch * seq_len / median. MFU = tokens/s * FLOPs/token / peak, with FLOPs/token taken
from lmfab's model (6N + 12*L*d*T, N without position embeddings) for every impl so the
figures compare. The markdown table goes to stdout, progress to stderr; ``--json`` writes
everything. See benchmarks/README.md.

    python benchmarks/train_throughput.py --config configs/train/gpt2-124m.yaml \\
        --impl lmfab,lmfab-eager,hf-eager,hf-compile --steps 30 --warmup 10
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Every impl compiles from scratch: a warm inductor cache once handed the HF peer a slower
# compiled artifact than a fresh compile gives it (100 vs 74 ms on an H200, same code;
# dev/LOG.md). Set TORCHINDUCTOR_FORCE_DISABLE_CACHES=0 to allow caches.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:  # an editable install; otherwise run from a plain checkout
    import lmfab
except ImportError:
    sys.path.insert(0, str(REPO / "src"))
    import lmfab

from lmfab.config import Config, ConfigError, load_config  # noqa: E402
from lmfab.dist import World, parallelize  # noqa: E402
from lmfab.dist.world import select_device  # noqa: E402
from lmfab.models.execution import choose_kernels  # noqa: E402
from lmfab.models.gpt import build_model, materialize  # noqa: E402
from lmfab.train.loop import autocast_for, precision_of  # noqa: E402
from lmfab.train.metrics import peak_flops  # noqa: E402
from lmfab.train.optim import build_optimizer, clip_and_step, set_lr  # noqa: E402

IMPLS = ("lmfab", "lmfab-eager", "hf-eager", "hf-compile")
GIB = 1024**3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Built:
    """One implementation ready to step: ``loss(tokens)`` runs the forward pass."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor], torch.Tensor]
    n_params: int


def build_lmfab(cfg: Config, device: torch.device, *, compile: bool, lr: float) -> Built:
    bf16 = precision_of(cfg, device) == "bf16"
    kernels = choose_kernels(cfg.runconfig.kernels, device, bf16=bf16)
    model = materialize(build_model(cfg.model, kernels=kernels), device, seed=cfg.runconfig.seed)
    world = World(rank=0, world_size=1, local_rank=0, device=device)
    wrapped = parallelize(model, world, dataclasses.replace(cfg.runconfig.parallel, compile=compile),
                          bf16=bf16).module
    wrapped.train()
    optimizer = build_optimizer(model, cfg.optimizer, device, cfg.model)
    set_lr(optimizer, lr)  # lmfab sets lr from its schedule every step

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        return wrapped(tokens[:, :-1], tokens[:, 1:])

    return Built(list(model.parameters()), optimizer, loss, model.num_params())


def build_hf(
    cfg: Config, device: torch.device, *, compile: bool, lr: float, activation: str
) -> Built:
    import transformers

    m, o = cfg.model, cfg.optimizer
    hf_cfg = transformers.GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.max_seq_len,
        n_embd=m.d_model,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_inner=m.ffn_dim,
        activation_function=activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=m.norm_eps,
        initializer_range=m.init_std,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.runconfig.seed)
    model = transformers.GPT2LMHeadModel(hf_cfg)
    attn = getattr(model.config, "_attn_implementation", None)
    if attn != "sdpa":
        raise RuntimeError(f"transformers chose attn_implementation={attn!r}, not 'sdpa'")
    # transformers 5 leaves loss_type unset on GPT2LMHeadModel and warns from inside forward,
    # which costs torch.compile a graph break; name the loss it falls back to anyway.
    model.loss_type = "ForCausalLM"
    model = model.to(device=device, dtype=torch.float32)
    model.train()
    wrapped = torch.compile(model) if compile else model
    use_fused = o.fused == "on" or (o.fused == "auto" and device.type == "cuda")
    params = list(model.parameters())  # tied lm_head/wte counted once
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=(o.betas[0], o.betas[1]), eps=o.eps,
        weight_decay=o.weight_decay, fused=use_fused or None,
    )

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        # HF shifts labels inside: T inputs, T-1 predicted positions (last label ignored).
        x = tokens[:, :-1]
        return wrapped(input_ids=x, labels=x, use_cache=False).loss

    return Built(params, optimizer, loss, sum(p.numel() for p in params))


def run_impl(impl: str, cfg: Config, args, device: torch.device, flops_per_token: float,
             peak: float | None) -> dict:
    B, T = args.micro_batch, args.seq_len
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    if impl.startswith("lmfab"):
        built = build_lmfab(cfg, device, compile=impl == "lmfab", lr=args.lr)
    else:
        built = build_hf(cfg, device, compile=impl == "hf-compile", lr=args.lr,
                         activation=args.hf_activation)
    build_s = time.perf_counter() - t_build
    log(f"[{impl}] built in {build_s:.1f}s: {built.n_params:,} parameters")

    gen = torch.Generator().manual_seed(args.data_seed)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=gen).to(device)
        for _ in range(args.num_batches)
    ]
    autocast = autocast_for(cfg, device)
    max_norm = cfg.optimizer.max_grad_norm
    max_norm = max_norm if max_norm is not None else float("inf")

    def train_step(tokens: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = built.loss(tokens)
        loss.backward()
        if impl.startswith("lmfab"):  # as lmfab's loop steps (clip folded into fused AdamW)
            clip_and_step(built.optimizer, built.params, cfg.optimizer.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(built.params, max_norm)
            built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def step(i: int) -> torch.Tensor:
        return train_step(batches[i % len(batches)])

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    # Warm-up: compilation, autotuning, allocator growth. First step timed on its own.
    warm_times = []
    for i in range(args.warmup):
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        warm_times.append(time.perf_counter() - t0)
        if i == 0:
            log(f"[{impl}] first step {warm_times[0]:.1f}s (includes compilation if any)")
    if args.warmup:
        log(f"[{impl}] warm-up {args.warmup} steps in {sum(warm_times):.1f}s")

    # Timed steps: CUDA events per step (no host sync inside the loop), wall clock on CPU.
    step_s: list[float] = []
    sync()
    t_wall = time.perf_counter()
    loss = None
    if is_cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(args.steps)]
        for i in range(args.steps):
            events[i][0].record()
            loss = step(args.warmup + i)
            events[i][1].record()
        sync()
        step_s = [a.elapsed_time(b) / 1e3 for a, b in events]
    else:
        for i in range(args.steps):
            t0 = time.perf_counter()
            loss = step(args.warmup + i)
            step_s.append(time.perf_counter() - t0)
    wall_s = time.perf_counter() - t_wall
    final_loss = float(loss.float().item()) if loss is not None else float("nan")
    breakdown = profile_steps(step, args.warmup + args.steps, args.profile) \
        if args.profile and is_cuda else None

    median = statistics.median(step_s)
    tokens_per_s = B * T / median
    mfu = tokens_per_s * flops_per_token / peak if peak else None
    peak_mem = torch.cuda.max_memory_allocated(device) / GIB if is_cuda else None
    peak_reserved = torch.cuda.max_memory_reserved(device) / GIB if is_cuda else None
    log(f"[{impl}] {args.steps} steps: median {1e3 * median:.1f} ms, {tokens_per_s:,.0f} tok/s, "
        f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}, loss {final_loss:.4f}"
        + ("" if peak_mem is None else f", peak mem {peak_mem:.2f} GiB"))
    if not math.isfinite(final_loss):
        log(f"[{impl}] WARNING: final loss is not finite")
    return {
        "impl": impl,
        "ok": True,
        "params": built.n_params,
        "micro_batch": B,
        "seq_len": T,
        "build_s": build_s,
        "first_step_s": warm_times[0] if warm_times else None,
        "warmup_s": sum(warm_times),
        "step_ms": [1e3 * s for s in step_s],
        "step_ms_median": 1e3 * median,
        "step_ms_min": 1e3 * min(step_s),
        "step_ms_mean_wall": 1e3 * wall_s / args.steps,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_wall": B * T * args.steps / wall_s,
        "mfu": mfu,
        "peak_mem_gib": peak_mem,
        "peak_reserved_gib": peak_reserved,
        "final_loss": final_loss,
        "profile": breakdown,
        "pid": os.getpid(),
    }


def profile_steps(step, first: int, n: int) -> dict:
    """Run ``n`` steps under torch.profiler: GPU kernel time per category and per kernel,
    and the wall time per step (launch-bound steps show a gap between the two)."""
    from lmfab.train.profile import StepProfiler, format_summary

    prof = StepProfiler(torch.device("cuda"))
    prof.start()
    for i in range(n):
        step(first + i)
    summary = prof.stop(n)
    log(format_summary(summary))
    return summary


def cleanup(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": hf_version,
        "lmfab": lmfab.__version__,
        "lmfab_commit": commit,
        "python": platform.python_version(),
        "command": "python " + shlex.join(sys.argv),
    }


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def format_table(env: dict, results: list[dict]) -> str:
    lines = [
        f"{env['date']} | {env['device']} | torch {env['torch']} | "
        f"transformers {env['transformers']} | lmfab {env['lmfab']}"
        + (f" ({env['lmfab_commit']})" if env["lmfab_commit"] else ""),
        f"command: `{env['command']}`",
        "",
        "| config | devices | impl | params | micro-batch x T | step ms (median) | tokens/s "
        "| MFU | peak mem GiB | final loss |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cfg_name = env.get("config", "-")
    for r in results:
        shape = f"{r['micro_batch']} x {r['seq_len']}"
        if not r["ok"]:
            lines.append(f"| {cfg_name} | 1 | {r['impl']} | - | {shape} | error: "
                         f"{_cell(r['error'])} | - | - | - | - |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        lines.append(
            f"| {cfg_name} | 1 | {r['impl']} | {r['params']:,} | {shape} | {r['step_ms_median']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {mfu} | {mem} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training throughput: lmfab GPT vs Hugging Face GPT2LMHeadModel (sdpa).",
    )
    p.add_argument("--config", required=True, help="lmfab params YAML (shapes from its model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as in `lmfab run --set` (repeatable)")
    p.add_argument("--impl", default="lmfab,lmfab-eager,hf-eager,hf-compile",
                   help=f"comma-separated, from {', '.join(IMPLS)}")
    p.add_argument("--steps", type=int, default=30, help="timed steps per impl")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile here)")
    p.add_argument("--micro_batch", type=int, default=None,
                   help="sequences per step (default: train_input.micro_batch_size, "
                        "else batch_size)")
    p.add_argument("--seq_len", type=int, default=None,
                   help="tokens per sequence (default: train_input.seq_len)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None,
                   help="default: runconfig.device of the config")
    p.add_argument("--lr", type=float, default=1e-4, help="constant AdamW learning rate")
    p.add_argument("--hf_activation", default="gelu_new",
                   help="GPT2Config.activation_function (gelu_new: GPT-2's; "
                        "gelu_pytorch_tanh: the same function as one fused PyTorch op)")
    p.add_argument("--num_batches", type=int, default=4,
                   help="random batches drawn once per impl and rotated")
    p.add_argument("--data_seed", type=int, default=1234)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps (CUDA): GPU time per kernel "
                        "category and the top kernels, to stderr and --json")
    p.add_argument("--no_isolate", dest="isolate", action="store_false",
                   help="run every impl in this process (default: one fresh process per impl "
                        "when several are given)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all numbers here")
    args = p.parse_args(argv)
    args.impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    bad = [s for s in args.impls if s not in IMPLS]
    if bad or not args.impls:
        p.error(f"--impl {args.impl!r}: expected a comma-separated subset of {', '.join(IMPLS)}")
    if args.steps < 1 or args.warmup < 0 or args.num_batches < 1:
        p.error("--steps must be >= 1, --warmup >= 0, --num_batches >= 1")
    return args


def run_isolated(impl: str, argv: list[str], args) -> dict:
    """Run one impl in a fresh Python process (this script, ``--impl impl``) and read its JSON.

    Impls share nothing then: on an H200 the HF peer compiled in the same process right after
    lmfab ran at 100 ms per step against 74 ms on its own (dev/LOG.md), so a shared
    process can flatter either side.
    """
    import tempfile

    child = []
    skip = False
    for a in argv:  # drop --impl/--json (and their values); the child gets its own
        if skip:
            skip = False
            continue
        if a in ("--impl", "--json"):
            skip = True
            continue
        if a.startswith(("--impl=", "--json=")):
            continue
        child.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *child, "--impl", impl,
               "--json", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
        if out.exists():
            return json.loads(out.read_text())["results"][0]
    return {"impl": impl, "ok": False, "error": f"subprocess exited with {proc.returncode}",
            "micro_batch": args.micro_batch, "seq_len": args.seq_len}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.seq_len is not None:  # validated against model.max_seq_len by the loader
        overrides.append(f"train_input.seq_len={args.seq_len}")
    if args.device is not None:
        overrides.append(f"runconfig.device={args.device}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        log(f"error: {e}")
        return 2
    args.seq_len = cfg.train_input.seq_len
    args.micro_batch = args.micro_batch or cfg.train_input.micro_batch_size or cfg.train_input.batch_size

    device = select_device(cfg.runconfig.device, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    flops_per_token = build_model(cfg.model).flops_per_token(args.seq_len)  # meta: no memory
    peak = peak_flops(device, cfg.runconfig.peak_flops_per_device)
    env = environment(device)
    env["config"] = Path(args.config).name
    m = cfg.model
    log(f"{env['date']} | {env['device']} | torch {env['torch']} | "
        f"transformers {env['transformers']}")
    log(f"model: n_layer={m.n_layer} n_head={m.n_head} d_model={m.d_model} d_ff={m.ffn_dim} "
        f"vocab={m.vocab_size} max_seq_len={m.max_seq_len}; micro-batch {args.micro_batch} x "
        f"T {args.seq_len}; FLOPs/token {flops_per_token:.4g}; peak "
        f"{'-' if peak is None else f'{peak:.4g}'} FLOP/s")

    results = []
    for impl in args.impls:
        log(f"[{impl}] start")
        if args.isolate and len(args.impls) > 1:
            results.append(run_isolated(impl, argv if argv is not None else sys.argv[1:], args))
            continue
        try:
            results.append(run_impl(impl, cfg, args, device, flops_per_token, peak))
        except Exception as e:  # OOM, a compile failure, transformers missing: report, go on
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log(f"[{impl}] FAILED: {msg}")
            results.append({"impl": impl, "ok": False, "error": msg[:200],
                            "micro_batch": args.micro_batch, "seq_len": args.seq_len})
        cleanup(device)

    print(format_table(env, results), flush=True)
    if args.json:
        out = {
            "env": env,
            "args": {k: v for k, v in vars(args).items() if k != "impl"},
            "model": dataclasses.asdict(cfg.model),
            "optimizer": dataclasses.asdict(cfg.optimizer),
            "precision": cfg.runconfig.precision,
            "flops_per_token": flops_per_token,
            "peak_flops": peak,
            "results": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        log(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
