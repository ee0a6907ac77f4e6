"""Training throughput of melama's megatron-core LLaMA: tokens/s/GPU, TFLOP/s/GPU, MFU, peak memory.

    # (a) a 70B-shaped slice on one GPU, every layer backend available (native, local, TE):
    python benchmarks/throughput.py --json slice.json
    # the same with the loss through melama's cross-entropy kernel as well as megatron's:
    python benchmarks/throughput.py --backends native --cross-entropy megatron melama
    # (b) any preset and layout on the GPUs of a node:
    torchrun --nproc-per-node 8 benchmarks/throughput.py --preset llama2-70b --layers 8 --tp 8 --pp 1 \
        --mbs 1 --gbs 16 --recompute selective --backends transformer_engine native
    # CPU (tiny shapes; what the tests run), fp32, or the production path (bf16, distributed optimizer):
    python benchmarks/throughput.py --preset nano --seq 64 --mbs 2 --gbs 4 --warmup 1 --steps 2 --vocab-size 256
    python benchmarks/throughput.py --preset nano --seq 64 --precision bf16 --distributed-optimizer ...

Each backend: the model is built with the trunk's `build_model_chunks` (a JobConfig whose
`model.num_layers` is --layers), started, wrapped and optimised exactly as `melama train` does it
(startup.py, distributed/parallel.py, components/optimizer.py), and trained on random tokens with
the trainer's own step (step.py: megatron's schedule over the global batch, the masked token loss,
the optimizer update with its non-finite skip and clipping): --warmup steps, then --steps timed
ones (synchronised; the slowest rank's time). A step is a whole global batch
(--gbs / (--mbs x DP) micro-batches), so the optimizer step is amortised as in training.

FLOPs: the trunk's `flops_per_token` (Megatron convention: 3 x 2 x every GEMM, causal attention
halved, recompute not counted) of the model actually built, i.e. --layers decoder layers plus the
output layer over the padded vocabulary (a multiple of model.make_vocab_size_divisible_by x TP, as
built and as Megatron-LM counts it), never the full preset. TFLOP/s/GPU = tokens/s x FLOPs/token / GPUs;
MFU = TFLOP/s/GPU / dense peak (components/metrics.py). Peak memory is
`torch.cuda.max_memory_allocated` (None on CPU), shown beside the planner's prediction for the same
layout (melama_mcore/commands/plan.py; it assumes a flash-style attention, so `local`, which stores
s x s scores, exceeds it).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from melama_mcore import step
from melama_mcore.commands import plan as planner
from melama_mcore.components.metrics import peak_tflops
from melama_mcore.components.optimizer import build_optimizer
from melama_mcore.config.job_config import JobConfig, load_config
from melama_mcore.distributed import parallel
from melama_mcore.distributed.launch import launch_env
from melama_mcore.errors import UserError
from melama_mcore.models.llama.config_registry import PRESETS, flops_per_token
from melama_mcore.models.llama.model import build_model_chunks, output_vocab_size
from melama_mcore.startup import start

SLICE_LAYERS = 2  # 70B width: ~14 GB of weights + grads + Adam state per layer in bf16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama2-70b")
    p.add_argument("--layers", type=int, help=f"decoder layers to build (default {SLICE_LAYERS} for llama2 presets, "
                                              "the preset's otherwise)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vp", type=int, help="virtual stages per pipeline rank (interleaved 1F1B)")
    p.add_argument("--mbs", type=int, default=1, help="micro batch size")
    p.add_argument("--gbs", type=int, help="global batch size (default 8 micro-batches per DP rank)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on when --tp > 1")
    p.add_argument("--backends", nargs="+", choices=["transformer_engine", "native", "local"],
                   help="default: every backend available here")
    p.add_argument("--cross-entropy", nargs="+", choices=["megatron", "melama"], default=["megatron"],
                   help="loss kernels to time with each backend (model.cross_entropy); melama rows are "
                        "labelled <backend>+melama-xent")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="training.precision (default auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="parallel.use_distributed_optimizer, with overlapped grad reduce and param gather "
                        "(default: the trainer's)")
    p.add_argument("--vocab-size", type=int, help="default: the preset's, else 32000")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return p


def job_config(args, world_size: int) -> JobConfig:
    layers = args.layers or (SLICE_LAYERS if args.preset.startswith("llama2") else None)
    sp = args.sequence_parallel if args.sequence_parallel is not None else args.tp > 1
    dp = max(1, world_size // (args.tp * args.pp))
    gbs = args.gbs or 8 * args.mbs * dp
    overrides = [
        f"model.preset={args.preset}", f"parallel.tensor_parallel={args.tp}",
        f"parallel.pipeline_parallel={args.pp}", f"parallel.virtual_pipeline={args.vp or 'null'}",
        f"parallel.sequence_parallel={str(sp).lower()}", f"training.seq_length={args.seq}",
        f"training.micro_batch_size={args.mbs}", f"training.global_batch_size={gbs}",
        f"training.recompute={args.recompute}", f"training.precision={args.precision}", "logging.tensorboard=false",
    ]
    if args.distributed_optimizer is not None:
        on = str(args.distributed_optimizer).lower()
        overrides += [f"parallel.use_distributed_optimizer={on}", f"parallel.overlap_grad_reduce={on}",
                      f"parallel.overlap_param_gather={on}"]
    if layers:
        overrides.append(f"model.num_layers={layers}")
    preset = PRESETS.get(args.preset)
    if args.vocab_size or (preset is not None and preset.vocab_size is None):
        overrides.append(f"model.vocab_size={args.vocab_size or 32000}")
    return load_config(None, overrides)


def available_backends(device: str, transformer_engine: bool) -> list[str]:
    return (["transformer_engine"] if device == "cuda" and transformer_engine else []) + ["native", "local"]


def state_bytes(chunks, optimizer) -> dict:
    """Bytes this rank holds in weights, main grads and optimizer state (master copies + Adam
    moments; torch's scalar step counters are left out), summed from the real tensors."""
    def nbytes(t):
        return t.numel() * t.element_size()

    params = [p for chunk in chunks for p in chunk.parameters()]
    model_ids = {id(p) for p in params}
    inners = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    masters = moments = 0
    for inner in inners:
        for group in inner.param_groups:
            for p in group["params"]:
                masters += 0 if id(p) in model_ids else nbytes(p)
                moments += sum(nbytes(s) for s in inner.state.get(p, {}).values()
                               if torch.is_tensor(s) and s.numel() == p.numel())
    return {
        "params": sum(p.numel() for p in params),
        "param_bytes": sum(map(nbytes, params)),
        "main_grad_bytes": sum(nbytes(p.main_grad) for p in params if getattr(p, "main_grad", None) is not None),
        "optimizer_state_bytes": masters + moments,
    }


def random_batch(cfg: JobConfig, vocab_size: int, device: torch.device) -> dict:
    t = cfg.training
    g = torch.Generator().manual_seed(t.seed)
    tokens = torch.randint(0, vocab_size, (t.micro_batch_size, t.seq_length + 1), generator=g)
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(t.seq_length).expand(t.micro_batch_size, -1).contiguous(),
        "loss_mask": torch.ones(t.micro_batch_size, t.seq_length),
    }
    return {k: v.to(device) for k, v in batch.items()}


