"""``lmfab import hf``: a transformers model becomes an lmfab run with the same logits, the
round trip back through ``lmfab export hf`` keeps every weight, continued pre-training starts
from it, and foreign folders that do not fit are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmfab.cli import main
from lmfab.infer.generate import load_trained

from .conftest import tiny_overrides

transformers = pytest.importorskip("transformers", reason="import hf needs transformers")

SMALL = dict(vocab_size=512, bos_token_id=0, eos_token_id=0)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                            activation_function="gelu_new", **SMALL),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=160, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **SMALL),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5}, **SMALL),
}


def hf_folder(root: Path, data: Path, arch: str, *, seed: int = 0,
              eos: str = "<|endoftext|>") -> Path:
    """A transformers model with random weights (norms and biases too), saved with the tiny
    dataset's tokenizer."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = root / f"hf-{arch}"
    model.save_pretrained(str(out))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer.json"),
                                               eos_token=eos, bos_token=eos)
    tok.save_pretrained(str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_import_keeps_the_logits_and_round_trips(arch, tiny_data, tmp_path):
    torch.set_num_threads(2)
    src = hf_folder(tmp_path, tiny_data, arch)
    run = tmp_path / "run"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 0
    ours, _, ckpt = load_trained(run)
    assert ckpt.name == "step_00000000"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = theirs(ids).logits, ours(ids)
    assert want.std() > 0.05
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    back = tmp_path / "back"
    assert main(["export", "hf", "--model-dir", str(run), "--out", str(back)]) == 0
    before, after = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(after) == sorted(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    assert json.loads((back / "config.json").read_text())["model_type"] == arch


@pytest.mark.slow
def test_continued_pretraining_starts_from_the_import(tiny_data, tmp_path, capsys):
    torch.set_num_threads(2)
    run = tmp_path / "run"
    assert main(["import", "hf", str(hf_folder(tmp_path, tiny_data, "llama")), "--out", str(run),
                 "--data-dir", str(tiny_data)]) == 0
    data_sets = [o for o in tiny_overrides(tiny_data) if not o.startswith("model.")]
    sets = [x for o in data_sets for x in ("--set", o)]
    cpt = tmp_path / "cpt"
    assert main(["run", "--params", str(run / "config.yaml"), *sets, "--model-dir", str(cpt),
                 "--init-from", str(run), "--max-steps", "2"]) == 0
    assert "initialised weights from" in capsys.readouterr().out
    assert (cpt / "checkpoints" / "step_00000002" / "model.safetensors").is_file()


def test_foreign_special_tokens_survive_the_round_trip(tiny_data, tmp_path):
    """A model whose EOS is not lmfab's <|endoftext|> keeps its own through import + export."""
    src = hf_folder(tmp_path, tiny_data, "gpt2", eos="<|pad|>")
    run, back = tmp_path / "run", tmp_path / "back"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 0
    assert main(["export", "hf", "--model-dir", str(run), "--out", str(back)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(back))
    assert tok.eos_token == tok.bos_token == "<|pad|>"
    gen = json.loads((back / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|pad|>")


def test_old_gpt2_names_and_buffers(tiny_data, tmp_path):
    """GPT-2 files from before the ``transformer.`` prefix, with their causal-mask buffers."""
    src = hf_folder(tmp_path, tiny_data, "gpt2")
    sd = load_file(str(src / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(old, str(src / "model.safetensors"))
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 0
    ours, _, _ = load_trained(tmp_path / "run")
    torch.testing.assert_close(ours.state_dict()["wpe.weight"], sd["transformer.wpe.weight"])


def test_tokenizer_made_from_vocab_and_merges(tiny_data, tmp_path):
    """A folder with GPT-2's vocab.json + merges.txt and no tokenizer.json."""
    from tokenizers import Tokenizer

    src = hf_folder(tmp_path, tiny_data, "gpt2")
    Tokenizer.from_file(str(src / "tokenizer.json")).model.save(str(src))
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    want = transformers.AutoTokenizer.from_pretrained(str(src))("ROMEO. Soft!")["input_ids"]
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 0
    got = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json")).encode("ROMEO. Soft!").ids
    assert got == want and len(got) > 2


def test_no_tokenizer_at_all(tiny_data, tmp_path, capsys):
    src = hf_folder(tmp_path, tiny_data, "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    _refused(src, tmp_path, capsys, "tokenizer.json: missing")


# ---- bad input -----------------------------------------------------------------------------

def _refused(src: Path, tmp_path: Path, capsys, *needles: str) -> None:
    out = tmp_path / "out"
    assert main(["import", "hf", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_missing_tensor_is_named(tiny_data, tmp_path, capsys):
    src = hf_folder(tmp_path, tiny_data, "gpt2")
    sd = load_file(str(src / "model.safetensors"))
    del sd["transformer.h.1.mlp.c_fc.weight"]
    save_file(sd, str(src / "model.safetensors"))
    _refused(src, tmp_path, capsys, "transformer.h.1.mlp.c_fc.weight", "missing")


def test_wrong_shape_is_named(tiny_data, tmp_path, capsys):
    src = hf_folder(tmp_path, tiny_data, "gpt_neox")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the file holds 256-wide MLPs
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(src, tmp_path, capsys, "blocks.0.mlp.fc.weight", "shape mismatch")


def test_unsupported_model_type_and_fields(tiny_data, tmp_path, capsys):
    src = hf_folder(tmp_path, tiny_data, "llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "bloom"}))
    _refused(src, tmp_path, capsys, "model_type 'bloom'")
    scaled = {**cfg, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    (src / "config.json").write_text(json.dumps(scaled))
    _refused(src, tmp_path, capsys, "rope_type=llama3")


class NotAWeight:  # a pickled object: torch.load(weights_only=True) refuses to build it
    pass


def test_pickle_bin_is_refused(tiny_data, tmp_path, capsys):
    src = hf_folder(tmp_path, tiny_data, "gpt2")
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save({**sd, "extra": NotAWeight()}, src / "pytorch_model.bin")
    _refused(src, tmp_path, capsys, "pytorch_model.bin", "weights only")


def test_weights_only_bin_is_read(tiny_data, tmp_path):
    src = hf_folder(tmp_path, tiny_data, "gpt2")
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 0
    ours, _, _ = load_trained(tmp_path / "run")
    torch.testing.assert_close(ours.state_dict()["blocks.0.attn.qkv.weight"],
                               sd["transformer.h.0.attn.c_attn.weight"].t())


@pytest.mark.slow
def test_bundled_alibi_export_imports_back(tiny_data, tmp_path):
    from .test_export_hf import make_run

    run = make_run(tmp_path, tiny_data, {"preset": "tiny-alibi-swiglu"})
    out, back = tmp_path / "hf", tmp_path / "back"
    assert main(["export", "hf", "--model-dir", str(run), "--out", str(out)]) == 0
    assert main(["import", "hf", str(out), "--out", str(back)]) == 0
    a, _, _ = load_trained(run)
    b, _, _ = load_trained(back)
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids), atol=1e-4, rtol=0)
