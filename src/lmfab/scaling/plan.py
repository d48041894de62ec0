"""Compute-optimal plans: from a budget (FLOPs, parameters or tokens) to a params YAML.

A *family* (``configs/families/NAME.yaml``) says how a model's shape and hyperparameters
follow its size: anchors of published shapes (Cerebras-GPT's Table 1, arXiv 2304.03208)
between which the aspect ratio ``d_model / n_layer``, the global batch and the peak learning
rate are interpolated in log(parameters), and ``tokens_per_param`` (Cerebras-GPT and
Chinchilla: 20). Given any one of a compute budget C, a size N or a token count D, the plan
solves the other two through lmfab's own accounting (C = FLOPs/token x D, with FLOPs/token =
6N + 12·L·d·T from :meth:`GPT.flops_per_token`), picks the integer shape nearest to N, and
writes a params file that ``lmfab run`` takes unchanged: warm-up then linear decay, batch
and steps for the token count. ``--proxy`` carries a tuned muP proxy's hyperparameters to the
planned shape (muTransfer); a fit (``lmfab fit``'s ``fit.json``) adds the predicted loss.

Parameters are counted as the run plan prints them without position embeddings (tied
embeddings once), the convention of Cerebras-GPT's model names.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

FAMILY_DIR = Path(__file__).resolve().parents[3] / "configs" / "families"


class PlanError(ValueError):
    """A budget or family that cannot be planned; the message says what to change."""


@dataclass(frozen=True)
class Anchor:
    params: float
    n_layer: int
    d_model: int
    d_head: int
    batch_size: int
    learning_rate: float

    @property
    def aspect(self) -> float:
        return self.d_model / self.n_layer


@dataclass(frozen=True)
class Family:
    name: str
    anchors: tuple[Anchor, ...]
    tokens_per_param: float = 20.0
    seq_len: int = 2048
    vocab_size: int = 50257
    warmup_tokens: float = 375e6
    max_warmup_fraction: float = 0.1
    decay_to: float = 0.1
    d_ff_mult: float = 4.0
    min_layers: int = 2
    n_layer: int | None = None  # fixed depth: only the width follows the size
    model: dict | None = None  # fields every planned model shares (pos, mlp, norm, muP ...)
    optimizer: dict | None = None  # betas, weight decay, clip
    source: str = ""


def family_names() -> list[str]:
    return sorted(p.stem for p in FAMILY_DIR.glob("*.yaml")) if FAMILY_DIR.is_dir() else []


def load_family(name_or_path: str | Path) -> Family:
    """A family by name (``configs/families/NAME.yaml``) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = FAMILY_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise PlanError(f"unknown family {str(name_or_path)!r}; available: "
                            f"{', '.join(family_names()) or '(none)'} (or give a YAML path)")
    if not path.is_file():
        raise PlanError(f"{path}: family file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: a family is a mapping")
    known = {f for f in Family.__dataclass_fields__} - {"source"}
    unknown = set(raw) - known
    if unknown:
        raise PlanError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    try:
        anchors = tuple(sorted((Anchor(**{k: float(v) if k in ("params", "learning_rate")
                                          else int(v) for k, v in a.items()})
                                for a in raw.get("anchors") or []), key=lambda a: a.params))
    except (TypeError, ValueError) as e:
        raise PlanError(f"{path}: anchors: {e} (each needs params, n_layer, d_model, d_head, "
                        f"batch_size, learning_rate)") from None
    if not anchors:
        raise PlanError(f"{path}: a family needs at least one anchor")
    fields = {k: v for k, v in raw.items() if k != "anchors"}
    for k in ("tokens_per_param", "warmup_tokens", "max_warmup_fraction", "decay_to", "d_ff_mult"):
        if k in fields:
            fields[k] = float(fields[k])
    return Family(anchors=anchors, source=str(path), **fields)