def measure(cfg: JobConfig, arch, backend: str, device: torch.device, warmup: int, steps: int, label: str) -> dict:
    """One backend: build, warm up, time the trainer's own step (step.py). Returns this rank's measurements."""
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    chunks = build_model_chunks(cfg, arch, backend)
    model = parallel.wrap_for_training(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    schedule = step.Schedule(cfg, model, device)
    iterators = [itertools.repeat(random_batch(cfg, arch.vocab_size, device)) for _ in model]

    def train_step():
        step.zero_grads(model, optimizer)
        loss = step.data_parallel_mean(schedule.run(iterators))
        return step.optimizer_step(optimizer, cfg.optimizer.clip_grad, loss, device)

    for _ in range(warmup):
        train_step()
    began = step.synchronized_time(device)
    for _ in range(steps):
        updated, grad_norm = train_step()
    elapsed = step.synchronized_time(device) - began
    result = {
        "backend": label,
        "rank": dist.get_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "step_time_s": elapsed / steps,
        "last_step_ok": bool(updated),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        **state_bytes(chunks, optimizer),
    }
    del model, chunks, optimizer, iterators, schedule
    gc.collect()
    return result


def model_flops_per_token(cfg: JobConfig, arch) -> float:
    """The trunk's FLOPs per token of the model as built: output layer over the padded vocabulary."""
    vocab = output_vocab_size(cfg, arch)
    return flops_per_token(arch, cfg.training.seq_length, vocab)


def summarise(cfg: JobConfig, arch, backend: str, ranks: list[dict], world: int) -> dict:
    errors = sorted({r["error"] for r in ranks if "error" in r})
    if errors:
        return {"backend": backend, "error": "; ".join(errors)}
    t = cfg.training
    step_time = max(r["step_time_s"] for r in ranks)  # the step ends when the slowest rank ends
    tokens_per_s = t.global_batch_size * t.seq_length / step_time
    fpt = model_flops_per_token(cfg, arch)
    tflops = tokens_per_s * fpt / world / 1e12
    peak = peak_tflops(t.precision, False, None)
    measured = [r["peak_memory_bytes"] for r in ranks if r["peak_memory_bytes"] is not None]
    layout = planner.Layout(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                            cfg.parallel.virtual_pipeline, world // (cfg.parallel.tensor_parallel *
                                                                     cfg.parallel.pipeline_parallel),
                            t.micro_batch_size, t.recompute, bool(cfg.parallel.use_distributed_optimizer))
    predicted = planner.peak_memory(arch, layout, t.seq_length, t.global_batch_size, t.precision)
    return {
        "backend": backend,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world,
        "flops_per_token": fpt,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": max(measured) / 2**30 if measured else None,
        "predicted_memory_gib": predicted.total / 2**30,
        "all_steps_ok": all(r["last_step_ok"] for r in ranks),
        "ranks": ranks,
    }


