"""`melama plan`: the parallel layouts of a LLaMA-2 run that fit in GPU memory, best predicted MFU first.

    melama plan --preset llama2-70b --gpu a100-80gb --gpus 160 --seq 4096 --gbs 1000
    melama plan --config examples/configs/llama2_70b_me_llama.yaml --gpu a100-80gb --gpus 160
    melama plan --preset llama2-70b --gpu h100-80gb --gpus 8 --seq 4096 --gbs 128 --peft lora --lora-rank 16

Every candidate (TP 1/2/4/8 inside a node, PP, virtual stages, DP, micro batch, recompute
none/selective/full, distributed optimizer on/off) is first passed through the trunk's own
`config.validate.validate`, so a listed layout is one `melama train` accepts. Then two models:

Memory per GPU (bytes, per pipeline stage; the worst stage is reported):
* params P of the stage on one TP rank, counted exactly as megatron builds them (TP-sharded
  linears, replicated RMSNorm weights, embedding on the first stage, final norm + output layer on
  the last, vocab padded as the trunk pads it);
* bf16 run: weights 2 B/param, fp32 main grads 4 B/param (megatron DDP, grad_reduce_in_fp32),
  fp32 master params + Adam m, v 12 B/param, divided by DP when the distributed optimizer is on.
  (fp32 run, as on CPU: weights 4, grads 4, Adam m, v 8; the fp32 params are their own master);
* activations, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"), redone for a LLaMA layer (RMSNorm, GQA, SwiGLU, no dropout) with sequence
  parallelism (on whenever TP > 1) and a flash-style attention core (TE, or the native backend's
  SDPA: no s x s scores stored). Per layer and micro-batch, s tokens x b, in bytes:
    none:      sb/t (12h + 4 d_kv + 6f + 4a)   norm in/out x2, Q, attention out, K, V, fc1 in,
                                              SwiGLU in (2f), fc2 in (f), fp32 softmax stats (a)
    selective: sb/t (12h + 4 d_kv + 6f)       core attention recomputed (megatron "core_attn")
    full:      2sbh/t per layer, plus one layer's "none" activations live during its backward
  1F1B keeps min(p - r, m) micro-batches in flight on stage r; the interleaved schedule keeps
  min(2(p - r - 1) + (v - 1)p + 1, m v) model chunks in flight (first stage: L (1 + (p-1)/(pv))
  layers, as in the paper). The last stage adds the loss: fp32 logits 4sbV/t and the final-norm
  and output-layer inputs 4sbh/t, for one micro-batch.
  A layout fits when total x (1 + FRAGMENTATION) + RUNTIME_RESERVED_GIB <= GPU memory.

With LoRA (`--peft lora`, or a recipe with `peft.method: lora`; strategies/lora.py, models/llama/lora.py):
* the base weights stay (frozen, same bytes) and get no main grads and no optimizer state; the
  adapters (stage_adapter_count: column-parallel base -> A [r, in] replicated, B [out / t, r];
  row-parallel base -> A [r, in / t], B [out, r] replicated) are parameters in the run's dtype, with
  fp32 main grads and master + Adam state like any trained parameter;
* activations: a frozen megatron linear stores no input (linear_with_frozen_weight), so the
  weight-gradient-only inputs of the "none" count (qkv in h, fc1 in h, fc2 in f; and the output
  layer's input) drop out: sb/t (8h + 4 d_kv + 4f + 4a) remain. Each target's adapters add what
  lora.py's forward stores (lora_activation_bytes): their input for A's gradient -- a column-
  parallel adapter runs A on this rank's positions under SP (sb/t x h), a row-parallel one on its
  input features / t (linear_proj's is the attention output, already kept); with dropout > 0 every
  piece (q, k, v / gate, up / ...) stores its own dropped copy and a 1-byte mask instead -- plus
  the rank-sized A(x) of each piece (gathered over the sequence) and the fused B of linear_qkv /
  linear_fc1 per micro-batch. Not counted: the first layer storing less (its
  input needs no gradient), small per-token fp32 norm statistics (as for full fine-tuning).

Step time (a roofline; the constants below are assumptions, calibrate COMPUTE_EFFICIENCY with
`benchmarks/throughput.py` on your GPUs and pass --compute-efficiency):
* compute: model FLOPs (models/llama/config_registry.py `flops_per_token`, Megatron convention, output layer
  over the padded vocabulary as for memory) plus recompute
  FLOPs (selective: the core-attention forward; full: the layers' forward), at
  COMPUTE_EFFICIENCY x dense bf16 peak;
* TP with SP: per layer and micro-batch 4 all-gathers/reduce-scatters of sbh bf16 forward and 4
  backward (4 more forward with full recompute), (t-1)/t x 2sbh bytes each at the NVLink bus
  bandwidth, not overlapped; the backward's input re-gather overlaps the dgrad GEMM (megatron);
* PP: the slowest stage sets the pace; bubble (p - 1)/(v m) of the m micro-batches' time;
  point-to-point activation sends are small next to TP traffic and are not modelled;
* DP: grads (fp32) reduced, all-reduce or, with the distributed optimizer, reduce-scatter plus bf16
  param all-gather, over NVLink when the DP group sits in one node (megatron's rank order
  tp-cp-ep-dp-pp) else the per-GPU inter-node bandwidth, DP_COMM_OVERLAP of it hidden behind
  backward; the optimizer step itself is not modelled.
* LoRA: frozen linears compute no weight gradient (the strategy's flops_per_token), adapters cost 6
  FLOPs per parameter and token (replicated A / B are computed on every TP rank), and DP reduces
  the adapters' gradients only. TFLOP/s and MFU then count the FLOPs a LoRA step executes, not 6N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from melama_mcore.components.metrics import PEAK_TFLOPS
from melama_mcore.config.job_config import JobConfig, PeftConfig, load_config
from melama_mcore.config.validate import Environment, InvalidConfig, resolve, validate
from melama_mcore.errors import ConfigError, UserError
from melama_mcore.models.llama import lora_tensors
from melama_mcore.models.llama.config_registry import (PRESETS, LlamaArch, forward_flops_per_token, padded_vocab_size,
                                                     parameter_count, resolve_arch)
from melama_mcore.output_paths import check_output_file, remove_created_folders, write_atomic
from melama_mcore.strategies import METHODS, strategy_for

GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    peak_key: str  # row of components.metrics.PEAK_TFLOPS
    memory_gib: float  # total device memory as nvidia-smi reports it
    nvlink_busbw_gbs: float  # assumed NCCL bus bandwidth inside a node (nccl-tests ballpark), GB/s
    internode_gbs: float  # assumed network bandwidth per GPU (one NIC per GPU), GB/s


GPUS = {
    "a100-80gb": GpuSpec("A100", 80.0, 230.0, 25.0),  # NVLink3; HDR 200 Gb/s per GPU
    "a100-40gb": GpuSpec("A100", 40.0, 230.0, 25.0),
    "h100-80gb": GpuSpec("H100", 79.6, 450.0, 50.0),  # NVLink4; NDR 400 Gb/s per GPU
    "h200": GpuSpec("H200", 140.4, 450.0, 50.0),
}
GPUS_PER_NODE = 8
COMPUTE_EFFICIENCY = 0.65  # achievable fraction of dense peak over a whole layer (GEMMs + the rest)
DP_COMM_OVERLAP = 0.5  # share of the DP grad reduce / param gather hidden behind compute
FRAGMENTATION = 0.10  # caching-allocator fragmentation on top of live tensors
RUNTIME_RESERVED_GIB = 3.0  # CUDA context, NCCL buffers, cuBLAS workspaces: not in max_memory_allocated
MICRO_BATCH_SIZES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")
ACTIVATION_BYTES = 2  # bf16 activations
# Layouts are judged with the trunk's default model settings (Layout.job_config), so its vocab padding.
VOCAB_DIVISIBLE_BY = JobConfig().model.make_vocab_size_divisible_by


def padded_vocab(arch: LlamaArch, tp: int) -> int:
    """Output-layer / embedding rows as the trunk builds them at this TP (memory and FLOPs)."""
    return padded_vocab_size(arch.vocab_size, VOCAB_DIVISIBLE_BY, tp)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vp: int | None  # virtual stages per pipeline rank; None: plain 1F1B
    dp: int
    mbs: int
    recompute: str
    distributed_optimizer: bool

    @property
    def chunks(self) -> int:
        return self.vp or 1

    def overrides(self, seq: int, gbs: int) -> list[str]:
        vp = "null" if self.vp is None else self.vp
        return [
            f"parallel.tensor_parallel={self.tp}", f"parallel.pipeline_parallel={self.pp}",
            f"parallel.virtual_pipeline={vp}", f"parallel.sequence_parallel={str(self.tp > 1).lower()}",
            f"parallel.use_distributed_optimizer={str(self.distributed_optimizer).lower()}",
            f"training.micro_batch_size={self.mbs}", f"training.global_batch_size={gbs}",
            f"training.seq_length={seq}", f"training.recompute={self.recompute}",
        ]

    def job_config(self, preset: str, seq: int, gbs: int) -> JobConfig:
        return load_config(None, [f"model.preset={preset}", "training.device=cuda", "training.precision=bf16",
                                  *self.overrides(seq, gbs)])


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    params: int  # on this GPU: the base's and, with LoRA, the adapters'
    trainable: int  # of which trained (with main grads and optimizer state)
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def gib(self) -> dict:
        return {k: getattr(self, k) / GIB for k in ("weights", "grads", "optimizer", "activations", "total")}


def bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(weights, grads, optimizer state) bytes per parameter, see the module docstring."""
    return (2, 4, 12) if precision == "bf16" else (4, 4, 8)


