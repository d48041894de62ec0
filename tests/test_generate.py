"""KV-cached generation: equal to the no-cache reference, ragged batches, sampling limits,
seeds, stop rules, streaming, long prompts and the `lmfab generate` command."""

from __future__ import annotations

import json

import pytest
import torch

from lmfab.cli import main
from lmfab.config.load import load_model_config
from lmfab.infer import generate as generate_module
from lmfab.infer.generate import (
    DecodeBatch,
    PromptTooLong,
    Request,
    _Text,
    batch_bucket,
    filter_logits,
    fit_prompt,
    generate,
    load_trained,
    run_batch,
    sample,
)
from lmfab.models import build_model, materialize
from tests.conftest import CONFIGS

PRESETS = ["tiny-learned", "tiny-llama", "tiny-neox", "tiny-alibi-swiglu"]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(name: str):
    cfg = load_model_config(CONFIGS / "models" / f"{name}.yaml")
    cfg.init_std = 0.2  # peaked logits: greedy ties are unlikely
    return materialize(build_model(cfg), "cpu", seed=0).eval()


class _NoTokenizer:
    """run_batch needs a tokenizer for text only; token-level tests decode to nothing."""

    def token_to_id(self, _token):
        return None

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("name", PRESETS)
def test_cached_greedy_equals_the_reference_for_ragged_batches(name):
    model = random_model(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 1, 12)]
    n_new = 24
    refs = [sample(model, torch.tensor([p]), max_new_tokens=n_new, temperature=0)[0, len(p):]
            .tolist() for p in prompts]
    reqs = [Request(p, max_new_tokens=n_new, stop_token_ids=[]) for p in prompts]
    batched = run_batch(model, _NoTokenizer(), reqs, compile=False)
    assert [c.token_ids for c in batched] == refs
    alone = run_batch(model, _NoTokenizer(), reqs[2:], compile=False)
    assert alone[0].token_ids == refs[2]
    assert all(c.finish_reason == "length" for c in batched)


def test_a_padded_batch_gives_the_same_completions(monkeypatch):
    """Compiled decodes run at power-of-two batch sizes with idle rows (one CUDA graph per
    bucket, not per size); the idle rows change nothing the requests get back."""
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17)] == [1, 2, 4, 4, 8, 16, 16, 32]
    model = random_model("tiny-llama")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 11, 2)]
    reqs = [Request(prompts[0], max_new_tokens=12, stop_token_ids=[]),
            Request(prompts[1], max_new_tokens=7, temperature=0.9, top_k=20, seed=3,
                    stop_token_ids=[]),
            Request(prompts[2], max_new_tokens=12, stop_token_ids=[])]
    sizes = []
    real_cache = generate_module._cache_for
    monkeypatch.setattr(generate_module, "_cache_for",
                        lambda m, B, *a: sizes.append(B) or real_cache(m, B, *a))
    plain = run_batch(model, _NoTokenizer(), reqs, compile=False, pad_batch=False)
    padded = run_batch(model, _NoTokenizer(), reqs, compile=False, pad_batch=True)
    assert sizes == [3, 4]  # the second ran with one idle row
    assert len(padded) == 3
    for a, b in zip(plain, padded, strict=True):
        assert (a.token_ids, a.text, a.finish_reason, a.prompt_tokens) == \
            (b.token_ids, b.text, b.finish_reason, b.prompt_tokens)
    assert [len(c.token_ids) for c in padded] == [12, 7, 12]


@pytest.mark.parametrize("name", PRESETS)
def test_a_request_joining_a_running_batch_gets_what_it_gets_alone(name):
    """Continuous batching: a request admitted into a free row of a running batch (its
    prompt prefilled alone, its keys and values copied in before the current slot) decodes
    the tokens it decodes on its own, greedy and sampled, and leaves the others alone."""
    model = random_model(name)
    g = torch.Generator().manual_seed(4)
    first = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 4)]
    late = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (6, 3)]
    reqs = [Request(first[0], max_new_tokens=20, stop_token_ids=[]),
            Request(first[1], max_new_tokens=5, stop_token_ids=[])]
    joiners = [Request(late[0], max_new_tokens=10, stop_token_ids=[]),
               Request(late[1], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=5,
                       stop_token_ids=[])]
    alone = [run_batch(model, _NoTokenizer(), [r], compile=False)[0] for r in reqs + joiners]
    batch = DecodeBatch(model, _NoTokenizer(), reqs, compile=False, headroom=2.0)
    got, rows, waiting = {}, {0: 0, 1: 1}, [2, 3]
    assert batch.admit(joiners[0]) is None  # no free row yet
    while not batch.finished:
        for b, c in batch.step():
            got[rows.pop(b)] = c
        while waiting and batch.free_rows():
            b = batch.admit(joiners[waiting[0] - 2])
            assert b is not None
            rows[b] = waiting.pop(0)
    assert sorted(got) == [0, 1, 2, 3], "every request, the joiners included, finished"
    for i, c in got.items():
        assert (c.token_ids, c.finish_reason, c.prompt_tokens) == \
            (alone[i].token_ids, alone[i].finish_reason, alone[i].prompt_tokens), i
    # a prompt longer than the slots already filled waits for the next batch
    b2 = DecodeBatch(model, _NoTokenizer(), [Request([1, 2], max_new_tokens=4,
                                                     stop_token_ids=[])], compile=False,
                     headroom=2.0)
    b2.step()
    assert b2.finished is False and not b2.fits(Request(list(range(1, 9)), max_new_tokens=1))


