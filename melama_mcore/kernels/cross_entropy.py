"""Vocab-parallel cross-entropy from one pass over each rank's logits.

Each tensor-parallel rank holds logits for its slice of the vocabulary. The forward computes per
row (max, sum of exp(x - max), the target's logit) over the slice, the fused kernel reading the
logits once; the ranks exchange these three numbers per row with one all-gather (megatron's
implementation does two all-reduces) and combine them into the log-sum-exp. The backward
recomputes the softmax from the saved logits and the log-sum-exp in one read-and-write pass, so
no fp32 copy of the logits or of the softmax is kept between forward and backward (megatron keeps
an fp32 softmax: twice the bytes of bf16 logits).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from melama_mcore.kernels import reference


def combine_stats(gathered: Tensor) -> tuple[Tensor, Tensor]:
    """(lse, loss) from every rank's stats stacked as [world, ..., 3]."""
    m, s, t = gathered.unbind(-1)
    top = m.amax(0)
    lse = top + torch.log((s * torch.exp(m - top)).sum(0))
    return lse, lse - t.sum(0)


class VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, tp_group, native: bool) -> Tensor:
        world = 1 if tp_group is None else dist.get_world_size(tp_group)
        vocab_start = 0 if tp_group is None else dist.get_rank(tp_group) * logits.shape[-1]
        if native:
            stats = torch.ops.melama.xent_stats(logits, target, vocab_start)
        else:
            stats = reference.xent_stats(logits, target, vocab_start).float()
        if world > 1:
            stats = stats.contiguous()
            gathered = stats.new_empty(world * stats.shape[0], *stats.shape[1:])  # gloo: concatenated
            dist.all_gather_into_tensor(gathered, stats, group=tp_group)
            gathered = gathered.view(world, *stats.shape)
        else:
            gathered = stats.unsqueeze(0)
        lse, loss = combine_stats(gathered)
        ctx.save_for_backward(logits, target, lse)
        ctx.vocab_start, ctx.native = vocab_start, native
        return loss

    @staticmethod
    def backward(ctx, dloss: Tensor):
        logits, target, lse = ctx.saved_tensors
        backward = torch.ops.melama.xent_backward if ctx.native else reference.xent_backward
        return backward(dloss, logits, target, lse, ctx.vocab_start), None, None, None
