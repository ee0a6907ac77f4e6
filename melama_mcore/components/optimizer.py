"""AdamW and the learning-rate schedule: megatron's optimizer and OptimizerParamScheduler, configured.

Defaults are the Me-LLaMA recipe (AdamW beta2 0.95, lr 8e-6, weight decay 1e-5, cosine decay with
5% warm-up, clip 1.0). Megatron excludes biases and norm weights from weight decay.
The schedule counts samples, not steps, as Megatron-LM does, so it is independent of batch size.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from melama_mcore.config.job_config import JobConfig


def warmup_iters(cfg: JobConfig) -> int:
    o = cfg.optimizer
    if o.lr_warmup_iters is not None:
        return o.lr_warmup_iters
    return int(round(o.warmup_fraction * cfg.training.train_iters))


def build_optimizer(cfg: JobConfig, model_chunks):
    o, t, p = cfg.optimizer, cfg.training, cfg.parallel
    bf16 = t.precision == "bf16"
    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        decoupled_weight_decay=True,  # AdamW
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(cfg: JobConfig, optimizer) -> OptimizerParamScheduler:
    o, t = cfg.optimizer, cfg.training
    samples_per_step = t.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup_iters(cfg) * samples_per_step,
        lr_decay_steps=t.train_iters * samples_per_step,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.train_iters * samples_per_step,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
