"""Fused kernels for LLaMA layers: RMSNorm, SwiGLU, rotary embedding, vocab-parallel cross-entropy.

    from melama_mcore.kernels import rms_norm, swiglu, apply_rotary, vocab_parallel_cross_entropy

On CUDA tensors of fp32/fp16/bf16 these call the `melama::*` custom ops (CUDA kernels from csrc/,
built on first use, see build.py); otherwise, or when the kernels cannot be built or loaded or fail
their start-up check against the reference (self_check.py), the differentiable torch reference in
reference.py. Each reason for falling back is logged once.
`MELAMA_KERNELS=torch` forces the reference.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from melama_mcore.kernels import reference

__all__ = ["rms_norm", "swiglu", "apply_rotary", "vocab_parallel_cross_entropy", "backend"]

log = logging.getLogger(__name__)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_logged: set[str] = set()
_state: tuple[str, str] | None = None  # (backend, reason), resolved on first use
# Reasons that are the machine's or the user's choice, not a fault: said once by rank 0 (INFO), not
# warned on every rank of a CPU run.
_EXPECTED = ("CUDA is not available", "MELAMA_KERNELS=torch")


# assume_constant_result: torch.compile runs these at trace time and keeps their (constant)
# results, so neither logging nor the one-off resolution breaks a graph.
@torch.compiler.assume_constant_result
def _fallback(reason: str) -> bool:
    """Log (once per reason) that the reference runs; returns False (= not native)."""
    if reason not in _logged:
        _logged.add(reason)
        level = logging.INFO if reason in _EXPECTED else logging.WARNING
        log.log(level, "melama kernels: using the torch reference: %s", reason)
    return False


def _resolve() -> tuple[str, str]:
    if os.environ.get("MELAMA_KERNELS", "").lower() == "torch":
        return "torch", "MELAMA_KERNELS=torch"
    if not torch.cuda.is_available():
        return "torch", "CUDA is not available"
    from melama_mcore.kernels import _lib, build

    try:
        _lib.load()
    except (build.BuildError, OSError) as err:
        return "torch", f"the CUDA kernels could not be built or loaded: {err}"
    from melama_mcore.kernels import ops  # noqa: F401  (registers the melama:: ops)
    from melama_mcore.kernels.self_check import first_mismatch

    if problem := first_mismatch(torch.device("cuda", torch.cuda.current_device())):
        return "torch", f"a CUDA kernel disagrees with the reference on this GPU: {problem}"
    return "cuda", ""


@torch.compiler.assume_constant_result
def backend() -> str:
    """"cuda" when the kernels are loaded, else "torch" (the reason is logged once)."""
    global _state
    if _state is None:
        _state = _resolve()
    name, reason = _state
    if name == "cuda":
        if "loaded" not in _logged:
            _logged.add("loaded")
            log.info("melama kernels: CUDA kernels loaded")
    else:
        _fallback(reason)
    return name


def _native(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors (logs why not, once per reason)."""
    if backend() != "cuda":
        return False
    if not all(t.is_cuda for t in tensors):
        return _fallback("tensor on CPU")
    if not all(t.dtype in _DTYPES for t in tensors):
        return _fallback(f"unsupported dtype {[t.dtype for t in tensors]}")
    return True


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight, in x.dtype; weight is fp32 or x.dtype."""
    if _native(x, weight):
        from melama_mcore.kernels import _lib

        shape_ok = weight.shape == x.shape[-1:] and 0 < x.shape[-1] <= _lib.RMS_NORM_MAX_COLS
        if shape_ok and weight.dtype in (torch.float32, x.dtype):
            return torch.ops.melama.rms_norm(x, weight, eps)[0]
        _fallback(f"unsupported rms_norm shapes/dtypes x {tuple(x.shape)} {x.dtype}, "
                  f"weight {tuple(weight.shape)} {weight.dtype}")
    return reference.rms_norm(x, weight, eps)


def swiglu(x: Tensor) -> Tensor:
    """[..., 2F] = [gate | up] -> silu(gate) * up, [..., F]."""
    if _native(x):
        if x.dim() > 0 and x.shape[-1] % 2 == 0 and x.shape[-1] > 0:
            return torch.ops.melama.swiglu(x)
        _fallback(f"unsupported swiglu shape {tuple(x.shape)}")
    return reference.swiglu(x)


def apply_rotary(t: Tensor, freqs: Tensor) -> Tensor:
    """Rotate-half RoPE on sbhd `t` [s, b, h, d] with megatron's freqs [s, 1, 1, rot] (angles)."""
    if _native(t, freqs):
        rot = freqs.shape[-1]
        shape_ok = (t.dim() == 4 and freqs.shape == (t.shape[0], 1, 1, rot)
                    and 0 < rot <= t.shape[-1] and rot % 2 == 0)
        if shape_ok:
            return torch.ops.melama.rotary(t, freqs)
        _fallback(f"unsupported rotary shapes t {tuple(t.shape)}, freqs {tuple(freqs.shape)}")
    return reference.apply_rotary(t, freqs)


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, tp_group=None) -> Tensor:
    """Cross-entropy per token, fp32 [...], of this tensor-parallel rank's vocabulary slice of the
    logits [..., v] (rank r holds ids r*v .. r*v + v - 1, as megatron's output layer) against
    global target ids [...]. Same result as megatron's vocab_parallel_cross_entropy; see
    cross_entropy.py for what differs."""
    from melama_mcore.kernels.cross_entropy import VocabParallelCrossEntropy

    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target {tuple(target.shape)} must be logits {tuple(logits.shape)} "
                         "without the vocabulary dim")
    native = _native(logits) and logits.shape[-1] > 0
    return VocabParallelCrossEntropy.apply(logits, target.long(), tp_group, native)
