"""lm-evaluation-harness on lmfab checkpoints: the LM's scores against lmfab's own logits,
batching, rolling windows, generation, the offline tasks, the CLI and in-loop evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance

from lmfab.cli import main
from lmfab.eval.harness import LmfabLM, evaluate_tasks, flat_metrics, lmfab_task_names
from lmfab.eval.tasks import build as task_build
from lmfab.infer.generate import load_trained
from lmfab.models.gpt import build_model, materialize

from .conftest import CONFIGS, SAMPLE, tiny_overrides

TINY = str(CONFIGS / "train" / "tiny.yaml")
STEPS = 30


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A tiny run folder trained STEPS steps (seconds on a CPU)."""
    torch.set_num_threads(2)
    run_dir = tmp_path_factory.mktemp("run") / "r"
    sets = [a for o in tiny_overrides(tiny_data, **{"runconfig.max_steps": STEPS})
            for a in ("--set", o)]
    assert main(["train", "--params", TINY, "--model-dir", str(run_dir), *sets]) == 0
    return run_dir


@pytest.fixture(scope="module")
def lm(trained):
    return LmfabLM(str(trained), device="cpu", batch_size=4)


def _ll(*pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _direct(lm, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-softmax of the continuation's tokens, from the model's logits directly."""
    tok, model = lm.tokenizer, lm.model
    whole = tok.encode(context + continuation).ids
    n_ctx = len(tok.encode(context).ids) if context else 0
    if not context:
        whole = [tok.token_to_id("<|endoftext|>"), *whole]
        n_ctx = 1
    cont = whole[n_ctx:]
    inp = whole[:-1][-model.cfg.max_seq_len:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp])).float()[0], dim=-1)
    logp = logp[len(inp) - len(cont):]
    target = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), target].sum()), bool(
        (logp.argmax(-1) == target).all())


PAIRS = [
    ("ROMEO. What light through yonder", " window breaks"),
    ("And the Word was", " God."),
    ("", "In the beginning"),  # empty context: conditioned on <|endoftext|>
    ("Speak,", " lady"),
    # longer than max_seq_len (32): cut from the left
    ("Lord, " * 30 + "what fools these", " mortals be"),
]


def test_loglikelihood_equals_direct_computation(lm):
    got = lm.loglikelihood(_ll(*PAIRS), disable_tqdm=True)
    for (ctx, cont), (score, greedy) in zip(PAIRS, got, strict=True):
        want, want_greedy = _direct(lm, ctx, cont)
        assert score == pytest.approx(want, abs=1e-5), (ctx, cont)
        assert score < 0 and greedy == want_greedy


def test_greedy_flag(lm):
    ctx = lm.tok_encode("And the Word was with")
    with torch.no_grad():
        best = int(lm.model(torch.tensor([ctx]))[0, -1].argmax())
    other = (best + 1) % lm.model.cfg.vocab_size
    (_, g_best), (_, g_other) = lm._loglikelihood_tokens(
        [(None, ctx, [best]), (None, ctx, [other])], disable_tqdm=True)
    assert g_best is True and g_other is False


def test_batching_gives_the_numbers_of_batch_size_one(lm, trained):
    one = LmfabLM(model=lm.model, tokenizer=lm.tokenizer, batch_size=1)
    a = one.loglikelihood(_ll(*PAIRS), disable_tqdm=True)
    b = lm.loglikelihood(_ll(*PAIRS), disable_tqdm=True)
    for (sa, ga), (sb, gb) in zip(a, b, strict=True):
        assert sa == pytest.approx(sb, abs=1e-5) and ga == gb


def test_loglikelihood_rolling_is_the_full_text_nll(lm):
    tok, model, L = lm.tokenizer, lm.model, lm.max_length
    short = "Thou shalt not stir one foot to seek a foe."
    long = "Rebellious subjects, enemies to peace, profaners of this neighbour-stained steel. " * 4
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                    for i, t in enumerate([short, long])], disable_tqdm=True)
    for text, score in zip([short, long], got, strict=True):
        full = [tok.token_to_id("<|endoftext|>"), *tok.encode(text).ids]
        n = len(full) - 1  # tokens to predict
        assert n > 0 and (text is short) == (n <= L)
        want, start = 0.0, 0
        while start < n:  # disjoint windows of L predictions, each with the most context
            stop = min(start + L, n)
            inp = full[max(0, stop - L): stop]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([inp])).float()[0], dim=-1)
            k = stop - start
            targets = torch.tensor(full[start + 1: stop + 1])
            want += float(logp[-k:][torch.arange(k), targets].sum())
            start = stop
        assert score == pytest.approx(want, abs=1e-4)


def test_generate_until_is_greedy_and_stops(lm):
    reqs = [Instance("generate_until", {}, ("ROMEO.\n", {"until": ["\n"], "max_gen_toks": 8}), 0),
            Instance("generate_until", {}, ("And the", {"until": ["zzz"], "max_gen_toks": 6}), 1)]
    first, second = lm.generate_until(reqs, disable_tqdm=True)
    assert "\n" not in first
    ids = lm.tok_encode("And the")
    for _ in range(6):  # greedy by hand
        with torch.no_grad():
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    want = lm.tokenizer.decode(ids[len(lm.tok_encode("And the")):], skip_special_tokens=False)
    assert second == want.split("<|endoftext|>")[0]


def test_simple_evaluate_on_the_offline_tasks(lm, trained):
    assert {"lmfab_cloze", "lmfab_choice"} <= set(lmfab_task_names())
    res = evaluate_tasks(lm, ["lmfab_cloze", "lmfab_choice"], limit=12, bootstrap_iters=0)
    flat = flat_metrics(res)
    for key in ("lmfab_cloze/acc", "lmfab_choice/acc", "lmfab_choice/acc_norm"):
        assert 0.0 <= flat[key] <= 1.0, key
    assert res["results"]["lmfab_choice"]["acc,none"] is not None
    # Training lowers the cloze perplexity far below that of the same model untrained.
    cfg = lm.model.cfg
    fresh = materialize(build_model(cfg), "cpu", seed=0).eval()
    untrained = flat_metrics(evaluate_tasks(LmfabLM(model=fresh, tokenizer=lm.tokenizer),
                                            ["lmfab_cloze"], limit=12, bootstrap_iters=0))
    assert flat["lmfab_cloze/perplexity"] < 0.5 * untrained["lmfab_cloze/perplexity"]


def test_task_builder_is_deterministic_and_its_items_are_well_formed():
    corpus = SAMPLE / "books.jsonl.zst"
    a, b = task_build.build(corpus), task_build.build(corpus)
    assert {k: task_build.to_jsonl(v) for k, v in a.items()} == {
        k: task_build.to_jsonl(v) for k, v in b.items()}
    for name, items in a.items():  # the shipped files are the builder's output
        shipped = (task_build.HERE / f"{name}.jsonl").read_bytes()
        assert shipped == task_build.to_jsonl(items).encode(), name
        assert 100 <= len(items) and len(shipped) < 300_000
    from lmfab.data.prep.readers import iter_documents

    held = {d.meta["title"]: d.text for d in iter_documents([str(corpus)])
            if d.meta["title"] in ("Romeo and Juliet", "John")}
    assert {it["doc"] for it in a["lmfab_cloze"]} == set(held)
    for it in a["lmfab_cloze"]:
        assert it["target"][0] == " " and it["target"][1:].isalpha() or "'" in it["target"]
        assert len(it["target"].split()) == 1 and (it["context"] + it["target"]) in held[it["doc"]]
    for it in a["lmfab_choice"]:
        ch = it["choices"]
        assert len(ch) == 4 == len(set(ch)) and 0 <= it["label"] < 4
        assert (it["context"] + ch[it["label"]]) in held[it["doc"]]
        others = [c for i, c in enumerate(ch) if i != it["label"]]
        assert not any((it["context"] + c) in held[it["doc"]] for c in others)


def test_cli_eval_tasks_writes_results(trained, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main(["eval", "--model-dir", str(trained), "--tasks", "lmfab_choice", "--limit", "6",
                 "--batch-size", "3", "--output", str(out), "--bootstrap-iters", "0"]) == 0
    printed = capsys.readouterr().out
    assert "lmfab_choice" in printed and "acc_norm" in printed
    res = json.loads(out.read_text())
    assert 0.0 <= res["results"]["lmfab_choice"]["acc,none"] <= 1.0
    assert res["lmfab"]["step"] == STEPS
    assert json.loads((trained / "eval" / f"downstream-step_{STEPS}.json").read_text()) == res


def test_a_built_task_folder_runs_through_include_path(trained, tmp_path, capsys):
    """build --name N --out DIR: a task folder (YAML, jsonl, loader) that lm-eval runs
    beside the shipped tasks; its items are the builder's, its scores its own."""
    folder = tmp_path / "tasks"
    corpus = str(SAMPLE / "books.jsonl.zst")
    assert task_build.main(["--corpus", corpus, "--name", "mine", "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "mine_choice.jsonl", "mine_choice.yaml", "mine_cloze.jsonl", "mine_cloze.yaml",
        "utils.py"]
    for kind in ("cloze", "choice"):  # the same items as the shipped ones, by another name
        assert ((folder / f"mine_{kind}.jsonl").read_bytes()
                == (task_build.HERE / f"lmfab_{kind}.jsonl").read_bytes())
    assert set(lmfab_task_names([folder])) >= {"mine_cloze", "mine_choice", "lmfab_cloze"}
    out = tmp_path / "res.json"
    assert main(["eval", "--model-dir", str(trained), "--tasks", "mine_choice,lmfab_choice",
                 "--include-path", str(folder), "--limit", "6", "--bootstrap-iters", "0",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["results"]["mine_choice"]["acc,none"] == res["results"]["lmfab_choice"]["acc,none"]
    assert res["lmfab"]["include_path"] == [str(folder)]
    # The default name into another folder, or a folder that is not there: refused, saying
    # what to do.
    assert task_build.main(["--corpus", corpus, "--out", str(tmp_path / "other")]) == 2
    assert "--name" in capsys.readouterr().err
    assert main(["eval", "--model-dir", str(trained), "--tasks", "lmfab_choice",
                 "--include-path", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_in_loop_tasks_from_an_include_path(tiny_data, tmp_path, capsys):
    folder = tmp_path / "tasks"
    assert task_build.main(["--corpus", str(SAMPLE / "books.jsonl.zst"), "--name", "mine",
                            "--out", str(folder)]) == 0
    sets = tiny_overrides(tiny_data, **{"runconfig.max_steps": 2, "eval_input.tasks_limit": 4,
                                        "eval_input.tasks": "[mine_cloze]"})
    args = ["run", "--mode", "train_and_eval", "--params", TINY, "--model-dir",
            str(tmp_path / "r"), *[a for o in sets for a in ("--set", o)]]
    assert main([*args, "--set", f"eval_input.tasks_include_path=[{tmp_path / 'nowhere'}]"]) == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "r" / "checkpoints").exists()
    assert main([*args, "--set", f"eval_input.tasks_include_path=[{folder}]"]) == 0
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("split") == "eval"][-1]
    assert 0.0 <= final["mine_cloze/acc"] <= 1.0 and final["mine_cloze/perplexity"] > 1.0


def test_cli_eval_without_params_or_tasks_is_exit_2(trained, capsys):
    assert main(["eval", "--model-dir", str(trained)]) == 2
    assert "--params" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_unknown_task_lists_the_available_ones(trained, capsys):
    """Indexing lm-eval's own registry (to know a name is in neither) takes seconds."""
    assert main(["eval", "--model-dir", str(trained), "--tasks", "lmfab_cloze,no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "no_such_task" in err and "lmfab_cloze" in err and "lmfab_choice" in err
    assert not (trained / "eval").exists() or not any(
        "no_such" in p.name for p in (trained / "eval").iterdir())


@pytest.mark.slow
def test_in_loop_downstream_metrics_are_logged_and_leave_training_unchanged(tiny_data, tmp_path):
    """eval_input.tasks: scored at every eval step into metrics.jsonl. lm-eval seeds the
    random generators; they are restored, so the run trains to the same weights as without."""
    def train(name, extra):
        sets = tiny_overrides(tiny_data, **{"runconfig.max_steps": 3, "runconfig.eval_steps": 1,
                                            "model.dropout": 0.1, **extra})
        assert main(["run", "--mode", "train_and_eval", "--params", TINY, "--model-dir",
                     str(tmp_path / name), *[a for o in sets for a in ("--set", o)]]) == 0
        return load_trained(tmp_path / name)[0].state_dict()

    a = train("plain", {})
    b = train("tasks", {"eval_input.tasks": "[lmfab_cloze]", "eval_input.tasks_limit": 4})
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "tasks" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3]
    for r in evals:
        assert 0.0 <= r["lmfab_cloze/acc"] <= 1.0 and r["lmfab_cloze/perplexity"] > 1.0
        assert r["loss"] > 0
    from lmfab.scaling.results import downstream_metrics

    assert set(downstream_metrics(evals[-1])) == {"lmfab_cloze/acc", "lmfab_cloze/perplexity"}
    assert downstream_metrics({"step": 3, "loss": 2.0}) is None


@pytest.mark.slow
def test_scores_equal_lm_eval_hf_backend_on_the_export(lm, trained, tmp_path):
    """The same tasks through lm-eval's Hugging Face backend on the checkpoint's export give
    the same numbers (1e-4): the adapter follows HF's tokenization and scoring conventions."""
    hf = pytest.importorskip("lmfab.export.hf", reason="needs lmfab.export (Hugging Face export)")
    pytest.importorskip("accelerate", reason="lm-eval's HF backend needs accelerate")
    from lm_eval.models.huggingface import HFLM

    hf.export_hf(trained, tmp_path / "hf")
    peer = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4, dtype="float32")
    assert peer.max_length == lm.max_length and peer.prefix_token_id == lm.prefix_token_id
    a = lm.loglikelihood(_ll(*PAIRS), disable_tqdm=True)
    b = peer.loglikelihood(_ll(*PAIRS), disable_tqdm=True)
    for (sa, ga), (sb, gb) in zip(a, b, strict=True):
        assert sa == pytest.approx(sb, abs=1e-4) and ga == gb
    text = "Rebellious subjects, enemies to peace, profaners of this neighbour-stained steel. " * 3
    roll = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert lm.loglikelihood_rolling(roll, disable_tqdm=True)[0] == pytest.approx(
        peer.loglikelihood_rolling(roll, disable_tqdm=True)[0], abs=1e-4)
    # (lmfab_choice's lines run past this model's 32 positions, which HF's backend refuses)
    tasks = ["lmfab_cloze"]
    ours = flat_metrics(evaluate_tasks(lm, tasks, limit=24, bootstrap_iters=0))
    theirs = flat_metrics(evaluate_tasks(peer, tasks, limit=24, bootstrap_iters=0))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-4), k


def test_results_rows_keep_downstream_scores():
    from lmfab.scaling.results import check_row

    row = {"name": "a", "status": "done", "group": "f", "n_params": 10, "tokens": 100,
           "flops": 6e3, "eval_loss": 3.0}
    assert check_row({**row, "downstream": {"lmfab_cloze/acc": 0.25}}) is None
    assert "downstream" in check_row({**row, "downstream": 0.25})


def test_bad_tasks_limit_is_refused(tiny_data, capsys):
    sets = tiny_overrides(tiny_data, **{"eval_input.tasks": "[lmfab_cloze]",
                                        "eval_input.tasks_limit": 0})
    assert main(["eval", "--params", TINY, "--model-dir", "unused",
                 *[a for o in sets for a in ("--set", o)]]) == 2
    assert "eval_input.tasks_limit" in capsys.readouterr().err


@pytest.mark.gpu
def test_on_the_gpu_bf16_scores_near_fp32(trained):
    """CUDA, bf16 autocast (the default there) against the CPU's fp32 scores."""
    gpu = LmfabLM(str(trained), device="cuda", batch_size=4)
    cpu = LmfabLM(str(trained), device="cpu", batch_size=4)
    assert gpu.dtype == "bf16" and gpu.device.type == "cuda"
    for (a, _), (b, _) in zip(gpu.loglikelihood(_ll(*PAIRS), disable_tqdm=True),
                              cpu.loglikelihood(_ll(*PAIRS), disable_tqdm=True), strict=True):
        assert a == pytest.approx(b, rel=0.05, abs=0.1)


def test_sweep_collects_the_final_eval_s_downstream_scores(tmp_path):
    import yaml

    from lmfab.scaling.sweep import collect_point, expand

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({
        "base": str(CONFIGS / "train/subscale.yaml"),
        "groups": [{"name": "fam", "family": "subscale", "flops": 1e15, "params": [1.75e6]}]}))
    _, (point,) = expand(f)
    steps = point.params["runconfig"]["max_steps"]
    run = tmp_path / "runs" / point.name
    run.mkdir(parents=True)
    records = [{"step": steps, "split": "train", "loss": 3.1},
               {"step": steps // 2, "split": "eval", "loss": 3.5, "lmfab_cloze/acc": 0.1},
               {"step": steps, "split": "eval", "loss": 3.0, "bits_per_byte": 1.5,
                "lmfab_cloze/acc": 0.2, "lmfab_choice/acc_norm": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = collect_point(point, tmp_path)
    assert row["status"] == "done" and row["eval_loss"] == 3.0
    assert row["downstream"] == {"lmfab_cloze/acc": 0.2, "lmfab_choice/acc_norm": 0.4}


def test_task_builder_names_untitled_documents_by_file_and_line(tmp_path):
    """No title: items name the file (not the path it was given by) and the line, so two
    untitled documents of one file stay apart."""
    from lmfab.data.prep.readers import iter_documents

    docs = [d for d in iter_documents([str(SAMPLE / "books.jsonl.zst")]) if d.text.strip()]
    corpus = tmp_path / "deep" / "untitled.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    items = task_build.build(corpus, val_fraction=0.3)
    names = {it["doc"] for it in items["lmfab_cloze"] + items["lmfab_choice"]}
    assert names and all(n.startswith("untitled.jsonl:") for n in names), names
    assert len(names) > 1  # several held-out documents, told apart by their line
