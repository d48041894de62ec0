"""The ``lmfab`` command line: a table from verb to the function that runs it.

``VERBS`` below is the whole command line. Each entry names a verb, the function that runs
it, the function that adds its flags, and the help line; a group (``data``, ``mup``,
``import``) holds verbs of its own. Each handler is a few lines that call one public library
function. Library modules are imported inside the handlers, so ``lmfab --help`` stays fast
and a module that moves changes one import line here.

Flags have one spelling, with dashes (``--model-dir``); the underscore spelling
(``--model_dir``, the Cerebras Model Zoo's ``run.py`` style) is accepted everywhere too and
is left out of ``--help``. ``lmfab run --params P --mode {train,eval,train_and_eval,eval_all}``
is the Model Zoo's contract; ``lmfab train`` and ``lmfab eval`` are ``run --mode train`` and
``run --mode eval``.
"""

from __future__ import annotations

import argparse
import copy
import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

DESCRIPTION = """\
lmfab: an LLM fab. Curate raw text, tokenize and pack it, train a GPT on 1..N devices from
one params YAML, evaluate it and sample from it; plan compute-optimal runs, sweep sub-scale
models and fit the scaling laws that predict the big run."""

EPILOG = """\
examples:
  lmfab data curate configs/data/default.yaml --set write.output=runs/curated
  lmfab data tokenize --input runs/curated/train --out runs/data --seq-len 128
  lmfab train --params configs/train/tiny.yaml --dry-run
  lmfab train --params configs/train/tiny.yaml --model-dir runs/x --num-devices 2
  lmfab eval --params configs/train/tiny.yaml --model-dir runs/x
  lmfab eval --model-dir runs/x --tasks lmfab_cloze,lmfab_choice --limit 100
  lmfab generate --model-dir runs/x --prompt "ROMEO."
  lmfab export hf --model-dir runs/x --out exports/x-hf
  lmfab serve --model-dir runs/x --port 8000
  lmfab plan --flops 1e18 --base configs/train/gpt2-124m.yaml -o runs/plan.yaml
  lmfab sweep configs/sweeps/subscale-family.yaml --parallel 8
  lmfab fit runs/sweeps/subscale-family --predict runs/plan.yaml -o runs/fit

Run `lmfab VERB --help` for a verb's flags. Exit codes: 0 done, 2 bad input (the message
names the key or file), 3 out of device memory (the message says what to change). Set
LMFAB_DEBUG=1 for the full traceback."""


class Verb(NamedTuple):
    run: Callable[[argparse.Namespace], int]  # the handler: parsed flags in, exit code out
    flags: Callable[[argparse.ArgumentParser], None]  # adds the verb's flags
    help: str


class Group(NamedTuple):
    help: str
    verbs: dict[str, Verb | Group]


