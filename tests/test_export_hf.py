"""``lmfab export hf``: the exported folder is the same model in transformers.

Per architecture family: logits within 1e-4 (fp32) on the same ids, 32 greedy tokens
identical, the HF tokenizer's ids equal lmfab's on the sample text; then the loss scale of a
trained run through a plain transformers loop, and the bad inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from lmfab.cli import main
from lmfab.config.load import write_config
from lmfab.infer.generate import load_trained, sample
from lmfab.models.gpt import build_model, materialize
from lmfab.tools.modelzoo import load_config

from .conftest import CONFIGS, SAMPLE, tiny_overrides

transformers = pytest.importorskip("transformers", reason="export hf needs transformers")



def sample_text(chars: int = 20_000) -> str:
    """The start of the shipped sample corpus's first document."""
    from lmfab.data.prep.readers import iter_documents

    return next(iter_documents([SAMPLE / "books.jsonl.zst"])).text[:chars]


TEXT = sample_text()


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
    # no biases: GPT-2 always has them, written as zeros
    "gpt2-gelu-tanh-untied-nobias": ({"preset": "tiny-learned", "mlp": "gelu_tanh",
                                      "tied_embeddings": False, "bias": False},
                                     "GPT2LMHeadModel"),
    "llama": ({"preset": "tiny-llama"}, "LlamaForCausalLM"),
    "neox": ({"preset": "tiny-neox", "dropout": 0.0}, "GPTNeoXForCausalLM"),
    "alibi-swiglu-bundled": ({"preset": "tiny-alibi-swiglu"}, "LmfabAlibiForCausalLM"),
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
    remote = arch == "LmfabAlibiForCausalLM"  # bundled code: BTLM's and Jais's way
    assert (out / "modeling_lmfab_alibi.py").is_file() == remote
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out),
                                                           trust_remote_code=remote).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT).ids  # same tokenizer, ~20k chars
    assert hf_tok.decode(tok.encode(TEXT).ids) == TEXT
    ids = sample_ids(tok)
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
    assert ("Folded multipliers" in card) == (family in ("gpt2-mup", "alibi-swiglu-bundled"))


@pytest.mark.slow
def test_held_out_loss_through_transformers_equals_lmfab_eval(tiny_data, tmp_path):
    """The loss scale on a trained run: a plain transformers loop over the held-out windows
    that `lmfab run --mode eval` reads gives the same mean loss."""
    from lmfab.data.loader import TokenDataset, iterate_eval

    torch.set_num_threads(2)
    params, run = str(CONFIGS / "train" / "tiny.yaml"), tmp_path / "run"
    sets = [x for o in tiny_overrides(tiny_data, **{"model.embedding_mult": 4.0,
                                                   "model.output_mult": 0.5})
            for x in ("--set", o)]
    assert main(["run", "--params", params, *sets, "--model-dir", str(run),
                 "--max-steps", "4"]) == 0
    assert main(["run", "--mode", "eval", "--params", params, *sets,
                 "--model-dir", str(run)]) == 0
    want = json.loads((run / "eval_results.json").read_text())[0]
    out = tmp_path / "hf"
    assert main(["export", "hf", "--model-dir", str(run), "--out", str(out)]) == 0
    assert "| 4 |" in (out / "README.md").read_text()  # the eval result is in the card
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    val = TokenDataset(tiny_data / "val", window=33)
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for rows in iterate_eval(val, batch=8, max_batches=2, rank=0, world_size=1):
            rows = torch.from_numpy(rows).long()
            logits = hf(input_ids=rows[:, :-1]).logits
            loss_sum += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
            n += rows[:, 1:].numel()
    assert n == want["tokens"]
    assert abs(loss_sum / n - want["loss"]) < 1e-4, (loss_sum / n, want["loss"])


def test_bf16_and_shards(tiny_data, tmp_path):
    from lmfab.export.hf import write_safetensors

    run = make_run(tmp_path, tiny_data, {"preset": "tiny-llama"})
    out = tmp_path / "hf"
    assert main(["export", "hf", "--model-dir", str(run), "--checkpoint", "0", "--out", str(out),
                 "--dtype", "bf16"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.dtype == torch.bfloat16
    tensors = load_file(str(out / "model.safetensors"))
    shards = tmp_path / "shards"
    shards.mkdir()
    files = write_safetensors(tensors, shards, shard_bytes=40_000)
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (shards / name).write_bytes((out / name).read_bytes())
    again = transformers.AutoModelForCausalLM.from_pretrained(str(shards))
    for k, v in hf.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


# ---- bad input -----------------------------------------------------------------------------

def _refused(args: list[str], out: Path, capsys, *needles: str) -> None:
    assert main(["export", "hf", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_run_without_checkpoint(tiny_data, tmp_path, capsys):
    run = make_run(tmp_path, tiny_data, {"preset": "tiny-learned"})
    _refused(["--model-dir", str(run), "--checkpoint", "step_00000100"], tmp_path / "a", capsys,
             "step_00000100", "have: step_00000000")
    shutil.rmtree(run / "checkpoints")
    _refused(["--model-dir", str(run)], tmp_path / "b", capsys, "no checkpoint")


@pytest.mark.parametrize("model, fields", [
    ({"preset": "tiny-llama", "norm": "layernorm"}, ["norm=layernorm", "mlp=swiglu"]),
    ({"preset": "tiny-learned", "pos": "rope", "norm": "rmsnorm"}, ["pos=rope", "norm=rmsnorm"]),
])
def test_unmappable_architecture_lists_the_fields(model, fields, tiny_data, tmp_path, capsys):
    run = make_run(tmp_path, tiny_data, model)
    _refused(["--model-dir", str(run)], tmp_path / "x", capsys, "no native transformers", *fields)


EXPECTED = {"cerebras-gpt": "gpt2", "gpt3": "gpt2", "tiny-learned": "gpt2", "llama": "llama",
            "tiny-llama": "llama", "gpt-neox": "gpt_neox", "tiny-neox": "gpt_neox",
            "btlm": "lmfab_alibi", "jais": "lmfab_alibi", "tiny-alibi": "lmfab_alibi"}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIGS / "models").glob("*.yaml")))
def test_every_preset_has_an_export_class(preset):
    from lmfab.export.fold import folded_config
    from lmfab.export.hf import choose_architecture
    from lmfab.tools.modelzoo import load_model_config

    want = next(v for k, v in EXPECTED.items() if preset.startswith(k))
    cfg = load_model_config(str(CONFIGS / "models" / f"{preset}.yaml"), [])
    assert choose_architecture(folded_config(cfg)) == want
