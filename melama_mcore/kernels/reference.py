"""Plain-torch reference implementations: the fallback without CUDA kernels, and the CPU
implementation of the custom ops. They compute in fp32 (fp64 stays fp64) and cast back.

The forwards are differentiable by autograd; the `*_backward` functions are the same gradients
written out, used where the custom ops need an explicit backward.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def rms_norm_with_rstd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y, rstd): y in x.dtype, rstd = 1/sqrt(mean(x^2) + eps) per row in the compute dtype."""
    xf = x.to(_compute_dtype(x))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * rstd * weight.to(xf.dtype)
    return y.to(x.dtype), rstd.squeeze(-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_with_rstd(x, weight, eps)[0]


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dw) of y = x * rstd * w, with rstd as returned by the forward."""
    ct = _compute_dtype(x)
    xf, dyf, wf, r = x.to(ct), dy.to(ct), weight.to(ct), rstd.to(ct).unsqueeze(-1)
    dot = (dyf * wf * xf).mean(-1, keepdim=True)
    dx = r * wf * dyf - xf * r.pow(3) * dot
    dw = (dyf * xf * r).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def swiglu(x: Tensor) -> Tensor:
    """[..., 2F] laid out [gate | up] -> silu(gate) * up, [..., F]."""
    gate, up = x.to(_compute_dtype(x)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def swiglu_backward(dy: Tensor, x: Tensor) -> Tensor:
    gate, up = x.to(_compute_dtype(x)).chunk(2, dim=-1)
    dyf = dy.to(gate.dtype)
    sig = torch.sigmoid(gate)
    dgate = dyf * up * sig * (1 + gate * (1 - sig))
    dup = dyf * gate * sig
    return torch.cat([dgate, dup], dim=-1).to(x.dtype)


def _rotate_half(t: Tensor) -> Tensor:
    lo, hi = t.chunk(2, dim=-1)
    return torch.cat([-hi, lo], dim=-1)


def apply_rotary(t: Tensor, freqs: Tensor) -> Tensor:
    """Rotate-half RoPE (megatron sbhd, rotary_interleaved=False): t[..., :rot] * cos(freqs) +
    rotate_half(t[..., :rot]) * sin(freqs), the remaining dims passed through; freqs broadcast
    against t ([s, 1, 1, rot] from megatron)."""
    rot = freqs.shape[-1]
    ct = _compute_dtype(t)
    t_rot, t_pass = t[..., :rot].to(ct), t[..., rot:]
    f = freqs.to(ct)
    out = t_rot * f.cos() + _rotate_half(t_rot) * f.sin()
    return torch.cat([out.to(t.dtype), t_pass], dim=-1)


def apply_rotary_backward(dy: Tensor, freqs: Tensor) -> Tensor:
    """Gradient of `apply_rotary` with respect to t: the transposed rotation."""
    rot = freqs.shape[-1]
    ct = _compute_dtype(dy)
    dy_rot, dy_pass = dy[..., :rot].to(ct), dy[..., rot:]
    f = freqs.to(ct)
    # rotate_half is antisymmetric (R^T = -R): d/dt of rotate_half(t) * sin is -R(dy * sin).
    dt = dy_rot * f.cos() - _rotate_half(dy_rot * f.sin())
    return torch.cat([dt.to(dy.dtype), dy_pass], dim=-1)


def xent_stats(logits: Tensor, target: Tensor, vocab_start: int) -> Tensor:
    """Per row of this rank's vocabulary slice logits[..., v] (ids vocab_start ..): [..., 3] =
    (max, sum of exp(x - max), the target's logit or 0 when the target is not in this slice)."""
    x = logits.to(_compute_dtype(logits))
    m = x.amax(-1)
    s = torch.exp(x - m.unsqueeze(-1)).sum(-1)
    local = target - vocab_start
    in_slice = (local >= 0) & (local < x.shape[-1])
    picked = x.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.stack([m, s, torch.where(in_slice, picked, torch.zeros_like(picked))], -1)


def xent_backward(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                  vocab_start: int) -> Tensor:
    """d loss / d logits = (softmax(x) - onehot(target)) * dloss, softmax taken with the global
    log-sum-exp `lse`; rows whose target is in another slice get no onehot term."""
    ct = _compute_dtype(logits)
    x = logits.to(ct)
    grad = torch.exp(x - lse.to(ct).unsqueeze(-1))
    local = (target - vocab_start).unsqueeze(-1)
    in_slice = (local >= 0) & (local < x.shape[-1])
    grad = grad - torch.zeros_like(grad).scatter(-1, local.clamp(0, x.shape[-1] - 1),
                                                 in_slice.to(ct))
    return (grad * dloss.to(ct).unsqueeze(-1)).to(logits.dtype)
