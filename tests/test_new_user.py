"""What a new user met: each defect found by trying lmfab as the README says, with its fix.

Scratch read as data, a tokenizer swapped under a run, tracebacks, silent successes and
misleading messages; every case here once went wrong and is pinned by its test."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from lmfab.cli import main
from lmfab.data.prep.readers import iter_documents, list_files

from .conftest import CONFIGS, SAMPLE, tiny_overrides

TINY = str(CONFIGS / "train" / "tiny.yaml")
DEFAULT_RECIPE = str(CONFIGS / "data" / "default.yaml")


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """The README's curate step on the shipped sample (33 documents)."""
    out = tmp_path_factory.mktemp("curated") / "books"
    assert main(["data", "curate", DEFAULT_RECIPE, "--workers", "1",
                 "--set", f"read.inputs=[{SAMPLE / 'books.jsonl.zst'}]", "--set", f"write.output={out}"]) == 0
    return out


# ---- silent duplication: a pipeline's scratch is never read -----------------------------

@pytest.mark.slow
def test_a_curate_output_reads_as_its_documents_only(curated):
    written = json.loads((curated / "stats.json").read_text())["written"]
    n_written = sum(v["docs"] for split in written.values() for v in split.values())
    assert any((curated / "_work").rglob("*.jsonl.zst"))  # the scratch is there ...
    docs = list(iter_documents([curated]))
    assert len(docs) == n_written == 33  # ... and not read (it once counted 67)
    assert {d.source for d in docs} == {"Books"}
    assert all("/_work/" not in d.path for d in docs)


def test_report_files_of_a_curate_output_are_not_documents(tmp_path):
    out = tmp_path / "cur"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00000.jsonl").write_text('{"text": "kept"}\n')
    (out / "stats.json").write_text("{}")
    (out / "rejects.txt").write_text("x.jsonl:3: bad JSON\n")
    (out / "near_dedup").mkdir()
    (out / "near_dedup" / "clusters.jsonl").write_text('{"cluster": [1, 2]}\n')
    (out / "_work" / "map").mkdir(parents=True)
    (out / "_work" / "map" / "t00000.docs.jsonl").write_text('{"text": "kept"}\n')
    assert list_files([out]) == [out / "train" / "part-00000.jsonl"]
    # an ordinary folder: scratch folders (leading _) are passed over too
    plain = tmp_path / "plain"
    (plain / "_tmp").mkdir(parents=True)
    (plain / "a.txt").write_text("a")
    (plain / "_tmp" / "b.txt").write_text("b")
    assert list_files([plain]) == [plain / "a.txt"]


@pytest.mark.slow
def test_quickstart_tokenizer_and_pack_on_a_curate_output(curated, tmp_path, capsys):
    tok = tmp_path / "tok" / "tokenizer.json"
    assert main(["data", "tokenizer", "train", "--input", str(curated), "--out", str(tok),
                 "--vocab-size", "600", "--by", "lang"]) == 0
    summary = json.loads(tok.with_suffix(".train.json").read_text())
    assert list(summary["groups"]) == ["en"] and summary["groups"]["en"]["documents"] == 33
    capsys.readouterr()
    assert main(["data", "tokenizer", "report", "--tokenizer", str(tok), "--input", str(curated),
                 "--max-bytes", "2e5"]) == 0
    out = capsys.readouterr().out
    assert "| Books |" in out and "0-00000" not in out  # no group named after a scratch file


# ---- tokenizer identity ------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_tokenization(tmp_path_factory):
    """The sample tokenized again with the same vocabulary size but another BPE."""
    from lmfab.data.prep.tokenize_corpus import tokenize_corpus

    out = tmp_path_factory.mktemp("other") / "tiny"
    tokenize_corpus([str(SAMPLE)], str(out), seq_len=32, vocab_size=512, val_fraction=0.5,
                    progress=False)  # trained on another half of the documents
    return out


