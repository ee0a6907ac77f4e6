"""One training step: what `melama train` runs per global batch and `benchmarks/throughput.py` times.

A step is megatron's pipeline schedule running forward and backward over the global batch's
micro-batches (`forward_step` is called once per micro-batch and model chunk), then the optimizer
update, skipped as a whole when the loss or the gradient norm is not finite (`train_step`):

    schedule = Schedule(cfg, model, device)
    zero_grads(model, optimizer)
    totals = data_parallel_totals(schedule.run(data_iterators))   # [loss sum, weight, ...] over DP
    loss = totals[0] / totals[1]                                  # on the last pipeline stage
    updated, grad_norm = optimizer_step(optimizer, clip_grad, loss, device)

The loss is the mean over unmasked tokens of the whole global batch (every micro-batch and data-
parallel rank weighted by its token count), so it does not depend on how the batch is split.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from melama_mcore.config.job_config import JobConfig
from melama_mcore.data.run_data import PRETRAINING, DataKind
from melama_mcore.models.llama.config_registry import LlamaArch
from melama_mcore.models.llama.model import BACKENDS, output_vocab_size
from melama_mcore.strategies import TrainingStrategy

TOTALS = 4  # what masked_token_loss reduces per micro-batch


def unwrap(model):
    """DDP -> (Float16Module ->) the GPTModel chunk itself."""
    while hasattr(model, "module"):
        model = model.module
    return model


def masked_token_loss(weights: torch.Tensor, real_tokens: torch.Tensor, per_token_loss: torch.Tensor):
    """megatron's loss function contract: (weighted loss sum to backpropagate, total weight, values
    to reduce). `weights` are the loss mask (per-token normalisation) or per-sample weights
    (data/sft/batch.py). megatron (calculate_per_token_loss) divides the gradients once by the total
    weight of the global batch, and the step divides the reduced sums the same way, so the loss is
    the weighted mean over the whole global batch however it is split. Reduced per micro-batch:
    [loss sum, weight, real (non-padding) tokens, positions]."""
    weights = weights.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * weights).sum()
    weight = weights.sum()
    reduced = torch.stack([loss_sum.detach(), weight, real_tokens.float().sum(), torch.tensor(float(weights.numel()))])
    return loss_sum, weight.round().to(torch.int), {"loss": reduced}


def forward_step(data_iterator, model, *, data: DataKind = PRETRAINING, loss_normalization: str = "token"):
    """Called by megatron's schedule once per micro-batch and model chunk. The first and last
    pipeline stages read the micro-batch (tokens in, labels and mask out); a middle stage gets its
    input from the previous stage, but with `packed` data (instruction data) every stage reads the
    micro-batch for its sample boundaries, which its layer backend turns into attention confined to
    each sample (BACKENDS[...].pack)."""
    chunk = unwrap(model)
    if not (data.packed or chunk.pre_process or chunk.post_process):
        return model(None, None, None), partial(masked_token_loss, None, None)
    batch, extra = next(data_iterator), {}
    if data.packed:
        batch, extra = BACKENDS[chunk.backend].pack(batch)
    weights, real = data.loss_weights(batch, loss_normalization)
    output = model(batch["tokens"], batch["position_ids"], extra.pop("attention_mask", None),
                   labels=batch["labels"], **extra)
    return output, partial(masked_token_loss, weights, real)


class Schedule:
    """megatron's forward-backward schedule (1F1B, interleaved, or none) over one global batch."""

    def __init__(self, cfg: JobConfig, model: list, device: torch.device):
        t = cfg.training
        self.model, self.device = model, device
        self.seq_length, self.micro_batch_size = t.seq_length, t.micro_batch_size
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
        self.forward_backward = get_forward_backward_func()

    def run(self, data_iterators: list, step_fn=forward_step, forward_only: bool = False,
            groups: list[int] | None = None, go_on: Callable[[int], bool] | None = None) -> torch.Tensor | None:
        """[loss sum, token count] of this rank's micro-batches (zeros off the last pipeline stage).
        One data iterator per model chunk: the interleaved schedule pulls micro-batches per chunk.

        `groups` runs the micro-batches as consecutive schedule calls of these sizes: gradients
        accumulate across them and are reduced once, after the last (megatron's grad-sync and
        finalize hooks are held back until then). Before each group after the first,
        `go_on(groups done)` is asked, on every rank alike; False abandons the step: returns None,
        weights untouched."""
        groups = groups or [self.num_microbatches]
        totals = torch.zeros(TOTALS, device=self.device)
        for i, size in enumerate(groups):
            if i > 0 and go_on is not None and not go_on(i):
                return None
            last = forward_only or i == len(groups) - 1
            with self._hold_grad_sync(last, earlier_weight=totals[1]):
                totals += self._call(data_iterators, step_fn, size, forward_only)
        return totals

    def _call(self, data_iterators, step_fn, num_microbatches: int, forward_only: bool) -> torch.Tensor:
        reduced = self.forward_backward(
            forward_step_func=step_fn,
            data_iterator=data_iterators if len(self.model) > 1 else data_iterators[0],
            model=self.model,
            num_microbatches=num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            decoder_seq_length=self.seq_length,
            forward_only=forward_only,
        )
        if not reduced:
            return torch.zeros(TOTALS, device=self.device)
        return torch.stack([r["loss"].float() for r in reduced]).sum(0).to(self.device)

    @contextlib.contextmanager
    def _hold_grad_sync(self, release: bool, earlier_weight: torch.Tensor):
        """Unless `release`: the schedule call accumulates gradients only (DDP's no_sync over the
        whole call; no overlapped reduce, no finalize), as for all but the last micro-batch. With
        `release` after held calls, the finalize divides the gradients by the loss weight of the
        whole step (`earlier_weight`: that of the held calls), not of the last call alone."""
        config = unwrap(self.model[0]).config
        if release:
            finalize = config.finalize_model_grads_func
            if earlier_weight.item() and finalize is not None:
                def finalize_whole_step(model, num_tokens, *args, **kwargs):
                    if num_tokens is not None:
                        num_tokens = num_tokens + earlier_weight.round().to(num_tokens.dtype).to(num_tokens.device)
                    return finalize(model, num_tokens, *args, **kwargs)

                config.finalize_model_grads_func = finalize_whole_step
            try:
                yield
            finally:
                config.finalize_model_grads_func = finalize
            return
        saved = config.no_sync_func, config.grad_sync_func, config.finalize_model_grads_func
        config.no_sync_func, config.grad_sync_func, config.finalize_model_grads_func = contextlib.nullcontext, None, None
        try:
            with contextlib.ExitStack() as stack:
                for m in self.model:
                    stack.enter_context(m.no_sync())
                yield
        finally:
            config.no_sync_func, config.grad_sync_func, config.finalize_model_grads_func = saved


