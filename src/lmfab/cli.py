"""The ``lmfab`` command line. Verbs only: parse, then call one public function per verb.

    lmfab run --params P --mode {train,eval,train_and_eval,eval_all} --model_dir D
              [--num_steps S] [--num_devices N] [--num_nodes M] [--set a.b=c ...]
              [--init_from CKPT] [--dry-run]
    lmfab data tokenize --input PATH... --out DIR --seq_len T [--vocab_size V | --tokenizer J]
    lmfab data curate RECIPE [--set a.b=c ...] [--workers N] [--executor local|ray --address A]
    lmfab data tokenizer train --input PATH... --out tokenizer.json --vocab_size V
              [--by source|lang --weights NAME=W,...] [--sample_bytes N]
    lmfab data tokenizer report --tokenizer J [J ...] --input PATH... [--out DIR]
    lmfab data pack --input PATH... --tokenizer J --out DIR --seq_len 2048,8192 [--processes N]
    lmfab generate --model_dir D --prompt TEXT
    lmfab mup coord-check --params P [--widths 128,256,512,1024] / mup transfer --proxy --target
    lmfab import modelzoo FILE -o OUT

The flags of ``run`` mirror the Cerebras Model Zoo's ``run.py`` (``--params --mode
--num_steps --model_dir``), with ``--num_devices`` / ``--num_nodes`` in place of ``--num_csx``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Flags consumed by the launcher and not passed on to the relaunched processes.
_LAUNCH_FLAGS = {"--num_devices", "--num_nodes", "--node_rank", "--master_addr", "--master_port"}


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


class _HelpConfig(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from lmfab.config.describe import help_text

        print(help_text())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmfab", description=__doc__.split("\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)

    r = verbs.add_parser("run", help="train / evaluate from one params YAML")
    r.add_argument("--params", required=True, help="params YAML")
    r.add_argument("--help-config", action=_HelpConfig, help="list every params key with its "
                   "type, default and help, then exit")
    r.add_argument("--mode", default="train", choices=["train", "eval", "train_and_eval", "eval_all"])
    r.add_argument("--model_dir", help="run directory (default: runconfig.model_dir)")
    r.add_argument("--num_steps", type=int, help="steps to run in this invocation")
    r.add_argument("--max_steps", type=int, help="total steps (overrides runconfig.max_steps)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params value, e.g. optimizer.learning_rate=3e-4")
    r.add_argument("--init_from", help="load weights only from a checkpoint or run dir")
    r.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the resolved config and the run plan, then exit")
    r.add_argument("--num_devices", type=int, default=1, help="processes per node")
    r.add_argument("--num_nodes", type=int, default=1)
    r.add_argument("--node_rank", type=int, default=0)
    r.add_argument("--master_addr")
    r.add_argument("--master_port", type=int, default=29500)

    d = verbs.add_parser("data", help="data preparation").add_subparsers(dest="data_verb", required=True)
    t = d.add_parser("tokenize", help="train or load a BPE tokenizer and pack token shards")
    t.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.zst / txt files or folders")
    t.add_argument("--out", required=True, help="output dataset directory")
    t.add_argument("--seq_len", type=int, required=True)
    t.add_argument("--vocab_size", type=int, default=8192)
    t.add_argument("--tokenizer", help="an existing tokenizer.json (skips training)")
    t.add_argument("--val_fraction", type=float, default=0.02)
    t.add_argument("--seed", type=int, default=0)
    c = d.add_parser("curate", help="clean, dedup, mix, split a corpus (the SlimPajama recipe)")
    c.add_argument("recipe", help="recipe YAML, e.g. configs/data/slimpajama.yaml")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. write.output=runs/curated")
    c.add_argument("--workers", type=int, help="local processes / Ray CPUs (default: all cores)")
    c.add_argument("--executor", default="local", choices=["local", "ray"])
    c.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    _data_token_parsers(d)

    mp = verbs.add_parser("mup", help="muP tools").add_subparsers(dest="mup_verb", required=True)
    cc = mp.add_parser("coord-check", help="activation-update scale per layer type vs width")
    cc.add_argument("--params", required=True, help="params YAML or model preset YAML")
    cc.add_argument("--widths", default="128,256,512,1024")
    cc.add_argument("--steps", type=int, default=5)
    cc.add_argument("--lr", type=float, default=6e-3, help="Adam LR at every width")
    cc.add_argument("--n_layer", type=int, help="override the depth (default: the config's)")
    cc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cc.add_argument("--out", default="runs/coord-check", help="folder for the PNG and JSON")
    tr = mp.add_parser("transfer", help="write a target config with a proxy's tuned muP HPs")
    tr.add_argument("--proxy", required=True)
    tr.add_argument("--target", required=True)
    tr.add_argument("-o", "--out", required=True)

    im = verbs.add_parser("import", help="convert other tools' configs")
    im_sub = im.add_subparsers(dest="import_verb", required=True)
    mz = im_sub.add_parser("modelzoo", help="a Cerebras Model Zoo GPT-2/3/BTLM params YAML")
    mz.add_argument("file")
    mz.add_argument("-o", "--out", required=True)

    g = verbs.add_parser("generate", help="sample text from a trained run")
    g.add_argument("--model_dir", required=True, help="run directory or checkpoint directory")
    g.add_argument("--prompt", default="")
    g.add_argument("--max_new_tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top_k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    return p


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from lmfab.dist.launch import already_launched, relaunch
    from lmfab.dist.world import world_size_from_env

    world_size = args.num_devices * args.num_nodes
    if world_size > 1 and not args.dry_run and not already_launched():
        return relaunch(
            _strip_launch_flags(argv), num_devices=args.num_devices, num_nodes=args.num_nodes,
            node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
        )
    if already_launched():
        world_size = world_size_from_env()

    from lmfab.tools.modelzoo import load_config

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"runconfig.max_steps={args.max_steps}")
    cfg = load_config(args.params, overrides, world_size=world_size)
    model_dir = args.model_dir or cfg.runconfig.model_dir
    if args.dry_run:
        import yaml

        from lmfab.config import config_to_dict
        from lmfab.train.plan import format_plan, plan_run

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
        print(f"\nrun plan ({args.mode}, model_dir={model_dir}):")
        # runconfig.device auto: plan for a GPU, the usual target of a memory question
        dev = "cuda" if cfg.runconfig.device == "auto" else cfg.runconfig.device
        print(format_plan(plan_run(cfg, world_size, device_type=dev)))
        return 0
    if not model_dir:
        raise SystemExit("lmfab run: --model_dir is required (or set runconfig.model_dir)")

    from lmfab.train.loop import run_mode

    run_mode(cfg, mode=args.mode, model_dir=model_dir, num_steps=args.num_steps,
             init_from=args.init_from)
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from lmfab.data.curate import curate, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    curate(recipe, executor=args.executor, workers=args.workers, address=args.address)
    return 0


def _data_token_parsers(d) -> None:
    """``data tokenizer train|report`` and ``data pack`` (issue 5)."""
    tk = d.add_parser("tokenizer", help="train or compare BPE tokenizers").add_subparsers(
        dest="tokenizer_verb", required=True)
    tt = tk.add_parser("train", help="byte-level BPE from a streamed, weighted sample")
    tt.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.zst / txt files or folders")
    tt.add_argument("--out", required=True, help="tokenizer.json to write (a summary goes beside it)")
    tt.add_argument("--vocab_size", type=int, required=True)
    tt.add_argument("--min_frequency", type=int, default=2)
    tt.add_argument("--eos_token", default="<|endoftext|>")
    tt.add_argument("--pad_token", default="<|pad|>", help="'' for none")
    tt.add_argument("--special_tokens", nargs="*", default=[], help="more special tokens")
    tt.add_argument("--by", default="source", choices=["source", "lang"], help="groups for --weights")
    tt.add_argument("--weights", help="sample shares per group, e.g. ar=1,en=1 or Arabic=2,*=1")
    tt.add_argument("--sample_bytes", type=float, help="sample size in bytes (default: see docs)")
    tt.add_argument("--val_fraction", type=float, default=0.0, help="hold out pack's val docs")
    tt.add_argument("--pre_tokenizer", default="gpt2", choices=["gpt2", "gpt2-marks"],
                    help="gpt2-marks keeps combining marks (Arabic diacritics) inside words")
    tt.add_argument("--seed", type=int, default=0)
    tr = tk.add_parser("report", help="fertility per source and language, side by side")
    tr.add_argument("--tokenizer", nargs="+", required=True, help="tokenizer.json files (LABEL=PATH)")
    tr.add_argument("--input", nargs="+", required=True)
    tr.add_argument("--out", help="folder for report.md, report.json and fertility.png")
    tr.add_argument("--max_bytes", type=float, default=2e6, help="sample cap per group")
    tr.add_argument("--split", default="all", choices=["all", "train", "val"])
    tr.add_argument("--val_fraction", type=float, default=0.02)
    tr.add_argument("--seed", type=int, default=0)
    pk = d.add_parser("pack", help="tokenize on all cores and pack shards at one or more MSLs")
    pk.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.zst / txt files or folders")
    pk.add_argument("--val_input", nargs="*", default=[], help="files or folders that are the val split")
    pk.add_argument("--tokenizer", required=True, help="tokenizer.json (must have the EOS token)")
    pk.add_argument("--out", required=True, help="output folder: seq<T>/ per MSL, pack.json")
    pk.add_argument("--seq_len", required=True, help="one or more, e.g. 2048,8192")
    pk.add_argument("--val_fraction", type=float, help="hash-held-out share (default 0.02)")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--processes", type=int, help="encoding processes (default: all cores)")
    pk.add_argument("--shard_tokens", type=int, default=50_000_000)
    pk.add_argument("--doc_index", action="store_true", help="write .docs.npy document starts")
    pk.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    pk.add_argument("--eos_token", default="<|endoftext|>")
    pk.add_argument("--keep_work", action="store_true", help="keep the per-file encoded ids")


def cmd_tokenizer(args: argparse.Namespace) -> int:
    import json

    if args.tokenizer_verb == "report":
        from lmfab.data.fertility import fertility_report, format_table

        report = fertility_report(
            args.tokenizer, args.input, max_bytes=int(args.max_bytes), split=args.split,
            val_fraction=args.val_fraction, seed=args.seed, out_dir=args.out,
        )
        print(format_table(report["rows"]))
        if args.out:
            print(f"wrote {args.out}/report.md, report.json, fertility.png")
        return 0
    from lmfab.data.tokenizer import train_tokenizer

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


def cmd_pack(args: argparse.Namespace) -> int:
    from lmfab.data.pack import pack_corpus

    try:
        seq_lens = [int(x) for x in args.seq_len.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"lmfab data pack: --seq_len must be integers like 2048,8192, "
                         f"got {args.seq_len!r}") from None
    pack_corpus(
        args.input, args.out, tokenizer=args.tokenizer, seq_lens=seq_lens,
        val_fraction=args.val_fraction, val_inputs=args.val_input, seed=args.seed,
        processes=args.processes, shard_tokens=args.shard_tokens, doc_index=args.doc_index,
        dtype=args.dtype, eos_token=args.eos_token, keep_work=args.keep_work,
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_verb == "curate":
        return cmd_curate(args)
    if args.data_verb in ("tokenizer", "pack"):
        return cmd_tokenizer(args) if args.data_verb == "tokenizer" else cmd_pack(args)
    from lmfab.data.tokenize import tokenize_corpus

    tokenize_corpus(
        args.input, args.out, seq_len=args.seq_len, vocab_size=args.vocab_size,
        tokenizer=args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmfab.infer.generate import generate_text

    text = generate_text(
        args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed, device=args.device,
    )
    print(text)
    return 0


def cmd_mup(args: argparse.Namespace) -> int:
    import json

    from lmfab.config.load import write_config
    from lmfab.tools.modelzoo import load_config, load_model_config

    if args.mup_verb == "transfer":
        from lmfab.tools.mutransfer import transfer

        target, changes = transfer(load_config(args.proxy), load_config(args.target))
        write_config(target, args.out)
        print("\n".join(f"  {c}" for c in changes))
        print(f"wrote {args.out}")
        return 0

    from lmfab.tools.coord_check import coord_check, format_table, plot, spread

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


def cmd_import(args: argparse.Namespace) -> int:
    from lmfab.config.load import write_config
    from lmfab.tools.modelzoo import load_config

    cfg = load_config(args.file)  # converts, prints notices, validates
    write_config(cfg, args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code:  # a rank started by `--num_devices`: tell the launcher why it stopped
        from lmfab.dist.launch import record_rank_code

        record_rank_code(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from lmfab.config import ConfigError
    from lmfab.data.shards import ShardError

    try:
        if args.verb == "run":
            return cmd_run(args, argv)
        if args.verb == "data":
            return cmd_data(args)
        if args.verb == "mup":
            return cmd_mup(args)
        if args.verb == "import":
            return cmd_import(args)
        return cmd_generate(args)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LMFAB_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"lmfab: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.OutOfMemoryError: the message carries lmfab's advice
        if type(e).__name__ != "OutOfMemoryError" or os.environ.get("LMFAB_DEBUG"):
            raise
        print(f"lmfab: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