@pytest.mark.slow
def test_eval_or_resume_on_shards_of_another_tokenizer_is_refused(tiny_data, other_tokenization,
                                                                  tmp_path, capsys):
    meta = [json.loads((d / "meta.json").read_text()) for d in (tiny_data, other_tokenization)]
    assert meta[0]["vocab_size"] == meta[1]["vocab_size"] == 512
    run = str(tmp_path / "run")
    assert main(["train", "--params", TINY, "--model-dir", run, "--num-steps", "2",
                 *_sets(tiny_overrides(tiny_data))]) == 0
    capsys.readouterr()
    other = _sets(tiny_overrides(other_tokenization))
    assert main(["eval", "--params", TINY, "--model-dir", run, *other]) == 2
    err = capsys.readouterr().err
    assert "another tokenizer" in err and "tokenizer.json" in err
    assert main(["train", "--params", TINY, "--model-dir", run, "--num-steps", "1", *other]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert main(["train", "--params", TINY, "--model-dir", run, "--dry-run", *other]) == 2
    # the run's own data still evaluates
    assert main(["eval", "--params", TINY, "--model-dir", run,
                 *_sets(tiny_overrides(tiny_data))]) == 0


# ---- tracebacks become one message -------------------------------------------------------

@pytest.mark.slow
def test_model_dir_under_a_file(tiny_data, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code = main(["train", "--params", TINY, "--model-dir", str(tmp_path / "f" / "run"),
                 "--num-steps", "1", *_sets(tiny_overrides(tiny_data))])
    assert code == 2
    assert f"{tmp_path / 'f'}" in capsys.readouterr().err


def test_binary_and_folder_params(tmp_path, capsys):
    binary = tmp_path / "p.yaml"
    binary.write_bytes(b"\x00\x01model:\xff\xfe")
    assert main(["run", "--params", str(binary), "--dry-run"]) == 2
    assert f"{binary}: not a YAML text file" in capsys.readouterr().err
    assert main(["run", "--params", str(tmp_path), "--dry-run"]) == 2
    assert f"{tmp_path}: is a folder, not a YAML file" in capsys.readouterr().err


def test_curate_with_only_invalid_utf8_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff\xfe"}\n\xff\n')
    code = main(["data", "curate", DEFAULT_RECIPE, "--workers", "1",
                 "--set", f"read.inputs=[{bad}]", "--set", f"write.output={tmp_path / 'o'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no documents left to write" in err and "2 bad records" in err
    assert f"{bad}:1: invalid UTF-8" in err


# ---- silent successes --------------------------------------------------------------------

def test_curate_whose_filters_drop_everything_says_so(tmp_path, capsys):
    src = tmp_path / "short.jsonl"
    src.write_text('{"text": "hi"}\n{"text": "a b"}\n')
    code = main(["data", "curate", DEFAULT_RECIPE, "--workers", "1",
                 "--set", f"read.inputs=[{src}]", "--set", f"write.output={tmp_path / 'o'}"])
    assert code == 2
    assert "2 documents read; filter removed 2" in capsys.readouterr().err


def test_a_folder_of_parquet_is_read(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet input needs the curate extra")
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["one doc", "two doc"]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": ["three", None]}), folder / "b.parquet")
    docs = list(iter_documents([folder], on_error="skip"))
    assert [d.text for d in docs] == ["one doc", "two doc", "three"]
    with pytest.raises(ValueError, match=r"b\.parquet:2: text column 'text' is null"):
        list(iter_documents([folder]))


def test_a_folder_with_nothing_readable_is_an_error(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.csv").write_text("text\nhello\n")
    code = main(["data", "tokenize", "--input", str(tmp_path / "in"), "--out",
                 str(tmp_path / "out"), "--seq-len", "16", "--vocab-size", "300"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no input files in this folder" in err and "data.csv" in err


def test_dry_run_with_a_missing_data_dir_fails(tmp_path, capsys):
    code = main(["train", "--params", TINY, "--dry-run",
                 "--set", f"train_input.data_dir={tmp_path / 'nope'}"])
    captured = capsys.readouterr()
    assert code == 2
    assert "memory/device" in captured.out  # the plan is still printed
    assert f"data_dir not found: {tmp_path / 'nope'}" in captured.err


# ---- misleading messages -----------------------------------------------------------------

@pytest.mark.slow
def test_data_dir_of_a_pack_output_names_its_seq_folders(tiny_data, tmp_path, capsys):
    out = tmp_path / "packed"
    assert main(["data", "pack", "--input", str(SAMPLE), "--tokenizer",
                 str(tiny_data / "tokenizer.json"), "--out", str(out), "--seq-len", "32,64",
                 "--processes", "1"]) == 0
    capsys.readouterr()
    code = main(["train", "--params", TINY, "--dry-run",
                 *_sets(tiny_overrides(tiny_data, **{"train_input.data_dir": out}))])
    err = capsys.readouterr().err
    assert code == 2
    assert "seq32/, seq64/" in err and f"{out / 'seq32'}" in err
    assert "run `lmfab data tokenize`" not in err


@pytest.mark.slow
def test_a_resumed_call_counts_its_own_steps_and_max_steps_notice(tiny_data, tmp_path, capsys):
    run = str(tmp_path / "run")
    sets = _sets(tiny_overrides(tiny_data))
    assert main(["train", "--params", TINY, "--model-dir", run, "--max-steps", "2", *sets]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps (0 -> 2)" in out
    # tiny.yaml's schedule is 500 steps long: a shorter run says what the LR does
    assert "runconfig.max_steps=2 ends the run inside the learning-rate schedule (500" in out
    assert main(["train", "--params", TINY, "--model-dir", run, "--max-steps", "3", *sets]) == 0
    assert "trained 1 steps (2 -> 3)" in capsys.readouterr().out


def test_dry_run_plans_for_this_machine(tiny_data, capsys):
    import torch

    assert main(["train", "--params", TINY, "--dry-run",
                 *_sets(tiny_overrides(tiny_data))]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "cuda: runconfig.device auto" in out
    else:
        assert "cpu: runconfig.device auto and no GPU here" in out
        assert "standard loss's logits" in out  # what the CPU run then uses
    assert main(["train", "--params", TINY, "--dry-run", "--set", "runconfig.device=cuda",
                 *_sets(tiny_overrides(tiny_data))]) == 0
    assert "fused loss's logits" in capsys.readouterr().out


def test_a_vocabulary_the_data_cannot_fill_is_a_warning(tmp_path, capsys):
    src = tmp_path / "small.txt"
    src.write_text("the cat sat on the mat. " * 40)
    out = tmp_path / "tok.json"
    assert main(["data", "tokenizer", "train", "--input", str(src), "--out", str(out),
                 "--vocab-size", "5000"]) == 0
    err = capsys.readouterr().err
    got = json.loads(out.read_text())
    n = len(got["model"]["vocab"]) + sum(1 for t in got["added_tokens"]
                                         if t["content"] not in got["model"]["vocab"])
    assert f"the vocabulary has {n} tokens, not the 5000 requested" in err


@pytest.mark.slow
def test_quickstart_weights_example_runs_on_the_sample(curated, tmp_path):
    """README's Quickstart line, as written (its old `--weights ar=1,en=1` had no Arabic)."""
    readme = (CONFIGS.parent / "README.md").read_text()
    line = next(ln for ln in readme.replace("\\\n", " ").splitlines()
                if "lmfab data tokenizer train" in ln)
    args = line.split("#")[0].split()[1:]
    args = [str(curated) if a == "runs/curated/books" else a for a in args]
    args = [str(tmp_path / "tokenizer.json") if a == "runs/tok/tokenizer.json" else a
            for a in args]
    assert main(args) == 0
    assert yaml.safe_load((tmp_path / "tokenizer.train.json").read_text())["by"] == "lang"
    shutil.rmtree(tmp_path)
