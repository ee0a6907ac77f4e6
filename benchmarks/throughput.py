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
    # instruction tuning: LoRA vs full fine-tuning, packed instruction rows vs one sample per row:
    python benchmarks/throughput.py --preset llama2-13b --layers 4 --backends native --peft none lora \
        --data packed unpacked --json sft_13b.json

Each backend: the model is started, built, given its training strategy, wrapped and optimised
exactly as `melama train` does it (startup.py, ready_model.build: a JobConfig whose
`model.num_layers` is --layers), and trained on random tokens with the trainer's own step
(step.train_step: megatron's schedule over the global batch, the masked token loss, the loss taken
on the last pipeline stage, the optimizer update with its non-finite skip and clipping): --warmup
steps, then --steps timed ones (synchronised; the slowest rank's time). A step is a whole global
batch (--gbs / (--mbs x DP) micro-batches), so the optimizer step is amortised as in training.

FLOPs: the trainer's (step.flops_per_token: the training strategy's count, Megatron convention: 3 x
2 x every GEMM, causal attention halved, recompute not counted) of the model actually built, i.e.
--layers decoder layers plus the output layer over the padded vocabulary (a multiple of
model.make_vocab_size_divisible_by x TP, as built and as Megatron-LM counts it), never the full
preset. TFLOP/s/GPU = tokens/s x FLOPs/token / GPUs;
MFU = TFLOP/s/GPU / dense peak (components/metrics.py). Peak memory is
`torch.cuda.max_memory_allocated` (None on CPU), shown beside the planner's prediction for the same
layout (melama_mcore/commands/plan.py; it assumes a flash-style attention, so `local`, which stores
s x s scores, exceeds it).

Instruction tuning (issue 12); each option takes several values, every combination is a row:
* `--peft lora` trains with the LoRA strategy, as `melama train` does (strategies/lora.py: adapters
  added before the DDP wrap; rank --lora-rank, targets --lora-targets, dropout --lora-dropout, alpha
  the recipe default): the base is frozen, so main grads and optimizer state are the adapters' only,
  and TFLOP/s count the FLOPs a LoRA step executes (the strategy's: no weight gradients for frozen
  linears), not 6N: the trainer's and the planner's count.
* `--data packed|unpacked` trains on instruction samples drawn from the Me-LLaMA mix of
  benchmarks/sft_packing.py (source sizes published, lengths ASSUMED, scaled to --seq; loss on the
  last ANSWER_SHARE of each sample). packed: the training datasets' packing plan (data/sft/packing.py
  `build_plan`: shuffled, first-fit-decreasing) assembled into rows as the training datasets assemble
  them (data/sft/dataset.py `packed_row`: cu_seqlens, positions restarting per sample), trained as
  instruction data (data/run_data.py INSTRUCTIONS: attention confined to each sample). unpacked: one
  sample per row, padded, trained as plain causal sequences (PRETRAINING: no sample boundaries
  needed, the fastest attention a trainer without packing has). Same model, layout and sample distribution; `tokens_per_s` counts real (non-padding)
  tokens, padding_waste = 1 - real tokens / positions; TFLOP/s and MFU count every position, since
  padding is computed too. `--data random` (default): random tokens, every position real.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import sys
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from melama_mcore import ready_model, step
from melama_mcore.commands import plan as planner
from melama_mcore.components.metrics import peak_tflops
from melama_mcore.config.job_config import JobConfig, PeftConfig, load_config
from melama_mcore.data.run_data import INSTRUCTIONS, PRETRAINING
from melama_mcore.data.sft.dataset import packed_row
from melama_mcore.data.sft.packing import PackingPlan, build_plan
from melama_mcore.distributed import parallel
from melama_mcore.distributed.launch import launch_env
from melama_mcore.errors import UserError
from melama_mcore.models.llama.config_registry import PRESETS
from melama_mcore.models.llama.lora_tensors import TARGETS
from melama_mcore.models.llama.model import output_vocab_size
from melama_mcore.startup import Runtime, start
from melama_mcore.strategies import METHODS, strategy_for
from sft_packing import me_llama_sample  # benchmarks/: the running script's folder, on sys.path

