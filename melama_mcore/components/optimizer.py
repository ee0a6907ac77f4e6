"""AdamW and the learning-rate schedule: megatron's optimizer and OptimizerParamScheduler, configured.

Defaults are the Me-LLaMA recipe (AdamW beta2 0.95, lr 8e-6, weight decay 1e-5, cosine decay with
5% warm-up, clip 1.0). Megatron excludes biases and norm weights from weight decay.
The schedule counts samples, not steps, as Megatron-LM does, so it is independent of batch size.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from melama_mcore.config.job_config import JobConfig


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
    optimizer = get_megatron_optimizer(config, model_chunks)
    for part in _parts(optimizer):
        if isinstance(part, distrib_optimizer.DistributedOptimizer) and not distrib_optimizer.HAVE_APEX_OR_TE:
            _keep_adam_step_out_of_param_state(part)
    return optimizer


# -- megatron's distributed optimizer on torch's Adam ------------------------------------------------
# Megatron-LM runs its distributed optimizer on Transformer Engine's or apex's fused Adam, which keeps
# the step count in the param groups. Without them (CPU, or a GPU image without TE/apex) megatron
# falls back to torch's Adam, which keeps a step count per parameter, and megatron 0.16's checkpoint
# code mishandles it: building the state to load needs a state that a fresh optimizer lacks, the
# fully_reshardable loader looks for a per-parameter step in the checkpoint (KeyError), and the
# dp_reshardable one loads zeros into a step tensor shared by every parameter (Adam then increments
# it once per parameter). The three functions below keep megatron's formats and make the loaded
# state what an uninterrupted run has.
def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _keep_adam_step_out_of_param_state(optimizer) -> None:
    """The flat parameter state (saved and loaded per parameter) holds main params and Adam moments;
    the step count travels in the param groups."""
    get_states, set_states = optimizer._get_main_param_and_optimizer_states, optimizer._set_main_param_and_optimizer_states

    def get_without_step(model_param):
        return {k: v for k, v in get_states(model_param).items() if k != "step"}

    def set_without_step(model_param, tensors):
        group, order = optimizer.model_param_group_index_map[model_param]
        state = optimizer.optimizer.state[optimizer.optimizer.param_groups[group]["params"][order]]
        step = state.pop("step", None)
        try:
            set_states(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    optimizer._get_main_param_and_optimizer_states = get_without_step
    optimizer._set_main_param_and_optimizer_states = set_without_step


def ensure_optimizer_state(optimizer) -> None:
    """An optimizer that has applied no step yet (fresh, or every step so far skipped as non-finite)
    gets zero Adam state at step 0, what Adam would start from: megatron's distributed optimizer
    reads the step count out of it to build its state dict, for a save as for a load. No parameter
    changes; a load overwrites all of it."""
    for part in _parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if inner is None or inner.state or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


def load_optimizer_state(optimizer, loaded) -> None:
    """megatron's load_state_dict, then every parameter's own Adam step count, the one saved in the
    param groups, as torch's Adam keeps it."""
    with torch.no_grad():  # copies into parameters (the fp32 distributed optimizer's main params are views)
        optimizer.load_state_dict(loaded)
    parts = _parts(optimizer)
    states = [loaded] if len(parts) == 1 else [loaded[i] for i in sorted(loaded)]
    for part, state in zip(parts, states):
        if not isinstance(part, distrib_optimizer.DistributedOptimizer):
            continue
        steps = {g["step"] for g in state["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1 or not any("step" in s for s in part.optimizer.state.values()):
            continue
        step = float(steps.pop())
        for param_state in part.optimizer.state.values():
            param_state["step"] = torch.tensor(step, dtype=torch.float32)


def build_scheduler(cfg: JobConfig, optimizer) -> OptimizerParamScheduler:
    o, t = cfg.optimizer, cfg.training
    samples_per_step = t.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=cfg.warmup_iters() * samples_per_step,
        lr_decay_steps=t.train_iters * samples_per_step,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.train_iters * samples_per_step,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
