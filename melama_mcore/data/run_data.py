"""A run's datasets, whatever its blend holds: pre-training text (megatron's GPT datasets) or
instruction data written by `melama preprocess-sft` (packed conversations), told apart by the blend's
prefixes. One place for the trainer and for `melama eval-ppl`, so both read the same samples."""

from __future__ import annotations

from melama_mcore.config.job_config import JobConfig
from melama_mcore.data.dataset import build_pretraining_datasets, check_pretraining_data
from melama_mcore.data.provenance import check_data_tokenizer
from melama_mcore.data.sft.dataset import build_sft_datasets
from melama_mcore.data.sft.indexed import is_sft_blend


def dataset_args(cfg: JobConfig) -> dict:
    """Sequence length, sample counts (train: the whole schedule; valid: eval_iters global batches
    per source), split and index cache of a run."""
    t = cfg.training
    return dict(seq_length=t.seq_length, train_samples=t.train_iters * t.global_batch_size,
                valid_samples=cfg.logging.eval_iters * t.global_batch_size, split=cfg.data.split,
                cache_dir=cfg.data.cache_dir or f"{cfg.output_dir}/data_cache")


def check_run_data(cfg: JobConfig, blend, vocab_size: int) -> None:
    """Before any process group: every input megatron's dataset builder would hang on or fail deep
    inside is refused now (only then can its cached indices be checked: later a rank may be writing
    them). Instruction data is checked as its datasets are built."""
    if not is_sft_blend(blend):
        check_pretraining_data(blend, vocab_size=vocab_size, **dataset_args(cfg))
    check_data_tokenizer(blend, cfg.data.tokenizer, allow_mismatch=cfg.data.allow_tokenizer_mismatch)


def build_run_datasets(cfg: JobConfig, blend, tokenizer, data_parallel_size: int):
    """(train dataset, {source name: validation dataset}); `packed` samples when the blend is
    instruction data (see is_sft_blend)."""
    if is_sft_blend(blend):
        return build_sft_datasets(blend, tokenizer=tokenizer, seed=cfg.training.seed, **dataset_args(cfg))
    return build_pretraining_datasets(blend, tokenizer=tokenizer, seed=cfg.training.seed,
                                      data_parallel_size=data_parallel_size, **dataset_args(cfg))
