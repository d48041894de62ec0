"""A full disk and folders that cannot be written: one clear error, before training starts
(the ``model_dir`` probe) or at the save (ENOSPC injected inside the checkpoint write, after
the weights file), nothing half-written, the earlier checkpoints intact and resumable."""

from __future__ import annotations

import os

import pytest

from lmfab import checkpoint as ckpt
from lmfab.cli import main

from ..conftest import REPO, tiny_overrides
from .conftest import TINY, assert_checkpoints_sound


def _argv(model_dir, data, **sets):
    argv = ["run", "--params", str(TINY), "--mode", "train", "--model_dir", str(model_dir)]
    for s in tiny_overrides(data, **sets):
        argv += ["--set", s]
    return argv


def test_model_dir_under_a_file_fails_before_training(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(_argv(tmp_path / "file" / "run", tiny_data, **{"runconfig.max_steps": 2})) == 2
    out = capsys.readouterr()
    assert "cannot write the run there" in out.err and str(tmp_path / "file") in out.err
    assert "training steps" not in out.out and "Traceback" not in out.err


def test_read_only_model_dir_fails_before_training(tiny_data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user writes into read-only folders (root): permissions untestable")
        assert main(_argv(ro / "run", tiny_data, **{"runconfig.max_steps": 2})) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert "cannot write the run there" in err and "Permission denied" in err


def test_disk_full_at_a_save_keeps_the_earlier_checkpoint(tiny_data, tmp_path, monkeypatch,
                                                          capsys):
    run = tmp_path / "run"
    argv = _argv(run, tiny_data, **{"runconfig.max_steps": 6, "runconfig.checkpoint_steps": 2})
    monkeypatch.setenv("LMFAB_FAULT", "checkpoint.write[step=4]:enospc")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4" in err and "No space left" in err
    assert "step_00000002" in err and "Traceback" not in err
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]
    assert not list(ckpt.checkpoint_root(run).glob(".step_*"))  # the partial step is gone
    assert_checkpoints_sound(run)
    monkeypatch.delenv("LMFAB_FAULT")
    assert main(argv) == 0  # space freed: the run resumes from step 2 and finishes
    assert "resumed from" in capsys.readouterr().out
    assert ckpt.latest_checkpoint(run).name == "step_00000006"


@pytest.mark.parametrize("verb", ["curate", "pack", "tokenizer", "tokenize"])
def test_data_output_under_a_file_is_one_clear_error(verb, tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    sample = str(REPO / "data" / "sample")
    argv = {
        "curate": ["data", "curate", str(REPO / "configs/data/default.yaml"), "--workers", "1",
                   "--set", f"read.inputs=[{sample}]", "--set", f"write.output={out}"],
        "pack": ["data", "pack", "--input", sample, "--tokenizer",
                 str(tiny_data / "tokenizer.json"), "--out", str(out), "--seq-len", "32",
                 "--processes", "1"],
        "tokenizer": ["data", "tokenizer", "train", "--input", sample, "--out",
                      str(out / "tokenizer.json"), "--vocab-size", "300"],
        "tokenize": ["data", "tokenize", "--input", sample, "--out", str(out), "--seq-len",
                     "32", "--tokenizer", str(tiny_data / "tokenizer.json")],
    }[verb]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "lmfab: error:" in err and str(tmp_path / "file") in err
    assert "Traceback" not in err


def test_a_kill_while_pruning_never_leaves_a_listed_half(tiny_data, tmp_path, monkeypatch):
    """keep_checkpoints deletes the oldest checkpoint; a process killed half-way through the
    deletion (simulated: the deletion removes one file and stops) must not leave an
    incomplete folder among the listed checkpoints."""
    from lmfab.config import load_config
    from lmfab.train.loop import run_mode

    from .conftest import CHECKPOINT_FILES

    real = ckpt.shutil.rmtree

    def half_delete(path, ignore_errors=False):
        if (path / "model.safetensors").is_file():
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt  # stands in for the kill
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", half_delete)
    sets = tiny_overrides(tiny_data, **{"runconfig.max_steps": 4, "runconfig.checkpoint_steps": 1,
                                        "runconfig.keep_checkpoints": 1})
    with pytest.raises(KeyboardInterrupt):
        run_mode(load_config(TINY, sets), mode="train", model_dir=tmp_path / "run")
    listed = ckpt.list_checkpoints(tmp_path / "run")
    assert listed and all((p / f).is_file() for p in listed for f in CHECKPOINT_FILES)
