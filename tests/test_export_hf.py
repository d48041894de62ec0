"""``lmfab export hf``: the exported folder is the same model in transformers.

Per architecture family: logits within 1e-4 (fp32) on the same ids, 32 greedy tokens
identical, the HF tokenizer's ids equal lmfab's on the sample text; then the loss scale of a
trained run through a plain transformers loop, and the bad inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lmfab.cli import main
from lmfab.config.load import write_config
from lmfab.infer.generate import load_trained, sample
from lmfab.models.gpt import build_model, materialize
from lmfab.tools.modelzoo import load_config

from .conftest import CONFIGS, tiny_overrides

transformers = pytest.importorskip("transformers", reason="export hf needs transformers")

TEXT = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and "
        "Juliet is the sun.\n\n")


def make_run(root: Path, data: Path, model: dict, *, seed: int = 1) -> Path:
    """A run folder with one checkpoint of random weights for ``model`` (a model section)."""
    params = yaml.safe_load((CONFIGS / "train" / "tiny.yaml").read_text())
    params["model"] = model
    src = root / "params.yaml"
    src.write_text(yaml.safe_dump(params))
    data_only = [o for o in tiny_overrides(data) if not o.startswith("model.")]
    cfg = load_config(str(src), data_only)
    run = root / "run"
    ck = run / "checkpoints" / "step_00000000"
    ck.mkdir(parents=True)
    write_config(cfg, run / "config.yaml")
    (run / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    net = materialize(build_model(cfg.model), "cpu", seed=seed)
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a mix-up shows
        for p in net.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ck / "model.safetensors"))
    write_config(cfg, ck / "config.yaml")
    (ck / "state.json").write_text(json.dumps({"format": 1, "step": 0, "tokens": 0}))
    return run


def sample_ids(tok: Tokenizer, n: int = 40) -> list[int]:
    return tok.encode(TEXT).ids[:n]


FAMILIES = {
    "gpt2-learned": ({"preset": "tiny-learned"}, "GPT2LMHeadModel"),
    "gpt2-gelu-tanh-untied": ({"preset": "tiny-learned", "mlp": "gelu_tanh",
                               "tied_embeddings": False}, "GPT2LMHeadModel"),
    "llama": ({"preset": "tiny-llama"}, "LlamaForCausalLM"),
    "neox": ({"preset": "tiny-neox", "dropout": 0.0}, "GPTNeoXForCausalLM"),
    "gpt2-mup": ({"preset": "tiny-learned", "init_std": 0.08, "embedding_mult": 10.0,
                  "output_mult": 1.3, "attn_score_scale": "inv_d_head",
                  "mup_base_d_model": 32}, "GPT2LMHeadModel"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_is_the_same_model(family, tiny_data, tmp_path):
    torch.set_num_threads(2)
    model_section, arch = FAMILIES[family]
    run = make_run(tmp_path, tiny_data, model_section)
    out = tmp_path / "hf"
    assert main(["export", "hf", "--model-dir", str(run), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch]

    ours, tok, _ = load_trained(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = sample_ids(tok)
    assert hf_tok(TEXT)["input_ids"][:40] == ids  # same tokenizer
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"
    x = torch.tensor([ids[:24]])
    with torch.no_grad():
        want, got = ours(x), hf(x).logits
    assert want.std() > 0.05  # a real signal
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # 32 greedy tokens: lmfab's sample at temperature 0 against transformers' generate
    prompt = torch.tensor([ids[:8]])
    mine = sample(ours, prompt, max_new_tokens=32, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         attention_mask=torch.ones_like(prompt))
    assert theirs[0].tolist() == mine[0].tolist()
    card = (out / "README.md").read_text()
    assert arch in card and "Training budget" in card
    assert ("Folded multipliers" in card) == (family == "gpt2-mup")
