"""Text generation from a trained run: load the resolved config, weights and tokenizer.

Sampling is temperature + top-k over the model's logits, seeded for reproducibility. The
context is cropped to the model's positions. (A KV cache and quantized weights are on the
roadmap; this is the reference path they will be checked against.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmfab.checkpoint import find_tokenizer, load_weights, read_run_config, resolve_checkpoint
from lmfab.models.gpt import GPT, build_model, materialize


def load_trained(model_dir: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, Path]:
    """Model (eval mode) and tokenizer of a run directory or a checkpoint directory."""
    ckpt = resolve_checkpoint(model_dir)
    cfg = read_run_config(ckpt)
    model = materialize(build_model(cfg.model), device)
    load_weights(model, ckpt)
    tok_file = find_tokenizer(ckpt, cfg)
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{tok_file}: not a Hugging Face tokenizer.json ({err})") from None
    return model.eval(), tok, ckpt


@torch.no_grad()
def sample(
    model: GPT,
    idx: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` sampled tokens to ``idx`` (B, T)."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.cfg.max_seq_len :])[:, -1, :].float()  # (B, V)
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
    return idx


def generate_text(
    model_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    model, tok, _ = load_trained(model_dir, device)
    eos_id = tok.token_to_id("<|endoftext|>")
    ids = tok.encode(prompt).ids or ([eos_id] if eos_id is not None else [0])
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = sample(model, idx, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_k=top_k, generator=gen, eos_id=eos_id)
    return tok.decode(out[0].tolist())
