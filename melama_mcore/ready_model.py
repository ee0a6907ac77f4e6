"""A ready model: from a started run (startup.py) to model chunks that train or evaluate, their
weights in place. The one place where a model is built and loaded, for the trainer, `melama
eval-ppl`, the trunk's logits (melama_mcore/logits.py: conversion --verify) and the throughput
benchmark:

    build(cfg, runtime, training)    chunks built (models/), the training strategy applied (LoRA:
                                     adapters added, base frozen), wrapped for training (megatron
                                     DDP, optimizer, schedule) or inference; weights as initialised
    for_training(cfg, runtime, ...)  build, then this run's weights: the base from checkpoint.init_from
                                     when the run's checkpoints do not hold it, then the run resumed
                                     from its latest checkpoint, or started from init_from, or from scratch
    for_inference(cfg, runtime, checkpoint)
                                     build, then a checkpoint's weights: the model's, or an adapter
                                     checkpoint's base (its init_from) and then its adapters
    load_checkpoint(ready, runtime, checkpoint)
                                     another checkpoint of the same run into that model (a series)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from melama_mcore.checkpoint.checkpointer import Checkpointer, TrainState
from melama_mcore.components.optimizer import build_optimizer, build_scheduler
from melama_mcore.config.job_config import JobConfig
from melama_mcore.distributed import parallel
from melama_mcore.models.llama.model import build_model_chunks, output_vocab_size
from melama_mcore.startup import Runtime

log = logging.getLogger("melama")


@dataclass
class ReadyModel:
    chunks: list  # the GPTModel chunks this rank holds, one per virtual pipeline stage (unwrapped)
    model: list  # the same chunks wrapped: megatron DDP (training), Float16Module in bf16 (inference)
    optimizer: object | None = None  # training only
    scheduler: OptimizerParamScheduler | None = None  # training only
    checkpointer: Checkpointer | None = None  # once weights were loaded
    state: TrainState | None = None  # training: where the run stands (resumed, or a fresh start)


def build(cfg: JobConfig, runtime: Runtime, training: bool) -> ReadyModel:
    """The chunks built, the training strategy applied before any wrap (so that DDP gives gradient
    buffers, and the optimizer state, to the trained parameters only), then wrapped; for training
    also the optimizer and the learning-rate schedule. Weights as initialised."""
    chunks = build_model_chunks(cfg, runtime.arch, runtime.backend)
    strategy = runtime.strategy
    strategy.apply(chunks, seed=cfg.training.seed)
    if not training:
        return ReadyModel(chunks, parallel.wrap_for_inference(cfg, chunks))
    shapes = strategy.trainable_shapes(runtime.arch, output_vocab_size(cfg, runtime.arch)).values()
    log.info("trainable parameters: %s (%s)", f"{sum(math.prod(s) for s in shapes):,}", strategy.trained)
    model = parallel.wrap_for_training(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    return ReadyModel(chunks, model, optimizer, build_scheduler(cfg, optimizer))


def for_training(cfg: JobConfig, runtime: Runtime, identity: dict) -> ReadyModel:
    """build(), then the weights and where the run stands: resumed from this run's latest checkpoint,
    else from checkpoint.init_from's weights, else from scratch. When the run's checkpoints hold only
    the strategy's own tensors (LoRA's adapters), the frozen base comes from init_from either way."""
    ready = build(cfg, runtime, training=True)
    checkpointer = Checkpointer(cfg, ready.chunks, ready.optimizer, ready.scheduler, identity=identity,
                                strategy=runtime.strategy)
    init_from, holds_base = cfg.checkpoint.init_from, runtime.strategy.checkpoint_holds_base
    if init_from and not holds_base:
        checkpointer.load_weights(init_from)
    state = checkpointer.resume() if cfg.checkpoint.resume else None
    if state is None:
        checkpointer.clean_partial()
        state = TrainState()
        if init_from and holds_base:
            checkpointer.load_weights(init_from)
    ready.checkpointer, ready.state = checkpointer, state
    return ready


def for_inference(cfg: JobConfig, runtime: Runtime, checkpoint: Path, identity: dict | None = None,
                  base: Path | None = None) -> ReadyModel:
    """build() for inference, then `checkpoint`'s weights. A checkpoint of a strategy that saves its
    own tensors only (an adapter checkpoint; cfg is its config) loads on its base: `base`, else
    cfg.checkpoint.init_from."""
    ready = build(cfg, runtime, training=False)
    ready.checkpointer = Checkpointer(cfg, ready.chunks, None, None, identity=identity, strategy=runtime.strategy)
    if not runtime.strategy.checkpoint_holds_base:
        ready.checkpointer.load_weights(str(base or cfg.checkpoint.init_from))
    load_checkpoint(ready, runtime, checkpoint)
    return ready


def load_checkpoint(ready: ReadyModel, runtime: Runtime, checkpoint: Path) -> None:
    """Another checkpoint of the same run into a model from for_inference, without building it
    again: its weights, or (an adapter checkpoint) its adapters over the base already loaded."""
    if runtime.strategy.checkpoint_holds_base:
        ready.checkpointer.load_weights(str(checkpoint))
    else:
        ready.checkpointer.load_own(checkpoint)
