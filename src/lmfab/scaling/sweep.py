"""Sweeps: one YAML expands into many params files, runs them (resumably), collects a table.

A sweep file names a base params file and a list of *groups*; each group expands into points:

```yaml
base: ../train/subscale.yaml          # a params file; relative paths are to this file
out: runs/sweeps/family               # default runs/sweeps/<file stem>
set: [train_input.data_dir=runs/data/corpus]   # --set overrides for every point
mup: {base_d_model: 128, init_std: 0.08, embedding_mult: 10.0}   # what `parametrization: mup` sets
groups:
  - name: family                      # compute-optimal sizes: shape, batch, LR, steps planned
    family: subscale                  #   by `lmfab plan` from the family rule
    params: [1.0e+6, 2.0e+6, 4.0e+6]  #   (or flops: [...] / tokens: [...])
  - name: isoflop-3e15                # an IsoFLOP profile: sizes at one budget
    family: subscale
    flops: 3.0e+15
    params: [1.0e+6, 2.0e+6, 4.0e+6]  #   tokens = flops / FLOPs-per-token of each size
  - name: mup-lr                      # a grid: the cartesian product of the axes
    axes:
      model.d_model: [128, 512, 1024] #   any params key, or:
      peak_lr: [1.0e-3, 2.0e-3]       #   the schedule rescaled to this peak
      parametrization: [mup, sp]      #   muP multipliers from `mup:` on, or off
    set: {model.n_layer: 4}
```

Each point gets ``<out>/points/<name>/params.yaml`` (fully resolved: a user can rerun any point
by hand with ``lmfab run``) and a run folder ``<out>/runs/<name>``. Points run one after another,
or ``--parallel K`` at a time (independent processes: results are those of separate runs).
A finished point (its final eval at max_steps is in its metrics) is skipped; a killed point
resumes from its newest checkpoint through ``lmfab run``'s own resume; a failed point is
recorded with the reason and the sweep goes on. ``<out>/results.jsonl`` and ``results.csv``
hold one row per point: final and smoothed eval loss, bits per byte, parameters, tokens,
FLOPs (lmfab's accounting), wall time and status -- what ``lmfab fit`` reads -- and the
downstream scores of the final checkpoint, from ``eval_input.tasks`` or from ``lmfab eval
--tasks`` run on it afterwards (``--collect`` then gathers them).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from lmfab.atomic import atomic_write_json, atomic_write_text
from lmfab.scaling.plan import PlanError, load_family, merge, params_dict, plan
from lmfab.scaling.results import downstream_metrics, flat_metrics

RESULT_FIELDS = ["name", "group", "status", "reason", "n_params", "n_params_nonembed", "tokens",
                 "flops", "eval_loss", "eval_loss_smoothed", "bpb", "train_loss", "wall_s",
                 "d_model", "n_layer", "learning_rate", "parametrization", "vocab_size",
                 "steps", "epochs", "tags"]


class SweepError(ValueError):
    """A sweep file that cannot be expanded; the message names the file and key."""


@dataclasses.dataclass
class Point:
    name: str
    group: str
    params: dict  # the resolved params YAML as a mapping
    tags: dict


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}".replace("+", "")
    return str(v)


def _label(key: str, value) -> str:
    if key == "parametrization":
        return str(value)
    if isinstance(value, dict):  # a joint axis is named by its first key
        key, value = next(iter(value.items()))
    return f"{key.split('.')[-1]}{_fmt(value)}"


def _set_key(raw: dict, key: str, value, where: str) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SweepError(f"{where}: key {key!r}: {p!r} is not a section")
    node[parts[-1]] = copy.deepcopy(value)  # points never share a mutable value


def _rescale_lr(raw: dict, peak: float) -> None:
    lr = raw.setdefault("optimizer", {}).get("learning_rate", 3e-4)
    if isinstance(lr, int | float):
        raw["optimizer"]["learning_rate"] = peak
        return
    old = max(max(s.get("start", 0.0), s.get("end") or 0.0) for s in lr)
    if old <= 0:
        raise SweepError("peak_lr: the base schedule's peak is 0")
    f = peak / old
    raw["optimizer"]["learning_rate"] = [
        {**s, "start": s.get("start", 0.0) * f,
         **({"end": s["end"] * f} if s.get("end") is not None else {})} for s in lr]


def _parametrize(raw: dict, which: str, mup: dict, where: str) -> None:
    m = raw.setdefault("model", {})
    if which == "sp":
        for k in ("mup_base_d_model", "mup_base_d_ff"):
            m.pop(k, None)
        m.setdefault("attn_score_scale", "rsqrt_d_head")
        return
    if which != "mup":
        raise SweepError(f"{where}: parametrization must be mup or sp, got {which!r}")
    if "base_d_model" not in mup:
        raise SweepError(f"{where}: parametrization mup needs a top-level `mup:` with base_d_model")
    m["mup_base_d_model"] = mup["base_d_model"]
    if "base_d_ff" in mup:
        m["mup_base_d_ff"] = mup["base_d_ff"]
    m["attn_score_scale"] = "inv_d_head"
    for k in ("init_std", "embedding_mult", "output_mult"):
        if k in mup:
            m[k] = mup[k]


def _planned(base: dict, group: dict, size: dict, where: str) -> tuple[dict, dict]:
    """A family point: the plan's shape, batch, schedule and steps on top of the base."""
    fam_name = group["family"]
    try:
        fam = load_family(fam_name)
        over = {k: group[k] for k in ("tokens_per_param", "vocab_size") if k in group}
        if "flops" in group and "params" in size:  # IsoFLOP: size fixed, tokens from budget
            over.pop("tokens_per_param", None)
            p0 = plan(family=fam_name, params=size["params"], **over)
            tokens = group["flops"] / p0.flops_per_token
            p = plan(family=fam_name, params=size["params"],
                     tokens_per_param=tokens / p0.n_params, **over)
        else:
            p = plan(family=fam_name, **size, **over)
    except PlanError as e:
        raise SweepError(f"{where}: {e}") from None
    raw = merge({k: v for k, v in base.items() if k != "model"}, params_dict(p, fam))
    raw["runconfig"]["max_steps"] = p.steps
    tags = {"planned_params": _fmt(float(p.n_params)), "family": fam.name}
    return raw, tags


