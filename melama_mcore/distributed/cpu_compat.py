"""Run megatron-core on CPU processes with gloo: the one place that adapts it.

megatron-core has no CPU path (its maintainers say so), yet its parallel state, tensor/pipeline
parallel layers, schedules, DDP, optimizer and dist-checkpointing all work on CPU once a few CUDA
assumptions are answered. This module answers them, and nothing else in the project knows about
it. What it does, and why:

* ``torch.cuda.current_device/synchronize/current_stream/Stream/Event/stream/get_rng_state/
  set_rng_state`` become CPU equivalents or no-ops: megatron calls them unconditionally
  (tensor-parallel buffers, RoPE, DDP grad buffers, timers, the RNG tracker).
* A ``TorchFunctionMode`` rewrites a CUDA ``device=`` argument (and ``.to(cuda)`` / ``.cuda()``)
  to CPU. This catches megatron's ``device="cuda"`` literals (causal mask, schedules' token
  counters, clip-grads, grad scaler) without editing megatron's files.
* The same mode answers ``Tensor.type()`` (no arguments) with the CUDA type name, e.g.
  ``torch.cuda.BFloat16Tensor`` for a CPU bf16 tensor: megatron's mixed-precision and distributed
  optimizers and its grad clipping accept a parameter only when its type string names CUDA.
  Nothing else reads those strings, so bf16, the distributed optimizer and overlapped grad reduce
  and param gather run megatron's own code on CPU.
* Megatron's no-op RNG tracker is installed: LLaMA has no dropout, and the CUDA tracker cannot
  fork CPU generators.
* ``TRANSFORMER_CONFIG_ON_CPU``: TransformerConfig fields set differently on CPU, each with its reason.
* torch's warning about reading ``.grad`` of a non-leaf tensor is silenced when it comes through the
  function mode: megatron's distributed optimizer reads it on its fp32 shard views in every
  ``zero_grad`` (megatron's own comment: "throws grad-access warning"). On GPU the warning is
  attributed to megatron and silenced with megatron's other notes (logs.py); under the mode, torch
  attributes it to this module, so every CPU run printed it.

What still cannot run on CPU (the config checks refuse it, naming the reason): Transformer
Engine and FP8 (CUDA libraries), NCCL-specific settings, CUDA graphs, and the fused CUDA kernels
(the native backend uses their torch references on CPU). And activation recompute with the
`local` backend: torch switches a function mode off while it runs the function it intercepted, so
the forward that recompute replays inside `autograd.backward` escapes the device rewrite and meets
megatron's `device="cuda"` causal mask (the native backend builds no such mask).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode

_enabled = False

TRANSFORMER_CONFIG_ON_CPU = {
    # megatron frees a pipeline stage's output (swaps its storage for a 1-element tensor) right
    # after issuing the send. NCCL has read the pointer by then; gloo's asynchronous send (the
    # interleaved schedule's overlapped p2p) reads the storage later and would ship that element.
    "deallocate_pipeline_outputs": False,
}


def _is_cuda(device) -> bool:
    if isinstance(device, int):  # torch.cuda.current_device() results fed back as device=
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Turns every request for a CUDA tensor into a CPU one, and names CPU tensors' types as CUDA's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return "torch.cuda." + func(*args).rsplit(".", 1)[-1]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    cuda_stream = 0

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NullStream()

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def enable() -> None:
    """Adapt megatron-core to CPU processes. Idempotent; call before building any megatron object."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.enable() is for machines without CUDA")

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda *a, **k: None
    cuda.empty_cache = lambda: None

    _CudaToCpu().__enter__()  # stays active for the life of the process
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor",
                            category=UserWarning, module=__name__)
    _enabled = True


def install_rng_tracker() -> None:
    """megatron's no-op RNG tracker: forks nothing, which is right without dropout on CPU."""
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
