"""runconfig keys that moved into a section or were removed, and what becomes of them.

``runconfig`` keeps the Model Zoo's run keys flat (``max_steps``, ``log_steps``, ``seed``, ...)
and groups the execution choices into ``kernels``, ``parallel`` and ``profile``, each read by
one module. A params file (or a ``--set``) that uses an old key fails with the key's new
place; a ``config.yaml`` that lmfab wrote beside an older checkpoint is upgraded silently, so
evaluation, generation and resume read old runs.
"""

from __future__ import annotations

from lmfab.config.errors import ConfigError

# runconfig keys that lmfab no longer has, and why (docs/decisions.md). A params file that
# sets one fails saying so; a resolved config written before (beside a checkpoint) loads.
REMOVED_RUN_KEYS = {
    "cuda_graph": "the whole-step CUDA graph was removed (measured at noise level: +0.6% at "
                  "124M on an H200); drop the key",
    "gc_steps": "the fixed-step garbage collection was removed (measured at noise level); "
                "drop the key",
}
# Flat runconfig keys that moved into a section: old key -> (section, key there).
MOVED_RUN_KEYS = {
    **{k: ("kernels", k) for k in ("attention_backend", "loss", "loss_chunk", "mlp_kernel",
                                   "residual_dtype")},
    **{k: ("parallel", k) for k in ("compile", "compile_mode", "float8", "strategy",
                                    "ddp_bucket_mb", "ddp_split_graph",
                                    "fsdp_reshard_after_forward", "grad_reduce_dtype",
                                    "activation_checkpointing", "checkpoint_every",
                                    "dist_backend")},
    "profile_steps": ("profile", "steps"),
    "profile_start": ("profile", "start"),
}


def upgrade_runconfig(raw: dict, *, resolved: bool) -> dict:
    """``raw`` with its runconfig section in today's layout. ``resolved``: a config lmfab
    wrote itself (beside a checkpoint): removed keys are dropped and moved keys moved. In a
    params file either fails, naming the key's new place or the reason."""
    run = raw.get("runconfig")
    if not isinstance(run, dict):
        return raw
    old = [k for k in run if k in REMOVED_RUN_KEYS or k in MOVED_RUN_KEYS]
    if not old:
        return raw
    if not resolved:
        key = old[0]
        if key in REMOVED_RUN_KEYS:
            raise ConfigError(f"runconfig.{key}: {REMOVED_RUN_KEYS[key]}")
        moved = [f"runconfig.{k} moved to runconfig.{'.'.join(MOVED_RUN_KEYS[k])}"
                 for k in old if k in MOVED_RUN_KEYS]
        raise ConfigError("; ".join(moved))
    run = dict(run)
    for key in old:
        value = run.pop(key)
        if key in MOVED_RUN_KEYS:
            section, name = MOVED_RUN_KEYS[key]
            run[section] = {**(run.get(section) or {}), name: value}
    return {**raw, "runconfig": run}