def expand(path: str | Path, only: list[str] | None = None, *, sets: Sequence[str] = (),
           out: str | Path | None = None) -> tuple[dict, list[Point]]:
    """Read a sweep file: (its settings, the points in order). ``sets`` (``--set``) apply to
    every point last, after planning; ``out`` replaces the file's output folder."""
    from lmfab.config.load import apply_overrides, config_from_dict, config_to_dict, read_yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep file is a mapping")
    unknown = set(spec) - {"base", "out", "set", "mup", "groups", "parallel"}
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; known: base, out, set, "
                         "mup, groups, parallel")
    if "base" not in spec or "groups" not in spec:
        raise SweepError(f"{path}: needs `base:` (a params file) and `groups:`")
    base_path = (path.parent / spec["base"]).resolve()
    base = apply_overrides(read_yaml(base_path), list(spec.get("set") or []))
    spec["out"] = str(out or spec.get("out") or Path("runs") / "sweeps" / path.stem)
    points: list[Point] = []
    for gi, group in enumerate(spec["groups"]):
        where = f"{path}: groups[{gi}]"
        if not isinstance(group, dict) or "name" not in group:
            raise SweepError(f"{where}: each group is a mapping with a `name`")
        extra = set(group) - {"name", "family", "params", "flops", "tokens", "tokens_per_param",
                              "vocab_size", "axes", "set"}
        if extra:
            raise SweepError(f"{where}: unknown key(s) {sorted(extra)}")
        gname = str(group["name"])
        axes = dict(group.get("axes") or {})
        if "family" in group:  # sizes come from params / tokens / flops lists
            if "params" in group:
                sizes = [{"params": float(v)} for v in _as_list(group["params"], where)]
            elif "tokens" in group:
                sizes = [{"tokens": float(v)} for v in _as_list(group["tokens"], where)]
            elif "flops" in group:
                sizes = [{"flops": float(v)} for v in _as_list(group["flops"], where)]
            else:
                raise SweepError(f"{where}: a family group needs params, tokens or flops")
            if "flops" in group and "params" in group:
                group = {**group, "flops": float(group["flops"])}
        else:
            sizes = [{}]
        combos = [dict(zip(axes, vals, strict=True))
                  for vals in itertools.product(*(_as_list(v, f"{where}.axes.{k}")
                                                  for k, v in axes.items()))] or [{}]
        for size in sizes:
            for combo in combos:
                raw, tags = (_planned(base, group, size, where) if size
                             else (copy.deepcopy(base), {}))
                for k, v in (group.get("set") or {}).items():
                    _set_key(raw, k, v, where)
                for k, v in combo.items():
                    if k == "peak_lr":
                        _rescale_lr(raw, float(v))
                    elif k == "parametrization":
                        _parametrize(raw, v, spec.get("mup") or {}, where)
                    elif isinstance(v, dict):  # keys set together: {d_model: 256, n_head: 8}
                        for sub, sv in v.items():
                            _set_key(raw, f"{k}.{sub}", sv, where)
                    else:
                        _set_key(raw, k, v, where)
                label = [gname] + [f"{k.split('.')[-1]}{_fmt(v)}" for k, v in size.items()]
                label += [_label(k, v) for k, v in combo.items()]
                name = "-".join(label).replace("/", "_")
                tags.update({k: _label(k, v) for k, v in combo.items()})
                try:
                    raw = apply_overrides(raw, sets)
                    cfg = config_from_dict(raw, source=f"{where} point {name}",
                                           base_dir=base_path.parent)
                except ValueError as e:
                    raise SweepError(str(e)) from None
                points.append(Point(name, gname, config_to_dict(cfg), tags))
    names = [p.name for p in points]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SweepError(f"{path}: points with the same name {sorted(dupes)}: give groups "
                         "distinct names or axes distinct values")
    if only:
        missing = [o for o in only if not any(p.name == o or p.group == o for p in points)]
        if missing:
            raise SweepError(f"{path}: --only {missing}: no such point or group; points: "
                             f"{', '.join(names)}")
        points = [p for p in points if p.name in only or p.group in only]
    return spec, points


