"""The model card (``README.md``) of an exported folder, made from what the run folder holds:
the resolved config, the data it trained on, its eval results and its training budget."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmfab.config.load import config_to_dict
from lmfab.config.schema import Config
from lmfab.export.fold import logit_scale


def _eval_results(run_dir: Path) -> list[dict]:
    """The newest eval record per step from metrics.jsonl, or eval_results.json's rows."""
    rows: dict[int, dict] = {}
    results = run_dir / "eval_results.json"
    if results.is_file():
        for r in json.loads(results.read_text()):
            rows[int(r.get("step", 0))] = r
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
            if r.get("split") == "eval":
                rows[int(r["step"])] = r
    return [rows[s] for s in sorted(rows)]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(cfg: Config, *, arch: str, run_dir: Path, checkpoint: Path, state: dict,
               dtype: str, folded: bool, n_params: int) -> str:
    """Markdown: what the model is, how to load it, what it was trained on and how far."""
    from lmfab.models.gpt import build_model

    m = cfg.model
    remote = arch == "LmfabAlibiForCausalLM"
    step, tokens = state.get("step"), state.get("tokens")
    seq_len = cfg.train_input.seq_len
    flops_tok = build_model(m).flops_per_token(seq_len)
    sources = ([cfg.train_input.data_dir] if cfg.train_input.data_dir else
               [f"{s.data_dir} (weight {s.weight:g})" for s in cfg.train_input.mixture])
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [lmfab]", "---", "",
        f"# {run_dir.name}", "",
        f"A {m.n_layer}-layer, d_model {m.d_model} GPT ({n_params:,} parameters in this "
        f"folder) trained with lmfab and exported as `{arch}` ({dtype}).", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"'
        f'{", trust_remote_code=True" if remote else ""})',
        "```", "",
        *([f"transformers has no class for these fields (pos {m.pos}, mlp {m.mlp}): the "
           "folder bundles its modeling code, `modeling_lmfab_alibi.py` (torch and "
           "transformers only), which `trust_remote_code=True` runs from this folder.", ""]
          if remote else []),
        "## Training budget", "",
        f"- checkpoint: `{checkpoint.name}`, step {_fmt(step)}",
        f"- tokens seen: {tokens:,}" if isinstance(tokens, int) else "- tokens seen: unknown",
        f"- training FLOPs: {tokens * flops_tok:.3e} (6N + 12 L d T per token = "
        f"{flops_tok:.3e})" if isinstance(tokens, int) else "- training FLOPs: unknown",
        f"- sequence length {seq_len}, global batch {cfg.train_input.batch_size}", "",
        "## Data", "",
        *[f"- `{s}`" for s in sources], "",
    ]
    evals = _eval_results(run_dir)
    if evals:
        lines += ["## Eval results (held-out split)", "", "| step | loss | perplexity | bits/byte |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {r.get('step')} | {_fmt(r.get('loss'))} | {_fmt(r.get('perplexity'))} | "
                  f"{_fmt(r.get('bits_per_byte'))} |" for r in evals]
        lines.append("")
    else:
        lines += ["## Eval results", "", "The run folder has no eval results.", ""]
    if folded:
        tie = "; the head stays tied to the embeddings" if m.tied_embeddings else ""
        lines += [
            "## Folded multipliers", "",
            f"The run used embedding_mult {m.embedding_mult:g}, logit scale {logit_scale(m):g} "
            f"(output_mult {m.output_mult:g}, muP base width {m.mup_base_d_model}) and "
            f"attention scores / {m.attn_score_scale.replace('_', ' ')}. They are folded "
            "into the weights: embeddings x embedding_mult, the final norm x logit scale / "
            "embedding_mult, query weights x "
            f"1/sqrt(d_head){tie}. The logits are the trained model's; for further muP training, "
            "start from the lmfab run, not from this folder.", "",
        ]
    lines += ["## Resolved lmfab config", "", "```yaml",
              yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
