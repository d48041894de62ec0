"""The ``lmfab`` command line: a table from verb to the function that runs it.

``VERBS`` below is the whole command line. Each entry names a verb, the function that runs
it, the function that adds its flags (in :mod:`lmfab.cli.flags`), and the help line; a group (``data``, ``mup``,
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
import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from lmfab.cli.flags import (
    _coord_check_flags,
    _curate_flags,
    _eval_flags,
    _export_gguf_flags,
    _export_hf_flags,
    _fit_flags,
    _generate_flags,
    _Help,
    _import_hf_flags,
    _modelzoo_flags,
    _pack_flags,
    _plan_flags,
    _run_flags,
    _serve_flags,
    _sweep_flags,
    _tokenize_flags,
    _tokenizer_report_flags,
    _tokenizer_train_flags,
    _train_flags,
    _transfer_flags,
)

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


# ---------------------------------------------------------------------------------------
# Handlers (their flags are in lmfab.cli.flags)

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
            against=args.against, out_dir=args.out)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from lmfab.export.hf import describe, export_hf

    print(describe(export_hf(args.model_dir, args.out, checkpoint=args.checkpoint,
                             dtype=args.dtype)))
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from lmfab.export.hf_import import describe, import_hf

    print(describe(import_hf(args.path, args.out, data_dir=args.data_dir)))
    return 0


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
