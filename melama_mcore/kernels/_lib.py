"""ctypes bridge to libmelama_kernels.so: loading, and launchers that write into given tensors.

The launchers take contiguous CUDA tensors (rotary input: any strides with a contiguous last dim)
and outputs allocated by the caller, so tests can pass outputs pre-filled with NaN.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from melama_mcore.kernels import build

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_p, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "melama_rms_norm_fwd": (_p, _p, _p, _p, _i64, _i64, _f32, _int, _int, _p),
    "melama_rms_norm_bwd": (_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _int, _int, _p),
    "melama_swiglu_fwd": (_p, _p, _i64, _i64, _int, _p),
    "melama_swiglu_bwd": (_p, _p, _p, _i64, _i64, _int, _p),
    "melama_rotary_fwd": (_p, _p, _p, *[_i64] * 8, _int, _p),
    "melama_rotary_bwd": (_p, _p, _p, *[_i64] * 8, _int, _p),
    "melama_xent_fwd": (_p, _p, _p, _i64, _i64, _i64, _int, _p),
    "melama_xent_bwd": (_p, _p, _p, _p, _p, _i64, _i64, _i64, _int, _p),
}


def device_archs() -> tuple[str, ...]:
    """Archs to build for the current GPU: the default sm_80 + sm_90 build serves A100-class
    (sm_8x runs sm_80 code) and H100/H200; anything else gets its own build."""
    major, minor = torch.cuda.get_device_capability()
    if major == 8 or f"{major}{minor}" in build.DEFAULT_ARCHS:
        return build.DEFAULT_ARCHS
    return (f"{major}{minor}",)


_LIB: ctypes.CDLL | None = None
RMS_NORM_MAX_COLS = 0  # set by load(): the widest row the RMSNorm kernels take


def load() -> ctypes.CDLL:
    """Load (building on first use) the shared object; raises build.BuildError or OSError."""
    global _LIB, RMS_NORM_MAX_COLS
    if _LIB is not None:
        return _LIB
    path = os.environ.get("MELAMA_KERNELS_LIB") or build.library_path(device_archs())
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.melama_error_string.argtypes, lib.melama_error_string.restype = [_int], ctypes.c_char_p
    lib.melama_rms_norm_max_cols.argtypes, lib.melama_rms_norm_max_cols.restype = [], _i64
    RMS_NORM_MAX_COLS = lib.melama_rms_norm_max_cols()
    _LIB = lib
    return lib


def _call(name: str, device: torch.device, *args) -> None:
    lib = load()
    with torch.cuda.device(device):
        err = getattr(lib, name)(*args, torch.cuda.current_stream().cuda_stream)
    if err:
        raise RuntimeError(f"{name}: {lib.melama_error_string(err).decode()}")


@functools.cache
def _partials(device_index: int) -> int:
    # Enough dw partial blocks to fill the GPU (each holds one row of fp32 dw in shared memory).
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def rms_norm_fwd(x, weight, eps: float, y, rstd) -> None:
    cols = x.shape[-1]
    _call("melama_rms_norm_fwd", x.device, x.data_ptr(), weight.data_ptr(), y.data_ptr(),
          rstd.data_ptr(), x.numel() // cols, cols, eps, DTYPE_CODES[x.dtype],
          DTYPE_CODES[weight.dtype])


def rms_norm_bwd(dy, x, weight, rstd, dx, dw) -> None:
    cols = x.shape[-1]
    rows = x.numel() // cols
    partials = max(1, min(rows, _partials(x.device.index)))
    partial = torch.empty(partials, cols, device=x.device, dtype=torch.float32)
    _call("melama_rms_norm_bwd", x.device, dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
          rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(), partial.data_ptr(), partials, rows, cols,
          DTYPE_CODES[x.dtype], DTYPE_CODES[weight.dtype])


def swiglu_fwd(x, y) -> None:
    f = y.shape[-1]
    _call("melama_swiglu_fwd", x.device, x.data_ptr(), y.data_ptr(), y.numel() // f, f,
          DTYPE_CODES[x.dtype])


def swiglu_bwd(dy, x, dx) -> None:
    f = dy.shape[-1]
    _call("melama_swiglu_bwd", x.device, dy.data_ptr(), x.data_ptr(), dx.data_ptr(),
          dy.numel() // f, f, DTYPE_CODES[x.dtype])


def rotary(t, freqs, out, backward: bool = False) -> None:
    """t: [s, b, h, d] with t.stride(-1) == 1; freqs: contiguous fp32 [s, rot]; out contiguous."""
    s, b, h, d = t.shape
    _call("melama_rotary_bwd" if backward else "melama_rotary_fwd", t.device, t.data_ptr(),
          freqs.data_ptr(), out.data_ptr(), s, b, h, d, freqs.shape[-1], t.stride(0), t.stride(1),
          t.stride(2), DTYPE_CODES[t.dtype])


def xent_fwd(logits, target, vocab_start: int, stats) -> None:
    """logits [rows, v] contiguous, target [rows] int64, stats [rows, 3] fp32."""
    v = logits.shape[-1]
    _call("melama_xent_fwd", logits.device, logits.data_ptr(), target.data_ptr(), stats.data_ptr(),
          logits.numel() // v, v, vocab_start, DTYPE_CODES[logits.dtype])


def xent_bwd(logits, target, lse, dloss, vocab_start: int, dx) -> None:
    """lse and dloss [rows] fp32; dx like logits (may be logits itself)."""
    v = logits.shape[-1]
    _call("melama_xent_bwd", logits.device, logits.data_ptr(), target.data_ptr(), lse.data_ptr(),
          dloss.data_ptr(), dx.data_ptr(), logits.numel() // v, v, vocab_start,
          DTYPE_CODES[logits.dtype])
