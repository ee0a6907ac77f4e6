"""One of this project's checkpoints, opened: whatever a user names, one object that knows what it is.

    open_checkpoint(path)   a run's folder (its latest), its checkpoints/ folder, one iter_* folder, or
                            a weights-only folder -> Checkpoint

A Checkpoint knows
    kind        RUN       a run's checkpoint (iter_XXXXXXX: the weights, optimizer state, schedule)
                WEIGHTS   the weights only (`melama convert import-hf`, `train --create-seed-checkpoint`)
                ADAPTERS  a run whose training strategy saves its own tensors only (LoRA adapters),
                          trained on a base that is another checkpoint (its checkpoint.init_from)
    cfg, strategy, arch, identity   its config.yaml, the training strategy that wrote it, the
                          architecture, model_identity.json
    layout      the TP, PP, VP it was saved at (any other loads it)
and gives what an export or an evaluation needs: `weights()` (a reader of its model tensors),
`base()` (an adapter checkpoint's base, checked to be the model the adapters were trained on),
`own_tensors()` (the adapters), `tokenizer()` (the one the run trained with).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from melama_mcore.checkpoint.dcp_stream import DistCheckpointReader
from melama_mcore.checkpoint.integrity import (identity_differences, model_identity, read_identity,
                                               tokenizer_record, verify_checksums)
from melama_mcore.checkpoint.layout import CONFIG, find_checkpoint, read_config
from melama_mcore.config.job_config import JobConfig
from melama_mcore.data.tokenizer import load_tokenizer, vocabulary_difference
from melama_mcore.errors import CheckpointError, ConfigError, UserError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch, resolve_arch
from melama_mcore.strategies import TrainingStrategy, strategy_for

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """A command may check the same tokenizer twice (eval: at start, then in the export)."""
    log.warning(message)

RUN, WEIGHTS, ADAPTERS = "run", "weights", "adapters"
_STEP_FOLDER = re.compile(r"iter_\d{7,}")  # layout.step_dir's names


@dataclass
class Checkpoint:
    """One of this project's checkpoints, described by what it records."""

    folder: Path
    kind: str  # RUN, WEIGHTS or ADAPTERS
    cfg: JobConfig  # its config.yaml
    strategy: TrainingStrategy  # how the run that wrote it trained (cfg.peft)
    arch: LlamaArch
    identity: dict | None  # its model_identity.json

    @property
    def layout(self) -> tuple[int, int, int | None]:
        p = self.cfg.parallel
        return p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline

    def recorded_identity(self) -> dict:
        return self.identity or model_identity(self.arch, None)

    def weights(self) -> tuple[DistCheckpointReader, int, torch.dtype]:
        """A reader of the model tensors, checked against the architecture; the padded vocabulary
        (embedding rows) and the stored dtype."""
        reader = DistCheckpointReader(self.folder)
        padded = reader.shape(sda.EMBEDDING)[0] if sda.EMBEDDING in reader.stored else 0
        for key, shape in sda.megatron_shapes(self.arch, padded).items():
            if key not in reader.stored:
                raise CheckpointError(f"{self.folder} has no tensor {key}: not a complete LLaMA checkpoint")
            if reader.shape(key) != shape:
                raise CheckpointError(f"{self.folder}: {key} is {list(reader.shape(key))} but its config.yaml "
                                      f"describes {list(shape)}: config and weights are from different models")
        if padded < self.arch.vocab_size:
            raise CheckpointError(f"{self.folder}: the embedding has {padded} rows, fewer than the vocabulary "
                                  f"({self.arch.vocab_size})")
        return reader, padded, reader.dtype(sda.EMBEDDING)

    def tokenizer(self, override: Path | None = None, allow_mismatch: bool = False) -> Path | None:
        """The tokenizer the run trained with (data.tokenizer in its config.yaml), or `override`; None
        when there is none (an import of a Hugging Face folder without tokenizer.model). Checked against the
        vocabulary the checkpoint records (or, without a record, the model's vocabulary size): another
        one is refused, naming both, unless `allow_mismatch`."""
        if override is not None:
            if not override.exists():
                raise UserError(f"--tokenizer {override} does not exist")
            path, given = override, "--tokenizer"
        elif not self.cfg.data.tokenizer:
            return None
        else:
            path, given = Path(self.cfg.data.tokenizer), f"data.tokenizer in {self.folder / CONFIG}"
            if not path.exists():
                raise CheckpointError(f"{self.folder}: the tokenizer its config.yaml names (data.tokenizer), {path}, "
                                      "does not exist here: pass --tokenizer PATH")
        self._check_tokenizer(path, given, allow_mismatch)
        return path

    def _check_tokenizer(self, path: Path, given: str, allow_mismatch: bool) -> None:
        tok = load_tokenizer(str(path))
        if tok.vocab_size > self.arch.vocab_size:  # ids past the embedding: no override makes that work
            raise CheckpointError(f"{given} {path} has {tok.vocab_size:,} tokens, more than the vocabulary of "
                                  f"{self.folder} ({self.arch.vocab_size:,}): give the tokenizer the model was "
                                  "trained with (--tokenizer PATH)")
        recorded = (self.identity or {}).get("tokenizer")
        difference = vocabulary_difference(recorded, tokenizer_record(tok)) if recorded else None
        if difference is None:
            return
        mismatch = (f"{given} {path} ({difference}) is not the tokenizer {self.folder} "
                    f"was trained with, {recorded['path']} ({recorded['vocab_size']:,} tokens)")
        if allow_mismatch:
            _warn_once(f"{mismatch}: using it anyway (--allow-tokenizer-mismatch)")
            return
        raise CheckpointError(f"{mismatch}: token ids would mean other text. Give the tokenizer it was trained with "
                              "(--tokenizer PATH), or pass --allow-tokenizer-mismatch if you mean it")

    def base(self, override: Path | None = None) -> Checkpoint:
        """The base model of an adapter checkpoint: `override` (--base), else its checkpoint.init_from;
        refused when its identity (architecture, tokenizer vocabulary) differs from the one the
        adapters recorded."""
        given = override or self.cfg.checkpoint.init_from
        origin = "--base" if override else f"checkpoint.init_from in {self.folder / CONFIG}"
        if not given:
            raise CheckpointError(f"{self.folder}: its config.yaml names no base model (checkpoint.init_from): "
                                  "pass --base PATH")
        if not Path(given).exists():
            raise CheckpointError(f"the base model {given} ({origin}) does not exist here: pass --base PATH")
        base = open_checkpoint(Path(given))
        if base.kind == ADAPTERS:
            raise CheckpointError(f"the base model {base.folder} ({origin}) is itself an adapter checkpoint")
        diffs = identity_differences(base.recorded_identity(), self.recorded_identity())
        if diffs:
            raise CheckpointError(f"the base model {base.folder} ({origin}) is not the model the adapters of "
                                  f"{self.folder} were trained on: {'; '.join(diffs)}")
        return base

    def own_tensors(self) -> dict[str, torch.Tensor]:
        """The global tensors of an adapter checkpoint (saved at any TP/PP), checked against its
        strategy's settings and the architecture: every tensor there, none else."""
        reader = DistCheckpointReader(self.folder)
        keys = reader.model_keys()
        others = [k for k in keys if not self.strategy.owns_key(k)]
        if others:
            raise CheckpointError(f"{self.folder} holds {others[0]}: an adapter checkpoint holds LoRA tensors only")
        tensors = reader.tensors(keys)
        self.strategy.check_own_tensors(tensors, self.arch)
        return tensors


