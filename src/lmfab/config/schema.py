"""Typed schema of an lmfab params file.

The sections follow the Cerebras Model Zoo's params YAML (``model``, ``optimizer``,
``train_input``, ``eval_input``, ``runconfig``); the field names inside are lmfab's own
(``n_layer``, ``d_model``, ``seq_len``, ... see DESIGN.md, "Naming"). Each component of the
fab receives only its own section.

Choices are closed sets (``Literal``): a value outside the set fails at load time, in
:mod:`lmfab.config.load`, with the key path and the allowed values. Cross-field rules
("impossible combinations") live in :func:`lmfab.config.load.check_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """One GPT, options from closed sets (learned positions, LayerNorm, GELU for now)."""

    n_layer: int
    n_head: int
    d_model: int
    vocab_size: int
    max_seq_len: int
    d_ff: int | None = None  # default 4 * d_model
    pos: Literal["learned"] = "learned"
    mlp: Literal["gelu"] = "gelu"
    norm: Literal["layernorm"] = "layernorm"
    tied_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-5

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


@dataclass
class LRSegment:
    """One piece of a piecewise learning-rate schedule (the Model Zoo's scheduler list).

    ``linear`` and ``cosine`` go from ``start`` to ``end`` over ``steps``; ``constant`` holds
    ``start``. After the last segment the rate stays at its final value.
    """

    schedule: Literal["constant", "linear", "cosine"]
    steps: int
    start: float
    end: float | None = None  # constant: must be absent or equal to start


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    learning_rate: float | list[LRSegment] = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0
    fused: Literal["auto", "on", "off"] = "auto"  # fused AdamW kernel on CUDA


@dataclass
class TrainInputConfig:
    """Packed token shards written by ``lmfab data tokenize``.

    ``batch_size`` is global (sequences per optimizer step, over all devices);
    ``micro_batch_size`` is per device per forward/backward. Gradient accumulation is
    derived: batch_size / (devices * micro_batch_size).
    """

    data_dir: str
    batch_size: int
    seq_len: int
    micro_batch_size: int | None = None  # default: batch_size / devices (no accumulation)
    split: str = "train"
    shuffle: bool = True
    seed: int = 0


@dataclass
class EvalInputConfig:
    data_dir: str | None = None  # default: train_input.data_dir
    batch_size: int = 8
    micro_batch_size: int | None = None
    split: str = "val"
    max_batches: int | None = 20  # None: the whole split


@dataclass
class RunConfig:
    max_steps: int = 1000
    log_steps: int = 10
    checkpoint_steps: int = 0  # 0: only at the end of the run
    eval_steps: int = 0  # in-loop eval every N steps; 0: none (train_and_eval evals at the end)
    keep_checkpoints: int = 3  # newest N kept; 0 keeps all
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    peak_flops_per_device: float | None = None  # for MFU; known GPUs are detected
    tensorboard: bool = True
    model_dir: str | None = None  # --model_dir overrides


@dataclass
class Config:
    model: ModelConfig
    optimizer: OptimizerConfig
    train_input: TrainInputConfig
    eval_input: EvalInputConfig = field(default_factory=EvalInputConfig)
    runconfig: RunConfig = field(default_factory=RunConfig)