SLICE_LAYERS = 2  # 70B width: ~14 GB of weights + grads + Adam state per layer in bf16
SFT_POOL = 4096  # Me-LLaMA-like samples drawn for --data packed|unpacked (packed in as many epochs as needed)
ANSWER_SHARE = 0.3  # ASSUMED trained share of each sample's tokens; the loss mask does not change a step's work


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
    p.add_argument("--peft", nargs="+", choices=METHODS, default=["none"],
                   help="full fine-tuning (none) and/or LoRA adapters on a frozen base (lora), each a row "
                        "labelled <backend>+lora")
    p.add_argument("--lora-rank", type=int, default=PeftConfig.rank, help=f"LoRA rank (default {PeftConfig.rank})")
    p.add_argument("--lora-dropout", type=float, default=PeftConfig.dropout,
                   help=f"LoRA dropout (default {PeftConfig.dropout}, the recipe default)")
    p.add_argument("--lora-targets", nargs="+", choices=list(TARGETS), default=PeftConfig().target_modules,
                   help="modules given adapters (default: the four linears of every layer)")
    p.add_argument("--data", nargs="+", choices=["random", "packed", "unpacked"], default=["random"],
                   help="random tokens, or Me-LLaMA-like instruction samples packed several per row or one per "
                        "row (rows labelled <backend>+packed / +unpacked)")
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
    moments; torch's scalar step counters are left out), summed from the real tensors. An optimizer
    parameter that shares storage with the model's (fp32 weights: the distributed optimizer's shards
    are views of megatron's parameter buffer) is no master copy and costs nothing."""
    def nbytes(t):
        return t.numel() * t.element_size()

    params = [p for chunk in chunks for p in chunk.parameters()]
    model_storages = {p.untyped_storage().data_ptr() for p in params}
    inners = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    masters = moments = 0
    for inner in inners:
        for group in inner.param_groups:
            for p in group["params"]:
                masters += 0 if p.untyped_storage().data_ptr() in model_storages else nbytes(p)
                moments += sum(nbytes(s) for s in inner.state.get(p, {}).values()
                               if torch.is_tensor(s) and s.numel() == p.numel())
    return {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
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


def instruction_batches(cfg: JobConfig, vocab_size: int, packed: bool, count: int, device: torch.device):
    """`count` global batches of Me-LLaMA-like instruction samples (module docstring): this rank's
    micro-batches of each, and every global batch's real tokens and samples (the same on all ranks)."""
    t = cfg.training
    seq, gbs, rows = t.seq_length, t.global_batch_size, count * t.global_batch_size
    positions = me_llama_sample(SFT_POOL, seq, seed=t.seed)
    rng = np.random.default_rng(t.seed)
    samples = []
    for n in positions.tolist():  # n + 1 tokens train n positions
        mask = np.zeros(n + 1, np.uint8)
        mask[-max(1, round(ANSWER_SHARE * (n + 1))):] = 1
        samples.append((rng.integers(0, vocab_size, n + 1), mask))
    ids = np.arange(len(samples))
    if packed:
        plan = build_plan(ids, positions, seq, t.seed, rows)
    else:
        order = np.random.RandomState(t.seed).permutation(len(ids))
        plan = PackingPlan(np.arange(rows + 1), np.resize(order, rows), epochs=-(-rows // len(ids)))
    share = gbs // parallel_state.get_data_parallel_world_size()
    first_mine = parallel_state.get_data_parallel_rank() * share
    batches, real, counts = [], [], []
    for b in range(count):
        members = [plan.sequence(i) for i in range(b * gbs, (b + 1) * gbs)]
        real.append(int(sum(positions[m].sum() for m in members)))
        counts.append(sum(len(m) for m in members))
        mine = [packed_row((samples[c] for c in plan.sequence(b * gbs + first_mine + i)), seq, pad_id=0)
                for i in range(share)]
        batches.append([{k: torch.stack([row[k] for row in mine[j:j + t.micro_batch_size]]).to(device)
                         for k in mine[0]} for j in range(0, share, t.micro_batch_size)])
    return batches, real, counts


def measure(cfg: JobConfig, runtime: Runtime, warmup: int, steps: int, label: str, data: str) -> dict:
    """One row: build as the trainer does (the runtime's backend and training strategy), warm up, time
    the trainer's own step (step.train_step). Returns this rank's measurements."""
    device = runtime.device
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = cfg.training
    ready = ready_model.build(cfg, runtime, training=True)
    model, optimizer = ready.model, ready.optimizer
    schedule = step.Schedule(cfg, model, device)
    vocab_size = runtime.arch.vocab_size
    if data == "random":
        batch = random_batch(cfg, vocab_size, device)
        feed = lambda i: [itertools.repeat(batch) for _ in model]  # noqa: E731
        real, samples, step_fn = [t.global_batch_size * t.seq_length] * (warmup + steps), None, step.forward_step
    else:
        packed = data == "packed"
        batches, real, samples = instruction_batches(cfg, vocab_size, packed, warmup + steps, device)
        feed = lambda i: [iter(batches[i]) for _ in model]  # noqa: E731
        step_fn = partial(step.forward_step, data=INSTRUCTIONS if packed else PRETRAINING,
                          loss_normalization=t.loss_normalization)

    for i in range(warmup):
        step.train_step(schedule, optimizer, feed(i), step_fn, cfg.optimizer.clip_grad)
    timed = torch.zeros(step.TOTALS, device=device)
    began = step.synchronized_time(device)
    for i in range(warmup, warmup + steps):
        result = step.train_step(schedule, optimizer, feed(i), step_fn, cfg.optimizer.clip_grad)
        timed += result.totals  # [loss sum, weight, real tokens, positions] over DP (last stage)
    elapsed = step.synchronized_time(device) - began
    out = {
        "backend": label,
        "rank": dist.get_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "step_time_s": elapsed / steps,
        "real_tokens_per_step": sum(real[warmup:]) / steps,
        "samples_per_step": sum(samples[warmup:]) / steps if samples else None,
        # the same count as the trainer's loss reduction sees it (packed rows carry real_tokens)
        "step_real_tokens_per_step": timed[2].item() / steps
        if data == "packed" and parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None,
        "last_step_ok": bool(result.updated),
        "grad_norm": float(result.grad_norm) if result.grad_norm is not None else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        **state_bytes(ready.chunks, optimizer),
    }
    del ready, model, optimizer, schedule, feed
    gc.collect()
    return out


def summarise(cfg: JobConfig, arch, backend: str, ranks: list[dict], world: int, peft: PeftConfig,
              data: str) -> dict:
    strategy = strategy_for(peft)
    errors = sorted({r["error"] for r in ranks if "error" in r})
    if errors:
        return {"backend": backend, "peft": strategy.method, "data": data, "error": "; ".join(errors)}
    t = cfg.training
    step_time = max(r["step_time_s"] for r in ranks)  # the step ends when the slowest rank ends
    positions = t.global_batch_size * t.seq_length
    real = ranks[0]["real_tokens_per_step"]
    vocab = output_vocab_size(cfg, arch)
    fpt = step.flops_per_token(cfg, arch, strategy)  # the trainer's count
    tflops = positions / step_time * fpt / world / 1e12
    peak = peak_tflops(t.precision, False, None)
    measured = [r["peak_memory_bytes"] for r in ranks if r["peak_memory_bytes"] is not None]
    layout = planner.Layout(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                            cfg.parallel.virtual_pipeline, world // (cfg.parallel.tensor_parallel *
                                                                     cfg.parallel.pipeline_parallel),
                            t.micro_batch_size, t.recompute, bool(cfg.parallel.use_distributed_optimizer))
    predicted = planner.peak_memory(arch, layout, t.seq_length, t.global_batch_size, t.precision, peft)
    counted = [r["step_real_tokens_per_step"] for r in ranks if r["step_real_tokens_per_step"] is not None]
    return {
        "backend": backend,
        "peft": strategy.method,
        "lora_rank": strategy.adapters.rank if strategy.adapters is not None else None,
        "data": data,
        "step_time_s": step_time,
        "tokens_per_s": real / step_time,
        "tokens_per_s_per_gpu": real / step_time / world,
        "positions_per_s": positions / step_time,
        "real_tokens_per_step": real,
        "positions_per_step": positions,
        "samples_per_step": ranks[0]["samples_per_step"],
        "padding_waste": 1 - real / positions,
        "step_real_tokens_per_step": counted[0] if counted else None,
        "trainable_params": sum(math.prod(shape) for shape in strategy.trainable_shapes(arch, vocab).values()),
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
    print("tokens/s/GPU: real (non-padding) tokens; TFLOP/s: every position, with LoRA the FLOPs it executes; "
          "state MiB: this rank's weights + main grads + optimizer state (rank 0)")
    print(f"{'row':<30}{'step s':>9}{'tokens/s/GPU':>14}{'padding':>9}{'TFLOP/s/GPU':>13}{'MFU':>7}"
          f"{'trainable':>12}{'state MiB':>11}{'peak GiB':>10}{'predicted GiB':>15}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['backend']:<30}failed: {r['error']}")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        rank0 = r["ranks"][0]
        state = (rank0["param_bytes"] + rank0["main_grad_bytes"] + rank0["optimizer_state_bytes"]) / 2**20
        print(f"{r['backend']:<30}{r['step_time_s']:>9.4f}{r['tokens_per_s_per_gpu']:>14.1f}"
              f"{r['padding_waste'] * 100:>8.1f}%{r['tflops_per_gpu']:>13.4g}{mfu:>7}{r['trainable_params']:>12,}"
              f"{state:>11.2f}{mem:>10}{r['predicted_memory_gib']:>15.3g}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or (args.layers is not None and args.layers < 1):
        raise UserError("--steps and --layers must be >= 1 and --warmup >= 0")
    pefts = [PeftConfig(method=method, rank=args.lora_rank, dropout=args.lora_dropout,
                        target_modules=list(args.lora_targets)) for method in args.peft]
    strategies = [strategy_for(peft) for peft in pefts]  # settings checked before any process group
    cfg = job_config(args, launch_env().world_size)
    runtime = start(cfg)
    arch, world = runtime.arch, runtime.launch.world_size
    backends = args.backends or available_backends(cfg.training.device, runtime.env.transformer_engine)

    try:
        results = []
        rows = itertools.product(backends, args.cross_entropy, zip(pefts, strategies), args.data)
        for backend, loss_kernel, (peft, strategy), data in rows:
            suffixes = ["melama-xent"] * (loss_kernel == "melama") + ["lora"] * (strategy.adapters is not None)
            label = "+".join([backend] + suffixes + [data] * (data != "random"))
            cfg.model.cross_entropy, cfg.peft = loss_kernel, peft
            try:
                mine = measure(cfg, dataclasses.replace(runtime, backend=backend, strategy=strategy), args.warmup,
                               args.steps, label, data)
            # One backend failing (out of memory, a fused kernel missing outside NVIDIA's container)
            # must not hide the others' figures; the failure is reported in its row.
            except Exception as err:  # noqa: BLE001
                mine = {"backend": label, "rank": dist.get_rank(), "error": f"{type(err).__name__}: {err}"[:300]}
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
            results.append(summarise(cfg, arch, label, ranks, world, peft, data))
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
        "flops_per_token": step.flops_per_token(cfg, arch, strategy_for(None)),  # full training's
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
