"""Params YAML, fuzzed through the real entry point (``lmfab run --params F --dry-run``).

Three generators: the valid tiny config with one leaf mutated (wrong type, huge or negative
number, string where a list goes, a list where a mapping goes, deleted, an unknown key
beside it); random YAML documents; and valid configs drawn from the schema's ranges, which
must never be refused. The Model Zoo importer gets the same treatment from the published
Cerebras-GPT file."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st

from ..conftest import CONFIGS, REPO, tiny_overrides
from .oracle import run_cli

TINY = CONFIGS / "train" / "tiny.yaml"
ZOO = REPO / "tests" / "fixtures" / "modelzoo" / "published" / "cerebras_gpt_111m_r2.0.yaml"

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e6", "3e-4", "off", "yes", "auto", "[1, 2]", "{a: 1}", "~", "!!str"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    yield path


def _base(data_dir: Path) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    for item in tiny_overrides(data_dir):
        key, value = item.split("=", 1)
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return raw


def _write(raw, suffix=".yaml") -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False)
    with f:
        f.write(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return f.name


def _mutate(raw: dict, data) -> tuple[dict, str]:
    raw = copy.deepcopy(raw)
    paths = [p for p in _leaves(raw) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    parent = raw
    for part in path[:-1]:
        parent = parent[part]
    op = data.draw(st.sampled_from(["set", "delete", "unknown"]), label="op")
    if op == "delete":
        del parent[path[-1]]
    elif op == "unknown" and isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=10), label="key")] = 1
    else:
        parent[path[-1]] = data.draw(values, label="value")
    return raw, str(path[0])


@given(data=st.data())
def test_mutated_params(data, tiny_data):
    raw, section = _mutate(_base(tiny_data), data)
    path = _write(raw)
    run_cli(["run", "--params", path, "--dry-run"], path, f"{section}:", f"{section}.")


@given(doc=values)
def test_random_yaml_documents(doc):
    path = _write(doc)
    code, _, _ = run_cli(["run", "--params", path, "--dry-run"], path)
    assert code == 2  # nothing random is a whole valid config


@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(
    lambda b: b.decode("latin-1"))))
def test_random_text_as_params(text):
    path = _write(text)
    run_cli(["run", "--params", path, "--dry-run"], path)


@st.composite
def valid_configs(draw, data_dir):
    raw = _base(data_dir)
    n_head = draw(st.sampled_from([1, 2, 4]))
    m = raw["model"]
    m.update(n_layer=draw(st.integers(1, 4)), n_head=n_head,
             d_model=n_head * draw(st.sampled_from([8, 16, 32])),
             vocab_size=draw(st.integers(512, 2048)), max_seq_len=draw(st.sampled_from([32, 64])))
    m["d_ff"] = draw(st.sampled_from([None, 4 * m["d_model"], 64]))
    m["pos"] = draw(st.sampled_from(["learned", "alibi", "rope"]))
    m["mlp"] = draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "swiglu"]))
    m["norm"] = draw(st.sampled_from(["layernorm", "rmsnorm"]))
    m["dropout"] = 0.0 if m["pos"] == "alibi" else draw(st.floats(0.0, 0.5))
    micro = draw(st.sampled_from([1, 2, 4]))
    raw["train_input"].update(micro_batch_size=micro, batch_size=micro * draw(st.integers(1, 4)))
    raw["optimizer"]["learning_rate"] = draw(st.one_of(
        st.floats(1e-6, 1e-1),
        st.lists(st.fixed_dictionaries({"schedule": st.sampled_from(["linear", "cosine"]),
                                        "steps": st.integers(1, 1000),
                                        "start": st.floats(0, 1e-2), "end": st.floats(0, 1e-2)}),
                 min_size=1, max_size=3)))
    raw["optimizer"]["weight_decay"] = draw(st.floats(0.0, 0.3))
    raw["runconfig"]["max_steps"] = draw(st.integers(0, 10**6))
    return raw


@given(data=st.data())
def test_valid_params_are_never_refused(data, tiny_data):
    raw = data.draw(valid_configs(tiny_data))
    path = _write(raw)
    code, out, err = run_cli(["run", "--params", path, "--dry-run"], path)
    assert code == 0, err
    assert "memory/device" in out


@given(data=st.data())
def test_mutated_modelzoo_params(data, tiny_data):
    raw = yaml.safe_load(ZOO.read_text())
    raw["train_input"]["data_dir"] = str(tiny_data)
    raw, _ = _mutate(raw, data)
    path = _write(raw)
    run_cli(["import", "modelzoo", path, "-o", path + ".out.yaml"], path)