def _drive(model, reqs, joiners, *, overlap):
    """Run ``reqs`` in one DecodeBatch, admitting ``joiners`` as rows free up; the
    completions by request index (joiners after reqs)."""
    batch = DecodeBatch(model, _NoTokenizer(), reqs, compile=False, headroom=3.0,
                        overlap=overlap)
    got, rows, waiting = {}, {i: i for i in range(len(reqs))}, list(range(len(joiners)))
    while not batch.finished:
        for b, c in batch.step():
            got[rows.pop(b)] = c
        while waiting and batch.free_rows():
            b = batch.admit(joiners[waiting[0]])
            assert b is not None
            rows[b] = len(reqs) + waiting.pop(0)
    return {i: (c.token_ids, c.finish_reason, c.prompt_tokens) for i, c in got.items()}


def _overlap_case(device):
    model = random_model("tiny-llama").to(device)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 9, 3, 4)]
    free = run_batch(model, _NoTokenizer(), [Request(prompts[0], max_new_tokens=16,
                                                     stop_token_ids=[])], compile=False)[0]
    stop = free.token_ids[6]  # row 0 ends early on a stop token, mid-batch
    reqs = [Request(prompts[0], max_new_tokens=16, stop_token_ids=[stop]),
            Request(prompts[1], max_new_tokens=12, temperature=0.9, top_k=30, seed=2,
                    stop_token_ids=[]),
            Request(prompts[2], max_new_tokens=1, stop_token_ids=[])]  # one token: done at once
    joiners = [Request(prompts[3], max_new_tokens=6, stop_token_ids=[])]
    return model, reqs, joiners, stop


def test_the_overlapped_decode_step_changes_no_output():
    """With ``overlap`` each step is queued before the host reads the tokens (the step
    after a stop token is computed and dropped); completions, finish reasons and joiners
    are what the plain loop gives."""
    model, reqs, joiners, stop = _overlap_case("cpu")
    plain = _drive(model, reqs, joiners, overlap=False)
    assert plain[0][1] == "stop" and plain[0][0][-1] != stop and plain[2][0] and plain[3][0]
    assert _drive(model, reqs, joiners, overlap=True) == plain


def test_spare_rows_stop_where_half_the_free_memory_ends():
    from lmfab.infer.generate import _cache_row_bytes, spare_rows

    btlm = load_model_config(CONFIGS / "models" / "btlm-3b-8k.yaml")
    row = _cache_row_bytes(btlm, 4096)  # bf16 keys and values of 32 layers, 4096 slots
    assert row == 2 * 32 * 32 * 80 * 4096 * 2
    assert spare_rows(16, 2, row, 80 * 2**30) == 16  # an H200's free memory: all 16
    assert spare_rows(16, 2, row, 8 * 2**30) == 3  # 8 GiB free: 4 GiB of 1.34 GB rows
    assert spare_rows(16, 3, row, 2**20) == 3  # never fewer than the batch needs


def test_generation_ends_at_the_context():
    model = random_model("tiny-learned")  # learned positions: 64 of them
    c = run_batch(model, _NoTokenizer(), [Request([1] * 60, max_new_tokens=50,
                                                  stop_token_ids=[])], compile=False)[0]
    assert len(c.token_ids) == 4 and c.finish_reason == "length"


def test_top_k_and_top_p_limits_hold():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    top_k = torch.tensor([5, 0, 3])
    top_p = torch.tensor([1.0, 0.6, 0.9])
    kept = torch.isfinite(filter_logits(logits, top_k, top_p))
    assert kept[0].sum() == 5 and set(kept[0].nonzero().flatten().tolist()) == set(
        logits[0].topk(5).indices.tolist())
    probs = torch.softmax(logits[1], -1)
    mass = probs[kept[1]].sum()
    smallest = probs[kept[1]].min()
    assert mass >= 0.6 and mass - smallest < 0.6  # the smallest set reaching p
    assert kept[2].sum() <= 3
    from lmfab.infer.generate import next_tokens

    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    for _ in range(200):
        t = next_tokens(logits, torch.ones(3), top_k, top_p, gens)
        assert all(kept[b, t[b]] for b in range(3))


def test_seeds_reproduce_and_differ(tiny_run):
    model, tok, _ = load_trained(tiny_run)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = generate(model, tok, ["The", "A long"], seed=3, **kw)
    assert generate(model, tok, ["The", "A long"], seed=3, **kw) == a
    assert generate(model, tok, ["A long"], seed=3, **kw) == a[1:]  # batch-independent
    assert generate(model, tok, ["The"], seed=4, **kw)[0] != a[0]