class _HelpConfig(argparse.Action):
    """``--help-config``: every params key with its type, default and help, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from lmfab.config.describe import help_text

        print(help_text())
        parser.exit()


# ---------------------------------------------------------------------------------------
# Flags


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one; only the dash spelling of each flag listed."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if d is None or d is False or d in ([], "") or d is argparse.SUPPRESS or action.required:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) > 1:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if "_" not in s]
        return super()._format_action_invocation(action)


def _opt(p: argparse.ArgumentParser, name: str, *more: str, **kw) -> None:
    """Add ``--a-b`` and accept ``--a_b`` for it as well."""
    names = [name, *more]
    if "-" in name[2:]:
        names.append("--" + name[2:].replace("-", "_"))
    if kw.get("type") is int:
        kw.setdefault("metavar", "N")
    p.add_argument(*names, **kw)


def _sets(p: argparse.ArgumentParser, what: str, example: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a {what} value, repeatable, e.g. {example}")


def _launch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices", "more than one process: lmfab relaunches itself under "
                             "torchrun (torchrun -m lmfab ... works too)")
    _opt(g, "--num-devices", type=int, default=1, help="processes (GPUs) per node")
    _opt(g, "--num-nodes", type=int, default=1, help="nodes")
    _opt(g, "--node-rank", type=int, default=0, help="this node's index, 0..num-nodes-1")
    _opt(g, "--master-addr", metavar="HOST", help="host name of node 0 (default: this host on "
         "one node)")
    _opt(g, "--master-port", type=int, default=29500, metavar="PORT", help="a free TCP port on "
         "node 0")


def _run_common(p: argparse.ArgumentParser, params_required: bool = True) -> None:
    p.add_argument("--params", required=params_required, metavar="YAML",
                   help="the params YAML (lmfab or Model Zoo format)")
    _opt(p, "--model-dir", metavar="DIR", help="run folder: checkpoints, metrics, resolved config "
         "(default: runconfig.model_dir)")
    _sets(p, "params", "optimizer.learning_rate=3e-4")
    _opt(p, "--dry-run", action="store_true",
         help="print the resolved config and the run plan (parameters, FLOPs, memory), then exit")
    _opt(p, "--help-config", action=_HelpConfig,
         help="list every params key with its type, default and help, then exit")


def _train_flags(p: argparse.ArgumentParser) -> None:
    _run_common(p)
    _opt(p, "--num-steps", type=int, help="steps to run in this invocation (default: to the end)")
    _opt(p, "--max-steps", type=int, help="total steps of the run (overrides runconfig.max_steps)")
    _opt(p, "--init-from", metavar="DIR", help="load weights only (not optimizer or step) from a checkpoint "
         "or run folder: continued pre-training; resuming is automatic and needs no flag")
    _launch_flags(p)


def _eval_flags(p: argparse.ArgumentParser) -> None:
    _run_common(p, params_required=False)
    _launch_flags(p)
    p.set_defaults(num_steps=None, max_steps=None, init_from=None)
    g = p.add_argument_group("downstream tasks", "with --tasks: lm-evaluation-harness on the "
                             "newest checkpoint of --model-dir (no --params needed); without: "
                             "held-out loss of --params")
    g.add_argument("--tasks", help="comma-separated task names: lmfab_cloze, lmfab_choice "
                   "(offline) or lm-eval's (hellaswag, lambada_openai, ...: need the Hub)")
    g.add_argument("--limit", type=float, help="items per task (a fraction below 1: a share)")
    _opt(g, "--include-path", action="append", default=[], metavar="DIR",
         help="a folder of more task YAML files (repeatable), e.g. one written by "
         "python -m lmfab.eval.tasks.build --name N --out DIR")
    _opt(g, "--batch-size", type=int, default=16, help="requests per forward pass")
    g.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    _opt(g, "--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    _opt(g, "--bootstrap-iters", type=int, default=1000,
         help="bootstrap resamples for standard errors (0: none)")
    g.add_argument("--output", metavar="JSON", help="also write lm-eval's results here")


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="train", choices=["train", "eval", "train_and_eval", "eval_all"],
                   help="train; eval the newest checkpoint; train with in-loop eval; eval "
                   "every checkpoint")
    _train_flags(p)


def _inference_flags(p: argparse.ArgumentParser) -> None:
    _opt(p, "--model-dir", required=True, metavar="DIR", help="run folder or checkpoint folder")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="weight-only quantization through torchao")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")


def _generate_flags(p: argparse.ArgumentParser) -> None:
    _inference_flags(p)
    p.add_argument("--prompt", default="", help="text to continue")
    _opt(p, "--prompts-file", metavar="FILE", help="prompts, one per line (or .jsonl with "
         "a prompt field), generated as a batch and printed as JSON lines")
    _opt(p, "--max-new-tokens", type=int, default=100, help="tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature "
                   "(0: greedy)")
    _opt(p, "--top-k", type=int, default=50, help="sample among the k most likely tokens "
         "(0: no limit)")
    _opt(p, "--top-p", type=float, help="sample among the most likely tokens that make up "
         "this probability (nucleus sampling)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text, repeatable (\\n and \\t stand for newline and tab)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _opt(p, "--batch-size", type=int, default=16, help="prompts per batch")
    _opt(p, "--on-long-prompt", default="truncate", choices=["truncate", "refuse"],
         help="a prompt longer than the context: keep its end, or stop with an error")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    _inference_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    _opt(p, "--max-batch-size", type=int, default=16,
         help="concurrent requests decoded as one batch")
    _opt(p, "--model-name", help="the model's name in the API (default: the run folder's)")


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help="jsonl / jsonl.zst / parquet / txt files or folders")


def _tokenize_flags(p: argparse.ArgumentParser) -> None:
    _inputs(p)
    p.add_argument("--out", required=True, help="output dataset folder")
    _opt(p, "--seq-len", type=int, required=True, help="tokens per training sequence")
    _opt(p, "--vocab-size", type=int, default=8192, help="BPE vocabulary size to train")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (skips training)")
    _opt(p, "--val-fraction", type=float, default=0.02, help="share of documents held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")


def _curate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. configs/data/default.yaml")
    _sets(p, "recipe", "write.output=runs/curated")
    p.add_argument("--workers", type=int, help="local processes or Ray CPUs (default: all cores)")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="run the per-document steps in a local process pool or on Ray")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")


def _tokenizer_train_flags(p: argparse.ArgumentParser) -> None:
    _inputs(p)
    p.add_argument("--out", required=True, help="tokenizer.json to write (a summary goes beside it)")
    _opt(p, "--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    _opt(p, "--min-frequency", type=int, default=2, help="fewest occurrences of a merged pair")
    _opt(p, "--eos-token", default="<|endoftext|>", help="end-of-document token")
    _opt(p, "--pad-token", default="<|pad|>", help="padding token; '' for none")
    _opt(p, "--special-tokens", nargs="*", default=[], help="more special tokens")
    p.add_argument("--by", default="source", choices=["source", "lang"],
                   help="what the groups of --weights are")
    p.add_argument("--weights", help="sample shares per group, e.g. ar=1,en=1 or Arabic=2,*=1 "
                   "(default: in proportion to the data)")
    _opt(p, "--sample-bytes", type=float, help="sample size in bytes (default: see docs/data.md)")
    _opt(p, "--val-fraction", type=float, default=0.0,
         help="leave out the documents `data pack` would hold out at this share")
    _opt(p, "--pre-tokenizer", default="gpt2", choices=["gpt2", "gpt2-marks"],
         help="gpt2-marks keeps combining marks (Arabic diacritics) inside words")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _tokenizer_report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", nargs="+", required=True,
                   help="tokenizer.json files, optionally LABEL=PATH")
    p.add_argument("--input", nargs="+", required=True, help="files or folders to measure on")
    p.add_argument("--out", help="folder for report.md, report.json and fertility.png")
    _opt(p, "--max-bytes", type=float, default=2e6, help="sample cap per group, in bytes")
    p.add_argument("--split", default="all", choices=["all", "train", "val"],
                   help="which documents of the hash split to measure")
    _opt(p, "--val-fraction", type=float, default=0.02, help="the split's held-out share")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _pack_flags(p: argparse.ArgumentParser) -> None:
    _inputs(p)
    _opt(p, "--val-input", nargs="*", default=[], help="files or folders that are the val split")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (must have the EOS token)")
    p.add_argument("--out", required=True, help="output folder: seq<T>/ per length, pack.json")
    _opt(p, "--seq-len", required=True, help="one or more sequence lengths, e.g. 2048,8192")
    _opt(p, "--val-fraction", type=float, help="hash-held-out share (default: 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--processes", type=int, help="encoding processes (default: all cores)")
    _opt(p, "--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    _opt(p, "--doc-index", action="store_true", help="also write .docs.npy document starts")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                   help="token dtype on disk; auto picks uint16 when the vocabulary fits")
    _opt(p, "--eos-token", default="<|endoftext|>", help="token placed between documents")
    _opt(p, "--keep-work", action="store_true", help="keep the per-file encoded ids")


def _coord_check_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", required=True, help="params YAML or model preset YAML with "
                   "model.mup_base_d_model")
    p.add_argument("--widths", default="128,256,512,1024", help="d_model values to compare")
    p.add_argument("--steps", type=int, default=5, help="training steps per width")
    p.add_argument("--lr", type=float, default=6e-3, help="Adam LR at every width")
    _opt(p, "--n-layer", type=int, help="override the depth (default: the config's)")
    _sets(p, "model", "n_head=4")
    p.add_argument("--out", default="runs/coord-check", help="folder for the PNG and JSON")


def _transfer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proxy", required=True, help="the tuned small-width params YAML")
    p.add_argument("--target", required=True, help="the wide params YAML to receive its HPs")
    p.add_argument("-o", "--out", required=True, help="params YAML to write")


def _modelzoo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a Model Zoo GPT-2 / GPT-3 / BTLM params YAML")
    p.add_argument("-o", "--out", required=True, help="lmfab params YAML to write")
    _sets(p, "converted params", "train_input.data_dir=runs/data/pile")


# ---------------------------------------------------------------------------------------
# Handlers


def _plan_flags(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--flops", type=float, help="training compute budget in FLOPs, e.g. 1e18")
    size.add_argument("--params", type=float, help="model size in parameters, e.g. 125e6")
    size.add_argument("--tokens", type=float, help="training tokens, e.g. 2.5e9")
    p.add_argument("--family", default="cerebras-gpt",
                   help="shape rule: a name in configs/families/ or a family YAML")
    _opt(p, "--tokens-per-param", type=float, help="default: the family's (20)")
    p.add_argument("--base", metavar="YAML", help="params YAML whose data, eval and runconfig "
                   "the plan keeps (its model, batch and schedule are replaced)")
    p.add_argument("--proxy", metavar="YAML", help="a tuned muP proxy's params: its "
                   "hyperparameters carry to the planned shape (muTransfer)")
    p.add_argument("--fit", metavar="JSON", help="fit.json (or its folder) from `lmfab fit`: "
                   "print the predicted loss")
    _opt(p, "--data-dir", metavar="DIR", help="train_input.data_dir of the plan")
    _sets(p, "planned params", "runconfig.checkpoint_steps=1000")
    p.add_argument("-o", "--out", metavar="YAML", help="params YAML to write")


def _sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", metavar="SWEEP_YAML", help="sweep file (configs/sweeps/)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these points or groups")
    p.add_argument("--parallel", type=int, metavar="K",
                   help="points at a time, as separate processes (default: the file's, or 1)")
    p.add_argument("--collect", action="store_true",
                   help="run nothing; collect the results table of what has finished")
    p.add_argument("--list", action="store_true",
                   help="write each point's params.yaml, list them with their status, run nothing")
    _sets(p, "every point's params", "train_input.data_dir=runs/data/x (applied last)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the file's `out:`)")


def _fit_metric(value: str) -> str:
    if value in ("eval_loss", "bpb") or (value.count("/") == 1 and all(value.split("/"))):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r}: expected eval_loss, bpb or a downstream TASK/METRIC such as lmfab_choice/acc")


def _fit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep folder or its results.jsonl")
    p.add_argument("--predict", metavar="YAML", help="params YAML of a target run: its loss, "
                   "predicted with an interval")
    p.add_argument("--form", default="power", choices=["power", "chinchilla", "both"],
                   help="L(C) = a·C^-b + c, L(N, D) = E + A/N^alpha + B/D^beta, or both")
    p.add_argument("--metric", default="eval_loss", type=_fit_metric,
                   help="what is fitted: eval_loss (nats/token), bpb (bits per byte), or a "
                   "downstream score TASK/METRIC of the runs' eval_input.tasks (e.g. "
                   "lmfab_choice/acc; accuracies are fitted as the error 1 - acc, perplexities as "
                   "their log; predictions are also given in the score's own units)")
    p.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="folder for fit.json and the plots")


def cmd_train(args: argparse.Namespace) -> int:
    args.mode = "train"
    return cmd_run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks:
        return cmd_eval_tasks(args)
    if not args.params:
        raise ValueError("lmfab eval: give --params (held-out loss) or --tasks (downstream)")
    args.mode = "eval"
    return cmd_run(args)


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    if not args.model_dir:
        raise ValueError("lmfab eval: --tasks needs --model-dir (a run or checkpoint folder)")
    from lmfab.eval.harness import eval_command

    eval_command(args.model_dir, args.tasks, limit=args.limit, batch_size=args.batch_size,
                 device=args.device, dtype=args.dtype, num_fewshot=args.num_fewshot,
                 bootstrap_iters=args.bootstrap_iters, output=args.output,
                 include_path=args.include_path)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    world_size = _world_size(args)
    if world_size is None:  # --num-devices / --num-nodes: run this command under torchrun
        return _relaunch(args)
    from lmfab.tools.modelzoo import load_config  # lmfab's params, or a Model Zoo file

    max_steps = [] if args.max_steps is None else [f"runconfig.max_steps={args.max_steps}"]
    cfg = load_config(args.params, [*args.overrides, *max_steps], world_size=world_size)
    model_dir = args.model_dir or cfg.runconfig.model_dir
    if args.dry_run:
        return _print_plan(cfg, args.mode, model_dir, world_size)
    if not model_dir:
        raise SystemExit(f"lmfab {args.verb}: --model-dir is required (or set runconfig.model_dir)")
    from lmfab.train.loop import run_mode

    extra = {}
    if cfg.eval_input.tasks:  # downstream tasks at each eval (lmfab.eval sits above train)
        from lmfab.eval.harness import downstream_for_config

        extra["downstream"] = downstream_for_config(cfg)
    run_mode(cfg, mode=args.mode, model_dir=model_dir, num_steps=args.num_steps,
             init_from=args.init_from, **extra)
    return 0


def _world_size(args: argparse.Namespace) -> int | None:
    """The processes of this run, or None where this process must launch them first."""
    from lmfab.dist.launch import already_launched
    from lmfab.dist.world import world_size_from_env

    if already_launched():
        return world_size_from_env()
    world_size = args.num_devices * args.num_nodes
    return None if world_size > 1 and not args.dry_run else world_size


def _relaunch(args: argparse.Namespace) -> int:
    from lmfab.dist.launch import relaunch

    return relaunch(_strip_launch_flags(args.argv), num_devices=args.num_devices,
                    num_nodes=args.num_nodes, node_rank=args.node_rank,
                    master_addr=args.master_addr, master_port=args.master_port)


def _print_plan(cfg, mode: str, model_dir: str | None, world_size: int) -> int:
    import yaml

    from lmfab.config import config_to_dict
    from lmfab.train.data import check_data, trained_tokenizer
    from lmfab.train.plan import config_notes, format_plan, plan_run, planned_device

    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    dev, why = planned_device(cfg.runconfig)  # the device this machine's run would use
    print(f"\nrun plan ({mode}, model_dir={model_dir}, {dev}: {why}):")
    print(format_plan(plan_run(cfg, world_size, device_type=dev)))
    for note in config_notes(cfg, dev):
        print(f"note: {note}")
    problems = check_data(cfg, trained_tokenizer(model_dir) if model_dir else None)
    for problem in problems:
        print(f"lmfab: error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmfab.infer.generate import generate_cli, read_prompts

    prompts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    generate_cli(args.model_dir, prompts, device=args.device, quantize=args.quantize,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, stop=stop, seed=args.seed,
                 batch_size=args.batch_size, on_long_prompt=args.on_long_prompt)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lmfab.serve.app import serve

    serve(args.model_dir, host=args.host, port=args.port, device=args.device,
          quantize=args.quantize, max_batch_size=args.max_batch_size, model_name=args.model_name)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from lmfab.data.prep.tokenize_corpus import tokenize_corpus

    tokenize_corpus(args.input, args.out, seq_len=args.seq_len, vocab_size=args.vocab_size,
                    tokenizer=args.tokenizer, val_fraction=args.val_fraction, seed=args.seed)
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from lmfab.data.curate import curate, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    curate(recipe, executor=args.executor, workers=args.workers, address=args.address)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import json

    from lmfab.data.prep.bpe_train import train_tokenizer

    specials = [args.eos_token, *([args.pad_token] if args.pad_token else []), *args.special_tokens]
    summary = train_tokenizer(
        args.input, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
        special_tokens=specials, by=args.by, weights=args.weights,
        sample_bytes=int(args.sample_bytes) if args.sample_bytes else None,
        val_fraction=args.val_fraction, seed=args.seed, pre_tokenizer=args.pre_tokenizer,
    )
    side = Path(args.out).with_suffix(".train.json")
    side.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for g, v in summary["groups"].items():
        print(f"{g:>16}: {v['bytes'] / 1e6:9.2f} MB available, rate {v['rate']:.3f}, "
              f"{v['sampled_bytes'] / 1e6:9.2f} MB sampled")
    print(f"wrote {args.out} (vocab {summary['vocab_size']}) and {side}")
    return 0


def cmd_tokenizer_report(args: argparse.Namespace) -> int:
    from lmfab.data.prep.fertility import fertility_report, format_table

    report = fertility_report(args.tokenizer, args.input, max_bytes=int(args.max_bytes),
                              split=args.split, val_fraction=args.val_fraction, seed=args.seed,
                              out_dir=args.out)
    print(format_table(report["rows"]))
    if args.out:
        print(f"wrote {args.out}/report.md, report.json, fertility.png")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from lmfab.data.prep.pack import pack_corpus

    try:
        seq_lens = [int(x) for x in args.seq_len.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"lmfab data pack: --seq-len must be integers like 2048,8192, "
                         f"got {args.seq_len!r}") from None
    pack_corpus(
        args.input, args.out, tokenizer=args.tokenizer, seq_lens=seq_lens,
        val_fraction=args.val_fraction, val_inputs=args.val_input, seed=args.seed,
        processes=args.processes, shard_tokens=args.shard_tokens, doc_index=args.doc_index,
        dtype=args.dtype, eos_token=args.eos_token, keep_work=args.keep_work,
    )
    return 0


def cmd_coord_check(args: argparse.Namespace) -> int:
    import json

    from lmfab.tools.coord_check import coord_check, format_table, plot, spread
    from lmfab.tools.modelzoo import load_model_config

    overrides = list(args.overrides) + ([f"n_layer={args.n_layer}"] if args.n_layer else [])
    cfg = load_model_config(args.params, overrides)
    if cfg.mup_base_d_model is None:
        raise SystemExit(f"lmfab mup coord-check: {args.params} has no model.mup_base_d_model")
    widths = [int(w) for w in args.widths.split(",")]
    results = {}
    for label, mup in (("muP", True), ("SP", False)):
        print(f"coord check, {label}: widths {widths}, {args.steps} steps", flush=True)
        results[label] = coord_check(cfg, widths, steps=args.steps, lr=args.lr, mup=mup)
        print(format_table(results[label], label))
    out = Path(args.out)
    png = plot(results, out / "coord_check.png")
    (out / "coord_check.json").write_text(json.dumps(
        {k: {str(w): c for w, c in r.items()} for k, r in results.items()}, indent=1))
    worst = max(spread(results["muP"], k) for k in results["muP"][widths[0]])
    print(f"muP worst spread over widths: {worst:.2f}x; SP logits spread: "
          f"{spread(results['SP'], 'logits'):.2f}x; plot: {png}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from lmfab.config.load import write_config
    from lmfab.tools.modelzoo import load_config
    from lmfab.tools.mutransfer import transfer

    target, changes = transfer(load_config(args.proxy), load_config(args.target))
    write_config(target, args.out)
    print("\n".join(f"  {c}" for c in changes))
    print(f"wrote {args.out}")
    return 0


def cmd_import_modelzoo(args: argparse.Namespace) -> int:
    from lmfab.config.load import write_config
    from lmfab.tools.modelzoo import load_config

    # converts, prints notices, validates
    write_config(load_config(args.file, args.overrides), args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from lmfab.scaling.plan import plan_command

    transfer = None
    if args.proxy:  # muTransfer from a tuned proxy (a tool: it sits above scaling)
        from lmfab.tools.modelzoo import load_config
        from lmfab.tools.mutransfer import transfer as mutransfer

        transfer = functools.partial(mutransfer, load_config(args.proxy))
    plan_command(family=args.family, flops=args.flops, params=args.params, tokens=args.tokens,
                 tokens_per_param=args.tokens_per_param, base=args.base, fit=args.fit,
                 data_dir=args.data_dir, sets=args.overrides, out=args.out, transfer=transfer)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lmfab.scaling.sweep import format_results, list_points, run_sweep

    where = {"sets": args.overrides, "out": args.out}
    if args.list:
        print(list_points(args.sweep, args.only, **where))
        return 0
    rows = run_sweep(args.sweep, only=args.only, parallel=args.parallel, collect_only=args.collect,
                     **where)
    print(format_results(rows))
    return 0 if all(r["status"] == "done" for r in rows) else 1


def cmd_fit(args: argparse.Namespace) -> int:
    from lmfab.scaling.fit import run_fit

    run_fit(args.sweep_dir, form=args.form, predict=args.predict, loss_key=args.metric,
            out_dir=args.out)
    return 0


def _export_hf_flags(p: argparse.ArgumentParser) -> None:
    _opt(p, "--model-dir", required=True, metavar="DIR", help="run folder (or a checkpoint folder)")
    p.add_argument("--checkpoint", metavar="STEP", help="step_N, N or a checkpoint folder "
                   "(default: the newest)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the written weights")


def cmd_export_hf(args: argparse.Namespace) -> int:
    from lmfab.export.hf import describe, export_hf

    print(describe(export_hf(args.model_dir, args.out, checkpoint=args.checkpoint,
                             dtype=args.dtype)))
    return 0


def _import_hf_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a local GPT-2, Llama or GPT-NeoX folder (config.json, "
                   "safetensors or weights-only .bin, tokenizer.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder to write (new or empty)")
    _opt(p, "--data-dir", metavar="DIR", help="train_input.data_dir of the written params "
         "(default: a placeholder to set before training)")


def cmd_import_hf(args: argparse.Namespace) -> int:
    from lmfab.export.hf_import import describe, import_hf

    print(describe(import_hf(args.path, args.out, data_dir=args.data_dir)))
    return 0


def _export_gguf_flags(p: argparse.ArgumentParser) -> None:
    _opt(p, "--model-dir", required=True, help="run folder (its newest checkpoint by default)")
    _opt(p, "--checkpoint", default=None, metavar="step_N", help="a checkpoint of the run")
    _opt(p, "--out", required=True, help="the .gguf file to write")
    _opt(p, "--type", default="f16", metavar="TYPE",
         help="tensor type: f32, f16, q8_0 or q4_0 (norms stay f32)")
    _opt(p, "--allow-split-mismatch", action="store_true",
         help="export a gpt2-marks tokenizer with llama.cpp's GPT-2 split")


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from lmfab.export.gguf import export_gguf

    e = export_gguf(args.model_dir, args.out, checkpoint=args.checkpoint, qtype=args.type,
                    allow_split_mismatch=args.allow_split_mismatch)
    print(f"wrote {e.path} ({e.arch}, {e.type}, {e.n_tensors} tensors)")
    return 0


# ---------------------------------------------------------------------------------------
# The table.

VERBS: dict[str, Verb | Group] = {
    "train": Verb(cmd_train, _train_flags, "train from one params YAML (= run --mode train)"),
    "eval": Verb(cmd_eval, _eval_flags,
                 "evaluate a run's newest checkpoint: held-out loss (= run --mode eval), or "
                 "downstream tasks through lm-evaluation-harness (--tasks)"),
    "run": Verb(cmd_run, _run_flags, "train and/or evaluate, the Model Zoo's run.py: --mode "
                "train | eval | train_and_eval | eval_all"),
    "generate": Verb(cmd_generate, _generate_flags, "sample text from a trained run"),
    "serve": Verb(cmd_serve, _serve_flags, "an OpenAI-compatible HTTP server for a trained run"),
    "plan": Verb(cmd_plan, _plan_flags, "a compute-optimal params YAML from a budget "
                 "(FLOPs, parameters or tokens) and a family rule"),
    "sweep": Verb(cmd_sweep, _sweep_flags, "expand a sweep YAML into runs, run them "
                  "(resumable, several at a time), collect a results table"),
    "fit": Verb(cmd_fit, _fit_flags, "fit scaling laws to a sweep's results; predict a "
                "target run's loss"),
    "data": Group("prepare data: curate, tokenize, train tokenizers, pack", {
        "curate": Verb(cmd_curate, _curate_flags,
                       "clean, dedup, mix and split a corpus (the SlimPajama recipe)"),
        "tokenize": Verb(cmd_tokenize, _tokenize_flags,
                         "train or load a BPE tokenizer and pack token shards, in one step"),
        "tokenizer": Group("train or compare BPE tokenizers", {
            "train": Verb(cmd_tokenizer_train, _tokenizer_train_flags,
                          "byte-level BPE from a streamed, weighted sample"),
            "report": Verb(cmd_tokenizer_report, _tokenizer_report_flags,
                           "fertility per source and language, tokenizers side by side"),
        }),
        "pack": Verb(cmd_pack, _pack_flags,
                     "tokenize on all cores and pack shards at one or more sequence lengths"),
    }),
    "mup": Group("muP tools", {
        "coord-check": Verb(cmd_coord_check, _coord_check_flags,
                            "activation-update scale per layer type against width, muP and SP"),
        "transfer": Verb(cmd_transfer, _transfer_flags,
                         "write a target params YAML with a proxy's tuned muP HPs"),
    }),
    "import": Group("bring in other tools' configs and models", {
        "modelzoo": Verb(cmd_import_modelzoo, _modelzoo_flags,
                         "a Cerebras Model Zoo GPT-2 / GPT-3 / BTLM params YAML"),
        "hf": Verb(cmd_import_hf, _import_hf_flags,
                   "a local Hugging Face GPT-2 / Llama / GPT-NeoX model into a run folder"),
    }),
    "export": Group("models out of lmfab", {
        "gguf": Verb(cmd_export_gguf, _export_gguf_flags,
                     "a GGUF file for llama.cpp (f32, f16, q8_0, q4_0)"),
        "hf": Verb(cmd_export_hf, _export_hf_flags,
                   "a folder transformers loads: config, safetensors, tokenizer, model card"),
    }),
}


def _add_verbs(parser: argparse.ArgumentParser, verbs: dict[str, Verb | Group], path: str) -> None:
    sub = parser.add_subparsers(dest=f"_{path or 'verb'}", metavar="VERB", required=True,
                                help="one of:")
    for name, entry in verbs.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help, formatter_class=_Help)
        if isinstance(entry, Group):
            _add_verbs(p, entry.verbs, f"{path}_{name}")
        else:
            entry.flags(p)
            p.set_defaults(handler=entry.run, verb=f"{path} {name}".replace("_", " ").strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmfab", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_Help)
    from lmfab import __version__  # importlib.metadata's, from pyproject.toml

    p.add_argument("--version", action="version", version=f"lmfab {__version__}")
    _add_verbs(p, VERBS, "")
    return p


# Flags consumed by the launcher and not passed on to the relaunched processes.
_LAUNCH_FLAGS = {f"--{name}" for dashed in ("num-devices", "num-nodes", "node-rank", "master-addr",
                                             "master-port")
                 for name in (dashed, dashed.replace("-", "_"))}


def _strip_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code:  # a rank started by `--num-devices`: tell the launcher why it stopped
        from lmfab.dist.launch import record_rank_code

        record_rank_code(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    from lmfab.config import ConfigError
    from lmfab.data.shards import ShardError

    try:
        try:
            return args.handler(args)
        except OSError as e:  # the machine failed a write (disk full, I/O): exit 1, not 2
            if e.errno in _MACHINE_ERRNOS:
                return _run_stopped(e)
            raise
    except (ConfigError, ShardError, OSError, ValueError) as e:
        if os.environ.get("LMFAB_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"lmfab: error: {_os_message(e) if type(e) is not FileNotFoundError else e}",
              file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.OutOfMemoryError: the message carries lmfab's advice
        if type(e).__name__ != "OutOfMemoryError":
            return _run_stopped(e)
        if os.environ.get("LMFAB_DEBUG"):
            raise
        print(f"lmfab: error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # stops of a training run: a signal, a non-finite step, the disk
        return _run_stopped(e)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop's step boundaries
        print("lmfab: interrupted", file=sys.stderr)
        return 130


# A write that failed because of the machine, not the input: disk full, quota, I/O error.
_MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


def _run_stopped(e: Exception) -> int:
    """Exit codes (docs/decisions.md): 128 + the signal for a stop on SIGINT / SIGTERM (the
    loop printed where it saved), 4 for a non-finite loss, 5 for a rank that lost its peers,
    1 for a failed write (disk full, permissions); anything else is a bug and keeps its
    traceback."""
    from lmfab.dist.launch import PEER_LOST
    from lmfab.dist.world import PeerLost
    from lmfab.train.interrupt import Interrupted
    from lmfab.train.nonfinite import NonFiniteError

    if isinstance(e, Interrupted):
        return e.code
    if os.environ.get("LMFAB_DEBUG") or not isinstance(e, NonFiniteError | OSError | PeerLost):
        raise e
    print(f"lmfab: error: {e}", file=sys.stderr)
    return 4 if isinstance(e, NonFiniteError) else PEER_LOST if isinstance(e, PeerLost) else 1


def _os_message(e: Exception) -> str:
    """An OSError as ``path: reason`` (a folder under a file, no permission, disk full)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        extra = f" -> {e.filename2}" if e.filename2 else ""
        return f"{e.filename}{extra}: {e.strerror}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
