"""Greedy decode speed: lmfab's KV-cached generation against transformers' ``generate`` with
its static cache, on the same weights.

    python benchmarks/decode.py --device cuda --model configs/models/llama-1b.yaml \
        --batch 1,16 --prompt-len 128 --new-tokens 256 --json decode.json
    python benchmarks/decode.py --device cpu --model configs/models/tiny-llama.yaml

The model is a LLaMA-shaped lmfab preset (RoPE, RMSNorm, SwiGLU, GQA, no biases), random
initialised with a wide init so greedy paths are not degenerate, or ``--model-dir``'s trained
weights; the peer is ``transformers.LlamaForCausalLM`` with the same weights copied in. Before
anything is cast or compiled, 8 greedy tokens of both must be equal in fp32 (the mapping
check); the timed runs' agreement is reported, and required only in fp32: in bf16 the two
round differently and random weights have near-ties that flip (seen on the H200 at 1B).

lmfab: :func:`lmfab.infer.generate.run_batch`, decode step compiled with CUDA graphs on CUDA
(``--lmfab-compile``), each step queued before the host reads the last tokens back; on CUDA
also ``lmfab-no-overlap``, the same without that overlap. HF: ``generate(do_sample=False,
cache_implementation="static")``,
which in transformers 5 compiles the decoding forward itself on CUDA (its ``compile_config``;
``--hf-compile auto``, the default). ``--hf-compile on`` also wraps ``model.forward`` in
``torch.compile(mode="reduce-overhead", fullgraph=True)`` as transformers 4's static-cache
guide did; with transformers 5.17 and torch 2.11 that double compilation fails ("accessing
tensor output of CUDAGraphs that has been overwritten"), so it is not the default.
``--hf-compile off`` sets ``disable_compile``. Decode tokens/s =
B x (N - 1) / (t(N new tokens) - t(1 new token)): prefill excluded; medians of ``--repeats``
runs after warm-up runs (compilation).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfab.config.load import load_model_config  # noqa: E402
from lmfab.infer.generate import Request, TokenIdsOnly, run_batch  # noqa: E402
from lmfab.models import build_model, materialize  # noqa: E402


def hf_llama(model, dtype):
    """transformers.LlamaForCausalLM with ``model``'s (an lmfab LLaMA-style GPT) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    if (c.pos, c.norm, c.mlp, c.bias, c.rope_fraction, c.parallel_residual) != (
            "rope", "rmsnorm", "swiglu", False, 1.0, False) or model.logit_scale != 1.0 \
            or c.embedding_mult != 1.0:
        raise SystemExit("--model must be LLaMA-shaped (rope, rmsnorm, swiglu, no bias, no muP)")
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                     num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                     num_key_value_heads=c.kv_heads, head_dim=c.d_head,
                     max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                     rope_theta=c.rope_theta, attention_bias=False, mlp_bias=False,
                     tie_word_embeddings=c.tied_embeddings, bos_token_id=None,
                     eos_token_id=None, pad_token_id=0)  # no end token: every row runs N
    hc.rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta}
    hf = LlamaForCausalLM(hc)
    sd = model.state_dict()
    q, kv = c.n_head * c.d_head, c.kv_heads * c.d_head
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"],
           "lm_head.weight": sd["wte.weight" if c.tied_embeddings else "lm_head.weight"]}
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].split([q, kv, kv])
        gate, up = sd[p + "mlp.fc.weight"].chunk(2)
        out |= {h + "self_attn.q_proj.weight": wq, h + "self_attn.k_proj.weight": wk,
                h + "self_attn.v_proj.weight": wv, h + "self_attn.o_proj.weight":
                sd[p + "attn.proj.weight"], h + "mlp.gate_proj.weight": gate,
                h + "mlp.up_proj.weight": up, h + "mlp.down_proj.weight": sd[p + "mlp.proj.weight"],
                h + "input_layernorm.weight": sd[p + "ln_1.weight"],
                h + "post_attention_layernorm.weight": sd[p + "ln_2.weight"]}
    missing, unexpected = hf.load_state_dict(out, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise SystemExit(f"HF mapping: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    return hf.to(device=next(model.parameters()).device, dtype=dtype).eval()


def mapping_check(model, prompt_len: int, n: int = 8) -> None:
    """The peer computes the same model: 8 greedy tokens equal in fp32, eagerly, before
    anything is cast or compiled. (In bf16 the two round differently, and random weights
    give near-ties that flip, so the timed runs' agreement is reported, not required.)"""
    hf = hf_llama(model, torch.float32)
    V = model.cfg.vocab_size
    prompts = torch.randint(0, V, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lmfab_run(model, prompts.tolist(), n, False)
        hf.generation_config.disable_compile = True
        theirs = hf_run(hf, prompts.tolist(), n)
    del hf
    if ours != theirs:
        raise SystemExit(f"fp32 greedy tokens differ (lmfab {ours[0]}, HF {theirs[0]}): the "
                         "weight mapping is wrong")
    print(f"fp32 mapping check: {n} greedy tokens equal", file=sys.stderr)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def lmfab_run(model, prompts, n, compile, overlap=None):
    reqs = [Request(p, max_new_tokens=n, stop_token_ids=[]) for p in prompts]
    out = run_batch(model, TokenIdsOnly(), reqs, compile=compile, overlap=overlap)
    return [c.token_ids for c in out]


def hf_run(hf, prompts, n):
    x = torch.tensor(prompts, device=hf.device)
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                      do_sample=False, cache_implementation="static", pad_token_id=0)
    return out[:, x.shape[1]:].tolist()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def agreement(a, b) -> float:
    """Share of rows' tokens that agree up to the first difference (averaged over rows)."""
    shares = []
    for x, y in zip(a, b, strict=True):
        k = next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), len(x))
        shares.append(k / len(x))
    return sum(shares) / len(shares)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="configs/models/tiny-llama.yaml",
                    help="a LLaMA-shaped model preset YAML")
    ap.add_argument("--model-dir", help="a trained LLaMA-shaped run instead of random weights")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 on CUDA)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lmfab-compile", default="auto",
                    help="auto (CUDA graphs on CUDA, eager on CPU), off, or a compile mode")
    ap.add_argument("--hf-compile", default="auto",
                    help="auto (generate's own compilation of the static cache on CUDA), on "
                    "(also torch.compile the forward, transformers 4's recipe) or off")
    ap.add_argument("--min-agreement", type=float, default=0.5,
                    help="in fp32, refuse to time when the timed greedy outputs agree less "
                    "than this (in bf16 the agreement is reported only)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    device = torch.device(a.device)
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[a.dtype] or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if a.model_dir:
        from lmfab.infer.generate import load_trained

        model = load_trained(a.model_dir, str(device))[0]
    else:
        cfg = load_model_config(a.model)
        cfg.init_std = 0.1
        model = materialize(build_model(cfg), device, seed=0).eval()
    lm_compile = {"auto": None, "off": False, "on": True}.get(a.lmfab_compile, a.lmfab_compile)
    mapping_check(model, a.prompt_len)  # in fp32, where near-ties do not flip
    model = model.to(dtype)
    hf = hf_llama(model, dtype)
    hf_compile = a.hf_compile
    if hf_compile == "on":
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    elif hf_compile == "off":
        hf.generation_config.disable_compile = True
    import transformers

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
           or platform.machine(), "torch": torch.__version__,
           "transformers": transformers.__version__, "dtype": str(dtype).split(".")[-1],
           "model": a.model_dir or a.model, "params": model.num_params(),
           "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
           "lmfab_compile": a.lmfab_compile, "hf_compile": hf_compile,
           "date": time.strftime("%Y-%m-%d")}
    print(f"# {env}", file=sys.stderr)
    rows = []
    V = model.cfg.vocab_size
    for B in [int(b) for b in a.batch.split(",")]:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, V, (B, a.prompt_len), generator=g).tolist()
        with torch.no_grad():
            ours = lmfab_run(model, prompts, a.new_tokens, lm_compile)  # also the first warm-up
            theirs = hf_run(hf, prompts, a.new_tokens)
            for _ in range(max(a.warmup - 1, 0)):
                lmfab_run(model, prompts, a.new_tokens, lm_compile)
                hf_run(hf, prompts, a.new_tokens)
            for _ in range(min(a.warmup, 1)):
                lmfab_run(model, prompts, 1, lm_compile)
                hf_run(hf, prompts, 1)
        from lmfab.infer import generate as lmfab_generate

        if lmfab_generate._COMPILE_FAILED:
            env["lmfab_compile_failed"] = sorted(lmfab_generate._COMPILE_FAILED)
            print(f"lmfab's compiled step failed ({env['lmfab_compile_failed']}): its "
                  "figures below are eager", file=sys.stderr)
        agree = agreement(ours, theirs)
        print(f"batch {B}: greedy agreement {agree:.3f}", file=sys.stderr)
        if dtype == torch.float32 and agree < a.min_agreement:
            raise SystemExit(f"batch {B}: lmfab and HF greedy outputs agree on {agree:.0%} "
                             "only; the mapping is wrong, not timing")
        impls = [("lmfab", lambda p, n: lmfab_run(model, p, n, lm_compile)),
                 ("hf-static", lambda p, n: hf_run(hf, p, n))]
        if device.type == "cuda":  # what queueing each step before the host reads buys
            impls.insert(1, ("lmfab-no-overlap",
                             lambda p, n: lmfab_run(model, p, n, lm_compile, overlap=False)))
        for impl, run in impls:
            with torch.no_grad():
                t_n = timed(lambda run=run, p=prompts: run(p, a.new_tokens), device, a.repeats)
                t_1 = timed(lambda run=run, p=prompts: run(p, 1), device, a.repeats)
            tps = B * (a.new_tokens - 1) / max(t_n - t_1, 1e-9)
            rows.append({"impl": impl, "batch": B, "decode_tokens_per_s": tps,
                         "ms_per_step": 1e3 * (t_n - t_1) / (a.new_tokens - 1),
                         "prefill_ms": 1e3 * t_1, "greedy_agreement": agree})
    print(f"\n{env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
          f"{env['dtype']} | {Path(env['model']).name} | prompt {a.prompt_len} | new "
          f"{a.new_tokens} | {env['date']}\n")
    print("| impl | batch | decode tok/s | ms/step | prefill+1 ms | greedy agree |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['batch']} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['ms_per_step']:.2f} | {r['prefill_ms']:.1f} | {r['greedy_agreement']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
