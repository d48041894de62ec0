"""Text generation from a trained run: KV-cached batched decoding, sampling, stop rules.

:func:`generate` continues a batch of prompts and returns the texts; :func:`run_batch` runs
one :class:`DecodeBatch`, the engine under it (and, with requests joining between steps,
under ``lmfab serve``): one prefill of the left-padded prompts
into a preallocated :class:`~lmfab.infer.cache.KVCache`, then one-token decode steps, each
row with its own sampling settings (greedy, temperature, top-k, top-p, a seed), its own
stop strings and stop tokens, and an optional callback that receives text as soon as it is
complete UTF-8 and cannot be the start of a stop string (streaming). On CUDA the decode step
is compiled (``torch.compile``, CUDA graphs); elsewhere it runs eagerly.

:func:`sample` is the reference path without a cache: it recomputes the whole context for
every token. The tests check that greedy decoding with the cache gives the same tokens.

A prompt longer than the model's context is cut from the left (``on_long_prompt="truncate"``)
or refused with a :class:`PromptTooLong` error (``"refuse"``); generation ends at the end of
the context (finish reason ``"length"``).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmfab.checkpoint import find_tokenizer, load_weights, read_run_config, resolve_checkpoint
from lmfab.infer.cache import KVCache
from lmfab.models.gpt import GPT, build_model, materialize

EOS = "<|endoftext|>"


def load_trained(model_dir: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, Path]:
    """Model (eval mode) and tokenizer of a run directory or a checkpoint directory."""
    ckpt = resolve_checkpoint(model_dir)
    cfg = read_run_config(ckpt)
    model = materialize(build_model(cfg.model), device)
    load_weights(model, ckpt)
    tok_file = find_tokenizer(ckpt, cfg)
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{tok_file}: not a Hugging Face tokenizer.json ({err})") from None
    return model.eval(), tok, ckpt


def resolve_device(device: str) -> str:
    """``auto``: CUDA when present, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here (use cpu or auto)")
    return device


# ---- the reference path ---------------------------------------------------------------------

