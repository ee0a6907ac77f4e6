"""Benchmark melama's CUDA kernels against torch eager and torch.compile of the references at
LLaMA-2 70B shapes (bf16): seq 4096, micro-batch 1, hidden 8192, FFN 28672, 64 q / 8 kv heads
of dim 128 and the 32000-token vocabulary (padded as megatron pads it) split over tensor-parallel
ranks. The cross-entropy is also timed against megatron's fused vocab-parallel cross-entropy
(what `model.cross_entropy=megatron` runs), on one rank: the TP collectives are not timed.

    python benchmarks/kernels.py [--tp 1 2 4 8] [--iters 50] [--warmup 10] [--impls ...] [--json PATH]

Prints a markdown table: median time (CUDA events), achieved GB/s of the bytes each op must move
(inputs read once, outputs written once), and that as % of this device's copy bandwidth, measured
in the same run with a large `copy_`. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from melama_mcore import kernels
from melama_mcore.kernels import reference
from melama_mcore.models.llama.config_registry import padded_vocab_size

SEQ, HIDDEN, FFN, Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 8192, 28672, 64, 8, 128, 32000
DTYPE = torch.bfloat16  # weights too: megatron's bf16 params
EPS = 1e-5
IMPLS = ("melama", "eager", "compiled", "megatron")


def median_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(iters: int, warmup: int) -> float:
    """GB/s of a 1 GiB device-to-device copy_ (bytes read + written)."""
    src = torch.empty(2**29, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters, warmup)
    return 2 * src.numel() * src.element_size() / ms / 1e6


@dataclass
class Case:
    op: str
    tp: int
    shape: str
    ours: Callable
    ref: Callable
    inputs: tuple
    grad_inputs: tuple[int, ...]  # positions of the inputs that get gradients
    fwd_bytes: int
    bwd_bytes: int
    others: dict[str, Callable] | None = None  # further implementations to time


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(tps: list[int]):
    x = torch.randn(SEQ, HIDDEN, device="cuda", dtype=DTYPE)
    w = torch.rand(HIDDEN, device="cuda", dtype=DTYPE)
    rstd = torch.empty(SEQ, device="cuda")  # saved by the kernel, read by its backward
    yield Case("rms_norm", 1, f"[{SEQ}, {HIDDEN}]", kernels.rms_norm, reference.rms_norm,
               (x, w, EPS), (0, 1), nbytes(x, w, x, rstd), nbytes(x, x, w, rstd, x, w))
    for tp in tps:
        f = FFN // tp
        fc1 = torch.randn(SEQ, 2 * f, device="cuda", dtype=DTYPE)
        out = fc1[:, :f]
        yield Case("swiglu", tp, f"[{SEQ}, 2x{f}]", kernels.swiglu, reference.swiglu, (fc1,),
                   (0,), nbytes(fc1, out), nbytes(out, fc1, fc1))
        freqs = torch.randn(SEQ, 1, 1, HEAD_DIM, device="cuda")
        for which, heads in (("q", Q_HEADS // tp), ("k", max(1, KV_HEADS // tp))):
            t = torch.randn(SEQ, 1, heads, HEAD_DIM, device="cuda", dtype=DTYPE)
            moved = nbytes(t, t, freqs)
            yield Case(f"rotary {which}", tp, f"[{SEQ}, 1, {heads}, {HEAD_DIM}]",
                       kernels.apply_rotary, reference.apply_rotary, (t, freqs), (0,), moved,
                       moved)
        v = padded_vocab_size(VOCAB, 128, tp) // tp
        logits = torch.randn(SEQ, 1, v, device="cuda", dtype=DTYPE) * 4
        target = torch.randint(0, v, (SEQ, 1), device="cuda")
        loss = torch.empty(SEQ, 1, device="cuda")
        yield Case("cross-entropy", tp, f"[{SEQ}, 1, {v}]", kernels.vocab_parallel_cross_entropy,
                   torch_cross_entropy, (logits, target), (0,), nbytes(logits, target, loss),
                   nbytes(loss, logits, target, logits), {"megatron": megatron_cross_entropy})


def torch_cross_entropy(logits, target):
    """What a plain torch loss does: fp32 logits through F.cross_entropy."""
    v = logits.shape[-1]
    return F.cross_entropy(logits.float().view(-1, v), target.view(-1),
                           reduction="none").view(target.shape)


def megatron_cross_entropy(logits, target):
    """megatron-core's fused vocab-parallel cross-entropy on a one-rank group."""
    import torch.distributed as dist
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    if not dist.is_initialized():  # a file store: no port to collide with
        store = Path(tempfile.mkdtemp(prefix="melama_bench_")) / "store"
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    return fused_vocab_parallel_cross_entropy(logits, target, dist.group.WORLD)


def forward(fn, case: Case):
    return lambda: fn(*case.inputs)


def forward_backward(fn, case: Case):
    args = [a.detach().requires_grad_() if i in case.grad_inputs else a
            for i, a in enumerate(case.inputs)]
    dy = torch.randn_like(fn(*args))
    leaves = [args[i] for i in case.grad_inputs]

    def run():
        for leaf in leaves:
            leaf.grad = None
        fn(*args).backward(dy)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS),
                        help="implementations to time (default all; megatron: the cross-entropy only)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device; nothing to measure.")
        return 0
    if kernels.backend() != "cuda":
        print("warning: the CUDA kernels did not load; the 'melama' rows time the reference")

    copy_gbs = copy_bandwidth(args.iters, args.warmup)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16; "
          f"copy_ bandwidth {copy_gbs:.0f} GB/s\n")
    print("| op | TP | shape | pass | impl | median ms | GB/s | % of copy |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for case in cases(args.tp):
        impls = {"melama": case.ours, "eager": case.ref, "compiled": case.ref, **(case.others or {})}
        impls = {k: torch.compile(fn) if k == "compiled" else fn for k, fn in impls.items() if k in args.impls}
        for label, make, moved in (("fwd", forward, case.fwd_bytes),
                                   ("fwd+bwd", forward_backward, case.fwd_bytes + case.bwd_bytes)):
            for impl, fn in impls.items():
                ms = median_ms(make(fn, case), args.iters, args.warmup)
                gbs = moved / ms / 1e6
                print(f"| {case.op} | {case.tp} | {case.shape} | {label} | {impl} | {ms:.3f} "
                      f"| {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |")
                rows.append({"op": case.op, "tp": case.tp, "shape": case.shape, "pass": label, "impl": impl,
                             "median_ms": ms, "gb_per_s": gbs, "of_copy": gbs / copy_gbs})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "kernels": kernels.backend(), "copy_gb_per_s": copy_gbs, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
