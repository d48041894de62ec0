"""Training data for the loop: datasets, mixtures and sequence-length stages from the config.

Each stage of ``train_input`` (one, unless ``seq_len_schedule`` adds longer ones) reads one
packed dataset or a weighted mixture of them; this module opens them, checks them against
the model and against each other (window, vocabulary, one tokenizer for the whole run) and
builds the rank-aware, resumable loader for a stage. :class:`StagedData` is what the loop
holds: the current stage's loader, switched at each stage's first step.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmfab.checkpoint import latest_checkpoint, run_tokenizer
from lmfab.config.errors import ConfigError
from lmfab.config.schema import Config
from lmfab.data.loader import BatchLoader, TokenDataset
from lmfab.data.mixture import MixtureLoader
from lmfab.data.shards import tokenizer_hash
from lmfab.dist.world import World
from lmfab.train.plan import TrainStage, train_stages


def trained_tokenizer(model_dir: str | Path) -> Path | None:
    """The tokenizer.json a run's checkpoints were trained with (None: no checkpoint yet, or
    a run folder from before lmfab kept it)."""
    tok = Path(model_dir) / "tokenizer.json"
    return tok if tok.is_file() and latest_checkpoint(model_dir) is not None else None


def open_dataset(cfg: Config, data_dir: str | Path, split: str, seq_len: int,
                 trained_with: Path | None = None) -> TokenDataset:
    """One split of a packed dataset, checked against the model and the run's tokenizer.

    ``trained_with``: the tokenizer.json of the weights that will read these tokens (a run
    folder's); shards whose header names another tokenizer are refused, whatever the
    vocabulary sizes, because the same ids would mean other text."""
    data_dir = Path(data_dir)
    meta_file = data_dir / "meta.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{meta_file}: not a readable meta.json ({e})") from None
        vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
        if not isinstance(vocab, int | None):
            raise ConfigError(f"{meta_file}: vocab_size is {vocab!r}, not an integer")
        if vocab is not None and vocab > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({vocab}, {meta_file}); raise model.vocab_size"
            )
    tok = data_dir / "tokenizer.json"
    expected = tokenizer_hash(tok) if tok.is_file() else None
    reference = run_tokenizer(cfg)
    if expected and reference is not None and tokenizer_hash(reference) != expected:
        raise ConfigError(
            f"{data_dir}: its tokenizer.json differs from the run's ({reference}); every "
            "dataset of a run (mixtures, later stages, eval) must be packed by one tokenizer"
        )
    ds = TokenDataset(data_dir / split, window=seq_len + 1, tokenizer_hash=expected,
                      vocab_size=cfg.model.vocab_size)
    if trained_with is not None and ds.tokenizer_hash != _UNKNOWN_HASH:
        want = tokenizer_hash(trained_with)
        if ds.tokenizer_hash != want:
            raise ConfigError(
                f"{data_dir}: its shards were made by another tokenizer (sha256 "
                f"{ds.tokenizer_hash[:12]}...) than the one this run was trained with "
                f"({trained_with}, {want[:12]}...): the same ids would be other text and the "
                f"loss meaningless, whatever the vocabulary sizes. Pack the data with that "
                f"tokenizer (lmfab data pack --tokenizer {trained_with}) or use a new "
                "--model-dir")
    return ds


# A shard header with no tokenizer hash (all zero bytes) is not checked against the run.
_UNKNOWN_HASH = "0" * 64


def stage_at(stages: list[TrainStage], step: int) -> TrainStage:
    return [s for s in stages if s.at_step <= step][-1]


def make_loader(cfg: Config, stage: TrainStage, world: World,
                trained_with: Path | None = None) -> BatchLoader | MixtureLoader:
    t = cfg.train_input
    datasets = [open_dataset(cfg, d, t.split, stage.seq_len, trained_with)
                for d, _ in stage.sources]
    kwargs = dict(global_batch=stage.batch_size, rank=world.rank, world_size=world.world_size,
                  seed=t.seed, shuffle=t.shuffle)
    if stage.mixture:
        return MixtureLoader(datasets, [w for _, w in stage.sources], **kwargs)
    return BatchLoader(datasets[0], **kwargs)


class StagedData:
    """The loader of the current sequence-length stage. ``start(step, saved)`` builds the
    stage's loader at ``step`` and restores a checkpoint's loader state (``saved``: state.json's
    ``loader`` entry and the checkpoint's path) when it was saved in the same stage;
    ``switch(step)`` moves to the next stage at its first step (tokens per step stay fixed)."""

    def __init__(self, cfg: Config, world: World, say, trained_with: Path | None = None) -> None:
        self.cfg, self.world, self.say = cfg, world, say
        self.trained_with = trained_with  # the tokenizer of the checkpoint resumed from
        self.stages = train_stages(cfg, world.world_size)
        self.stage: TrainStage = self.stages[0]
        self.loader: BatchLoader | MixtureLoader | None = None

    def start(self, step: int, saved: tuple[dict, Path] | None) -> None:
        self.stage = stage_at(self.stages, step)
        self.loader = make_loader(self.cfg, self.stage, self.world, self.trained_with)
        if saved is None or saved[0]["stage"] != self.stage.index:
            return
        state, path = saved
        saved_kind = state["state"].get("kind", "single")
        if (saved_kind == "mixture") != self.stage.mixture:
            raise ConfigError(
                f"{path}: the checkpoint's data was {'a' if saved_kind == 'mixture' else 'no'} "
                "mixture but train_input now says otherwise; the data order cannot continue "
                "(use a new --model_dir, or --init_from)")
        self.loader.load_state_dict(state["state"])

    def switch(self, step: int) -> None:
        if stage_at(self.stages, step) is self.stage:
            return
        s = self.stage = stage_at(self.stages, step)
        self.loader = make_loader(self.cfg, s, self.world, self.trained_with)
        self.say(f"step {step}: seq_len {s.seq_len}, global batch {s.batch_size} "
                 f"(micro {s.micro_batch} x {s.grad_accum}), same tokens per step")

    def state_dict(self) -> dict:
        """What a checkpoint records of the data: the stage and its loader's position."""
        return {"stage": self.stage.index, "state": self.loader.state_dict()}


def check_data(cfg: Config, trained_with: Path | None = None) -> list[str]:
    """Every problem with the run's datasets (all stages and eval), as messages: what a dry
    run reports instead of leaving it to the first step."""
    t, e = cfg.train_input, cfg.eval_input
    wanted = [("train_input", d, t.split, stage.seq_len)
              for stage in train_stages(cfg) for d, _ in stage.sources]
    eval_dir = e.data_dir or t.data_dir or t.mixture[0].data_dir
    wanted.append(("eval_input", eval_dir, e.split, e.seq_len or t.seq_len))
    problems: list[str] = []
    for section, data_dir, split, seq_len in dict.fromkeys(wanted):
        try:
            open_dataset(cfg, data_dir, split, seq_len, trained_with)
        except (ConfigError, ValueError, OSError) as err:
            msg = f"{section}: {err}"
            if msg not in problems:
                problems.append(msg)
    return problems
