"""A start-up check of the CUDA kernels against the torch reference on the GPU they will run on.

Each kernel runs once, forward and backward, on small random fp32 inputs of odd and vector-width
sizes. A kernel that misbehaves on a GPU or toolkit it was never tested on then costs a log line
and the reference's speed, not a run trained on wrong numbers. It takes milliseconds.
"""

from __future__ import annotations

import torch

from melama_mcore.kernels import reference
from melama_mcore.kernels.cross_entropy import VocabParallelCrossEntropy

RTOL = 1e-3  # fp32 arithmetic on both sides: a real defect is far larger


def _cases(device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    x, w = randn(5, 1000), randn(1000).abs() + 0.5
    yield ("rms_norm", lambda x, w: torch.ops.melama.rms_norm(x, w, 1e-5)[0],
           lambda x, w: reference.rms_norm(x, w, 1e-5), (x, w))
    yield "swiglu", torch.ops.melama.swiglu, reference.swiglu, (randn(3, 2, 2 * 72 + 2),)
    freqs = randn(6, 1, 1, 32) * 3
    yield ("rotary", lambda t: torch.ops.melama.rotary(t, freqs),
           lambda t: reference.apply_rotary(t, freqs), (randn(6, 2, 3, 40),))
    target = torch.randint(0, 2 * 1003, (7,), device=device, generator=g)
    yield ("cross_entropy", lambda x: VocabParallelCrossEntropy.apply(x, target, None, True),
           lambda x: VocabParallelCrossEntropy.apply(x, target, None, False), (randn(7, 1003) * 4,))


def first_mismatch(device: torch.device) -> str | None:
    """None when every kernel's output and input gradients match the reference on `device`,
    else which kernel and how far off."""
    for name, kernel, ref, inputs in _cases(device):
        results = []
        for fn in (kernel, ref):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = fn(*leaves)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
            results.append((out.detach(), *grads))
        for part, got, expected in zip(("output", *(f"grad {i}" for i in range(len(inputs)))),
                                       *results):
            scale = expected.abs().max().clamp(min=1).item()
            if not torch.allclose(got, expected, rtol=RTOL, atol=RTOL * scale):
                err = (got - expected).abs().max().item()
                return f"{name} {part}: max abs error {err:.3g} (scale {scale:.3g})"
    return None