def _as_list(v, where: str) -> list:
    if isinstance(v, list) and v:
        return v
    raise SweepError(f"{where}: expected a non-empty list, got {v!r}")


# -- running --------------------------------------------------------------------------------


def _posthoc_downstream(model_dir: Path, step: int) -> dict[str, float]:
    """The scores of ``lmfab eval --tasks`` on the point's final checkpoint
    (``<run>/eval/downstream-step_<N>.json``), so that a sweep trained without
    ``eval_input.tasks`` can fit downstream scores after the fact. Unreadable: none."""
    path = model_dir / "eval" / f"downstream-step_{step}.json"
    if not path.is_file():
        return {}
    try:
        return flat_metrics(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError) as e:
        print(f"lmfab sweep: {path}: not read ({e})", file=sys.stderr)
        return {}


def _final_eval(model_dir: Path, max_steps: int) -> tuple[dict | None, list[dict], dict | None]:
    """(the final eval record at max_steps, all eval records, the last train record)."""
    evals, last_train = [], None
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        return None, [], None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if rec.get("split") == "eval":
            evals.append(rec)
        elif rec.get("split") == "train":
            last_train = rec
    final = next((r for r in reversed(evals) if r.get("step") == max_steps), None)
    return final, evals, last_train


def point_status(point: Point, out: Path) -> str:
    final, _, _ = _final_eval(out / "runs" / point.name, point.params["runconfig"]["max_steps"])
    return "done" if final is not None else "pending"


def write_params(point: Point, out: Path) -> Path:
    """``<out>/points/<name>/params.yaml``: the point as a params file ``lmfab run`` takes."""
    pdir = out / "points" / point.name
    pdir.mkdir(parents=True, exist_ok=True)
    params_file = pdir / "params.yaml"
    atomic_write_text(params_file, yaml.safe_dump(point.params, sort_keys=False))
    return params_file


