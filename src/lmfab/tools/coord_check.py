"""The muP coordinate check: activation scale per layer type against width.

Yang et al. 2022 (arXiv 2203.03466, Sec. 5 and Fig. 5): train copies of one model at
several widths for a few steps with the same learning rate and record, per layer type, how
far the activations have moved from their values at initialisation: the mean over
coordinates of |x_t - x_0|. muP is defined by these updates being Theta(1) in width (flat
curves); under the standard parametrization (SP) they grow with width, which is why SP's
best learning rate shifts with size and muP's does not. (Raw |x_t| would mix in the
initial values, which muP deliberately lets shrink at the output layer.)

Widths keep d_head fixed (n_head = width / d_head) and d_ff / d_model fixed. SP is the same
config with the muP width fields removed, so at the base width the two are identical
(tested exactly). Data: a fixed batch of random tokens (seeded), as the check measures
scale, not learning.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmfab.config.schema import ModelConfig, OptimizerConfig
from lmfab.models.gpt import GPT, build_model, materialize
from lmfab.train.optim import build_optimizer, set_lr

LAYER_TYPES = ("embedding", "attn", "mlp", "block", "logits")


def at_width(cfg: ModelConfig, width: int, *, mup: bool) -> ModelConfig:
    """The config at another width: fixed d_head and d_ff/d_model; SP drops the muP fields."""
    d_head = cfg.d_model // cfg.n_head
    if width % d_head:
        raise ValueError(f"width {width} is not a multiple of d_head={d_head}")
    kv_ratio = cfg.n_head // cfg.kv_heads
    n_head = width // d_head
    changes = dict(
        d_model=width,
        n_head=n_head,
        n_kv_head=None if cfg.n_kv_head is None else max(1, n_head // kv_ratio),
        d_ff=round(cfg.ffn_dim * width / cfg.d_model),
    )
    if not mup:
        changes.update(mup_base_d_model=None, mup_base_d_ff=None)
    return dataclasses.replace(cfg, **changes)


def _record(model: GPT) -> tuple[dict[str, list[torch.Tensor]], list]:
    store: dict[str, list[torch.Tensor]] = {k: [] for k in LAYER_TYPES}

    def hook(kind):
        def fn(_module, _inputs, output):
            store[kind].append(output.detach().clone())
        return fn

    handles = [model.drop.register_forward_hook(hook("embedding"))]
    for block in model.blocks:
        handles += [
            block.attn.register_forward_hook(hook("attn")),
            block.mlp.register_forward_hook(hook("mlp")),
            block.register_forward_hook(hook("block")),
        ]
    return store, handles


def coord_check(
    cfg: ModelConfig,
    widths: list[int],
    *,
    steps: int = 5,
    lr: float = 6e-3,
    mup: bool = True,
    batch: int = 8,
    seq_len: int = 64,
    seed: int = 0,
) -> dict[int, dict[str, list[float]]]:
    """{width: {layer type: [mean |x_t - x_0| for t = 1..steps]}} (mean over layers)."""
    seq_len = min(seq_len, cfg.max_seq_len)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    results: dict[int, dict[str, list[float]]] = {}
    for width in widths:
        wcfg = at_width(cfg, width, mup=mup)
        model = materialize(build_model(wcfg), "cpu", seed=seed)
        opt = build_optimizer(model, OptimizerConfig(weight_decay=0.0, max_grad_norm=None),
                              torch.device("cpu"), wcfg)
        set_lr(opt, lr)
        curves: dict[str, list[float]] = {k: [] for k in LAYER_TYPES}
        initial = None
        for t in range(steps + 1):
            store, handles = _record(model)
            logits = model(tokens[:, :-1])
            for h in handles:
                h.remove()
            store["logits"].append(logits.detach())
            if t == 0:
                initial = store
            else:
                for kind in LAYER_TYPES:
                    moved = [(x - x0).abs().mean().item()
                             for x, x0 in zip(store[kind], initial[kind], strict=True)]
                    curves[kind].append(sum(moved) / len(moved))
            if t == steps:
                break
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[width] = curves
    return results


def spread(results: dict[int, dict[str, list[float]]], kind: str, step: int = -1) -> float:
    """max / min over widths of one layer type's scale at one step (1.0 = perfectly flat)."""
    values = [curves[kind][step] for curves in results.values()]
    return max(values) / min(values)


def format_table(results: dict[int, dict[str, list[float]]], label: str) -> str:
    widths = sorted(results)
    head = f"{label:<5} {'layer':<10}" + "".join(f"{'w=' + str(w):>11}" for w in widths) + "   spread"
    lines = [head]
    for kind in LAYER_TYPES:
        row = "".join(f"{results[w][kind][-1]:>11.4g}" for w in widths)
        lines.append(f"{label:<5} {kind:<10}{row}   {spread(results, kind):.2f}x")
    return "\n".join(lines)


def plot(all_results: dict[str, dict[int, dict[str, list[float]]]], path: str | Path) -> Path:
    """One panel per parametrization: last-step scale of each layer type against width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(5.5 * len(all_results), 4), sharey=True)
    axes = [axes] if len(all_results) == 1 else axes
    for ax, (label, results) in zip(axes, all_results.items(), strict=True):
        widths = sorted(results)
        for kind in LAYER_TYPES:
            ax.plot(widths, [results[w][kind][-1] for w in widths], marker="o", label=kind)
        ax.set(xscale="log", yscale="log", xlabel="width (d_model)",
               title=f"{label}: mean |x_t - x_0| at the last step")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean |x_t - x_0|")
    axes[-1].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
