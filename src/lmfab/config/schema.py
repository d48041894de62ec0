"""Typed schema of an lmfab params file.

The sections follow the Cerebras Model Zoo's params YAML (``model``, ``optimizer``,
``train_input``, ``eval_input``, ``runconfig``); the field names inside are lmfab's own
(``n_layer``, ``d_model``, ``seq_len``, ... see DESIGN.md, "Naming"). Each component of the
fab receives only its own section.

Choices are closed sets (``Literal``): a value outside the set fails at load time, in
:mod:`lmfab.config.load`, with the key path and the allowed values. Cross-field rules
("impossible combinations") live in :func:`lmfab.config.check.check_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """One GPT; every architectural choice is a field with a closed set of values.

    Width multipliers of muP (Yang et al. 2022; Cerebras-GPT, arXiv 2304.03208, App. G) are
    enabled by ``mup_base_d_model``: with m = d_model / mup_base_d_model the output logits are
    multiplied by ``output_mult / m``, hidden matrices are initialised with std / sqrt(m) and
    trained with Adam LR / m. They are derived where they are used (init, forward, optimizer
    groups; see :mod:`lmfab.models.mup`), never stored on tensors.
    """

    n_layer: int
    n_head: int
    d_model: int
    vocab_size: int
    max_seq_len: int  # learned positions: the table size; alibi/rope: the trained context
    d_ff: int | None = None  # default 4 * d_model (gelu) / the LLaMA 8/3 rule is not implied
    n_kv_head: int | None = None  # grouped-query attention; default n_head (multi-head)
    pos: Literal["learned", "alibi", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's dims that rotate (GPT-NeoX: 0.25)
    mlp: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    parallel_residual: bool = False  # GPT-J/NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    tied_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-5
    attn_score_scale: Literal["rsqrt_d_head", "inv_d_head"] = "rsqrt_d_head"
    embedding_mult: float = 1.0  # embeddings output x this (Cerebras muP: 10, BTLM: 14.6)
    output_mult: float = 1.0  # logits x this (muP: x this / m; BTLM alpha 2.22)
    mup_base_d_model: int | None = None  # enables muP width scaling
    mup_base_d_ff: int | None = None  # default: d_ff scales like d_model

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

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
class DataSource:
    """One packed dataset of a mixture (``lmfab data tokenize`` / ``lmfab data pack`` output)."""

    data_dir: str
    weight: float = 1.0


@dataclass
class SeqLenStage:
    """From ``at_step`` on, train at ``seq_len`` on data packed at that length (BTLM's 2K -> 8K).

    Tokens per step stay constant: the global batch (and the micro-batch) scale by
    train_input.seq_len / seq_len.
    """

    seq_len: int
    at_step: int
    data_dir: str | None = None
    mixture: list[DataSource] | None = None


@dataclass
class TrainInputConfig:
    """Packed token shards: one ``data_dir``, or a weighted ``mixture`` of them.

    ``batch_size`` is global (sequences per optimizer step, over all devices);
    ``micro_batch_size`` is per device per forward/backward. Gradient accumulation is
    derived: batch_size / (devices * micro_batch_size). ``seq_len_schedule`` switches to
    longer sequences (and their data) at given steps, keeping tokens per step.
    """

    batch_size: int
    seq_len: int
    data_dir: str | None = None
    mixture: list[DataSource] | None = None
    seq_len_schedule: list[SeqLenStage] | None = None
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
    max_batches: int | None = 20  # that many batches spread evenly over the split; None: all
    seq_len: int | None = None  # default train_input.seq_len; longer tests extrapolation
    tasks: list[str] = field(default_factory=list)
    """Downstream tasks scored through lm-evaluation-harness at every eval (eval_steps, the
    final eval, eval and eval_all), logged beside the held-out loss as ``<task>/<metric>``,
    e.g. [lmfab_cloze, lmfab_choice] (lmfab's offline tasks) or lm-eval's (hellaswag: needs
    the Hugging Face Hub). Empty: held-out loss only."""
    tasks_limit: int | None = 200
    """Items per downstream task at each eval (None: all); bounds the time an eval takes."""
    tasks_batch_size: int = 16
    """Requests per forward pass of the downstream evaluation."""
    tasks_include_path: list[str] = field(default_factory=list)
    """Folders of more task YAML files (lm-eval's include path), e.g. one written by
    ``python -m lmfab.eval.tasks.build --name corpus --out DIR`` from a corpus's held-out
    documents; their tasks are then named in ``tasks``."""


@dataclass
class KernelsConfig:
    """``runconfig.kernels``: which kernels compute the model (read by
    :func:`lmfab.models.execution.choose_kernels`); they change speed and memory, not the
    result beyond rounding."""

    attention_backend: Literal["auto", "torch", "cudnn", "flash", "efficient", "math"] = "auto"
    """Kernel for softmax attention (learned / rope positions; ALiBi always uses
    FlexAttention): auto = cuDNN first on Hopper GPUs (1.5-1.8x flash there,
    dev/LOG.md), PyTorch's own choice elsewhere; or one SDPA backend first (the others
    stay as fall-backs)."""
    loss: Literal["auto", "fused", "standard"] = "auto"
    """Output projection + cross-entropy (kernels/cross_entropy.py): fused = one matmul and one
    row kernel that turns the logits into their gradient in place (Triton on CUDA); standard =
    F.cross_entropy on full fp32 logits; auto = fused on CUDA, standard elsewhere."""
    loss_chunk: int = 0
    """Fused loss only: positions per block (0: all at once). A block computes its gradients in
    forward, so only (loss_chunk x vocab) logits exist: long sequences, large vocabularies."""
    mlp_kernel: Literal["auto", "fused", "standard"] = "auto"
    """The MLP's bias + GELU (kernels/bias_gelu.py): fused = one Triton kernel each way, the
    bias gradient made in the backward kernel's pass; standard = the GEMM adds the bias and
    torch (inductor) applies GELU; auto = fused on CUDA (with Triton). GELU MLPs with biases."""
    residual_dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype of the residual stream between blocks under bf16 autocast: fp32 (the weights'
    dtype, as autocast leaves it) or bf16 (half the activation traffic, as Megatron-LM's
    default); norms and softmax still compute in fp32. Under FSDP2 on GPUs the parameters are
    bf16, so the stream is bf16 either way."""


@dataclass
class ParallelConfig:
    """``runconfig.parallel``: how the model is wrapped for training, in this order: float8
    layers, activation checkpointing, torch.compile, DDP or FSDP2 (read by
    :func:`lmfab.dist.parallelize`)."""

    compile: bool = False
    """torch.compile the model (under FSDP2: each block)."""
    compile_mode: Literal["default", "tuned", "max-autotune-no-cudagraphs", "max-autotune",
                          "reduce-overhead"] = "default"
    """torch.compile mode: default; tuned (default + coordinate-descent tuning of inductor's
    fused pointwise/reduction kernels: minutes more compile time on an H200); or one of
    torch.compile's modes: max-autotune-no-cudagraphs (Triton GEMM templates with fused
    epilogues, minutes more), max-autotune, reduce-overhead (CUDA graphs)."""
    float8: Literal["off", "tensorwise", "rowwise", "rowwise_with_gw_hp"] = "off"
    """float8 matmuls for the transformer blocks' linear layers (torchao Float8Linear; needs the
    fp8 extra and, on GPUs, compute capability 8.9+: H100, H200, Ada). tensorwise or rowwise
    scaling; weights, checkpoints and everything outside the blocks stay as they are."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Data parallelism: ddp replicates the model; fsdp shards parameters, gradients and
    optimizer state (FSDP2); auto picks fsdp when the 16 bytes/parameter of weights,
    gradients and AdamW state would take over half of one GPU's memory."""
    ddp_bucket_mb: float = 25.0
    """DDP's gradient bucket size in MB (PyTorch's default 25): an all-reduce per bucket."""
    ddp_split_graph: Literal["auto"] | bool = "auto"
    """DDP under torch.compile: true splits the compiled graph at the gradient buckets so each
    bucket's all-reduce starts during backward (PyTorch's DDP optimizer); false keeps one
    graph and all-reduces after backward (no fusion lost at the cuts, no overlap either);
    auto: false when each step accumulates 2+ micro-batches (the all-reduce is rare, the cut
    graph would run on every micro-batch), true otherwise. Measured on 2 H200s at the 1.3B
    shape, 4 micro-batches per step: 98.3% scaling with false, 96.4% with true. Over slow
    links (several nodes) with little accumulation, overlap may matter more: try true."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free each block's gathered parameters after its forward (true, least memory) or
    keep them for backward (false: one all-gather per block fewer, ZeRO-2-like memory)."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype in which gradients cross between devices. fp32 (default): DDP all-reduces its fp32
    gradients, FSDP2 upcasts each block's bf16 gradients before its reduce-scatter. bf16: half
    the bytes on the links; FSDP2 reduces the bf16 gradients as computed, DDP casts each bucket
    to bf16 and back (lmfab's hook, like PyTorch's bf16_compress_hook, which refuses gloo).
    The sum across ranks is rounded to bf16; the optimizer still steps fp32 weights."""
    activation_checkpointing: bool = False
    """Recompute each block in backward: long context."""
    checkpoint_every: int = 1
    """With activation_checkpointing: recompute every N-th block only (1: all). The others keep
    their activations: less recompute for more memory (selective checkpointing by layer)."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: auto = nccl on CUDA, gloo on CPUs."""


@dataclass
class ProfileConfig:
    """``runconfig.profile``: torch.profiler over a window of steps (read by
    :class:`lmfab.train.profile.ProfileWindow`)."""

    steps: int = 0
    """Profile steps start+1 .. start+steps (0: off): each rank writes GPU kernel time per
    category and a Chrome trace to model_dir/profile/."""
    start: int = 10
    """Steps before the window: after compilation and warm-up."""


@dataclass
class RunConfig:
    """``runconfig``: the run's basics (the Model Zoo's keys) flat; execution choices in the
    sections ``kernels``, ``parallel`` and ``profile``."""

    max_steps: int = 1000
    """Optimizer steps of the whole run (``--max_steps`` overrides)."""
    log_steps: int = 10
    """Print and record the training metrics every N steps."""
    checkpoint_steps: int = 0
    """Save a checkpoint every N steps; 0: only at the end of the run."""
    eval_steps: int = 0
    """In-loop eval every N steps; 0: none (train_and_eval evals at the end)."""
    keep_checkpoints: int = 3
    """The newest N checkpoints are kept; 0 keeps all."""
    checkpoint_at_end: bool = True
    """Save a checkpoint when the run ends (the resume point). Off only for throughput runs
    whose checkpoint would be large and unused (13B with AdamW state: 156 GB)."""
    seed: int = 0
    """Seed of the weights' initialisation and of each rank's RNG."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPUs."""
    peak_flops_per_device: float | None = None
    """Peak FLOP/s of one device, for MFU; known GPUs are detected."""
    tensorboard: bool = True
    """Write TensorBoard events beside metrics.jsonl."""
    model_dir: str | None = None
    """The run folder (``--model_dir`` overrides)."""
    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    """A step whose loss or gradient norm is NaN/inf is never applied: stop (an error naming
    the step), skip (drop its update, go on) or rollback (restore the newest checkpoint and
    replay, skipping the offending batch). Each event is logged in metrics.jsonl."""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class Config:
    model: ModelConfig
    optimizer: OptimizerConfig
    train_input: TrainInputConfig
    eval_input: EvalInputConfig = field(default_factory=EvalInputConfig)
    runconfig: RunConfig = field(default_factory=RunConfig)
