"""torch.library custom ops `melama::*`: the CUDA kernels on CUDA tensors, the reference on
others (which keeps the ops testable with opcheck on CPU). Fake implementations let torch.compile
and megatron trace them; each forward's autograd calls its backward op."""

from __future__ import annotations

import torch
from torch import Tensor

from melama_mcore.kernels import _lib, reference


@torch.library.custom_op("melama::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y, rstd): rstd [x.shape[:-1]] fp32 is kept for the backward."""
    if not x.is_cuda:
        y, rstd = reference.rms_norm_with_rstd(x, weight, eps)
        return y, rstd.float()
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    _lib.rms_norm_fwd(x, weight, eps, y, rstd)
    return y, rstd


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("melama::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    if not x.is_cuda:
        return reference.rms_norm_backward(dy, x, weight, rstd)
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    dx, dw = torch.empty_like(x), torch.empty_like(weight)
    _lib.rms_norm_bwd(dy, x, weight, rstd, dx, dw)
    return dx, dw


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward(dy, x, weight, rstd)
    return dx, dw, None


rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


@torch.library.custom_op("melama::swiglu", mutates_args=())
def swiglu(x: Tensor) -> Tensor:
    if not x.is_cuda:
        return reference.swiglu(x)
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    _lib.swiglu_fwd(x, y)
    return y


@swiglu.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("melama::swiglu_backward", mutates_args=())
def swiglu_backward(dy: Tensor, x: Tensor) -> Tensor:
    if not x.is_cuda:
        return reference.swiglu_backward(dy, x)
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    _lib.swiglu_bwd(dy, x, dx)
    return dx


@swiglu_backward.register_fake
def _(dy, x):
    return torch.empty_like(x)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, dy):
    (x,) = ctx.saved_tensors
    return swiglu_backward(dy, x)


swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def _rotary_cuda(t: Tensor, freqs: Tensor, backward: bool) -> Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1]).float().contiguous()
    out = torch.empty(t.shape, device=t.device, dtype=t.dtype)
    _lib.rotary(t, angles, out, backward=backward)
    return out


@torch.library.custom_op("melama::rotary", mutates_args=())
def rotary(t: Tensor, freqs: Tensor) -> Tensor:
    """t [s, b, h, d] (strided heads allowed), freqs [s, 1, 1, rot] angles."""
    if not t.is_cuda:
        return reference.apply_rotary(t, freqs)
    return _rotary_cuda(t, freqs, backward=False)


@rotary.register_fake
def _(t, freqs):
    return torch.empty(t.shape, device=t.device, dtype=t.dtype)


@torch.library.custom_op("melama::rotary_backward", mutates_args=())
def rotary_backward(dy: Tensor, freqs: Tensor) -> Tensor:
    if not dy.is_cuda:
        return reference.apply_rotary_backward(dy, freqs)
    return _rotary_cuda(dy, freqs, backward=True)


@rotary_backward.register_fake
def _(dy, freqs):
    return torch.empty(dy.shape, device=dy.device, dtype=dy.dtype)


def _rotary_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _rotary_grad(ctx, dy):
    (freqs,) = ctx.saved_tensors
    return rotary_backward(dy, freqs), None


rotary.register_autograd(_rotary_grad, setup_context=_rotary_setup)


@torch.library.custom_op("melama::xent_stats", mutates_args=())
def xent_stats(logits: Tensor, target: Tensor, vocab_start: int) -> Tensor:
    """[..., 3] fp32 per-row (max, sum exp(x - max), target logit or 0); not differentiable: the
    autograd of the cross-entropy is in cross_entropy.py, after the ranks combine these."""
    if not logits.is_cuda:
        return reference.xent_stats(logits, target, vocab_start).float()
    logits, target = logits.contiguous(), target.contiguous()
    stats = logits.new_empty(*logits.shape[:-1], 3, dtype=torch.float32)
    _lib.xent_fwd(logits, target, vocab_start, stats)
    return stats


@xent_stats.register_fake
def _(logits, target, vocab_start):
    return logits.new_empty(*logits.shape[:-1], 3, dtype=torch.float32)


@torch.library.custom_op("melama::xent_backward", mutates_args=())
def xent_backward(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                  vocab_start: int) -> Tensor:
    if not logits.is_cuda:
        return reference.xent_backward(dloss, logits, target, lse, vocab_start)
    logits, target = logits.contiguous(), target.contiguous()
    lse, dloss = lse.float().contiguous(), dloss.float().contiguous()  # dloss may be an expand
    dx = torch.empty_like(logits)
    _lib.xent_bwd(logits, target, lse, dloss, vocab_start, dx)
    return dx


@xent_backward.register_fake
def _(dloss, logits, target, lse, vocab_start):
    return torch.empty_like(logits)
