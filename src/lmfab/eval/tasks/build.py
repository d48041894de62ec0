"""Build the offline tasks' items from a corpus: ``python -m lmfab.eval.tasks.build``.

The items come from the corpus's held-out documents: those whose split hash (the one
``lmfab data tokenize`` / ``data pack`` use) is below ``--val-fraction`` for ``--seed``.
For the shipped sample (``data/sample/books.jsonl.zst``) at 0.05 and seed 0 -- the demo's and
the tests' split -- these are *Romeo and Juliet* and the Gospel of John; a model trained on
that split never saw them. (At the default ``--val-fraction 0.02`` only *Romeo and Juliet*
is held out: John is then training text.)

* ``lmfab_cloze.jsonl``: ``{"context", "target"}``. A line of at least 6 words whose last
  word has 3+ letters ends the passage; the target is that word with its leading space
  (``" word"``), the context the text before it, starting at a line break at most
  ``CLOZE_CONTEXT`` characters back. Trailing punctuation after the word is dropped.
* ``lmfab_choice.jsonl``: ``{"context", "choices", "label"}``. The context is the text
  before a line of at least 5 words and at most ``CHOICE_LINE`` characters (at most
  ``CHOICE_CONTEXT`` characters, starting at a line break); the choices are that line and
  three lines of similar length (2/3x to 1.5x) from other documents of the same author or
  source (other plays for a play, other books for a Bible book), in a seeded random order. A Bible verse number stays in the context so
  that it does not give the true line away.

With ``--name N --out DIR`` the items of any corpus become a task folder of their own,
``N_cloze`` and ``N_choice`` (YAML, jsonl and the loader), which ``lmfab eval
--include-path DIR --tasks N_cloze,N_choice`` runs beside the shipped tasks.

Deterministic: the same corpus and flags give the same bytes. Each file is kept under
~300 KB.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from lmfab.atomic import atomic_write_text
from lmfab.data.prep.encode import split_hash
from lmfab.data.prep.readers import iter_documents

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = Path("data/sample/books.jsonl.zst")
CLOZE_CONTEXT = 500  # characters of context at most
CHOICE_CONTEXT = 400
CHOICE_LINE = 120  # the true line's characters at most: scorable by short-context models
N_CLOZE = 400
N_CHOICE = 250

_VERSE = re.compile(r"^(\s*\d+ )")  # "  12 " of a Bible verse
_LAST_WORD = re.compile(r"^(.*\S) ([A-Za-z][A-Za-z']*[A-Za-z])[^\w\s]*$")


def _family(meta: dict | None, source: str) -> str:
    meta = meta or {}
    return meta.get("author") or meta.get("source") or source


def _lines(text: str) -> list[tuple[int, str]]:
    """(offset, line) of every line of text."""
    out, at = [], 0
    for line in text.split("\n"):
        out.append((at, line))
        at += len(line) + 1
    return out


def _prose(line: str, min_words: int) -> bool:
    """A line of running text: not a stage direction, heading or speaker name."""
    s = line.strip()
    return len(s.split()) >= min_words and not s.startswith("[") and not s.isupper()


def _context_start(lines: list[tuple[int, str]], i: int, end: int, budget: int) -> int | None:
    """Offset of the earliest line break before line i that keeps end - start <= budget
    (at least one whole line before line i), or None."""
    start = None
    for j in range(i - 1, -1, -1):
        if end - lines[j][0] > budget:
            break
        start = lines[j][0]
    return start


def cloze_candidates(text: str) -> list[dict]:
    lines, out = _lines(text), []
    for i, (at, line) in enumerate(lines):
        if not _prose(line, 6) or not (m := _LAST_WORD.match(line)) or len(m.group(2)) < 3:
            continue
        word_at = at + len(m.group(1))  # the space before the word
        start = _context_start(lines, i, word_at, CLOZE_CONTEXT)
        if start is not None:
            out.append({"context": text[start:word_at], "target": " " + m.group(2), "line": i + 1})
    return out


def _body(line: str) -> tuple[str, str]:
    """(verse-number prefix, the rest) of a line."""
    m = _VERSE.match(line)
    prefix = m.group(1) if m else ""
    return prefix, line[len(prefix):].rstrip()


def choice_candidates(text: str) -> list[dict]:
    lines, out = _lines(text), []
    for i, (at, line) in enumerate(lines):
        prefix, body = _body(line)
        if not _prose(body, 5) or len(body) > CHOICE_LINE:
            continue
        start = _context_start(lines, i, at, CHOICE_CONTEXT)
        if start is not None:
            out.append({"context": text[start:at] + prefix, "true": body, "line": i + 1})
    return out


def _doc_name(d) -> str:
    """A document's name in the items: its title, else file name and line (not the path the
    corpus was given by, which may be a machine's own; two untitled documents of one file
    stay apart)."""
    return (d.meta or {}).get("title") or f"{Path(d.path).name}:{d.line}"


def build(corpus: str | Path = DEFAULT_CORPUS, *, val_fraction: float = 0.05, seed: int = 0,
          n_cloze: int = N_CLOZE, n_choice: int = N_CHOICE) -> dict[str, list[dict]]:
    """The items of both tasks (nothing written)."""
    docs = [d for d in iter_documents([str(corpus)]) if d.text.strip()]
    if not docs:
        raise ValueError(f"{corpus}: no documents")
    hashes = [split_hash(d.text, seed) for d in docs]
    held = [i for i, h in enumerate(hashes) if h < val_fraction]
    if not held:  # as data pack does: the lowest-hash document is held out
        held = [min(range(len(docs)), key=hashes.__getitem__)]
    rng = random.Random(seed)

    cloze = []
    for i in held:
        title = _doc_name(docs[i])
        cloze += [{"doc": title, **c} for c in cloze_candidates(docs[i].text)]
    cloze = sorted(rng.sample(cloze, min(n_cloze, len(cloze))),
                   key=lambda c: (c["doc"], c["line"]))

    # Distractor pools: prose lines of the other documents of the same family.
    pools: dict[str, list[str]] = {}
    for j, d in enumerate(docs):
        if j not in held:
            bodies = (_body(line)[1] for _, line in _lines(d.text))
            pools.setdefault(_family(d.meta, d.source), []).extend(
                b for b in bodies if _prose(b, 5))
    choice = []
    cands = []
    for i in held:
        title = _doc_name(docs[i])
        pool = pools.get(_family(docs[i].meta, docs[i].source)) or [
            b for p in pools.values() for b in p]
        cands += [(title, pool, c) for c in choice_candidates(docs[i].text)]
    for title, pool, c in sorted(rng.sample(cands, min(n_choice, len(cands))),
                                 key=lambda t: (t[0], t[2]["line"])):
        n = len(c["true"])
        near = [b for b in pool if 2 * n <= 3 * len(b) <= 9 * n // 2 and b != c["true"]]
        if len(near) < 3:
            continue
        choices = [c["true"], *rng.sample(near, 3)]
        rng.shuffle(choices)
        choice.append({"doc": title, "line": c["line"], "context": c["context"],
                       "choices": choices, "label": choices.index(c["true"])})
    return {"lmfab_cloze": cloze, "lmfab_choice": choice}


def to_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(it, sort_keys=True, ensure_ascii=False) + "\n" for it in items)


def write(items: dict[str, list[dict]], out: str | Path = HERE, name: str = "lmfab",
          made_by: str = "") -> list[Path]:
    """Write the items. Into the package folder (the shipped ``lmfab_*`` tasks): the jsonl
    files only. Into any other folder: a task folder for ``lmfab eval --include-path``, each
    task as ``<name>_cloze`` / ``<name>_choice`` (YAML + jsonl) with a copy of the loader."""
    out = Path(out)
    shipped = out.resolve() == HERE
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"--name {name!r}: letters, digits and _ only, starting with a letter")
    if shipped and name != "lmfab":
        raise ValueError(f"--name {name}: the package folder holds the shipped lmfab_* tasks; "
                         "give --out for tasks of another name")
    if not shipped and name == "lmfab":
        raise ValueError(f"--out {out}: give --name (e.g. --name corpus): tasks named lmfab_* "
                         "would shadow the shipped ones")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, rows in items.items():
        task = f"{name}_{key.split('_', 1)[1]}"
        path = out / f"{task}.jsonl"
        atomic_write_text(path, to_jsonl(rows))
        paths.append(path)
        if shipped:
            continue
        spec = [ln for ln in (HERE / f"{key}.yaml").read_text().splitlines()
                if not ln.startswith("#")]
        body = "\n".join(spec).replace(f"task: {key}", f"task: {task}", 1)
        body = body.replace(
            "custom_dataset: !function", f"dataset_kwargs:\n  data_file: {task}.jsonl\n"
            "custom_dataset: !function", 1)
        head = f"# {task}: {len(rows)} items made by {made_by or 'lmfab.eval.tasks.build'}\n"
        ypath = out / f"{task}.yaml"
        atomic_write_text(ypath, head + body + "\n")
        paths.append(ypath)
    if not shipped:
        atomic_write_text(out / "utils.py", (HERE / "utils.py").read_text())
        paths.append(out / "utils.py")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmfab.eval.tasks.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="jsonl / jsonl.zst corpus")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="held-out share of the split the items come from")
    p.add_argument("--seed", type=int, default=0, help="split seed and sampling seed")
    p.add_argument("--out", default=str(HERE),
                   help="the package folder (the shipped tasks; default) or a task folder "
                   "for `lmfab eval --include-path`")
    p.add_argument("--name", default="lmfab",
                   help="task name prefix: <name>_cloze, <name>_choice (another --out only)")
    args = p.parse_args(argv)
    made_by = (f"python -m lmfab.eval.tasks.build --corpus {args.corpus} --val-fraction "
               f"{args.val_fraction} --seed {args.seed} --name {args.name}")
    try:
        items = build(args.corpus, val_fraction=args.val_fraction, seed=args.seed)
        paths = write(items, args.out, args.name, made_by=made_by)
    except (FileNotFoundError, ValueError) as e:
        print(f"lmfab: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
