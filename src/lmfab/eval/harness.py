"""lmfab checkpoints inside lm-evaluation-harness: an ``LM`` registered as ``"lmfab"``.

lm-eval does the tasks, prompts, metrics and aggregation; this module only scores text with
an lmfab model. :class:`LmfabLM` follows the conventions of lm-eval's Hugging Face backend
(``lm_eval.models.huggingface.HFLM``) so that a checkpoint and its Hugging Face export score
alike:

* the context/continuation split is lm-eval's own (``TemplateLM._encode_pair``: trailing
  spaces of the context move to the continuation; the pair is encoded whole and split at
  the context's length), and an empty context is conditioned on ``<|endoftext|>``, the
  prefix token;
* a context + continuation longer than the model's ``max_seq_len`` loses tokens on the left;
  requests are sorted longest first, right-padded and scored one forward per batch;
* ``loglikelihood_rolling`` cuts the text into lm-eval's disjoint rolling windows;
* ``generate_until`` left-truncates the context to ``max_seq_len - max_gen_toks``, stops at
  the task's ``until`` strings and at ``<|endoftext|>``, and cuts the text at the first stop.

Use it through lm-eval's API (``lm_eval.simple_evaluate(model=LmfabLM(...), tasks=...)``),
by name (``simple_evaluate(model="lmfab", model_args="model_dir=runs/x")`` once this module
is imported), or through :func:`evaluate_tasks`, which also finds lmfab's offline tasks
(``lmfab_cloze``, ``lmfab_choice``; see :mod:`lmfab.eval.tasks`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tokenizers import Tokenizer
from tqdm import tqdm

from lmfab.infer.generate import Request, load_trained, run_batch
from lmfab.scaling.results import flat_metrics

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
EOT = "<|endoftext|>"
DTYPES = ("auto", "bf16", "fp32")
_log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[list[int]], *,
              max_new_tokens: int, temperature: float, stop: list[str],
              batch_size: int = 16) -> list[str]:
    """The text generated after each prompt (token ids, already cut to fit), greedy at
    temperature 0, ending at ``<|endoftext|>`` or the first ``stop`` string (the caller cuts
    at it too). The one place generation happens: infer's KV-cached batched decoding
    (:func:`lmfab.infer.generate.run_batch`), ``batch_size`` prompts at a time; each row's
    text does not depend on the others in its batch."""
    out = []
    for i in range(0, len(prompts), batch_size):
        reqs = [Request(list(ids), max_new_tokens=max_new_tokens, temperature=temperature,
                        stop=list(stop), seed=1234) for ids in prompts[i:i + batch_size]]
        out += [c.text for c in run_batch(model, tokenizer, reqs)]
    return out


@register_model("lmfab")
class LmfabLM(TemplateLM):
    """An lmfab GPT as an lm-eval language model.

    Give either ``model_dir`` (a run folder or a checkpoint folder; the newest checkpoint of
    a run is used) or an already-built ``model`` and ``tokenizer`` (in-loop evaluation).
    ``dtype``: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``; the
    log-softmax is always taken in fp32.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Tokenizer | str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"lmfab LM: dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("lmfab LM: batch_size 'auto' is not supported; give a number")
        if model is None:
            if model_dir is None:
                raise ValueError("lmfab LM: give model_dir (a run or checkpoint folder)")
            model, tokenizer, self.checkpoint = load_trained(model_dir, device or default_device())
        else:
            self.checkpoint = None
            if tokenizer is None:
                raise ValueError("lmfab LM: a model needs its tokenizer")
        if isinstance(tokenizer, str | Path):
            tokenizer = Tokenizer.from_file(str(tokenizer))
        self.model = model
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"lmfab LM: the tokenizer has no {EOT} token")
        self._eot_id = eot
        self.batch_size = max(1, int(batch_size))
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(max_length or model.cfg.max_seq_len)
        if dtype == "auto":
            dtype = "bf16" if self._device.type == "cuda" else "fp32"
        self.dtype = dtype
        self._warned_long = False

    # -- what lm-eval asks of a model -----------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "lmfab"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int] | int, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(device_type=self._device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, T, V) fp32 log-probabilities of the next token."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                logits = self.model(batch)
        finally:
            self.model.train(was_training)
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, is it the greedy continuation) for
        each (key, context tokens, continuation tokens)."""

        def longest_first(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        reorder = Collator(requests, sort_fn=longest_first)
        res = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or len(requests) < 2,
                    desc="lmfab: scoring")
        for chunk in reorder.get_batched(n=override_bs or self.batch_size):
            inps, conts = [], []
            for _, ctx, cont in chunk:
                if not ctx or not cont:
                    raise ValueError("lmfab LM: empty context or continuation after encoding")
                if len(cont) > self.max_length:  # (HF's backend stops here): its tail
                    if not self._warned_long:
                        _log.warning(f"lmfab LM: a continuation of {len(cont)} tokens is longer "
                                     f"than the model's {self.max_length} positions; only the "
                                     "last ones are scored (warned once)")
                        self._warned_long = True
                    cont = cont[-self.max_length:]
                # The input is context + continuation minus its last token, cut from the left
                # to max_length: the logits at its last len(cont) positions predict cont.
                inps.append((ctx + cont)[-(self.max_length + 1):][:-1])
                conts.append(cont)
            width = max(len(x) for x in inps)
            batch = torch.zeros(len(inps), width, dtype=torch.long)
            for i, x in enumerate(inps):
                batch[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            logprobs = self._logprobs(batch.to(self._device))
            for (key, _, _), inp, cont, lp in zip(chunk, inps, conts, logprobs, strict=True):
                lp = lp[len(inp) - len(cont): len(inp)]  # (len(cont), V)
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                score = float(lp.gather(1, target[:, None]).sum())
                res.append((score, greedy))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (score, greedy))
                pbar.update(1)
        pbar.close()
        return reorder.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in lm-eval's disjoint windows of max_length."""
        windows, counts = [], []
        for (text,) in [req.args for req in requests]:
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            these = [(None, *lm_utils.make_disjoint_window(w)) for w in rolling]
            windows += these
            counts.append(len(these))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, at = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[at: at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def longest_first(req):
            return -len(self.tok_encode(req[0])), req[0]

        reorder = Collator([req.args for req in requests], sort_fn=longest_first,
                           group_by="gen_kwargs", group_fn=lambda x: x[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        res = []
        for chunk in reorder.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise ValueError(f"lmfab LM: max_gen_toks {max_gen} must be below the model's "
                                 f"{self.max_length} positions")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen) or
                       [self.prefix_token_id] for c in contexts]
            with self._autocast():
                new = _generate(self.model, self.tokenizer, prompts, max_new_tokens=max_gen,
                                temperature=temperature, stop=until)
            for context, gen_kwargs, generated in zip(contexts, all_kwargs, new, strict=True):
                text = postprocess_generated_text(generated, until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return reorder.get_original(res)


# ---------------------------------------------------------------------------------------
# Tasks and runs


def lmfab_task_names(include_path: Sequence[str | Path] = ()) -> list[str]:
    """The offline tasks shipped with lmfab (the YAML files under lmfab/eval/tasks/), then
    those of the ``include_path`` folders (their YAML files, as lm-eval finds them)."""
    import yaml

    names = []
    files = sorted(TASKS_DIR.glob("*.yaml"))
    for folder in include_path:
        files += sorted(Path(folder).rglob("*.yaml"))
    for f in files:
        spec = yaml.safe_load(f.read_text().replace("!function", "")) or {}
        if isinstance(spec.get("task"), str):
            names.append(spec["task"])
    return names


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = ()):
    """lm-eval's task manager over lmfab's tasks and the ``include_path`` folders (task
    YAML files, lm-eval's ``--include_path``), plus lm-eval's own registry when a task is
    none of those (indexing the registry takes seconds, so it is skipped when not needed).
    Raises ValueError naming the unknown tasks and the available ones."""
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not Path(folder).is_dir():
            raise ValueError(f"{folder}: not a folder of task YAML files (--include-path, "
                             "eval_input.tasks_include_path)")
    ours = set(lmfab_task_names(include_path))
    need_registry = any(t not in ours for t in tasks)
    tm = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_path)],
                     include_defaults=need_registry)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; lmfab's "
            f"offline tasks{' and --include-path' if include_path else ''}: "
            f"{', '.join(sorted(ours))}; lm-eval's registry has {len(known)} "
            "more (`lm-eval ls tasks`), most of them need the Hugging Face Hub")
    return tm


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--tasks: give at least one task name")
    return names