def _interp(fam: Family, n: float, key: str, log: bool) -> float:
    """``key`` of the anchors, piecewise linear in log(params) (and log(value) if ``log``)."""
    xs = [math.log(a.params) for a in fam.anchors]
    ys = [getattr(a, key) for a in fam.anchors]
    if log:
        ys = [math.log(y) for y in ys]
    x = math.log(n)
    if x <= xs[0]:
        y = ys[0]
    elif x >= xs[-1]:
        y = ys[-1]
    else:
        i = next(i for i in range(1, len(xs)) if x <= xs[i])
        t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        y = ys[i - 1] + t * (ys[i] - ys[i - 1])
    return math.exp(y) if log else y


def _nearest_anchor(fam: Family, n: float) -> Anchor:
    return min(fam.anchors, key=lambda a: abs(math.log(a.params / n)))


def model_fields(fam: Family, n_layer: int, d_model: int, d_head: int) -> dict:
    return {**(fam.model or {}), "n_layer": n_layer, "d_model": d_model,
            "n_head": max(1, d_model // d_head), "d_ff": int(round(fam.d_ff_mult * d_model)),
            "vocab_size": fam.vocab_size, "max_seq_len": fam.seq_len}


def count(fields: dict, seq_len: int) -> tuple[int, float]:
    """(parameters without position embeddings, training FLOPs per token) of a shape."""
    from lmfab.config.load import config_from_dict
    from lmfab.models.gpt import build_model

    cfg = config_from_dict({"model": fields, "optimizer": {},
                            "train_input": {"batch_size": 1, "seq_len": seq_len,
                                            "data_dir": "(counting only)"}})
    model = build_model(cfg.model)  # meta device: no memory
    return model.num_params(exclude_positions=True), model.flops_per_token(seq_len)


def shape_for(fam: Family, target_params: float) -> dict:
    """The integer shape of the family nearest to ``target_params`` (in log space).

    Within 5% of an anchor's size the anchor's own shape is taken, so the published family
    is reproduced exactly."""
    for a in fam.anchors:
        if abs(math.log(a.params / target_params)) < 0.05:
            return model_fields(fam, a.n_layer, a.d_model, a.d_head)
    d_head = _nearest_anchor(fam, target_params).d_head
    if fam.n_layer:  # fixed depth: the width whose count is nearest, in steps of d_head
        best = None
        for k in range(1, 4096):
            fields = model_fields(fam, fam.n_layer, k * d_head, d_head)
            err = math.log(count(fields, fam.seq_len)[0] / target_params)
            if best is None or abs(err) < best[0]:
                best = (abs(err), fields)
            if err > 0:
                return best[1]
        return best[1]
    aspect = _interp(fam, target_params, "aspect", log=True)
    # N ~ 12 L d^2 + V d with d = aspect * L: solve for L by bisection on the real line.
    lo, hi = 0.1, 1000.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        d = aspect * mid
        if 12 * mid * d * d + fam.vocab_size * d < target_params:
            lo = mid
        else:
            hi = mid
    best = None
    # Depth from the real solution (monotone in N), then the width nearest to the target.
    for n_layer in (max(fam.min_layers, round(lo)),):
        base = max(1, round(aspect * n_layer / d_head))
        for k in range(max(1, base - 2), base + 3):
            if k < 1:
                continue
            fields = model_fields(fam, n_layer, k * d_head, d_head)
            n, _ = count(fields, fam.seq_len)
            err = abs(math.log(n / target_params))
            if best is None or err < best[0]:
                best = (err, fields)
    return best[1]


@dataclass
class Plan:
    family: str
    n_params: int
    tokens: int
    flops: float
    flops_per_token: float
    tokens_per_param: float
    batch_size: int
    seq_len: int
    steps: int
    warmup_steps: int
    learning_rate: float
    model: dict
    predicted_loss: dict | None = None
    notes: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def plan(*, family: str | Path = "cerebras-gpt", flops: float | None = None,
         params: float | None = None, tokens: float | None = None,
         tokens_per_param: float | None = None, seq_len: int | None = None,
         vocab_size: int | None = None) -> Plan:
    """Solve a compute-optimal plan from exactly one of ``flops``, ``params`` or ``tokens``."""
    given = [k for k, v in (("flops", flops), ("params", params), ("tokens", tokens))
             if v is not None]
    if len(given) != 1:
        raise PlanError(f"give exactly one of --flops, --params, --tokens (got {given or 'none'})")
    fam = load_family(family)
    overrides = {k: v for k, v in (("tokens_per_param", tokens_per_param), ("seq_len", seq_len),
                                   ("vocab_size", vocab_size)) if v is not None}
    if overrides:
        fam = Family(**{**fam.__dict__, **overrides})
    value = {"flops": flops, "params": params, "tokens": tokens}[given[0]]
    if not (value > 0 and math.isfinite(value)):
        raise PlanError(f"--{given[0]} must be a positive number, got {value}")
    r = fam.tokens_per_param
    if params is not None:
        target_n = params
    elif tokens is not None:
        target_n = tokens / r
    else:
        # C = fpt(N) * r * N with fpt ~ 6N (+ attention): solve by fixed point on the real shape.
        target_n = math.sqrt(flops / (6 * r))
        for _ in range(6):
            n, fpt = count(shape_for(fam, target_n), fam.seq_len)
            target_n *= math.sqrt(flops / (fpt * r * n))
    fields = shape_for(fam, target_n)
    n, fpt = count(fields, fam.seq_len)
    smallest = count(shape_for(fam, 1.0), fam.seq_len)[0]
    if target_n < 0.5 * smallest:
        raise PlanError(f"the budget gives a model of {target_n:.3g} parameters, below the "
                        f"family {fam.name!r}'s smallest shape ({smallest:,} parameters at "
                        f"{fam.min_layers} layers, vocab {fam.vocab_size}): raise the budget "
                        f"or use a family with a smaller vocabulary")
    n_tokens = tokens if tokens is not None else (flops / fpt if flops is not None else r * n)
    anchor = next((a for a in fam.anchors if abs(math.log(a.params / target_n)) < 0.05), None)
    batch = anchor.batch_size if anchor else max(1, round(_interp(fam, n, "batch_size", log=True)))
    tokens_per_step = batch * fam.seq_len
    steps = max(1, math.ceil(n_tokens / tokens_per_step))
    warmup = min(math.ceil(fam.warmup_tokens / tokens_per_step),
                 max(1, int(fam.max_warmup_fraction * steps)))
    warmup = min(warmup, steps - 1) if steps > 1 else 0
    lr = anchor.learning_rate if anchor else _interp(fam, n, "learning_rate", log=True)
    total = steps * tokens_per_step
    notes = []
    if fam.anchors[0].params > 2 * n or n > 2 * fam.anchors[-1].params:
        notes.append(f"{n:,} parameters lies outside the family's anchors "
                     f"({fam.anchors[0].params:.3g}..{fam.anchors[-1].params:.3g}): the nearest "
                     f"anchor's aspect ratio, batch and learning rate are kept")
    return Plan(family=fam.name, n_params=n, tokens=total, flops=fpt * total,
                flops_per_token=fpt, tokens_per_param=total / n, batch_size=batch,
                seq_len=fam.seq_len, steps=steps, warmup_steps=warmup, learning_rate=lr,
                model=fields, notes=notes or None)


def params_dict(p: Plan, fam: Family, *, data_dir: str | None = None) -> dict:
    """The params YAML (Model Zoo sections) that trains plan ``p``."""
    schedule = []
    if p.warmup_steps:
        schedule.append({"schedule": "linear", "steps": p.warmup_steps, "start": 0.0,
                         "end": p.learning_rate})
    schedule.append({"schedule": "linear", "steps": p.steps - p.warmup_steps,
                     "start": p.learning_rate, "end": p.learning_rate * fam.decay_to})
    opt = {"learning_rate": schedule, "betas": [0.9, 0.95], "weight_decay": 0.1,
           "max_grad_norm": 1.0, **(fam.optimizer or {})}
    train = {"batch_size": p.batch_size, "seq_len": p.seq_len}
    if data_dir:
        train["data_dir"] = data_dir
    return {"model": copy.deepcopy(p.model), "optimizer": opt, "train_input": train,
            "runconfig": {"max_steps": p.steps}}


def merge(base: dict, over: dict) -> dict:
    """``over`` laid onto ``base`` section by section (nested mappings merge, others replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def format_plan(p: Plan) -> str:
    m = p.model
    rows = [
        ("family", p.family),
        ("shape", f"{m['n_layer']} layers x d_model {m['d_model']} ({m['n_head']} heads, "
                  f"d_ff {m['d_ff']}), vocab {m['vocab_size']}, seq {p.seq_len}"),
        ("parameters", f"{p.n_params:,} (without position embeddings)"),
        ("FLOPs/token", f"{p.flops_per_token:.4g} (6N + 12·L·d·T)"),
        ("tokens", f"{p.tokens:,} = {p.tokens_per_param:.1f} tokens/parameter"),
        ("compute", f"{p.flops:.4g} FLOPs = FLOPs/token x tokens"),
        ("batch", f"{p.batch_size} x {p.seq_len} = {p.batch_size * p.seq_len:,} tokens/step, "
                  f"{p.steps:,} steps ({p.warmup_steps:,} warm-up)"),
        ("peak LR", f"{p.learning_rate:.3g}"),
    ]
    if p.predicted_loss:
        pl = p.predicted_loss
        rows.append(("predicted loss", f"{pl['loss']:.4f} (90% interval {pl['lo']:.4f}.."
                                       f"{pl['hi']:.4f}, from {pl['source']})"))
    w = max(len(k) for k, _ in rows)
    text = "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
    for note in p.notes or []:
        text += f"\n  note: {note}"
    return text


def plan_command(*, family: str, flops: float | None, params: float | None,
                 tokens: float | None, tokens_per_param: float | None, base: str | None,
                 fit: str | None, data_dir: str | None, sets: list[str], out: str | None,
                 transfer: Callable | None = None) -> dict:
    """``lmfab plan``: print the arithmetic, write the params YAML; returns the plan as a dict.

    ``transfer(target_config) -> (config, changes)`` applies a tuned muP proxy (``--proxy``:
    the CLI passes muTransfer, a tool above this layer, bound to the proxy's config)."""
    from lmfab.config.load import apply_overrides, config_from_dict, config_to_dict, read_yaml

    fam = load_family(family)
    p = plan(family=family, flops=flops, params=params, tokens=tokens,
             tokens_per_param=tokens_per_param)
    raw = params_dict(p, fam, data_dir=data_dir)
    if base:  # the base's data, eval and runconfig; the plan's shape, schedule and batch
        b = read_yaml(base)
        b.get("train_input", {}).pop("micro_batch_size", None)  # sized for another batch
        raw = merge({k: v for k, v in b.items() if k != "model"}, raw)
        raw["runconfig"]["max_steps"] = p.steps
    order = ("model", "optimizer", "train_input", "eval_input", "runconfig")
    raw = apply_overrides({k: raw[k] for k in (*order, *raw) if k in raw}, sets)
    changes: list[str] = []
    if transfer is not None:
        cfg, changes = transfer(config_from_dict(raw, source="plan"))
        raw = config_to_dict(cfg)
    else:
        config_from_dict(raw, source="plan")  # fail here, not in `lmfab run`
    if fit:
        p.predicted_loss = predicted_loss(fit, p.flops)
    print(format_plan(p))
    for c in changes:
        print(f"  muTransfer: {c}")
    if out:
        from lmfab.atomic import atomic_write_text

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, yaml.safe_dump(raw, sort_keys=False))
        print(f"lmfab: wrote {out}  (train it: lmfab run --params {out} --mode train_and_eval "
              f"--model_dir runs/NAME)")
    return {**p.to_dict(), "params": raw}


def predicted_loss(fit_json: str | Path, flops: float) -> dict:
    """The power law of a ``fit.json`` evaluated at ``flops``, with its interval."""
    import json

    path = Path(fit_json)
    if path.is_dir():
        path = path / "fit.json"
    try:
        law = json.loads(path.read_text())["power"]
    except (OSError, ValueError, KeyError) as e:
        raise PlanError(f"{path}: not a fit.json with a power-law fit ({e})") from None
    from lmfab.scaling.fit import PowerFit

    mean, lo, hi = PowerFit.from_dict(law).predict(flops)
    return {"loss": float(mean), "lo": float(lo), "hi": float(hi), "source": str(path)}