@dataclass
class StepResult:
    totals: torch.Tensor  # [loss sum, weight, real tokens, positions] summed over DP (last pipeline stage)
    loss: float  # the global batch's loss on the last pipeline stage, NaN elsewhere
    updated: bool  # False: skipped (a non-finite loss or gradient norm)
    grad_norm: float | None


def train_step(schedule: Schedule, optimizer, data_iterators: list, step_fn=forward_step, clip_grad: float = 0.0,
               groups: list[int] | None = None, go_on: Callable[[int], bool] | None = None) -> StepResult | None:
    """One optimizer step over a global batch (see the module docstring); None when `go_on` abandoned
    it (Schedule.run)."""
    zero_grads(schedule.model, optimizer)
    totals = schedule.run(data_iterators, step_fn, groups=groups, go_on=go_on)
    if totals is None:
        return None
    totals = data_parallel_totals(totals)
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    loss = (totals[0] / totals[1].clamp(min=1)).item() if last_stage else float("nan")
    updated, grad_norm = optimizer_step(optimizer, clip_grad, loss, schedule.device)
    return StepResult(totals, loss, updated, grad_norm)


def flops_per_token(cfg: JobConfig, arch: LlamaArch, strategy: TrainingStrategy) -> float:
    """Model FLOPs of one trained token as this run executes them (the strategy's count: LoRA computes
    no weight gradients for its frozen base), over the padded vocabulary the output layer is built
    with (as Megatron-LM): what MFU is computed from, in the trainer and the benchmark alike."""
    return strategy.flops_per_token(arch, cfg.training.seq_length, output_vocab_size(cfg, arch))