def test_stop_strings_cut_and_streaming_matches(tiny_run):
    model, tok, _ = load_trained(tiny_run)
    full = generate(model, tok, ["The"], max_new_tokens=30, stop_token_ids=[])[0]
    assert len(full) > 6
    stop = full[3:6]
    pieces = []
    cut = generate(model, tok, ["The"], max_new_tokens=30, stop=[stop], stop_token_ids=[],
                   on_text=lambda i, p: pieces.append(p))[0]
    assert cut == full[:full.find(stop)]
    assert "".join(pieces) == cut
    first = tok.encode(full).ids[0]  # the first generated token as a stop token: nothing
    assert generate(model, tok, ["The"], max_new_tokens=5, stop_token_ids=[first])[0] == ""


def test_streamed_text_is_whole_utf8(tiny_run):
    _, tok, _ = load_trained(tiny_run)
    text = "naïve café — 日本語 ✓ done"
    stream = _Text(tok, ["STOP"])
    pieces = [stream.add(t)[0] for t in tok.encode(text).ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text
    stream = _Text(tok, ["日本"])
    out, hit = "", False
    for t in tok.encode(text).ids:
        piece, hit = stream.add(t)
        out += piece
        if hit:
            break
    assert hit and out == "naïve café — "


def test_long_prompts_are_truncated_or_refused(tiny_run, capsys):
    assert fit_prompt(list(range(100)), 32) == (list(range(69, 100)), True)
    with pytest.raises(PromptTooLong, match="100 tokens and the model's context is 32"):
        fit_prompt(list(range(100)), 32, on_long_prompt="refuse")
    long = "the king and the queen " * 40
    assert main(["generate", "--model_dir", str(tiny_run), "--prompt", long,
                 "--max_new_tokens", "3", "--on_long_prompt", "refuse"]) == 2
    refused = capsys.readouterr()
    assert "context is 32" in refused.err and refused.out == ""  # nothing printed first
    assert main(["generate", "--model-dir", str(tiny_run), "--prompt", long,
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert "its last 31 tokens are kept" in capsys.readouterr().err


def test_generate_cli_prompts_file_and_stop(tiny_run, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "The"}) + "\n" + json.dumps({"prompt": "And so"}) + "\n")
    assert main(["generate", "--model-dir", str(tiny_run), "--prompts-file", str(f),
                 "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    model, tok, _ = load_trained(tiny_run)
    assert [r["text"] for r in rows] == generate(model, tok, ["The", "And so"],
                                                 max_new_tokens=12)
    full = rows[0]["text"]
    stop = full[4:7]
    assert main(["generate", "--model-dir", str(tiny_run), "--prompt", "The",
                 "--temperature", "0", "--max-new-tokens", "12", "--stop", stop]) == 0
    assert capsys.readouterr().out == "The" + full[:full.find(stop)] + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    assert main(["generate", "--model-dir", str(tiny_run), "--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
def test_compiled_cuda_decode_equals_the_reference(name):
    """On CUDA the decode step runs as a CUDA graph; in fp32 its greedy tokens are the
    reference's, ragged batch and all."""
    model = random_model(name).cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 1, 12)]
    refs = [sample(model, torch.tensor([p], device="cuda"), max_new_tokens=24,
                   temperature=0)[0, len(p):].tolist() for p in prompts]
    reqs = [Request(p, max_new_tokens=24, stop_token_ids=[]) for p in prompts]
    for _ in range(2):  # the second batch replays the recorded graph
        out = run_batch(model, _NoTokenizer(), reqs, compile="reduce-overhead")
        assert [c.token_ids for c in out] == refs


@pytest.mark.gpu
def test_compiled_batches_of_three_and_four_share_one_cache_and_graph():
    model = random_model("tiny-llama").cuda()
    reqs = [Request([1, 2, 3], max_new_tokens=8, stop_token_ids=[]) for _ in range(4)]
    a = run_batch(model, _NoTokenizer(), reqs[:3])  # compiled on CUDA by default: padded to 4
    b = run_batch(model, _NoTokenizer(), reqs)
    assert [c.token_ids for c in a] == [c.token_ids for c in b[:3]]
    assert [k[0] for k in generate_module._CACHES[model]] == [4]


@pytest.mark.gpu
def test_the_overlapped_cuda_decode_changes_no_output():
    """On CUDA the overlapped step copies the tokens to pinned memory behind an event; in
    fp32 the completions equal the plain loop's, and the compiled step's too."""
    model, reqs, joiners, _ = _overlap_case("cuda")
    plain = _drive(model, reqs, joiners, overlap=False)
    assert _drive(model, reqs, joiners, overlap=True) == plain
    compiled = run_batch(model, _NoTokenizer(), reqs)  # CUDA graphs, overlapped by default
    assert [(c.token_ids, c.finish_reason) for c in compiled] == [plain[i][:2] for i in range(3)]
