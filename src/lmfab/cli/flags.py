"""The flags of every ``lmfab`` verb: one function per verb that adds them to its parser
(named in :data:`lmfab.cli.VERBS`), and the helpers they share.

Each flag has one spelling with dashes; :func:`_opt` also accepts the underscore spelling
(the Model Zoo's ``--model_dir``) and leaves it out of ``--help``.
"""

from __future__ import annotations

import argparse
import copy


class _HelpConfig(argparse.Action):
    """``--help-config``: every params key with its type, default and help, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from lmfab.config.describe import help_text

        print(help_text())
        parser.exit()


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
    p.add_argument("--against", choices=["eval_loss", "bpb"], help="predict the --metric "
                   "score in two steps: the law on this loss, then the score as a straight "
                   "line in the loss over the runs (score_map.png)")
    p.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="folder for fit.json and the plots")


def _export_hf_flags(p: argparse.ArgumentParser) -> None:
    _opt(p, "--model-dir", required=True, metavar="DIR", help="run folder (or a checkpoint folder)")
    p.add_argument("--checkpoint", metavar="STEP", help="step_N, N or a checkpoint folder "
                   "(default: the newest)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the written weights")


def _import_hf_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a local GPT-2, Llama or GPT-NeoX folder (config.json, "
                   "safetensors or weights-only .bin, tokenizer.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder to write (new or empty)")
    _opt(p, "--data-dir", metavar="DIR", help="train_input.data_dir of the written params "
         "(default: a placeholder to set before training)")


def _export_gguf_flags(p: argparse.ArgumentParser) -> None:
    _opt(p, "--model-dir", required=True, help="run folder (its newest checkpoint by default)")
    _opt(p, "--checkpoint", default=None, metavar="step_N", help="a checkpoint of the run")
    _opt(p, "--out", required=True, help="the .gguf file to write")
    _opt(p, "--type", default="f16", metavar="TYPE",
         help="tensor type: f32, f16, q8_0 or q4_0 (norms stay f32)")
    _opt(p, "--allow-split-mismatch", action="store_true",
         help="export a gpt2-marks tokenizer with llama.cpp's GPT-2 split")