def zero_grads(model: list, optimizer) -> None:
    """Before a step's schedule, as Megatron-LM's train_step: DDP's grad buffers, then the optimizer
    (with overlapped param gather, the distributed optimizer dispatches the first all-gather here)."""
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()


def data_parallel_totals(totals: torch.Tensor) -> torch.Tensor:
    """A schedule's totals summed over the data-parallel ranks (meaningful on the last stage)."""
    totals = totals.clone()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return totals


def data_parallel_mean(totals: torch.Tensor) -> float:
    """The weighted mean loss of the global batch (meaningful on the last stage)."""
    totals = data_parallel_totals(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def any_rank(condition: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: decisions all ranks must take together."""
    flag = torch.tensor([float(condition)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def optimizer_step(optimizer, clip_grad: float, loss: float, device: torch.device) -> tuple[bool, float | None]:
    """megatron's optimizer.step(), split so that a non-finite loss (on the last pipeline stage) or
    gradient norm (reduced over all ranks) skips the update on every rank: (updated, grad norm)."""
    found_inf = optimizer.prepare_grads()
    grad_norm = None if found_inf else optimizer.get_grad_norm()
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    bad = found_inf or (last_stage and not math.isfinite(loss)) or (grad_norm is not None and not math.isfinite(grad_norm))
    if any_rank(bad, device):
        return False, grad_norm
    if clip_grad > 0:
        clip_grads.clip_grad_by_total_norm_fp32(optimizer.get_parameters(), max_norm=clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def synchronized_time(device: torch.device) -> float:
    """time.perf_counter() once the GPU's queued work is done (step times measure the work)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def sync_params(model: list, cfg: JobConfig) -> None:
    """With overlapped param gather, the updated weights reach every data-parallel rank during the
    next forward; finish that all-gather now (before a save or an evaluation), as Megatron-LM does."""
    if cfg.parallel.overlap_param_gather:
        for m in model:
            m.start_param_sync(force_sync=True)


def validation_totals(schedule: Schedule, cfg: JobConfig, datasets: dict, loader, step_fn=forward_step
                      ) -> dict[str, torch.Tensor]:
    """The trainer's validation: per dataset (blend source), logging.eval_iters global batches from its
    start, forward only; {name: totals summed over data parallelism} (loss sum, weight, real tokens,
    positions: loss = [0] / [1]). `loader(dataset, consumed_samples)` gives this rank's micro-batches."""
    out = {}
    with evaluating(schedule.model, cfg):
        for name, dataset in datasets.items():
            iterators = [loader(dataset, 0) for _ in schedule.model]
            totals = sum(schedule.run(iterators, step_fn, forward_only=True) for _ in range(cfg.logging.eval_iters))
            out[name] = data_parallel_totals(totals)
    return out


@contextlib.contextmanager
def evaluating(model: list, cfg: JobConfig):
    """Forward-only passes on the current weights: with overlapped param gather the forward
    pre-hooks are switched off (after a synchronous gather) while evaluating, as Megatron-LM does."""
    overlap = cfg.parallel.overlap_param_gather
    for m in model:
        if overlap:
            m.disable_forward_pre_hook()
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m in model:
            m.train()
            if overlap:
                m.enable_forward_pre_hook()
