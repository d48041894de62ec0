"""The command line: `make demo`'s commands end to end, the verb table and its --help,
--version, the train/eval aliases, one spelling per flag, --dry-run, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmfab.cli import VERBS, Group, _parser, _strip_launch_flags, main

from .conftest import CONFIGS, REPO, tiny_overrides

TINY = str(CONFIGS / "train" / "tiny.yaml")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_demo_commands_run_end_to_end(tmp_path):
    """`make demo-run` (the demo without its install step), shrunk to a few seconds."""
    small = " ".join(f"--set {s}" for s in [
        "model.n_layer=2", "model.d_model=64", "model.d_ff=256", "model.vocab_size=512",
        "runconfig.max_steps=40", "runconfig.log_steps=10", "runconfig.checkpoint_steps=20",
        "runconfig.eval_steps=20", "eval_input.max_batches=2"])
    bin_dir = str(Path(sys.executable).parent)
    proc = subprocess.run(
        ["make", "-s", "demo-run", f"BIN={bin_dir}", f"RUN_DIR={tmp_path / 'run'}",
         f"DATA_DIR={tmp_path / 'data'}", f"CURATED_DIR={tmp_path / 'curated'}",
         f"SWEEP_DIR={tmp_path / 'sweep'}", f"EXPORT_DIR={tmp_path / 'exports'}",
         "TASK_LIMIT=10", "DEMO_VOCAB=512", f"DEMO_SET={small}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for stage in ("1/8 curate", "2/8 tokenize", "3/8 train", "4/8 evaluate", "5/8 generate",
                  "6/8 export", "7/8 downstream eval", "8/8 scaling"):
        assert stage in out
    assert (tmp_path / "curated" / "stats.json").is_file()
    losses = [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines()
              if line.startswith("step ")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "eval step 40" in out
    generated = out.split("5/8 generate")[1].split("== 6/8")[0]
    assert len(generated.strip()) > 20  # the prompt and sampled text
    # the export: transformers loads the folder and continues the prompt; a GGUF file is written
    assert "transformers (GPT2LMHeadModel): ROMEO." in out
    assert (tmp_path / "exports" / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "exports" / "model-q8_0.gguf").read_bytes()[:4] == b"GGUF"
    # downstream: lm-eval's table of both offline tasks, and its JSON in the run folder
    assert "lmfab_cloze" in out and "lmfab_choice" in out
    assert list((tmp_path / "run" / "eval").glob("downstream-step_*.json"))
    # the scaling stage: four points done, a law fitted to them, its files written
    assert "4/4 points done" in out and "power law over size (4 points)" in out
    fit = json.loads((tmp_path / "sweep" / "fit" / "fit.json").read_text())
    assert fit["power"]["b"] > 0 and len(fit["power"]["C"]) == 4


def test_dry_run_prints_plan(capsys, tiny_data):
    code = main(["run", "--params", TINY, "--dry-run", "--num_devices", "2",
                 "--set", f"train_input.data_dir={tiny_data}", "--set", "train_input.seq_len=32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "n_layer: 4" in out  # the resolved config
    assert "micro-batch 8 x 1 accumulation" in out  # 16 over 2 devices
    assert "parameters" in out and "FLOPs/token" in out and "memory/device" in out


def test_bad_params_exit_2_with_key_path(capsys):
    code = main(["run", "--params", TINY, "--dry-run", "--set", "model.n_layers=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.n_layers: unknown key (did you mean 'n_layer'?)" in err


def test_bad_params_exit_2_under_num_devices_too(tmp_path):
    """torchrun exits 1 whatever stopped a rank; lmfab's launcher passes the ranks' own
    code on, so a script sees 2 for bad input on 2 processes as on one."""
    cmd = [sys.executable, "-m", "lmfab", "run", "--params", TINY, "--num_devices", "2",
           "--model_dir", str(tmp_path / "r"), "--set", "runconfig.parallel.ddp_bucket_mb=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "runconfig.parallel.ddp_bucket_mb: must be > 0" in proc.stderr


def test_rank_exit_code_is_the_lowest_rank_s(tmp_path):
    from lmfab.dist.launch import rank_exit_code

    assert rank_exit_code(tmp_path, 0) == 0
    assert rank_exit_code(tmp_path, 1) == 1  # no rank left a code: torchrun's
    (tmp_path / "rank3").write_text("2")
    (tmp_path / "rank1").write_text("3")
    (tmp_path / "rank0").write_text("0")  # finished: not the run's code
    assert rank_exit_code(tmp_path, 1) == 3


def test_a_crash_after_every_rank_finished_is_a_warning_not_a_failure(tmp_path, capsys):
    """Ranks record 0 past the final barrier; torchrun's 1 from a crash in teardown then
    means nothing was lost, unless a rank did not record."""
    from lmfab.dist.launch import rank_exit_code

    (tmp_path / "rank0").write_text("0")
    assert rank_exit_code(tmp_path, 1, num_ranks=2) == 1  # rank 1 never finished
    (tmp_path / "rank1").write_text("0")
    assert rank_exit_code(tmp_path, 1, num_ranks=2) == 0
    assert "after all 2 ranks had finished" in capsys.readouterr().err
    assert rank_exit_code(tmp_path, -6, num_ranks=3) == -6  # this node runs 3: one missing


def test_run_records_its_rank_finished_for_the_launcher(tiny_data, tmp_path, monkeypatch):
    """Under `--num_devices` each rank's `lmfab run` leaves 0 in LMFAB_EXIT_DIR once its
    work is saved, before tearing down; a run that fails leaves its error code."""
    exit_dir = tmp_path / "exit"
    exit_dir.mkdir()
    monkeypatch.setenv("LMFAB_EXIT_DIR", str(exit_dir))
    monkeypatch.setenv("RANK", "0")
    args = ["run", "--params", TINY, "--mode", "train", "--model_dir", str(tmp_path / "r"),
            "--num_steps", "1"]
    for s in tiny_overrides(tiny_data):
        args += ["--set", s]
    assert main(args) == 0
    assert (exit_dir / "rank0").read_text() == "0"
    assert main([*args, "--set", "runconfig.parallel.ddp_bucket_mb=0"]) == 2
    assert (exit_dir / "rank0").read_text() == "2"
    # a run whose work fails records nothing: the launcher keeps torchrun's failure
    (exit_dir / "rank0").unlink()

    def broken(*a, **k):
        raise RuntimeError("a bug in the training step")

    monkeypatch.setattr("lmfab.train.loop.train", broken)
    with pytest.raises(RuntimeError, match="a bug in the training step"):
        main(args)
    assert not (exit_dir / "rank0").exists()


def test_run_and_generate_via_cli(tiny_data, tmp_path, capsys):
    args = ["run", "--params", TINY, "--mode", "train", "--model_dir", str(tmp_path / "r"),
            "--num_steps", "3"]
    for s in tiny_overrides(tiny_data):
        args += ["--set", s]
    assert main(args) == 0
    assert main(["generate", "--model_dir", str(tmp_path / "r"), "--prompt", "The",
                 "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "step      3/3" in out
    assert "\nThe" in out  # the prompt, then the sample


def test_strip_launch_flags():
    argv = ["run", "--params", "p.yaml", "--num_devices", "2", "--num_nodes=1", "--set", "a=1"]
    assert _strip_launch_flags(argv) == ["run", "--params", "p.yaml", "--set", "a=1"]


def test_plan_counts_logits_by_loss_kind():
    """The fused loss keeps 2 bytes per logit (bf16, overwritten by its gradient), over
    loss_chunk rows if set; the standard loss 10 (bf16, the fp32 copy, its gradient)."""
    from lmfab.config import load_config
    from lmfab.train.plan import format_plan, plan_run

    cfg = load_config(TINY)
    rows = (cfg.train_input.micro_batch_size or cfg.train_input.batch_size) * cfg.train_input.seq_len
    v = cfg.model.vocab_size
    fused = plan_run(cfg, device_type="cuda")
    assert fused.fused_loss and fused.logit_bytes == rows * v * 2
    assert "in the fused loss's logits)" in format_plan(fused)
    standard = plan_run(cfg, device_type="cpu")  # loss: auto is standard off CUDA
    assert not standard.fused_loss and standard.logit_bytes == rows * v * 10
    assert standard.activation_bytes - fused.activation_bytes == rows * v * 8
    chunked = plan_run(load_config(TINY, ["runconfig.kernels.loss=fused", "runconfig.kernels.loss_chunk=64"]),
                       device_type="cpu")
    d = cfg.model.d_model  # chunked: the output weight's fp32 gradient, one bf16 product and
    # its fp32 copy, and the hidden states' gradient, made in forward and kept for backward
    assert chunked.logit_bytes == 64 * v * 2 + v * d * 10 + rows * d * 2
    assert "in the fused loss's logits and gradients)" in format_plan(chunked)


def _verb_paths(verbs=VERBS, prefix=()):
    """Every verb and group of the table, as the argv that names it."""
    for name, entry in verbs.items():
        yield (*prefix, name)
        if isinstance(entry, Group):
            yield from _verb_paths(entry.verbs, (*prefix, name))


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lmfab {version('lmfab')}"


def test_top_level_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for verb in ("train", "eval", "run", "generate", "data", "mup", "import"):
        assert f"\n    {verb} " in out
    assert "examples:" in out and "--version" in out
    assert "``" not in out and "issue" not in out  # not the module docstring


@pytest.mark.parametrize("path", list(_verb_paths()), ids=" ".join)
def test_help_of_each_verb_explains_every_flag(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"usage: lmfab {' '.join(path)} ")
    assert "_" not in "".join(a for a in out.split() if a.startswith("--"))  # one spelling
    parser = _parser()
    for name in path:  # walk down to this verb's parser
        parser = next(a for a in parser._actions if a.dest.startswith("_")).choices[name]
    for action in parser._actions:
        assert action.help, f"lmfab {' '.join(path)}: {action.option_strings or action.dest}"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--num-devices N processes (GPUs) per node (default: 1)" in out
    assert "--master-port PORT a free TCP port on node 0 (default: 29500)" in out


def test_help_does_not_import_torch():
    """The handlers import the library; `lmfab --help` parses flags only (fast, and a module
    that moves touches one import line in lmfab.cli)."""
    code = ("import sys\nfrom lmfab.cli import main\ntry:\n    main(['train', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("False")


def test_dash_and_underscore_spellings_are_one_flag():
    dash = _parser().parse_args(["train", "--params", "p.yaml", "--model-dir", "d",
                                 "--num-steps", "3", "--num-devices=2", "--dry-run"])
    under = _parser().parse_args(["train", "--params", "p.yaml", "--model_dir", "d",
                                  "--num_steps", "3", "--num_devices=2", "--dry_run"])
    assert vars(dash) == vars(under)
    assert (dash.model_dir, dash.num_steps, dash.num_devices, dash.dry_run) == ("d", 3, 2, True)
    assert _strip_launch_flags(["train", "--num-devices", "2", "--master-port=1", "--set", "a=1"]
                               ) == ["train", "--set", "a=1"]


@pytest.mark.parametrize("argv, mode", [
    (["train"], "train"), (["eval"], "eval"), (["run"], "train"),
    (["run", "--mode", "eval"], "eval"), (["run", "--mode", "train_and_eval"], "train_and_eval"),
    (["run", "--mode", "eval_all"], "eval_all"),
])
def test_train_and_eval_are_run_modes(argv, mode, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("lmfab.train.loop.run_mode", lambda cfg, **kw: calls.append(kw))
    assert main([*argv, "--params", TINY, "--model_dir", str(tmp_path)]) == 0
    assert calls == [{"mode": mode, "model_dir": str(tmp_path), "num_steps": None,
                      "init_from": None}]


def test_train_then_eval_verbs(tiny_data, tmp_path, capsys):
    sets = [a for o in tiny_overrides(tiny_data) for a in ("--set", o)]
    run_dir = str(tmp_path / "r")
    assert main(["train", "--params", TINY, "--model-dir", run_dir, "--num-steps", "2", *sets]) == 0
    assert "step      2/" in capsys.readouterr().out
    assert main(["eval", "--params", TINY, "--model-dir", run_dir, *sets]) == 0
    assert "eval step 2" in capsys.readouterr().out
    assert (tmp_path / "r" / "eval_results.json").is_file()


def test_help_config_lists_every_key_with_its_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help-config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in ("model.n_layer", "runconfig.max_steps", "runconfig.kernels.loss_chunk",
                "runconfig.parallel.strategy", "runconfig.profile.steps"):
        assert f"  {key}: " in out, key
    assert "positions per block" in out  # a field's attribute docstring
