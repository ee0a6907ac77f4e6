"""A run's data, whatever its blend holds: pre-training text (megatron's GPT datasets) or instruction
data written by `melama preprocess-sft` (packed conversations). Which of the two a blend holds is
decided here once (`data_kind`, from its prefixes' files) and travels as a value: the trainer,
`melama eval-ppl`, the training step and `melama blend-report` take it from there. One place for the
trainer and for `melama eval-ppl`, so both read the same samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from melama_mcore.config.job_config import JobConfig
from melama_mcore.data.dataset import build_pretraining_datasets, check_pretraining_data
from melama_mcore.data.provenance import check_data_tokenizer
from melama_mcore.data.sft.batch import loss_weights
from melama_mcore.data.sft.dataset import build_sft_datasets
from melama_mcore.data.sft.indexed import is_sft_blend
from melama_mcore.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class DataKind:
    """What a blend's samples are, and so how the training step reads a micro-batch of them."""

    name: str
    # Several samples per row, each its own segment (data/sft/dataset.py): every pipeline stage reads
    # the micro-batch for their boundaries, and `training.loss_normalization` weighs the loss.
    packed: bool

    def loss_weights(self, batch: dict[str, torch.Tensor], loss_normalization: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss weight of every position, the real (non-padding) tokens) of a micro-batch."""
        if self.packed:
            return loss_weights(batch, loss_normalization), batch["real_tokens"]
        return batch["loss_mask"], torch.tensor(float(batch["loss_mask"].numel()))


PRETRAINING = DataKind("pre-training text", packed=False)
INSTRUCTIONS = DataKind("instruction data", packed=True)


def data_kind(blend) -> DataKind:
    """The kind of a blend's data: instruction data when its prefixes were written by preprocess-sft
    (their marker files), else pre-training text; a blend that mixes both is refused."""
    return INSTRUCTIONS if is_sft_blend(blend) else PRETRAINING


def dataset_args(cfg: JobConfig) -> dict:
    """Sequence length, sample counts (train: the whole schedule; valid: eval_iters global batches
    per source), split and index cache of a run."""
    t = cfg.training
    return dict(seq_length=t.seq_length, train_samples=t.train_iters * t.global_batch_size,
                valid_samples=cfg.logging.eval_iters * t.global_batch_size, split=cfg.data.split,
                cache_dir=cfg.data.cache_dir or f"{cfg.output_dir}/data_cache")


def check_run_data(cfg: JobConfig, blend, kind: DataKind, tokenizer: Tokenizer,
                   override: str = "data.allow_tokenizer_mismatch=true") -> None:
    """Before any process group: every input megatron's dataset builder would hang on or fail deep
    inside is refused now (only then can its cached indices be checked: later a rank may be writing
    them). Instruction data is checked as its datasets are built. `override`: how the command lets a
    user take data of another tokenizer (cfg.data.allow_tokenizer_mismatch)."""
    if kind is PRETRAINING:
        check_pretraining_data(blend, vocab_size=tokenizer.vocab_size, **dataset_args(cfg))
    check_data_tokenizer(blend, tokenizer, allow_mismatch=cfg.data.allow_tokenizer_mismatch, override=override)


def build_run_datasets(cfg: JobConfig, blend, kind: DataKind, tokenizer: Tokenizer, data_parallel_size: int):
    """(train dataset, {source name: validation dataset}) of this kind of data."""
    if kind is INSTRUCTIONS:
        return build_sft_datasets(blend, tokenizer=tokenizer, seed=cfg.training.seed, **dataset_args(cfg))
    return build_pretraining_datasets(blend, tokenizer=tokenizer, seed=cfg.training.seed,
                                      data_parallel_size=data_parallel_size, **dataset_args(cfg))