@torch.no_grad()
def sample(
    model: GPT,
    idx: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` sampled tokens to ``idx`` (B, T), recomputing the
    whole (cropped) context for every token: the reference the cached path is checked on."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.cfg.max_seq_len :])[:, -1, :].float()  # (B, V)
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
    return idx


# ---- sampling ---------------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k (``top_k[b]`` <= 0: no limit) and
    outside its nucleus: the smallest set of most likely tokens whose probability reaches
    ``top_p[b]`` (1.0: no limit). logits (B, V) float; returns a new tensor."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)[:, None]
    drop = rank >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop |= (before >= top_p[:, None]) & (rank > 0)  # the most likely token always stays
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, generators: Sequence[torch.Generator | None], *,
                hot: list[int] | None = None) -> torch.Tensor:
    """One token per row (B,): the argmax where ``temperature[b]`` is 0, else a draw from the
    filtered, tempered distribution with row b's own generator. ``hot``: the rows with a
    temperature above 0, when the caller knows them (saves a device sync per step)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if hot is None:
        hot = (temperature > 0).nonzero().flatten().tolist()
    if not hot:
        return greedy
    rows = torch.tensor(hot, device=logits.device)
    scaled = logits[rows] / temperature[rows, None]
    probs = torch.softmax(filter_logits(scaled, top_k[rows], top_p[rows]), dim=-1)
    out = greedy.clone()
    for j, b in enumerate(hot):
        out[b] = torch.multinomial(probs[j], 1, generator=generators[b])[0]
    return out


# ---- requests and the engine ------------------------------------------------------------------

class TokenIdsOnly:
    """A stand-in tokenizer for token-level runs of :func:`run_batch` / :class:`DecodeBatch`
    (benchmarks, tests of ids): no end-of-text token, and no text."""

    def token_to_id(self, _token):
        return None

    def decode(self, _ids):
        return ""


class PromptTooLong(ValueError):
    """A prompt longer than the model's context, refused (``on_long_prompt="refuse"``)."""


@dataclass
class Request:
    """One prompt and how to continue it. ``stop_token_ids`` None: the tokenizer's
    end-of-text token. ``seed`` fixes the draws of this row alone, whatever else is in the
    batch. ``max_new_tokens`` is cut to what fits in the context."""

    prompt_ids: list[int]
    max_new_tokens: int = 100
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    seed: int = 0
    on_text: Callable[[str], None] | None = None  # receives each new piece of text
    cancelled: Callable[[], bool] | None = None  # True: stop this row (client went away)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop string or token), "length", or "cancelled"
    prompt_tokens: int
    truncated: bool = False  # the prompt was cut from the left to fit the context


def encode_prompt(tokenizer: Tokenizer, text: str, context: int, *,
                  on_long_prompt: str = "truncate") -> tuple[list[int], bool]:
    """Token ids of ``text`` (an empty prompt: the end-of-text token) and whether they were
    cut to the last ``context - 1`` tokens (one slot is left to generate into)."""
    ids = tokenizer.encode(text).ids
    if not ids:
        eos = tokenizer.token_to_id(EOS)
        ids = [eos if eos is not None else 0]
    return fit_prompt(ids, context, on_long_prompt=on_long_prompt)


def fit_prompt(ids: list[int], context: int, *, on_long_prompt: str = "truncate"):
    limit = context - 1
    if len(ids) <= limit:
        return list(ids), False
    if on_long_prompt == "refuse":
        raise PromptTooLong(f"the prompt is {len(ids)} tokens and the model's context is "
                            f"{context} (at most {limit} prompt tokens leave room for one new "
                            "token); shorten it or allow truncation")
    if on_long_prompt != "truncate":
        raise ValueError(f"on_long_prompt={on_long_prompt!r}: expected truncate or refuse")
    return list(ids[-limit:]), True


def _cache_length(need: int, context: int) -> int:
    """Cache slots for ``need`` tokens: rounded up to a multiple of 64 so that a compiled
    step is reused across nearby lengths, never past the context."""
    return min(context, -(-need // 64) * 64)


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {shape: KVCache}
_CACHES_PER_MODEL = 4


def _cache_for(model: GPT, batch: int, length: int, device, dtype) -> KVCache:
    """A cache of this shape, reused from an earlier batch of the same model when there is
    one: its buffers keep their addresses, so a compiled step (and its CUDA graph) is
    reused instead of compiled again. The few most recent shapes are kept; threads never
    share one."""
    pool = _CACHES.setdefault(model, {})
    key = (batch, length, str(device), dtype, threading.get_ident())
    cache = pool.pop(key, None) or KVCache(model.cfg, batch, length, device=device, dtype=dtype)
    pool[key] = cache  # most recent last
    while len(pool) > _CACHES_PER_MODEL:
        pool.pop(next(iter(pool)))
    return cache


def _step(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed ``idx`` (B, T) after the cached tokens; the last position's logits (B, V)."""
    h = model.hidden_states(idx, cache=cache)
    return model.logits(h[:, -1])


@functools.cache
def _compiled_step(mode: str):
    return torch.compile(_step, mode=mode, fullgraph=True, dynamic=False)


def compile_mode(device: torch.device, compile: bool | str | None) -> str | None:
    """The torch.compile mode of the decode step, or None to run it eagerly. ``compile``
    None: ``reduce-overhead`` (CUDA graphs) on CUDA, eager elsewhere (on a CPU the compile
    time outweighs the gain for the short generations of tests and demos); True: that
    mode anywhere; a string: that mode."""
    if compile is None:
        compile = device.type == "cuda"
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    return compile or None


_COMPILE_FAILED: set[str] = set()  # modes whose compilation failed in this process


def _guarded(compiled, mode: str):
    """The compiled step; should compiling fail (an unsupported op or backend), a warning
    and the eager step for the rest of the process. Its outputs are cloned: a CUDA graph
    reuses its output memory at the next replay."""

    def step(m, x, c):
        if mode not in _COMPILE_FAILED:
            try:
                return compiled(m, x, c).clone()
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001  (compilation errors have many types)
                import warnings

                _COMPILE_FAILED.add(mode)
                warnings.warn(f"the compiled decode step (mode={mode!r}) failed, decoding "
                              f"eagerly instead: {type(e).__name__}: {e}", stacklevel=2)
        return _step(m, x, c)

    return step


class _Text:
    """Incremental detokenisation of one row: text is released when it is complete UTF-8
    (byte-level BPE splits characters across tokens: an incomplete one decodes to U+FFFD)
    and cannot be the beginning of a stop string. Without stop strings and without a
    listener (``lazy``) the text is decoded once, at the end."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], *, lazy: bool = False):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.lazy = lazy and not self.stop
        self.ids: list[int] = []
        self.sent = 0  # characters already released
        self._text = ""
        self._stale = False

    @property
    def text(self) -> str:
        if self._stale:
            self._text, self._stale = self.tok.decode(self.ids), False
        return self._text

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; the newly releasable text and whether a stop string was hit."""
        self.ids.append(token)
        if self.lazy:
            self._stale = True
            return "", False
        text = self._text = self.tok.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop)
                if i >= 0]
        if hits:
            self._text = text[:min(hits)]
            return self._release(len(self._text)), True
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        for s in self.stop:  # hold back a suffix that may grow into a stop string
            for n in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[end - n:end] == s[:n]:
                    end -= n
                    break
        return self._release(end), False

    def _release(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def flush(self) -> str:
        return self._release(len(self.text))


def batch_bucket(n: int) -> int:
    """The batch size a compiled decode runs ``n`` rows at: the next power of two, so that
    batches of every size from 1 to 16 capture 5 CUDA graphs, not 16.
    Decode at these sizes reads weights, not activations: the extra rows cost little."""
    return 1 << (n - 1).bit_length()


def _cache_row_bytes(cfg, length: int, itemsize: int = 2) -> int:
    """Bytes of one row of a KV cache ``length`` slots long (keys and values, every layer)."""
    return 2 * cfg.n_layer * cfg.kv_heads * cfg.d_head * length * itemsize


def spare_rows(wanted: int, needed: int, row_bytes: int, free_bytes: int,
               share: float = 0.5) -> int:
    """Rows for a batch that needs ``needed`` and would like ``wanted``: the spare ones only
    as far as ``share`` of the free device memory holds them (a 3B model's 16 rows of a
    4K-slot cache are 21 GB), never fewer than ``needed``."""
    fit = int(share * free_bytes // max(row_bytes, 1))
    return max(needed, min(wanted, fit))


class DecodeBatch:
    """A batch of requests decoding together, one step at a time, that can take in new
    requests while it runs (continuous batching).

    Rows share cache slot numbers. A request joining at slot ``s`` is prefilled alone and
    its keys and values copied into a free row at slots ``s - n .. s - 1`` (``n`` prompt
    tokens), the row's padding set to ``s - n``: its positions are then those of its prompt
    alone, as for the rows that started the batch. A row is free when its request finished
    (or it was an idle row of the padded batch); it joins if its prompt fits before the
    current slot and the tokens it asks for fit after it (``headroom`` makes the cache that
    much longer than the starting rows need, for joiners; 1: none; ``rows``: at least that
    many rows, the spare ones free from the start). The buffers never move, so a captured
    CUDA graph serves the whole batch.

    ``overlap`` (default: on CUDA) queues each decode step on the GPU before the host reads
    the sampled tokens back and does its per-row work (stop checks, detokenisation), so the
    GPU does not wait on Python between steps; the step after a stop token is then computed
    and dropped. The outputs are the same either way (tested).
    """

    @torch.no_grad()
    def __init__(self, model: GPT, tokenizer: Tokenizer, requests: Sequence[Request], *,
                 compile: bool | str | None = None, pad_batch: bool | None = None,
                 headroom: float = 1.0, rows: int | None = None,
                 overlap: bool | None = None):
        if not requests:
            raise ValueError("a batch needs at least one request")
        self.model, self.tokenizer = model, tokenizer
        self.device = device = next(model.parameters()).device
        self.context = context = model.cfg.max_seq_len
        lengths = [len(r.prompt_ids) for r in requests]
        if min(lengths) < 1 or max(lengths) >= context:
            raise ValueError("every prompt needs 1 to context - 1 tokens (fit_prompt fits them)")
        self.eos = eos = tokenizer.token_to_id(EOS)
        self.fill = eos if eos is not None else 0
        mode = compile_mode(device, compile)
        n_real = len(requests)
        base = (batch_bucket(n_real) if (pad_batch if pad_batch is not None
                                         else mode is not None) else n_real)
        T0 = max(lengths)
        need = T0 + max(min(r.max_new_tokens, context - T0) for r in requests)
        length = _cache_length(max(need, int(need * headroom)), context)
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32  # quantized weights: the activations' dtype
        self.dtype = dtype
        if rows is not None and rows > base and device.type == "cuda":
            rows = spare_rows(rows, base, _cache_row_bytes(model.cfg, length, dtype.itemsize),
                              torch.cuda.mem_get_info(device)[0])
        rows = max(rows or 0, base)
        self.requests: list[Request | None] = [*requests, *[None] * (rows - n_real)]
        B = len(self.requests)
        lengths += [1] * (B - n_real)
        self.budget = [0] * B
        self.n_new = [0] * B
        self.lengths = lengths
        self.texts: list[_Text | None] = [None] * B
        self.stops: list[set[int]] = [set()] * B
        self.reasons = ["length"] * B
        self.done = [True] * B
        self.results: dict[int, Completion] = {}
        self.cache = cache = _cache_for(model, B, length, device, dtype)
        pad = [T0 - n for n in lengths]
        cache.reset(pad)
        self.slot = T0  # the slot the next fed token goes to (mirrors cache.slot, no sync)
        self.temperature = torch.zeros(B, device=device)
        self.top_k = torch.zeros(B, dtype=torch.long, device=device)
        self.top_p = torch.ones(B, device=device)
        self.generators: list[torch.Generator | None] = [None] * B
        for b, r in enumerate(requests):
            self._set_row(b, r, budget=min(r.max_new_tokens, context - T0))
        prompt = torch.tensor([[self.fill] * p + (r.prompt_ids if r is not None else [self.fill])
                               for p, r in zip(pad, self.requests, strict=True)],
                              dtype=torch.long, device=device)
        self.step_fn = _step
        if mode is not None:
            cache.mark_static()
            self.step_fn = _guarded(_compiled_step(mode), mode)
        self.logits = _step(model, prompt, cache)  # prefill: eager, any length
        self.overlap = device.type == "cuda" if overlap is None else overlap
        self._host = (torch.empty(B, dtype=torch.long, pin_memory=True)
                      if self.overlap and device.type == "cuda" else None)

    def _set_row(self, b: int, r: Request, *, budget: int) -> None:
        self.requests[b] = r
        self.budget[b], self.n_new[b] = max(0, budget), 0
        self.lengths[b] = len(r.prompt_ids)
        self.texts[b] = _Text(self.tokenizer, r.stop, lazy=r.on_text is None)
        self.stops[b] = (set(r.stop_token_ids) if r.stop_token_ids is not None else
                         ({self.eos} if self.eos is not None else set()))
        self.reasons[b] = "length"
        self.temperature[b] = max(0.0, r.temperature)
        self.top_k[b] = r.top_k or 0
        self.top_p[b] = 1.0 if r.top_p is None else r.top_p
        self.generators[b] = (torch.Generator(device=self.device).manual_seed(r.seed)
                              if r.temperature > 0 else None)
        self.done[b] = self.budget[b] == 0
        if self.done[b]:
            self._finish(b)

    def _finish(self, b: int) -> None:
        t = self.texts[b]
        self.results[b] = Completion(t.text, t.ids, self.reasons[b], self.lengths[b])

    @property
    def finished(self) -> bool:
        return all(self.done)

    def free_rows(self) -> list[int]:
        return [b for b, d in enumerate(self.done) if d]

    def fits(self, r: Request) -> bool:
        """Whether ``r`` can join now with all the tokens it would get on its own."""
        n = len(r.prompt_ids)
        want = min(r.max_new_tokens, self.context - n)
        return 1 <= n <= self.slot and self.slot + want <= self.cache.length

    @torch.no_grad()
    def admit(self, r: Request) -> int | None:
        """Put ``r`` into a free row (its prompt prefilled); the row, or None if it does
        not fit now (see :meth:`fits`)."""
        free = self.free_rows()
        if not free or not self.fits(r):
            return None
        b, n, s = free[0], len(r.prompt_ids), self.slot
        alone = KVCache(self.model.cfg, 1, _cache_length(n, self.context), device=self.device,
                        dtype=self.dtype)  # never the pool's: it could be this batch's own
        alone.reset([0])
        logits = _step(self.model, torch.tensor([r.prompt_ids], device=self.device), alone)
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][b, :, s - n:s].copy_(alone.k[layer][0, :, :n])
            self.cache.v[layer][b, :, s - n:s].copy_(alone.v[layer][0, :, :n])
        self.cache.pad[b] = s - n
        self.logits[b] = logits[0]
        self.results.pop(b, None)
        self._set_row(b, r, budget=min(r.max_new_tokens, self.context - n))
        return b

    @torch.no_grad()
    def step(self) -> list[tuple[int, Completion]]:
        """Sample each live row's next token, release its text, feed the tokens back (one
        decode step); the rows that finished in this step with their completions."""
        hot = [b for b in range(len(self.done)) if not self.done[b]
               and self.generators[b] is not None]
        nxt = next_tokens(self.logits, self.temperature, self.top_k, self.top_p,
                          self.generators, hot=hot)
        # Queue the next step first when some row will surely want it (a row with budget
        # left after this token): the GPU computes it while the host works on the tokens.
        ahead = self.overlap and any(not d and n + 1 < m for d, n, m in
                                     zip(self.done, self.n_new, self.budget, strict=True))
        pinned = ahead and self._host is not None
        if pinned:
            self._host.copy_(nxt, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if ahead:
            self.logits = self.step_fn(self.model, nxt[:, None], self.cache)
            self.slot += 1
        if pinned:
            copied.synchronize()  # the tokens only, not the step queued after them
        tokens = self._host.tolist() if pinned else nxt.tolist()
        ended = []
        for b, t in enumerate(tokens):
            if self.done[b]:
                continue
            r, text = self.requests[b], self.texts[b]
            self.n_new[b] += 1
            if r.cancelled is not None and r.cancelled():
                self.done[b], self.reasons[b] = True, "cancelled"
            elif t in self.stops[b]:
                self.done[b], self.reasons[b] = True, "stop"
            else:
                piece, hit = text.add(t)
                if hit:
                    self.done[b], self.reasons[b] = True, "stop"
                elif self.n_new[b] >= self.budget[b]:
                    self.done[b] = True
                    piece += text.flush()
                if piece and r.on_text is not None:
                    r.on_text(piece)
            if self.done[b] and self.reasons[b] == "stop":
                rest = text.flush()  # text held back for a stop string that never came
                if rest and r.on_text is not None:
                    r.on_text(rest)
            if self.done[b]:
                self._finish(b)
                ended.append((b, self.results[b]))
        if not ahead and not self.finished:
            self.logits = self.step_fn(self.model, nxt[:, None], self.cache)
            self.slot += 1
        return ended


@torch.no_grad()
def run_batch(model: GPT, tokenizer: Tokenizer, requests: Sequence[Request], *,
              compile: bool | str | None = None, pad_batch: bool | None = None,
              overlap: bool | None = None) -> list[Completion]:
    """Continue every request's prompt (already fitted to the context, see
    :func:`fit_prompt`) in one batch; the completions in request order. ``pad_batch``
    (default: when the decode step is compiled) runs the batch at :func:`batch_bucket`'s
    size with idle rows that generate nothing; ``overlap``: see :class:`DecodeBatch`."""
    if not requests:
        return []
    batch = DecodeBatch(model, tokenizer, requests, compile=compile, pad_batch=pad_batch,
                        overlap=overlap)
    while not batch.finished:
        batch.step()
    return [batch.results[b] for b in range(len(requests))]


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int = 0,
    on_long_prompt: str = "truncate",
    batch_size: int = 16,
    compile: bool | str | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The continuations of ``prompts`` (without the prompts, cut before a stop string).

    Greedy when ``temperature`` is 0. ``stop_token_ids`` None: stop at the tokenizer's
    end-of-text token. Each prompt is sampled with ``seed``, so its text does not depend
    on the other prompts of the batch. ``on_text(i, piece)`` streams prompt i's text.
    Prompts run ``batch_size`` at a time, longest first (less padding).
    """
    context = model.cfg.max_seq_len
    reqs = []
    for i, p in enumerate(prompts):
        ids, _ = encode_prompt(tokenizer, p, context, on_long_prompt=on_long_prompt)
        reqs.append(Request(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, stop=list(stop or []),
            stop_token_ids=None if stop_token_ids is None else list(stop_token_ids),
            seed=seed, on_text=None if on_text is None else functools.partial(on_text, i)))
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i].prompt_ids))
    out: list[str] = [""] * len(reqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, c in zip(chunk, run_batch(model, tokenizer, [reqs[i] for i in chunk],
                                         compile=compile), strict=True):
            out[i] = c.text
    return out


def load_for_inference(model_dir: str | Path, *, device: str = "auto",
                       quantize: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer, checkpoint, quantize report or None) for generation and serving:
    on CUDA in bf16 (unless ``dtype`` says otherwise), on the CPU in fp32; weights
    quantized by :func:`lmfab.infer.quantize.quantize_model` when ``quantize`` is given."""
    dev = resolve_device(device)
    model, tok, ckpt = load_trained(model_dir, dev)
    dtype = dtype or (torch.bfloat16 if torch.device(dev).type == "cuda" else None)
    if dtype is not None:
        model = model.to(dtype)
    report = None
    if quantize:
        from lmfab.infer.quantize import quantize_model

        report = quantize_model(model, quantize)
    return model, tok, ckpt, report


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file: a ``.jsonl`` file's ``prompt`` fields, else one prompt per line
    (``\\n`` in a line stands for a newline)."""
    import json

    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [ln.replace("\\n", "\n") for ln in lines if ln.strip()]
    out = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            out.append(str(json.loads(ln)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with a \"prompt\" field "
                             f"({type(e).__name__}: {e})") from None
    return out


def generate_cli(model_dir: str | Path, prompts: list[str], *, out=None, device: str = "auto",
                 quantize: str | None = None, **kw) -> None:
    """``lmfab generate``: one prompt is streamed (the prompt, then each piece of text as it
    is decoded); several are printed as JSON lines ``{"prompt", "text"}`` when all are done."""
    import json
    import sys

    out = out or sys.stdout
    model, tok, _, report = load_for_inference(model_dir, device=device, quantize=quantize)
    if report is not None:
        print(f"quantized: {report.summary()}", file=sys.stderr)
    context = model.cfg.max_seq_len
    for i, p in enumerate(prompts):  # refuse (or report truncation) before printing anything
        _, cut = encode_prompt(tok, p, context,
                               on_long_prompt=kw.get("on_long_prompt", "truncate"))
        if cut:
            print(f"prompt {i + 1}: longer than the context ({context} tokens); its last "
                  f"{context - 1} tokens are kept", file=sys.stderr)
    if len(prompts) == 1:
        out.write(prompts[0])
        out.flush()

        def show(_i, piece):
            out.write(piece)
            out.flush()

        generate(model, tok, prompts, on_text=show, **kw)
        out.write("\n")
        return
    for p, text in zip(prompts, generate(model, tok, prompts, **kw), strict=True):
        out.write(json.dumps({"prompt": p, "text": text}, ensure_ascii=False) + "\n")


def generate_text(
    model_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """The prompt and its continuation, from a run folder (one call, no streaming)."""
    model, tok, _ = load_trained(model_dir, resolve_device(device))
    return prompt + generate(model, tok, [prompt], max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)[0]
