"""Binary inputs from elsewhere, fuzzed: token shards, tokenizer files, safetensors weights.

A valid file is written, then cut, flipped, padded or rewritten; each reader must either
read it (and then what it read is consistent) or refuse it with a message naming the file
or the tensor -- never an IndexError, a SafetensorError or a segfault."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from lmfab.checkpoint import load_weights
from lmfab.config.schema import ModelConfig
from lmfab.data.loader import BatchLoader, TokenDataset
from lmfab.data.prep.pack import load_checked_tokenizer
from lmfab.data.shards import HEADER_SIZE, ShardError, open_shard, write_shard
from lmfab.models.gpt import build_model, materialize

from .oracle import assert_names, run_cli

HASH = "ab" * 32
edits = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 400)),
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(st.just("pad"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("field"), st.sampled_from([8, 12, 16, 20, 24]),
              st.sampled_from([0, 1, 2, 3, 4, 7, 2**31, 2**32 - 1])),
)


def _edit(data: bytes, edit) -> bytes:
    kind = edit[0]
    if kind == "cut":
        return data[: edit[1]]
    if kind == "flip":
        i = edit[1] % max(len(data), 1)
        return data[:i] + bytes([data[i] ^ edit[2]]) + data[i + 1:] if data else data
    if kind == "pad":
        return data + edit[1]
    offset, value = edit[1], edit[2]
    width = 8 if offset == 24 else 4
    if value >= 2 ** (8 * width):
        return data
    return data[:offset] + value.to_bytes(width, "little") + data[offset + width:]


@given(edit=edits, dtype=st.sampled_from([np.uint16, np.uint32]), windows=st.integers(1, 4))
def test_shards(edit, dtype, windows):
    d = Path(tempfile.mkdtemp()) / "train"
    d.mkdir()
    path = d / "shard_00000.tok"
    ids = np.arange(windows * 9, dtype=np.int64) % 300
    write_shard(path, ids, 9, HASH, dtype=dtype)
    path.write_bytes(_edit(path.read_bytes(), edit))
    try:
        header, tokens = open_shard(path)
    except ShardError as err:
        assert_names(err, str(path))
        return
    # read as valid: the file is exactly a header and its tokens
    assert path.stat().st_size == HEADER_SIZE + header.n_tokens * header.itemsize
    assert tokens.shape == (header.n_windows, header.window)
    try:
        ds = TokenDataset(d, window=9)
    except ShardError as err:
        assert_names(err, str(path))
        return
    if len(ds):
        batch = BatchLoader(ds, global_batch=2, rank=0, world_size=1, seed=0).next_batch()
        assert batch.shape == (2, 9)


@pytest.fixture(scope="module")
def tokenizer_json(tiny_data) -> bytes:
    return (tiny_data / "tokenizer.json").read_bytes()


@given(edit=edits)
def test_tokenizer_files(edit, tokenizer_json):
    path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    path.write_bytes(_edit(tokenizer_json, edit))
    try:
        tok = load_checked_tokenizer(path)
    except ValueError as err:
        assert_names(err, str(path))
    else:
        assert tok.token_to_id("<|endoftext|>") is not None


@given(doc=st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                        lambda c: st.one_of(st.lists(c, max_size=3),
                                            st.dictionaries(st.text(max_size=6), c, max_size=3)),
                        max_leaves=8))
def test_random_json_as_tokenizer(doc):
    path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as info:
        load_checked_tokenizer(path)
    assert_names(info.value, str(path))


TINY_MODEL = ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=64, max_seq_len=8)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    model = materialize(build_model(TINY_MODEL), "cpu", seed=0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _model():
    return materialize(build_model(TINY_MODEL), "cpu", seed=1)


tensor_edits = st.one_of(
    st.tuples(st.just("rename"), st.integers(0, 50), st.text(min_size=1, max_size=10)),
    st.tuples(st.just("drop"), st.integers(0, 50)),
    st.tuples(st.just("reshape"), st.integers(0, 50), st.integers(1, 40)),
    st.tuples(st.just("dtype"), st.integers(0, 50),
              st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.float64])),
    st.tuples(st.just("extra"), st.text(min_size=1, max_size=10)),
)


@given(edit=tensor_edits)
def test_foreign_safetensors_names_and_shapes(edit, weights):
    w = dict(weights)
    names = sorted(w)
    kind = edit[0]
    if kind == "rename":
        name = names[edit[1] % len(names)]
        w[edit[2]] = w.pop(name)
    elif kind == "drop":
        w.pop(names[edit[1] % len(names)])
    elif kind == "reshape":
        w[names[edit[1] % len(names)]] = torch.zeros(edit[2])
    elif kind == "dtype":
        name = names[edit[1] % len(names)]
        w[name] = w[name].to(edit[2])
    else:
        w[edit[1]] = torch.zeros(2)
    ckpt = Path(tempfile.mkdtemp())
    save_file({k: v.contiguous() for k, v in w.items()}, str(ckpt / "model.safetensors"))
    try:
        load_weights(_model(), ckpt)
    except ValueError as err:
        assert_names(err, str(ckpt))
    else:  # loaded: every name and shape matched (a float dtype is cast, as torch does)
        assert set(w) == set(weights)


@given(edit=edits)
def test_corrupt_safetensors_bytes(edit, weights):
    ckpt = Path(tempfile.mkdtemp())
    save_file(weights, str(ckpt / "model.safetensors"))
    path = ckpt / "model.safetensors"
    path.write_bytes(_edit(path.read_bytes(), edit))
    try:
        load_weights(_model(), ckpt)
    except ValueError as err:
        assert_names(err, str(ckpt))


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    """A real two-step run folder to corrupt."""
    from ..conftest import CONFIGS, tiny_overrides

    run = tmp_path_factory.mktemp("run") / "r"
    sets = [a for o in tiny_overrides(tiny_data) for a in ("--set", o)]
    code, _, err = run_cli(["train", "--params", str(CONFIGS / "train" / "tiny.yaml"),
                            "--model-dir", str(run), "--num-steps", "1", *sets], str(run))
    assert code == 0, err
    return run


@pytest.mark.slow
@given(edit=edits, target=st.sampled_from(["model.safetensors", "state.json", "config.yaml",
                                           "../../tokenizer.json"]))
def test_generate_from_a_corrupted_run(edit, target, trained_run):
    run = Path(tempfile.mkdtemp()) / "r"
    shutil.copytree(trained_run, run)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    path = (ckpt / target).resolve()
    path.write_bytes(_edit(path.read_bytes(), edit))
    run_cli(["generate", "--model-dir", str(run), "--max-new-tokens", "2"], str(run))


def test_header_struct_is_the_documented_one():
    assert struct.calcsize("<8sIIIIQ32s") == HEADER_SIZE