def stage_parameter_count(arch: LlamaArch, padded_vocab: int, tp: int, pp: int, vp: int | None, pp_rank: int) -> int:
    """Parameters on one TP rank of pipeline rank `pp_rank`, over all its virtual stages."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    d_kv = arch.num_query_groups * arch.head_dim
    per_layer = (h * (h + 2 * d_kv) + h * h + 3 * h * f) // tp + 2 * h  # TP linears + 2 replicated norms
    count = arch.num_layers // pp * per_layer
    if pp_rank == 0:
        count += padded_vocab * h // tp  # embedding
    if pp_rank == pp - 1:
        count += h + padded_vocab * h // tp  # final norm, output layer
    return count


def is_lora(peft: PeftConfig | None) -> bool:
    """Whether the training strategy of these settings adds LoRA adapters (whose memory is modelled here)."""
    return strategy_for(peft).adapters is not None


def stage_adapter_count(arch: LlamaArch, padded_vocab: int, tp: int, pp: int, pp_rank: int, peft: PeftConfig) -> int:
    """LoRA parameters on one TP rank of pipeline rank `pp_rank` (over all its virtual stages),
    sharded as lora.py shards them (module docstring)."""
    shapes = lora_tensors.piece_shapes(arch, padded_vocab)
    r, count = peft.rank, 0
    for target in lora_tensors.target_order(peft):
        column = target in lora_tensors.COLUMN_PARALLEL
        per_module = sum(r * inp + out // tp * r if column else r * inp // tp + out * r
                         for out, inp in (shapes[piece] for piece in lora_tensors.PIECES[target]))
        if target == "output_layer":
            count += per_module if pp_rank == pp - 1 else 0
        else:
            count += arch.num_layers // pp * per_module
    return count


def lora_activation_bytes(arch: LlamaArch, padded_vocab: int, tokens: int, tp: int, peft: PeftConfig,
                          target: str) -> float:
    """What one target's adapters store for backward, one micro-batch of `tokens` tokens on one TP
    rank (models/llama/lora.py's forward; see the module docstring)."""
    shapes = [lora_tensors.piece_shapes(arch, padded_vocab)[piece] for piece in lora_tensors.PIECES[target]]
    pieces, inp = len(shapes), shapes[0][1]
    # per token of the micro-batch, on this rank: a column-parallel adapter runs A on this rank's
    # positions under SP (1/t of the tokens, all features), a row-parallel one on its features / t
    width = inp / tp
    if peft.dropout:
        stored = pieces * tokens * width * (ACTIVATION_BYTES + 1)  # each piece's dropped input + bool mask
    elif target == "linear_proj":
        stored = 0.0  # the attention output, which the attention core keeps
    else:
        stored = tokens * width * ACTIVATION_BYTES
    stored += tokens * pieces * peft.rank * ACTIVATION_BYTES  # u = A(x) of every piece, for B's gradient
    if pieces > 1:  # the fused B, rebuilt in every forward
        stored += sum(out for out, _ in shapes) / tp * pieces * peft.rank * ACTIVATION_BYTES
    return stored


def activation_bytes_per_layer(arch: LlamaArch, tokens: int, tp: int, recompute: str,
                               peft: PeftConfig | None = None, padded_vocab: int = 0) -> float:
    """Stored activations of one decoder layer for one micro-batch of `tokens` (= s x b) tokens."""
    h, f, a = arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads
    d_kv = arch.num_query_groups * arch.head_dim
    if recompute == "full":
        return ACTIVATION_BYTES * tokens * h / tp
    softmax_stats = tokens * (4 * a if recompute == "none" else 0) / tp  # fp32 log-sum-exp per head
    if not is_lora(peft):
        per_token = 6 * h + 2 * d_kv + 3 * f  # elements, see the module docstring
        return tokens * ACTIVATION_BYTES * per_token / tp + softmax_stats
    kept = 4 * h + 2 * d_kv + 2 * f  # without the frozen linears' inputs
    adapters = sum(lora_activation_bytes(arch, padded_vocab, tokens, tp, peft, target)
                   for target in lora_tensors.target_order(peft) if target != "output_layer")
    return tokens * ACTIVATION_BYTES * kept / tp + softmax_stats + adapters


def in_flight(pp: int, vp: int | None, num_micro: int, pp_rank: int) -> tuple[int, int]:
    """(model chunks of activations held at the peak, layers per chunk divisor) of megatron's schedules."""
    if vp is None:
        return min(pp - pp_rank, num_micro), pp
    return min(2 * (pp - pp_rank - 1) + (vp - 1) * pp + 1, num_micro * vp), pp * vp


def stage_memory(arch: LlamaArch, layout: Layout, seq: int, gbs: int, precision: str, pp_rank: int,
                 peft: PeftConfig | None = None) -> Memory:
    tp, pp = layout.tp, layout.pp
    padded = padded_vocab(arch, tp)
    params = stage_parameter_count(arch, padded, tp, pp, layout.vp, pp_rank)
    trainable = params
    if is_lora(peft):  # the base is frozen: only the adapters have grads and optimizer state
        trainable = stage_adapter_count(arch, padded, tp, pp, pp_rank, peft)
        params += trainable
    w, g, o = bytes_per_param(precision)
    optimizer = trainable * o / (layout.dp if layout.distributed_optimizer else 1)
    tokens = seq * layout.mbs
    num_micro = gbs // (layout.mbs * layout.dp)
    chunks, divisor = in_flight(pp, layout.vp, num_micro, pp_rank)
    per_layer = activation_bytes_per_layer(arch, tokens, tp, layout.recompute, peft, padded)
    activations = chunks * (arch.num_layers // divisor) * per_layer
    if layout.recompute == "full":  # one layer's activations rebuilt during its backward
        activations += activation_bytes_per_layer(arch, tokens, tp, "none", peft, padded)
    if pp_rank == pp - 1:  # loss: fp32 logits, final-norm and output-layer inputs (frozen: no input kept)
        activations += tokens * (4 * padded + (1 if is_lora(peft) else 2) * ACTIVATION_BYTES * arch.hidden_size) / tp
        if is_lora(peft) and "output_layer" in peft.target_modules:
            activations += lora_activation_bytes(arch, padded, tokens, tp, peft, "output_layer")
    return Memory(pp_rank, params, trainable, params * w, trainable * g, optimizer, activations)


def peak_memory(arch: LlamaArch, layout: Layout, seq: int, gbs: int, precision: str = "bf16",
                peft: PeftConfig | None = None) -> Memory:
    """The pipeline stage that needs the most memory."""
    return max((stage_memory(arch, layout, seq, gbs, precision, r, peft) for r in range(layout.pp)),
               key=lambda m: m.total)


def fits(memory: Memory, gpu_memory_gib: float) -> bool:
    return memory.total * (1 + FRAGMENTATION) + RUNTIME_RESERVED_GIB * GIB <= gpu_memory_gib * GIB


# ---------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    layout: Layout
    memory: Memory
    fits: bool
    step_time_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float
    bubble_fraction: float
    tp_comm_fraction: float

    def to_dict(self, seq: int, gbs: int) -> dict:
        return {
            "layout": dataclasses.asdict(self.layout), "fits": self.fits,
            "memory_gib": self.memory.gib(), "worst_stage": self.memory.stage,
            "step_time_s": self.step_time_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "bubble_fraction": self.bubble_fraction,
            "tp_comm_fraction": self.tp_comm_fraction, "overrides": self.layout.overrides(seq, gbs),
            "params_per_gpu": self.memory.params, "trainable_params_per_gpu": self.memory.trainable,
        }


def backward_factor(peft: PeftConfig | None) -> float:
    """Training / forward FLOPs of a linear: 3 (forward, input and weight gradients), or 2 when frozen."""
    return 3.0 if strategy_for(peft).trains_base else 2.0


def training_flops_per_token(arch: LlamaArch, seq: int, vocab_size: int, peft: PeftConfig | None = None) -> float:
    """Model FLOPs of one training token (forward + backward), whole model: the training strategy's
    count, the trainer's (full training: every GEMM's three passes; LoRA: frozen linears skip their
    weight gradient, every adapter parameter costs 6 FLOPs per token)."""
    return strategy_for(peft).flops_per_token(arch, seq, vocab_size)


def estimate(arch: LlamaArch, layout: Layout, *, gpu: GpuSpec, gpus: int, seq: int, gbs: int,
             gpu_memory_gib: float, compute_efficiency: float = COMPUTE_EFFICIENCY,
             gpus_per_node: int = GPUS_PER_NODE, peft: PeftConfig | None = None) -> Estimate:
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    peak = PEAK_TFLOPS[gpu.peak_key]["bf16"] * 1e12
    tokens = seq * layout.mbs
    num_micro = gbs // (layout.mbs * dp)
    vocab = padded_vocab(arch, tp)
    layer, core_attention, output = forward_flops_per_token(arch, seq, vocab)
    recompute_extra = {"none": 0.0, "selective": core_attention, "full": layer}[layout.recompute]
    layers_per_stage = arch.num_layers // pp
    k = backward_factor(peft)
    layer_train = k * layer + (3 - k) * core_attention  # attention's backward is the same either way

    # One micro-batch through the slowest (last: it has the output layer) stage.
    stage_flops = tokens * (layers_per_stage * (layer_train + recompute_extra) + k * output) / tp
    if is_lora(peft):  # this rank's adapters (replicated halves computed on every TP rank)
        stage_flops += tokens * 6 * stage_adapter_count(arch, vocab, tp, pp, pp - 1, peft)
    compute_s = stage_flops / (peak * compute_efficiency)
    collectives = 8 + (4 if layout.recompute == "full" else 0)
    collective_bytes = (tp - 1) / tp * ACTIVATION_BYTES * tokens * arch.hidden_size
    tp_comm_s = layers_per_stage * collectives * collective_bytes / (gpu.nvlink_busbw_gbs * 1e9)
    stage_s = compute_s + tp_comm_s
    bubble = (pp - 1) / (layout.chunks * num_micro)
    pipeline_s = num_micro * stage_s * (1 + bubble)

    # Data-parallel gradient reduction of the largest stage.
    memory = peak_memory(arch, layout, seq, gbs, peft=peft)
    params = max(stage_memory(arch, layout, seq, gbs, "bf16", r, peft).trainable for r in range(pp))
    dp_bw = gpu.nvlink_busbw_gbs if tp * dp <= gpus_per_node else gpu.internode_gbs
    ring = (dp - 1) / dp
    if layout.distributed_optimizer:
        dp_bytes = ring * params * (4 + 2)  # reduce-scatter fp32 grads + all-gather bf16 params
    else:
        dp_bytes = 2 * ring * params * 4  # all-reduce fp32 grads
    dp_exposed_s = dp_bytes / (dp_bw * 1e9) * (1 - DP_COMM_OVERLAP)

    step_s = pipeline_s + dp_exposed_s
    tokens_per_s_per_gpu = gbs * seq / step_s / gpus
    tflops = tokens_per_s_per_gpu * training_flops_per_token(arch, seq, vocab, peft)
    return Estimate(
        layout=layout, memory=memory, fits=fits(memory, gpu_memory_gib), step_time_s=step_s,
        tokens_per_s_per_gpu=tokens_per_s_per_gpu, tflops_per_gpu=tflops / 1e12, mfu=tflops / peak,
        bubble_fraction=bubble / (1 + bubble), tp_comm_fraction=tp_comm_s / stage_s,
    )


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(arch: LlamaArch, preset: str, *, gpus: int, seq: int, gbs: int,
                      gpus_per_node: int = GPUS_PER_NODE) -> tuple[list[Layout], list[str]]:
    """Layouts the trunk's `validate` accepts, and the distinct reasons the others were refused."""
    env = Environment(world_size=gpus, cuda=True, transformer_engine=False, fp8_capable=False)
    accepted, refused = [], {}
    for tp in (1, 2, 4, 8):
        if tp > min(gpus, gpus_per_node) or gpus % tp:
            continue
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            vps: list[int | None] = [None]
            if pp > 1 and arch.num_layers % pp == 0:
                vps += [v for v in _divisors(arch.num_layers // pp) if v >= 2]
            for vp in vps:
                for mbs in MICRO_BATCH_SIZES:
                    for distopt in ((False, True) if dp > 1 else (False,)):
                        base = Layout(tp, pp, vp, dp, mbs, "none", distopt)
                        try:
                            # as `melama train` does: `auto` fields resolved, then checked
                            validate(resolve(base.job_config(preset, seq, gbs), env), arch, env)
                        except InvalidConfig as err:
                            refused.update(dict.fromkeys(problem.message for problem in err.problems))
                            continue
                        accepted += [dataclasses.replace(base, recompute=r) for r in RECOMPUTE]
    return accepted, list(refused)


@dataclass
class Plan:
    arch: LlamaArch
    estimates: list[Estimate]  # every valid layout, fitting ones first, best MFU first
    refused: list[str]

    @property
    def fitting(self) -> list[Estimate]:
        return [e for e in self.estimates if e.fits]


def plan(arch: LlamaArch, preset: str, *, gpu: str, gpus: int, seq: int, gbs: int,
         gpu_memory_gib: float | None = None, compute_efficiency: float = COMPUTE_EFFICIENCY,
         gpus_per_node: int = GPUS_PER_NODE, peft: PeftConfig | None = None) -> Plan:
    spec = GPUS[gpu]
    memory_gib = gpu_memory_gib or spec.memory_gib
    layouts, refused = candidate_layouts(arch, preset, gpus=gpus, seq=seq, gbs=gbs, gpus_per_node=gpus_per_node)
    estimates = [estimate(arch, lay, gpu=spec, gpus=gpus, seq=seq, gbs=gbs, gpu_memory_gib=memory_gib,
                          compute_efficiency=compute_efficiency, gpus_per_node=gpus_per_node, peft=peft)
                 for lay in layouts]
    estimates.sort(key=lambda e: (not e.fits, -e.mfu, e.memory.total))
    return Plan(arch, estimates, refused)


def nothing_fits_reason(result: Plan, gpu_memory_gib: float) -> str:
    if not result.estimates:
        return "no parallel layout is valid for this request: " + "; ".join(result.refused[:4])
    smallest = min(result.estimates, key=lambda e: e.memory.total)
    m, lay = smallest.memory.gib(), smallest.layout
    need = m["total"] * (1 + FRAGMENTATION) + RUNTIME_RESERVED_GIB
    return (f"nothing fits in {gpu_memory_gib:.1f} GiB per GPU: the smallest footprint of the "
            f"{len(result.estimates)} valid layouts is {need:.1f} GiB with margins (TP{lay.tp} PP{lay.pp} "
            f"VP{lay.vp or 1} DP{lay.dp} MBS{lay.mbs} recompute={lay.recompute} distributed optimizer="
            f"{'on' if lay.distributed_optimizer else 'off'}: weights {m['weights']:.1f}, grads {m['grads']:.1f}, "
            f"optimizer {m['optimizer']:.1f}, activations {m['activations']:.1f} GiB); use more or larger GPUs")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama plan",
        description="List the parallel layouts (TP, PP, virtual stages, DP, micro batch, recompute, distributed "
                    "optimizer) of a LLaMA-2 run that fit in GPU memory, with predicted memory per GPU, step time "
                    "and MFU, best first, and the config overrides to use. Every listed layout passes the same "
                    "checks as `melama train`. The memory and time models and their assumptions are described "
                    "in melama_mcore/commands/plan.py.",
        epilog="Examples: melama plan --preset llama2-70b --gpu a100-80gb --gpus 160 --seq 4096 --gbs 1000; "
               "melama plan --preset llama2-70b --gpu h100-80gb --gpus 8 --gbs 128 --peft lora --lora-rank 16",
    )
    parser.add_argument("--preset", choices=list(PRESETS), help="model architecture (or take it from --config)")
    parser.add_argument("--config", help="a recipe YAML: its preset, seq, batch and layout are judged first")
    parser.add_argument("--gpu", required=True, choices=list(GPUS), help="GPU model")
    parser.add_argument("--gpus", type=int, required=True, help="total number of GPUs")
    parser.add_argument("--seq", type=int, help="sequence length (default 4096 or the recipe's)")
    parser.add_argument("--gbs", type=int, help="global batch size in sequences (default 1024 or the recipe's)")
    parser.add_argument("--gpu-memory-gib", type=float, help="usable memory per GPU (default: the GPU's total)")
    parser.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE, help="TP stays inside a node")
    parser.add_argument("--vocab-size", type=int, help="vocabulary (needed for the tiny/nano presets)")
    parser.add_argument("--peft", choices=METHODS,
                        help="none: full fine-tuning; lora: frozen base, adapters trained (default: the recipe's "
                             "peft.method, else none)")
    parser.add_argument("--lora-rank", type=int,
                        help="LoRA rank (default: the recipe's peft.rank, else 16); alpha, dropout and target "
                             "modules come from the recipe or the recipe defaults (dropout 0.05, all four linears)")
    parser.add_argument("--compute-efficiency", type=float, default=COMPUTE_EFFICIENCY,
                        help="achievable fraction of dense bf16 peak, e.g. a measured MFU from "
                             f"benchmarks/throughput.py (default {COMPUTE_EFFICIENCY})")
    parser.add_argument("--top", type=int, default=10, help="how many fitting layouts to list")
    parser.add_argument("--json", metavar="PATH", help="also write the listed layouts as JSON")
    return parser


def _check_args(args) -> None:
    problems = []
    if args.preset is None and args.config is None:
        problems.append("give --preset or --config")
    for name in ("gpus", "seq", "gbs", "top", "gpus_per_node", "vocab_size", "lora_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.gpu_memory_gib is not None and args.gpu_memory_gib <= 0:
        problems.append(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib}")
    if not 0 < args.compute_efficiency <= 1:
        problems.append(f"--compute-efficiency must be in (0, 1], got {args.compute_efficiency}")
    if problems:
        raise UserError("; ".join(problems))


def _row(i, e: Estimate) -> str:
    lay, m = e.layout, e.memory.gib()
    return (f"{i:>3} {lay.tp:>3} {lay.pp:>3} {lay.vp or 1:>3} {lay.dp:>4} {lay.mbs:>3} {lay.recompute:<9} "
            f"{'on' if lay.distributed_optimizer else 'off':<4}| {m['weights']:>7.1f} {m['grads']:>6.1f} "
            f"{m['optimizer']:>6.1f} {m['activations']:>6.1f} {m['total']:>6.1f} | {e.step_time_s:>8.2f} "
            f"{e.tokens_per_s_per_gpu:>9.0f} {e.tflops_per_gpu:>7.1f} {e.mfu * 100:>5.1f}% {e.bubble_fraction * 100:>5.1f}%")


HEADER = ("  #  TP  PP  VP   DP MBS recompute distopt| weights  grads  optim  activ  total |   step s tok/s/GPU "
          "TFLOP/s   MFU bubble")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    created = check_output_file(args.json, "--json") if args.json else []  # before any work
    try:
        return _plan(args)
    except BaseException:
        remove_created_folders(created)  # only while empty: a report of why nothing fits is kept
        raise


def _plan(args) -> int:
    recipe_layout, peft = None, PeftConfig()
    if args.config:
        cfg = load_config(args.config)
        peft = cfg.peft
        args.preset = args.preset or cfg.model.preset
        args.seq = args.seq or cfg.training.seq_length
        args.gbs = args.gbs or cfg.training.global_batch_size
        p, t = cfg.parallel, cfg.training
        dp = args.gpus // (p.tensor_parallel * p.pipeline_parallel)
        recipe_layout = Layout(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline, max(dp, 1),
                               t.micro_batch_size, t.recompute, p.use_distributed_optimizer is not False)
    args.seq, args.gbs = args.seq or 4096, args.gbs or 1024
    peft = dataclasses.replace(peft, method=args.peft or peft.method, rank=args.lora_rank or peft.rank)
    strategy_for(peft)  # the settings checked
    args.peft, args.lora_rank = peft.method, peft.rank
    overrides = [f"model.preset={args.preset}"] + ([f"model.vocab_size={args.vocab_size}"] if args.vocab_size else [])
    arch = resolve_arch(load_config(None, overrides).model, None)
    spec = GPUS[args.gpu]
    memory_gib = args.gpu_memory_gib or spec.memory_gib
    common = dict(gpu=spec, gpus=args.gpus, seq=args.seq, gbs=args.gbs, gpu_memory_gib=memory_gib,
                  compute_efficiency=args.compute_efficiency, gpus_per_node=args.gpus_per_node, peft=peft)

    print(f"{args.preset}: {parameter_count(arch) / 1e9:.2f}B parameters; {args.gpus} x {args.gpu} "
          f"({memory_gib:.1f} GiB, {PEAK_TFLOPS[spec.peak_key]['bf16']:.0f} TFLOP/s bf16 dense); seq {args.seq}, "
          f"global batch {args.gbs} ({args.gbs * args.seq / 1e6:.2f}M tokens/step)")
    if is_lora(peft):
        adapters = sum(math.prod(s) for s in lora_tensors.adapter_shapes(arch, peft, padded_vocab(arch, 1)).values())
        print(f"LoRA: rank {peft.rank}, alpha {peft.alpha:g}, dropout {peft.dropout:g}, on "
              f"{', '.join(lora_tensors.target_order(peft))}: {adapters / 1e6:.1f}M trainable parameters; the base is frozen "
              "(weights only: no grads, no optimizer state)")
    report: dict = {"request": {k: v for k, v in vars(args).items() if k != "json"},
                    "peft": dataclasses.asdict(peft)}
    if recipe_layout is not None:
        try:
            env = Environment(args.gpus, cuda=True, transformer_engine=False, fp8_capable=False)
            validate(resolve(recipe_layout.job_config(args.preset, args.seq, args.gbs), env), arch, env)
        except ConfigError as err:
            raise ConfigError(f"{args.config}: the recipe's layout is not valid on {args.gpus} GPUs: {err}") from None
        judged = estimate(arch, recipe_layout, **common)
        verdict = "fits" if judged.fits else "does NOT fit"
        print(f"\nrecipe {args.config}: {verdict}\n{HEADER}\n{_row('cfg', judged)}")
        report["recipe"] = judged.to_dict(args.seq, args.gbs)

    result = plan(arch, args.preset, gpu=args.gpu, gpus=args.gpus, seq=args.seq, gbs=args.gbs,
                  gpu_memory_gib=memory_gib, compute_efficiency=args.compute_efficiency,
                  gpus_per_node=args.gpus_per_node, peft=peft)
    fitting = result.fitting
    report["valid_layouts"], report["fitting_layouts"] = len(result.estimates), len(fitting)
    report["layouts"] = [e.to_dict(args.seq, args.gbs) for e in fitting[:args.top]]
    if not fitting:
        reason = nothing_fits_reason(result, memory_gib)
        report["nothing_fits"] = reason
        _write_json(args.json, report)
        raise UserError(reason)
    print(f"\n{len(result.estimates)} valid layouts, {len(fitting)} fit; best {min(args.top, len(fitting))} "
          f"(memory in GiB on the worst pipeline stage):\n{HEADER}")
    for i, e in enumerate(fitting[:args.top], 1):
        print(_row(i, e))
    print("\nconfig overrides:")
    for i, e in enumerate(fitting[:args.top], 1):
        print(f"{i:>3}: {' '.join(e.layout.overrides(args.seq, args.gbs))}")
    print(f"\nassumptions: {args.compute_efficiency:.0%} of peak, NVLink {spec.nvlink_busbw_gbs:.0f} GB/s, "
          f"inter-node {spec.internode_gbs:.0f} GB/s per GPU, {DP_COMM_OVERLAP:.0%} of DP comm hidden, "
          f"+{FRAGMENTATION:.0%} fragmentation and {RUNTIME_RESERVED_GIB} GiB runtime per GPU; "
          "flash-style attention (TE or native backend); see melama_mcore/commands/plan.py")
    _write_json(args.json, report)
    return 0


def _write_json(path: str | None, report: dict) -> None:
    if path:
        write_atomic(Path(path), json.dumps(report, indent=1))


if __name__ == "__main__":
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