def _run_point(point: Point, out: Path, extra_env: dict, lock: threading.Lock,
               progress: list) -> None:
    pdir, rdir = out / "points" / point.name, out / "runs" / point.name
    params_file = write_params(point, out)
    cmd = [sys.executable, "-m", "lmfab", "run", "--params", str(params_file),
           "--mode", "train_and_eval", "--model_dir", str(rdir)]
    t0 = time.time()
    with open(pdir / "run.log", "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **extra_env})
    wall = time.time() - t0
    if rc == 0:  # the invocation that finished the point (a killed one writes nothing)
        atomic_write_json(pdir / "wall.json", {"wall_s": wall, "finished": time.time()})
    with lock:
        progress[0] += 1
        status = "ok" if rc == 0 else f"exit {rc} (see {pdir / 'run.log'})"
        print(f"lmfab sweep: [{progress[0]}/{progress[1]}] {point.name}: {status} "
              f"in {wall:.0f}s", flush=True)


def run_sweep(path: str | Path, *, only: list[str] | None = None, parallel: int | None = None,
              collect_only: bool = False, env: dict | None = None, sets: Sequence[str] = (),
              out: str | Path | None = None) -> list[dict]:
    """Expand, run the unfinished points, write and return the results table."""
    spec, points = expand(path, only, sets=sets, out=out)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.yaml", Path(path).read_text())
    todo = [p for p in points if point_status(p, out) != "done"]
    k = max(1, int(parallel or spec.get("parallel") or 1))
    print(f"lmfab sweep: {len(points)} points in {out}, {len(points) - len(todo)} finished, "
          f"{len(todo)} to run" + (f", {k} at a time" if k > 1 and todo else ""), flush=True)
    if todo and not collect_only:
        lock, progress = threading.Lock(), [0, len(todo)]
        with ThreadPoolExecutor(max_workers=k) as pool:
            list(pool.map(lambda p: _run_point(p, out, env or {}, lock, progress), todo))
    rows = [collect_point(p, out) for p in points]
    write_results(rows, out)
    bad = [r for r in rows if r["status"] != "done"]
    for r in bad:
        print(f"lmfab sweep: {r['name']}: {r['status']}: {r['reason']}", file=sys.stderr)
    print(f"lmfab sweep: {len(rows) - len(bad)}/{len(rows)} points done; results in "
          f"{out / 'results.jsonl'}", flush=True)
    return rows


def collect_point(point: Point, out: Path) -> dict:
    """One results row from a point's run folder (its metrics and params)."""
    from lmfab.config.load import config_from_dict
    from lmfab.train.plan import plan_run
    from lmfab.train.schedule import LRSchedule

    p = point.params
    max_steps = p["runconfig"]["max_steps"]
    cfg = config_from_dict(copy.deepcopy(p), source=point.name)
    rp = plan_run(cfg, device_type="cpu")
    m = cfg.model
    emb = m.vocab_size * m.d_model * (1 if m.tied_embeddings else 2)
    tokens = rp.tokens_per_step * max_steps
    row = {f: None for f in RESULT_FIELDS}
    peak = LRSchedule(cfg.optimizer.learning_rate).peak
    row.update(name=point.name, group=point.group, n_params=rp.n_params_no_pos,
               n_params_nonembed=rp.n_params_no_pos - emb, tokens=tokens,
               flops=rp.flops_per_token * tokens, d_model=m.d_model, n_layer=m.n_layer,
               learning_rate=peak, vocab_size=m.vocab_size, steps=max_steps,
               parametrization="mup" if m.mup_base_d_model else "sp", tags=point.tags,
               epochs=_epochs(cfg, tokens))
    rdir, pdir = out / "runs" / point.name, out / "points" / point.name
    final, evals, last_train = _final_eval(rdir, max_steps)
    if last_train is not None:
        row["train_loss"] = last_train.get("loss")
    if final is None:
        log = pdir / "run.log"
        reason = "not run yet" if not log.is_file() else _last_error(log)
        row.update(status="unfinished" if log.is_file() else "missing", reason=reason)
        return row
    loss = final.get("loss")
    late = [r["loss"] for r in evals if r.get("step", 0) >= 0.9 * max_steps
            and isinstance(r.get("loss"), int | float)]
    row.update(eval_loss=loss, bpb=final.get("bits_per_byte"),
               eval_loss_smoothed=sum(late) / len(late) if late else loss)
    scores = {**_posthoc_downstream(rdir, max_steps), **(downstream_metrics(final) or {})}
    if scores:  # eval_input.tasks in the run, and `lmfab eval --tasks` on its last checkpoint
        row["downstream"] = scores
    wall = pdir / "wall.json"
    if wall.is_file():
        row["wall_s"] = json.loads(wall.read_text()).get("wall_s")
    if loss is None or not math.isfinite(loss):
        row.update(status="diverged", reason=f"final eval loss {loss}")
    elif last_train is not None and not math.isfinite(last_train.get("loss", 0.0)):
        row.update(status="diverged", reason=f"train loss {last_train.get('loss')}")
    else:
        row.update(status="done", reason="")
    return row


def _epochs(cfg, tokens: int) -> float | None:
    """Passes over the training split: tokens trained / tokens in the data (when known)."""
    d = cfg.train_input.data_dir
    if not d:
        return None
    meta = Path(d) / "meta.json"
    try:
        info = json.loads(meta.read_text())
        n = info["splits"][cfg.train_input.split]["tokens"]
        return tokens / n if n else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _last_error(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    err = next((x for x in reversed(lines) if "error" in x.lower() or x.startswith("lmfab")), None)
    return (err or (lines[-1] if lines else "no output")).strip()[:300]


def write_results(rows: list[dict], out: Path) -> None:
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "results.csv", _csv(rows))


def _csv(rows: list[dict]) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "tags": ";".join(f"{k}={v}" for k, v in (r.get("tags") or {}).items())})
    return buf.getvalue()


def list_points(path: str | Path, only: list[str] | None = None, *, sets: Sequence[str] = (),
                out: str | Path | None = None) -> str:
    """The points of a sweep file, one a line: status and params file (written, not run)."""
    spec, points = expand(path, only, sets=sets, out=out)
    out = Path(spec["out"])
    return "\n".join(f"{point_status(p, out):<8} {write_params(p, out)}" for p in points)


def format_results(rows: list[dict]) -> str:
    head = f"{'point':<40} {'status':<10} {'params':>10} {'tokens':>10} {'FLOPs':>9} " \
           f"{'eval loss':>9} {'bpb':>6}"
    lines = [head]
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if isinstance(r.get("eval_loss"), float) else "-"
        bpb = f"{r['bpb']:.3f}" if isinstance(r.get("bpb"), float) else "-"
        lines.append(f"{r['name']:<40} {r['status']:<10} {r['n_params']:>10,} "
                     f"{r['tokens']:>10,} {r['flops']:>9.3g} {loss:>9} {bpb:>6}")
    return "\n".join(lines)