def open_checkpoint(path: Path, tokenizer: Path | None = None, *, verify: bool = True) -> Checkpoint:
    """A run's folder, its checkpoints/ folder (the latest), one iter_* folder or a weights-only folder.
    The architecture is its config.yaml's; the vocabulary and the context length are those its
    model_identity.json records (the resolved ones: config.yaml has no key for the context length,
    and a run may take its vocabulary from its tokenizer), else the tokenizer's vocabulary.
    `verify`: its files' checksums now (a load through the Checkpointer verifies them itself)."""
    folder = find_checkpoint(path)
    cfg = read_config(folder)
    try:
        strategy = strategy_for(cfg.peft)
    except ConfigError as err:
        raise CheckpointError(f"{folder / CONFIG}: {str(err).splitlines()[0]}") from None
    if verify:
        verify_checksums(folder)
    identity = read_identity(folder)
    recorded = (identity or {}).get("arch") or {}
    vocab = recorded.get("vocab_size")
    if cfg.model.vocab_size is None and vocab is None:
        source = tokenizer or cfg.data.tokenizer
        if not source:
            raise CheckpointError(f"{folder / CONFIG} states no vocab_size and names no tokenizer: pass --tokenizer")
        vocab = load_tokenizer(str(source)).vocab_size
    arch = resolve_arch(cfg.model, vocab)
    if "max_position_embeddings" in recorded:
        arch = dataclasses.replace(arch, max_position_embeddings=recorded["max_position_embeddings"])
    kind = ADAPTERS if not strategy.checkpoint_holds_base else RUN if _STEP_FOLDER.fullmatch(folder.name) else WEIGHTS
    return Checkpoint(folder, kind, cfg, strategy, arch, identity)


def init_from_problem(path: Path) -> str | None:
    """Why `path` cannot give a run its first weights (checkpoint.init_from), in one line with what
    to give instead; None when it can: a checkpoint that holds a whole model (a `melama convert
    import-hf` folder, a seed checkpoint, a run's). A dist-checkpoint without config.yaml (written
    elsewhere) is left to the load to judge."""
    key = f"checkpoint.init_from {path}"
    if not path.exists():
        return (f"{key} does not exist: give a `melama convert import-hf` folder, a run folder or one of its "
                "checkpoints")
    try:
        folder = find_checkpoint(path)
        if not (folder / CONFIG).is_file():
            return None
        cfg = read_config(folder)
        strategy = strategy_for(cfg.peft)
    except UserError as err:
        return f"checkpoint.init_from: {err}"
    if strategy.checkpoint_holds_base:
        return None
    return (f"{key} is an adapter checkpoint ({strategy.describe()}): it holds {strategy.trained} only, not a model. "
            f"Start from its base ({cfg.checkpoint.init_from}), or from the model with them merged in: "
            f"`melama convert export-hf --ckpt {path} --merge-lora --out HF`, then `melama convert import-hf "
            "--hf-dir HF --out CKPT` and checkpoint.init_from=CKPT")
