"""``lmfab export gguf``: the file parses (gguf's reader), llama.cpp loads it, generates what
lmfab generates and tokenizes as lmfab does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmfab import cli
from lmfab.checkpoint import read_run_config, resolve_checkpoint
from lmfab.export.gguf import choose_arch, export_gguf
from lmfab.tools.modelzoo import load_model_config

from .conftest import CONFIGS, REPO, SAMPLE, tiny_overrides

PRESETS = {"tiny-llama": "llama", "tiny-learned": "gpt2", "tiny-neox": "gptneox",
           "tiny-alibi-swiglu": "jais"}
CTX = 64
# Random-init models with a wide init: their greedy continuations vary token to token (a
# model trained for seconds repeats one token, which would let a wrong export pass). The
# ALiBi one is also exported untied, as its tied muP head echoes the input token; the tied
# preset as shipped is checked on logits as well ("tiny-alibi-swiglu-tied").
RUNS = {
    "tiny-llama": ("tiny-llama", {"init_std": 0.3}),
    "tiny-learned": ("tiny-learned", {"init_std": 0.3}),
    "tiny-neox": ("tiny-neox", {"init_std": 0.3}),
    "tiny-alibi-swiglu": ("tiny-alibi-swiglu", {"init_std": 0.15, "tied_embeddings": False}),
    "tiny-alibi-swiglu-tied": ("tiny-alibi-swiglu", {}),
    # Cerebras-GPT muP on the gpt2 graph: folded into a tied head with no output tensor
    "tiny-learned-mup": ("tiny-learned", {"init_std": 0.1, "embedding_mult": 10.0,
                                          "output_mult": 1.5, "attn_score_scale": "inv_d_head",
                                          "mup_base_d_model": 32}),
}


# Tied muP heads at random init echo the input token: their greedy continuation repeats one
# token, so for them the logits comparison is the check that can fail.
ECHO = {"tiny-alibi-swiglu-tied", "tiny-learned-mup"}


def _make_run(data: Path, preset: str, model_dir: Path, **model) -> Path:
    """A run folder with one checkpoint: one step at warm-up LR 0, so the weights are the
    seeded initialisation."""
    raw = yaml.safe_load((CONFIGS / "models" / f"{preset}.yaml").read_text())
    raw.update(max_seq_len=CTX, dropout=0.0, **model)
    extra = {f"model.{k}": v for k, v in raw.items()}
    extra.update({"runconfig.max_steps": 1, "runconfig.checkpoint_steps": 1,
                  "runconfig.eval_steps": 10_000})
    sets = [a for o in tiny_overrides(data, **extra) for a in ("--set", o)]
    assert cli.main(["run", "--params", str(CONFIGS / "train" / "tiny.yaml"), "--mode", "train",
                     "--model-dir", str(model_dir), *sets]) == 0
    return model_dir


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("gguf-runs")
    return {name: _make_run(tiny_data, preset, root / name, **model)
            for name, (preset, model) in RUNS.items()}


def _sample_text() -> str:
    from lmfab.data.prep.readers import iter_documents

    return next(iter(iter_documents([SAMPLE / "books.jsonl.zst"]))).text


# ---- the file, read back with gguf's own reader (no llama.cpp needed) ---------------------

@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_metadata_and_tensor_shapes(runs, tmp_path, qtype):
    from gguf import GGUFReader

    for preset, arch in PRESETS.items():
        model_dir = runs[preset]
        e = export_gguf(model_dir, tmp_path / f"{preset}.gguf", qtype=qtype, warn=lambda m: None)
        assert e.arch == arch and not list(tmp_path.glob("*.tmp"))
        r = GGUFReader(e.path)
        kv = {f.name: f.contents() for f in r.fields.values() if f.types}
        cfg = read_run_config(resolve_checkpoint(model_dir)).model
        assert kv["general.architecture"] == arch
        assert kv[f"{arch}.context_length"] == CTX
        assert kv[f"{arch}.embedding_length"] == cfg.d_model
        assert kv[f"{arch}.block_count"] == cfg.n_layer
        assert kv[f"{arch}.attention.head_count"] == cfg.n_head
        assert kv[f"{arch}.attention.head_count_kv"] == cfg.kv_heads
        assert kv[f"{arch}.feed_forward_length"] == cfg.ffn_dim
        if cfg.pos == "rope":
            assert kv[f"{arch}.rope.dimension_count"] == int(cfg.d_head * cfg.rope_fraction)
        if arch == "jais":
            assert kv["jais.attention.max_alibi_bias"] == 8.0
        tok = json.loads((model_dir / "tokenizer.json").read_text())
        eos = tok["model"]["vocab"]["<|endoftext|>"]
        assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
        assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size
        assert len(kv["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
        assert kv["tokenizer.ggml.eos_token_id"] == eos
        assert kv["tokenizer.ggml.token_type"][eos] == 3  # control
        tensors = {t.name: t for t in r.tensors}
        # ggml's shapes are PyTorch's reversed: token_embd is [d_model, vocab]
        assert list(tensors["token_embd.weight"].shape) == [cfg.d_model, cfg.vocab_size]
        assert ("position_embd.weight" in tensors) == (cfg.pos == "learned")
        assert ("output.weight" in tensors) == (arch in ("gptneox", "jais")
                                                or not cfg.tied_embeddings)
        down = tensors["blk.0.ffn_down.weight"]
        assert list(down.shape) == [cfg.ffn_dim, cfg.d_model]
        for t in r.tensors:
            if len([d for d in t.shape if d > 1]) <= 1 and t.name.endswith(("norm.weight", "bias")):
                assert t.tensor_type.name == "F32", t.name
        if qtype == "q8_0":  # rows not a multiple of 32 (d_ff 172) stay f16
            want = "Q8_0" if cfg.ffn_dim % 32 == 0 else "F16"
            assert down.tensor_type.name == want
            assert tensors["blk.0.attn_output.weight"].tensor_type.name == "Q8_0"
        n_kv = cfg.kv_heads * cfg.d_head
        if arch == "llama":
            assert list(tensors["blk.0.attn_k.weight"].shape) == [cfg.d_model, n_kv]
        else:
            assert list(tensors["blk.0.attn_qkv.weight"].shape) == [cfg.d_model,
                                                                    cfg.d_model + 2 * n_kv]


def test_unexportable_fields_are_named():
    cfg = load_model_config(str(CONFIGS / "models" / "tiny-llama.yaml"), ["mlp=relu"])
    with pytest.raises(ValueError, match=r"mlp=relu"):
        choose_arch(cfg)
    assert choose_arch(load_model_config(str(CONFIGS / "models" / "tiny-neox.yaml"), []))[0] \
        == "gptneox"


@pytest.mark.slow
def test_bad_input_exits_2_and_writes_nothing(runs, tmp_path, tiny_data, capsys):
    out = tmp_path / "x.gguf"
    base = ["export", "gguf", "--out", str(out)]
    assert cli.main([*base, "--model-dir", str(runs["tiny-llama"]), "--type", "q5_k"]) == 2
    assert "--type 'q5_k'" in capsys.readouterr().err
    assert cli.main([*base, "--model-dir", str(tiny_data)]) == 2  # no checkpoint there
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main([*base, "--model-dir", str(runs["tiny-llama"]),
                     "--checkpoint", "step_99"]) == 2
    assert "step_99" in capsys.readouterr().err
    # a gpt2-marks tokenizer: refused (llama.cpp has no such split) unless asked for
    run = tmp_path / "marks"
    _make_run(tiny_data, "tiny-llama", run)
    from tokenizers import Tokenizer

    from lmfab.data.prep.bpe_train import make_pre_tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    tok.pre_tokenizer = make_pre_tokenizer("gpt2-marks")
    tok.save(str(run / "tokenizer.json"))
    assert cli.main([*base, "--model-dir", str(run)]) == 2
    assert "gpt2-marks" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert cli.main([*base, "--model-dir", str(run), "--allow-split-mismatch"]) == 0
    assert out.is_file()


# ---- llama.cpp itself -------------------------------------------------------------------

def _llama(path: Path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python (the `gguf` extra) builds llama.cpp to read GGUF")
    return llama_cpp.Llama(model_path=str(path), n_ctx=CTX, n_threads=2, n_batch=CTX,
                           logits_all=True, type_k=0, type_v=0, verbose=False)  # f32 KV cache


def _llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _lmfab_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    from lmfab.infer.generate import load_trained, sample

    model, _, _ = load_trained(model_dir)
    idx = sample(model, torch.tensor([prompt]), max_new_tokens=n, temperature=0.0)
    return idx[0, len(prompt):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_llama_cpp_logits_and_greedy_continuation_equal_lmfab(runs, tmp_path, name):
    from tokenizers import Tokenizer

    from lmfab.infer.generate import load_trained

    run = runs[name]
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    ids = tok.encode(_sample_text()[:400]).ids[:40]
    model, _, _ = load_trained(run)
    with torch.no_grad():
        want_logits = model(torch.tensor([ids]))[0].numpy()
    scale = float(np.abs(want_logits).max())
    want = _lmfab_greedy(run, ids[:8], 32)
    if name not in ECHO:
        assert len(set(want)) > 8  # a continuation that tells exports apart
    # f32: llama.cpp's own rounding only (its GELU is tanh-approximated through an fp16
    # table, hence the wider bound for gpt2 / gptneox); f16: the weights' rounding on top
    for qtype, tol in (("f32", 2e-3), ("f16", 1e-2)):
        e = export_gguf(run, tmp_path / f"{qtype}.gguf", qtype=qtype, warn=lambda m: None)
        llm = _llama(e.path)
        llm.reset()
        llm.eval(ids)
        got_logits = np.array(llm.scores[: len(ids)])
        diff = float(np.abs(got_logits - want_logits).max())
        assert diff <= tol * scale, (name, qtype, diff, scale)
        assert _llama_greedy(llm, ids[:8], 32) == want, (name, qtype)


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_lmfab(runs, tmp_path):
    from tokenizers import Tokenizer

    run = runs["tiny-learned"]
    e = export_gguf(run, tmp_path / "t.gguf", qtype="f16", warn=lambda m: None)
    llm = _llama(e.path)
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    text = _sample_text()[:3000]
    samples = [text, " leading space", "Numbers 12345 and 3.14, 'quotes' they're",
               "tabs\tand\n\nnewlines  double  spaces", "Ünïcödé — dashes … «guillemets»"]
    for s in samples:
        want = tok.encode(s).ids
        got = llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)
        assert got == want, s[:40]
        assert llm.detokenize(got).decode("utf-8", errors="replace") == s


@pytest.mark.slow
def test_gguf_decode_benchmark_runs(runs, tiny_data, tmp_path):
    """benchmarks/gguf_decode.py end to end at toy size (its figures mean nothing here)."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp", reason="the benchmark measures llama.cpp (the gguf extra)")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gguf_decode.py"), "--model-dir",
           str(runs["tiny-llama"]), "--data-dir", str(tiny_data), "--types", "f32,q4_0",
           "--windows", "2", "--new", "4", "--repeat", "1", "--threads", "1",
           "--out-dir", str(tmp_path), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["impl"].split()[0], r["type"]) for r in rows] == [
        ("lmfab", "fp32"), ("lmfab", "fp32"), ("llama.cpp", "f32"), ("llama.cpp", "q4_0")]
    assert "KV cache" in rows[0]["impl"] and "no cache" in rows[1]["impl"]
    assert rows[2]["top1"] == 1.0 and abs(rows[2]["bpb"] - rows[0]["bpb"]) < 1e-3
    assert rows[3]["bytes"] < rows[2]["bytes"] and all(r["tokens_per_s"] > 0 for r in rows)
    assert "| llama.cpp | q4_0 |" in proc.stdout
