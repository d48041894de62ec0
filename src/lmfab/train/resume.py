"""Resume and save for the training loop: the run's side of :mod:`lmfab.checkpoint`.

A run resumes from the newest complete checkpoint in its ``model_dir`` (model, optimizer,
RNG, step, tokens seen, the loader's position); without one, ``--init_from`` loads weights
only, and the optimizer and step start fresh. It saves every ``runconfig.checkpoint_steps``
(not at the last step, which the end-of-run save covers) and, with
``runconfig.checkpoint_at_end``, when the run ends, unless that step is saved already.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmfab import checkpoint as ckpt
from lmfab.config.schema import Config
from lmfab.dist.world import World


class Checkpointer:
    def __init__(self, cfg: Config, model_dir: Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer, world: World, say) -> None:
        self.cfg, self.r, self.model_dir = cfg, cfg.runconfig, Path(model_dir)
        self.model, self.optimizer, self.world, self.say = model, optimizer, world, say

    def resume(self, init_from: str | None) -> tuple[int, int, tuple[dict, Path] | None]:
        """(step, tokens seen, (the loader's saved state, checkpoint path) or None)."""
        newest = ckpt.latest_checkpoint(self.model_dir)
        saved = None
        step, tokens = 0, 0
        if newest is not None:
            ckpt.check_resumable(newest, self.cfg)
            state = ckpt.load_checkpoint(newest, model=self.model, optimizer=self.optimizer,
                                         world=self.world)
            step, tokens, saved = state["step"], state.get("tokens", 0), (state["loader"], newest)
            self.say(f"resumed from {newest} (step {step})")
            if init_from:
                self.say(f"note: --init_from {init_from} ignored; resuming the run in "
                         f"{self.model_dir}")
        elif init_from:
            src = ckpt.load_weights(self.model, init_from)
            self.say(f"initialised weights from {src} (weights only; optimizer and step start "
                     "fresh)")
        for group in self.optimizer.param_groups:  # as built: a checkpoint of a run that
            group["capturable"] = False  # captured its step as a CUDA graph says True
        return step, tokens, saved

    def newest(self) -> Path | None:
        """The newest complete checkpoint of the run."""
        return ckpt.latest_checkpoint(self.model_dir)

    def save_now(self, step: int, data, tokens: int) -> Path:
        """A checkpoint at ``step`` unless that step is saved already (a stop on a signal)."""
        newest = self.newest()
        if newest is None or newest.name != f"step_{step:08d}":
            self.save(step, data, tokens)
        return ckpt.checkpoint_root(self.model_dir) / f"step_{step:08d}"

    def save(self, step: int, data, tokens: int) -> None:
        """Save collectively; ``data`` is the loop's :class:`~lmfab.train.data.StagedData`."""
        path = ckpt.save_checkpoint(self.model_dir, step=step, model=self.model,
                                    optimizer=self.optimizer,
                                    state={"loader": data.state_dict(), "tokens": tokens},
                                    cfg=self.cfg, world=self.world, keep=self.r.keep_checkpoints)
        self.say(f"checkpoint {path}")

    def maybe_save(self, step: int, end: int, data, tokens: int) -> None:
        """Every ``runconfig.checkpoint_steps`` steps, except the last (saved at the end)."""
        if self.r.checkpoint_steps and step % self.r.checkpoint_steps == 0 and step != end:
            self.save(step, data, tokens)

    def save_at_end(self, step: int, data, tokens: int) -> None:
        newest = ckpt.latest_checkpoint(self.model_dir)
        if self.r.checkpoint_at_end and (newest is None or newest.name != f"step_{step:08d}"):
            self.save(step, data, tokens)