def evaluate_tasks(lm: LmfabLM, tasks: Sequence[str], *, limit: int | float | None = None,
                   bootstrap_iters: int = 1000, num_fewshot: int | None = None,
                   verbosity: str = "WARNING",
                   include_path: Sequence[str | Path] = ()) -> dict:
    """lm-eval's ``simple_evaluate`` with this LM on the named tasks; its results dict."""
    from lm_eval import simple_evaluate

    tasks = parse_tasks(tasks)
    return simple_evaluate(
        model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters, task_manager=task_manager(tasks, include_path),
        log_samples=False, verbosity=verbosity,
    )


def downstream_evaluator(tasks: Sequence[str], tokenizer: str | Path, *,
                         limit: int | None = None, batch_size: int = 16,
                         dtype: str = "auto", include_path: Sequence[str | Path] = (),
                         ) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A callable for the training loop: model -> ``{"<task>/<metric>": value}``.

    Checked up front (unknown tasks fail before training starts). The random states lm-eval
    seeds (Python, NumPy, torch) are restored afterwards, so an evaluation does not change
    the training run that follows it.
    """
    tasks = parse_tasks(tasks)
    task_manager(tasks, include_path)

    def run(model: torch.nn.Module) -> dict[str, float]:
        lm = LmfabLM(model=model, tokenizer=str(tokenizer), batch_size=batch_size, dtype=dtype)
        py, npy = random.getstate(), np.random.get_state()
        devices = [lm.device] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                results = evaluate_tasks(lm, tasks, limit=limit, bootstrap_iters=0,
                                         verbosity="ERROR", include_path=include_path)
            finally:
                random.setstate(py)
                np.random.set_state(npy)
        return flat_metrics(results)

    return run


def downstream_for_config(cfg) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """The in-loop evaluator a params file asks for (``eval_input.tasks``), or None."""
    from lmfab.checkpoint import run_tokenizer

    e = cfg.eval_input
    if not e.tasks:
        return None
    if e.tasks_limit is not None and e.tasks_limit < 1:
        raise ValueError(f"eval_input.tasks_limit={e.tasks_limit}: must be at least 1, or null "
                         "for every item")
    tok = run_tokenizer(cfg)
    if tok is None:
        raise ValueError("eval_input.tasks: the run's data has no tokenizer.json to encode "
                         "the tasks' text with")
    return downstream_evaluator(e.tasks, tok, limit=e.tasks_limit, batch_size=e.tasks_batch_size,
                                include_path=e.tasks_include_path)


def eval_command(model_dir: str | Path, tasks: str | Sequence[str], *, limit: float | None = None,
                 batch_size: int = 16, device: str | None = None, dtype: str = "auto",
                 num_fewshot: int | None = None, bootstrap_iters: int = 1000,
                 output: str | Path | None = None,
                 include_path: Sequence[str | Path] = ()) -> dict:
    """``lmfab eval --tasks``: run lm-eval on a checkpoint, print its table, write the
    results JSON to ``output`` (if given) and to ``<run>/eval/downstream-step_<N>.json``."""
    from lm_eval.utils import handle_non_serializable, make_table

    from lmfab.atomic import atomic_write_text
    from lmfab.checkpoint import read_state

    names = parse_tasks(tasks)
    task_manager(names, include_path)  # unknown names fail before the model loads
    lm = LmfabLM(str(model_dir), device=device, dtype=dtype, batch_size=batch_size)
    if limit is not None and float(limit).is_integer():
        limit = int(limit)
    results = evaluate_tasks(lm, names, limit=limit, bootstrap_iters=bootstrap_iters,
                             num_fewshot=num_fewshot, include_path=include_path)
    ckpt = lm.checkpoint
    step = read_state(ckpt).get("step", 0) if (ckpt / "state.json").is_file() else 0
    results["lmfab"] = {"checkpoint": str(ckpt), "step": step, "dtype": lm.dtype,
                        "device": str(lm.device), "limit": limit,
                        "include_path": [str(p) for p in include_path]}
    print(make_table(results))
    text = json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    dest = [run_dir / "eval" / f"downstream-step_{step}.json"]
    if output:
        dest.append(Path(output))
    for path in dest:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        print(f"wrote {path}")
    return results