def print_table(report: dict) -> None:
    m, lay = report["model"], report["layout"]
    print(f"\n{m['preset']}: {m['layers_built']} of {m['preset_layers']} decoder layers built (hidden {m['hidden_size']}, "
          f"{m['heads']} heads, {m['kv_groups']} KV groups, FFN {m['ffn_hidden_size']}, vocab {m['vocab_size']} "
          f"padded to {m['padded_vocab_size']}), "
          f"seq {lay['seq']}, micro batch {lay['mbs']}, global batch {lay['gbs']}, {lay['precision']}, "
          f"TP{lay['tp']} PP{lay['pp']} VP{lay['vp'] or 1} DP{lay['dp']}, recompute {lay['recompute']}")
    print(f"{report['gpus']} x {report['machine']['device']}; FLOPs/token {report['flops_per_token']:.4g} "
          f"(Megatron convention, causal attention halved) for the {m['layers_built']} layers built + output layer; "
          f"peak {report['peak_tflops'] or 'n/a'} TFLOP/s")
    print(f"{'backend':<20}{'step s':>10}{'tokens/s/GPU':>14}{'TFLOP/s/GPU':>13}{'MFU':>8}"
          f"{'peak GiB':>10}{'predicted GiB':>15}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['backend']:<20}failed: {r['error']}")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        print(f"{r['backend']:<20}{r['step_time_s']:>10.4f}{r['tokens_per_s_per_gpu']:>14.1f}"
              f"{r['tflops_per_gpu']:>13.4g}{mfu:>8}{mem:>10}{r['predicted_memory_gib']:>15.3g}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or (args.layers is not None and args.layers < 1):
        raise UserError("--steps and --layers must be >= 1 and --warmup >= 0")
    cfg = job_config(args, launch_env().world_size)
    runtime = start(cfg)
    arch, world = runtime.arch, runtime.launch.world_size
    backends = args.backends or available_backends(cfg.training.device, runtime.env.transformer_engine)

    try:
        results = []
        for backend, loss_kernel in itertools.product(backends, args.cross_entropy):
            label = backend if loss_kernel == "megatron" else f"{backend}+melama-xent"
            cfg.model.cross_entropy = loss_kernel
            try:
                mine = measure(cfg, arch, backend, runtime.device, args.warmup, args.steps, label)
            # One backend failing (out of memory, a fused kernel missing outside NVIDIA's container)
            # must not hide the others' figures; the failure is reported in its row.
            except Exception as err:  # noqa: BLE001
                mine = {"backend": label, "rank": dist.get_rank(), "error": f"{type(err).__name__}: {err}"[:300]}
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
            results.append(summarise(cfg, arch, label, ranks, world))
    finally:
        parallel.shutdown()
    if runtime.launch.rank != 0:
        return 0
    t, p = cfg.training, cfg.parallel
    report = {
        "machine": {"device": torch.cuda.get_device_name() if cfg.training.device == "cuda" else "CPU",
                    "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "gpus": world,
        "model": {"preset": args.preset, "layers_built": arch.num_layers, "preset_layers": PRESETS[args.preset].num_layers,
                  "hidden_size": arch.hidden_size, "heads": arch.num_attention_heads, "kv_groups": arch.num_query_groups,
                  "ffn_hidden_size": arch.ffn_hidden_size, "vocab_size": arch.vocab_size,
                  "padded_vocab_size": output_vocab_size(cfg, arch)},
        "layout": {"tp": p.tensor_parallel, "pp": p.pipeline_parallel, "vp": p.virtual_pipeline,
                   "dp": world // (p.tensor_parallel * p.pipeline_parallel), "sequence_parallel": p.sequence_parallel,
                   "distributed_optimizer": p.use_distributed_optimizer, "mbs": t.micro_batch_size,
                   "gbs": t.global_batch_size, "seq": t.seq_length, "recompute": t.recompute, "precision": t.precision},
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "peak_tflops": peak_tflops(t.precision, False, None),
        "flops_per_token": model_flops_per_token(cfg, arch),
        "flop_convention": "Megatron: 3 x 2 x GEMM FLOPs, causal attention halved, recompute not counted; "
                           "for the layers actually built, output layer over the padded vocabulary",
        "results": results,
    }
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":  # guarded: megatron helpers may spawn into this module
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
