"""Rules of a params file: values within a section and combinations across sections.

:func:`check_config` runs at load time, after the strict conversion of
:mod:`lmfab.config.load`, so combinations that cannot run (a global batch that does not
divide over the devices, ``seq_len`` beyond the model's positions, a sequence-length stage
whose tokens do not divide into whole sequences, ...) fail with the key path before a run
starts, not at step 1000. :func:`micro_batching` is the batch split every run uses.
"""

from __future__ import annotations

from lmfab.config.errors import ConfigError
from lmfab.config.schema import Config, ModelConfig


def micro_batching(batch_size: int, micro: int | None, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum_steps) for a global batch over ``world_size`` devices."""
    if batch_size % world_size:
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by the {world_size} devices"
        )
    per_device = batch_size // world_size
    micro = micro or per_device
    if per_device % micro:
        raise ConfigError(
            f"batch_size={batch_size} over {world_size} device(s) is {per_device} per device, "
            f"not divisible by micro_batch_size={micro}; choose a divisor of {per_device}"
        )
    return micro, per_device // micro


# Sizes past these are not models but typos; they would make even a dry run build for hours
# (every layer is a module) or overflow the token format (uint32 ids).
_MODEL_LIMITS = {"n_layer": 4096, "n_head": 65536, "d_model": 1 << 20, "d_ff": 1 << 24,
                 "vocab_size": 1 << 32, "max_seq_len": 1 << 24}
MAX_STEPS_LIMIT = 10**12


def check_model_config(m: ModelConfig) -> None:
    """Rules within the model section."""
    for name in ("n_layer", "n_head", "d_model", "vocab_size", "max_seq_len"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name}: must be positive, got {getattr(m, name)}")
    for name, most in _MODEL_LIMITS.items():
        value = getattr(m, name)
        if value is not None and value > most:
            raise ConfigError(f"model.{name}: at most {most:,}, got {value:,} (beyond any "
                              "model lmfab can build or store: a typo?)")
    if m.d_model % m.n_head:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}"
        )
    for name in ("output_mult", "embedding_mult", "init_std"):
        if not getattr(m, name) > 0:
            raise ConfigError(f"model.{name}: must be positive, got {getattr(m, name)}")
    if m.kv_heads <= 0 or m.n_head % m.kv_heads:
        raise ConfigError(
            f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head} (grouped-query)"
        )
    if m.pos == "rope":
        rot = int(m.d_head * m.rope_fraction)
        if not 0.0 < m.rope_fraction <= 1.0 or rot % 2:
            raise ConfigError(
                f"model.rope_fraction={m.rope_fraction}: the rotated dims (d_head x fraction "
                f"= {m.d_head * m.rope_fraction:g}) must be a positive even number"
            )
    if m.mup_base_d_model is not None:
        if m.mup_base_d_model <= 0:
            raise ConfigError("model.mup_base_d_model: must be positive")
        if m.attn_score_scale != "inv_d_head":
            raise ConfigError(
                "model.attn_score_scale: muP (mup_base_d_model set) needs inv_d_head: "
                "attention logits scaled 1/d_head keep their size as the width grows"
            )
    elif m.mup_base_d_ff is not None:
        raise ConfigError("model.mup_base_d_ff needs model.mup_base_d_model (muP) as well")
    if m.d_ff is not None and m.d_ff <= 0:
        raise ConfigError(f"model.d_ff: must be positive, got {m.d_ff}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.dropout > 0 and m.pos == "alibi":
        raise ConfigError("model.dropout: the fused ALiBi attention has no attention-probability "
                          "dropout; use dropout 0 with pos: alibi (as BTLM and Jais do)")


def _sources(data_dir: str | None, mixture: list | None, where: str) -> tuple:
    if (data_dir is None) == (mixture is None):
        raise ConfigError(f"{where}: give exactly one of data_dir and mixture")
    if mixture is not None:
        if not mixture:
            raise ConfigError(f"{where}.mixture: an empty list")
        for i, src in enumerate(mixture):
            if not src.weight > 0 or src.weight == float("inf"):
                raise ConfigError(f"{where}.mixture[{i}].weight: must be positive and finite")
            if not src.data_dir.strip():
                raise ConfigError(f"{where}.mixture[{i}].data_dir: an empty path")
        return tuple((src.data_dir, src.weight) for src in mixture)
    if not data_dir.strip():
        raise ConfigError(f"{where}.data_dir: an empty path")
    return ((data_dir, 1.0),)


def stage_batches(cfg: Config, world_size: int = 1) -> list[tuple]:
    """(at_step, seq_len, sources, mixture, global batch, micro-batch, accumulation) of each
    sequence-length stage (one unless train_input.seq_len_schedule is set), checked: stages
    in step order, lengths the model can take, tokens per step that divide into whole
    sequences and over the devices. :func:`lmfab.train.plan.train_stages` names them."""
    t, m = cfg.train_input, cfg.model
    micro, accum = micro_batching(t.batch_size, t.micro_batch_size, world_size)
    stages = [(0, t.seq_len, _sources(t.data_dir, t.mixture, "train_input"),
               t.mixture is not None, t.batch_size, micro, accum)]
    last_step = 0
    for i, st in enumerate(t.seq_len_schedule or []):
        where = f"train_input.seq_len_schedule[{i}]"
        if st.at_step <= last_step:
            raise ConfigError(f"{where}.at_step={st.at_step}: must be after the previous stage's")
        if st.seq_len <= 0 or (m.pos == "learned" and st.seq_len > m.max_seq_len):
            raise ConfigError(f"{where}.seq_len={st.seq_len}: must be positive and, with learned "
                              f"positions, at most model.max_seq_len={m.max_seq_len}")
        tokens, micro_tokens = t.batch_size * t.seq_len, micro * t.seq_len
        if tokens % st.seq_len or micro_tokens % st.seq_len:
            raise ConfigError(
                f"{where}.seq_len={st.seq_len}: the {tokens} tokens per step (and {micro_tokens} "
                "per micro-batch) must divide into whole sequences of this length")
        batch, st_micro = tokens // st.seq_len, micro_tokens // st.seq_len
        try:
            st_micro, st_accum = micro_batching(batch, st_micro, world_size)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        stages.append((st.at_step, st.seq_len, _sources(st.data_dir, st.mixture, where),
                       st.mixture is not None, batch, st_micro, st_accum))
        last_step = st.at_step
    return stages


def check_config(cfg: Config, *, world_size: int = 1) -> None:
    """Cross-field checks: combinations that cannot run fail here, not at step 1000."""
    m, o, t, e, r = cfg.model, cfg.optimizer, cfg.train_input, cfg.eval_input, cfg.runconfig
    k, par, prof = r.kernels, r.parallel, r.profile
    check_model_config(m)
    if t.seq_len <= 0:
        raise ConfigError(f"train_input.seq_len: must be positive, got {t.seq_len}")
    if t.seq_len > m.max_seq_len and m.pos == "learned":
        raise ConfigError(
            f"train_input.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
            "(learned positions end there); raise model.max_seq_len or lower seq_len"
        )
    run_tokens = t.batch_size * t.seq_len * max(r.max_steps, 1)
    if run_tokens >= 2**63:  # token counters, loader positions and FLOPs are 64-bit
        raise ConfigError(
            f"train_input.batch_size={t.batch_size} x seq_len={t.seq_len} x "
            f"runconfig.max_steps={r.max_steps} = {run_tokens:.3g} tokens: more than a 64-bit "
            "count holds; is batch_size in sequences (not tokens)?")
    if e.data_dir is not None and not e.data_dir.strip():  # not silently the training data
        raise ConfigError("eval_input.data_dir: an empty path (leave the key out, or null, to "
                          "evaluate on train_input's data)")
    for i, folder in enumerate(e.tasks_include_path):
        if not folder.strip():
            raise ConfigError(f"eval_input.tasks_include_path[{i}]: an empty path")
    if e.seq_len is not None and (e.seq_len <= 0 or (e.seq_len > m.max_seq_len and m.pos == "learned")):
        raise ConfigError(
            f"eval_input.seq_len={e.seq_len}: must be positive and, with learned positions, "
            f"at most model.max_seq_len={m.max_seq_len}"
        )
    if k.loss_chunk < 0:
        raise ConfigError("runconfig.kernels.loss_chunk: must be >= 0 (0: all positions at "
                          f"once), got {k.loss_chunk}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optimizer.betas: expected two numbers in [0, 1), got {o.betas}")
    if o.max_grad_norm is not None and o.max_grad_norm <= 0:
        raise ConfigError("optimizer.max_grad_norm: must be positive or null (no clipping)")
    if isinstance(o.learning_rate, list):
        if not o.learning_rate:
            raise ConfigError("optimizer.learning_rate: an empty schedule list")
        for i, seg in enumerate(o.learning_rate):
            where = f"optimizer.learning_rate[{i}]"
            if seg.steps <= 0:
                raise ConfigError(f"{where}.steps: must be positive, got {seg.steps}")
            if seg.schedule == "constant" and seg.end not in (None, seg.start):
                raise ConfigError(f"{where}.end: a constant segment holds start; drop end")
            if seg.schedule != "constant" and seg.end is None:
                raise ConfigError(f"{where}.end: required for a {seg.schedule} segment")
    elif o.learning_rate < 0:
        raise ConfigError("optimizer.learning_rate: must be non-negative")
    for section, batch, micro in (
        ("train_input", t.batch_size, t.micro_batch_size),
        ("eval_input", e.batch_size, e.micro_batch_size),
    ):
        if batch <= 0 or (micro is not None and micro <= 0):
            raise ConfigError(f"{section}.batch_size and micro_batch_size must be positive")
        try:
            micro_batching(batch, micro, world_size)
        except ConfigError as err:
            raise ConfigError(f"{section}: {err}") from None
    stage_batches(cfg, world_size)
    if r.max_steps < 0 or r.log_steps <= 0:
        raise ConfigError("runconfig.max_steps must be >= 0 and runconfig.log_steps > 0")
    if r.max_steps > MAX_STEPS_LIMIT:
        raise ConfigError(f"runconfig.max_steps: at most {MAX_STEPS_LIMIT:,}, got {r.max_steps:,}")
    if r.checkpoint_steps < 0 or r.eval_steps < 0 or r.keep_checkpoints < 0:
        raise ConfigError("runconfig.checkpoint_steps, eval_steps, keep_checkpoints: >= 0")
    if prof.steps < 0 or prof.start < 0:
        raise ConfigError("runconfig.profile.steps and runconfig.profile.start: >= 0")
    if par.checkpoint_every < 1:
        raise ConfigError(f"runconfig.parallel.checkpoint_every: must be >= 1, got {par.checkpoint_every}")
    if not par.ddp_bucket_mb > 0:
        raise ConfigError(f"runconfig.parallel.ddp_bucket_mb: must be > 0, got {par.ddp_bucket_mb}")
    if par.compile and par.ddp_split_graph is not False and par.ddp_bucket_mb < 1:
        # torch.compile's DDP graph split asserts that DDP's 1 MiB first bucket is no larger
        # than the others (an AssertionError deep in dynamo on the first multi-GPU step)
        raise ConfigError(
            f"runconfig.parallel.ddp_bucket_mb={par.ddp_bucket_mb}: under torch.compile on several GPUs "
            "the graph may be cut at the buckets (ddp_split_graph true, or auto without "
            "accumulation), which needs every bucket at least as large as DDP's first, 1 MB; "
            "use >= 1, or runconfig.parallel.ddp_split_graph: false")
