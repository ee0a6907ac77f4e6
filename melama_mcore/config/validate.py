"""Fill the `auto` fields of a JobConfig for this machine and refuse impossible layouts.

Runs before any process group starts, on every rank (it is cheap and needs no communication), so a
bad recipe fails in seconds with one message listing every problem and what to change. Each problem
is a `Problem`: its message and the settings it concerns with their values; a caller with its own
words for settings (`melama convert`'s --tp, --pp, --vp) passes them as `names` and gets the
messages in those words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

import torch

from melama_mcore.config.job_config import JobConfig
from melama_mcore.errors import ConfigError

TP, PP, VP = "parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.virtual_pipeline"


@dataclass(frozen=True)
class Problem:
    """One reason a configuration cannot run: what is wrong and what to change, and the settings it
    concerns (config key -> value)."""

    message: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


class InvalidConfig(ConfigError):
    """Every problem `validate` found, as one message and as Problems."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(p.message for p in problems))


@dataclass(frozen=True)
class Environment:
    world_size: int
    cuda: bool
    transformer_engine: bool
    fp8_capable: bool  # compute capability >= 8.9 (Ada, Hopper, Blackwell)


def detect_environment(world_size: int) -> Environment:
    cuda = torch.cuda.is_available()
    return Environment(
        world_size=world_size,
        cuda=cuda,
        transformer_engine=transformer_engine_available(cuda),
        fp8_capable=cuda and torch.cuda.get_device_capability() >= (8, 9),
    )


def transformer_engine_available(cuda: bool) -> bool:
    """TE imported without error. It raises RuntimeError (not ImportError) without CUDA libraries,
    so anything it raises means "not available"; never imported on CPU machines."""
    if not cuda:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import means we cannot use it
        return False
    return True


def resolve(cfg: JobConfig, env: Environment, optimizer_format: str = "dp_reshardable") -> JobConfig:
    """Replace `auto`/None fields by what this machine supports; an `auto` checkpoint.optimizer_format
    by `optimizer_format` (the training strategy's default). Returns the same object."""
    t, p = cfg.training, cfg.parallel
    if t.device == "auto":
        t.device = "cuda" if env.cuda else "cpu"
    if t.precision == "auto":
        t.precision = "bf16" if t.device == "cuda" else "fp32"
    # The production path everywhere, CPU included (CI runs what GPU users run): the distributed
    # optimizer with overlapped grad reduce and param gather, as Megatron-LM recipes set them.
    if p.use_distributed_optimizer is None:
        p.use_distributed_optimizer = True
    if p.overlap_grad_reduce is None:
        p.overlap_grad_reduce = p.use_distributed_optimizer
    if p.overlap_param_gather is None:
        p.overlap_param_gather = p.use_distributed_optimizer and p.overlap_grad_reduce
    if cfg.checkpoint.optimizer_format == "auto":
        cfg.checkpoint.optimizer_format = optimizer_format
    return cfg


def data_parallel_size(cfg: JobConfig, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)


def _unset_keys(section: Any, prefix: str = "") -> list[str]:
    """Keys given no value (`key=` on the command line, `key:` in YAML) although they need one. A
    string whose default is empty (data.tokenizer) is reported by its user, as missing."""
    hints, unset = get_type_hints(type(section)), []
    for f in dataclasses.fields(section):
        value, hint = getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            unset += _unset_keys(value, f"{prefix}{f.name}.")
        elif value is None and hint is not Any and type(None) not in getattr(hint, "__args__", ()) and f.default != "":
            unset.append(prefix + f.name)
    return unset


def _value(cfg: JobConfig, arch, key: str) -> Any:
    """A setting's value as checked: model fields as resolved (the preset's unless overridden)."""
    section, _, field = key.rpartition(".")
    if section == "model" and hasattr(arch, field):
        return getattr(arch, field)
    return getattr(getattr(cfg, section) if section else cfg, field)


def validate(cfg: JobConfig, arch, env: Environment, problems: list[str | Problem] = (),
             names: Mapping[str, str] | None = None) -> None:
    """Raise one InvalidConfig listing every problem (the caller's `problems` first), each with what
    to change: every value that would otherwise fail, hang or loop inside megatron or the trainer.
    `arch` is the resolved architecture (models/llama/config_registry.LlamaArch); `names` the caller's
    words for settings (config key -> word), used in the messages instead of the config's."""
    t, p, o, c, lg = cfg.training, cfg.parallel, cfg.optimizer, cfg.checkpoint, cfg.logging
    found = [q if isinstance(q, Problem) else Problem(q) for q in problems]
    names = names or {}

    def n(key: str, written: str) -> str:
        """How a message names a setting: the caller's word for it, else as the message writes it."""
        return names.get(key, written)

    def need(ok: bool, message: str, *settings: str) -> None:
        if not ok:
            found.append(Problem(message, {key: _value(cfg, arch, key) for key in settings}))

    def fail() -> None:
        raise InvalidConfig(found)

    unset = _unset_keys(cfg)
    if unset:  # nothing below can be checked with a value missing
        found.extend(Problem(f"{key} has no value: give it one, or leave it out for the default", {key: None})
                     for key in unset)
        fail()

    # Sizes everything else divides by (a zero here would end in ZeroDivisionError or an endless loop).
    known = len(found)
    tp, pp, vp = p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline
    need(tp >= 1 and pp >= 1, f"{n(TP, 'parallel.tensor_parallel')} and {n(PP, 'parallel.pipeline_parallel')} "
                              "must be >= 1", TP, PP)
    need(t.micro_batch_size >= 1 and t.global_batch_size >= 1, "batch sizes must be >= 1",
         "training.micro_batch_size", "training.global_batch_size")
    sizes = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
             "make_vocab_size_divisible_by")
    for key in sizes:
        value = _value(cfg, arch, f"model.{key}")
        need(value >= 1, f"model.{key} must be >= 1, got {value}", f"model.{key}")
    if len(found) > known:
        fail()

    need(env.world_size % (tp * pp) == 0,
         f"world size {env.world_size} is not divisible by {n(TP, 'tensor_parallel')} x "
         f"{n(PP, 'pipeline_parallel')} = {tp * pp}: launch a multiple of {tp * pp} processes or change the layout",
         TP, PP)
    dp = max(1, data_parallel_size(cfg, env.world_size))
    need(arch.num_attention_heads % tp == 0,
         f"{arch.num_attention_heads} attention heads are not divisible by {n(TP, 'tensor_parallel')}={tp}: "
         f"choose a {n(TP, 'tensor_parallel')} that divides {arch.num_attention_heads}", TP,
         "model.num_attention_heads")
    need(arch.num_query_groups % tp == 0,
         f"{arch.num_query_groups} KV groups are not divisible by {n(TP, 'tensor_parallel')}={tp}: "
         f"choose a {n(TP, 'tensor_parallel')} that divides {arch.num_query_groups}", TP, "model.num_query_groups")
    need(arch.num_attention_heads % arch.num_query_groups == 0,
         f"model.num_attention_heads ({arch.num_attention_heads}) must be a multiple of num_query_groups "
         f"({arch.num_query_groups})", "model.num_attention_heads", "model.num_query_groups")
    need(arch.ffn_hidden_size % tp == 0,
         f"ffn_hidden_size {arch.ffn_hidden_size} is not divisible by {n(TP, 'tensor_parallel')}={tp}",
         TP, "model.ffn_hidden_size")
    need(arch.hidden_size % arch.num_attention_heads == 0,
         f"hidden_size {arch.hidden_size} is not divisible by {arch.num_attention_heads} heads",
         "model.hidden_size", "model.num_attention_heads")
    need(arch.head_dim % 2 == 0,
         f"head size hidden_size / num_attention_heads = {arch.head_dim} is odd: rotary embeddings rotate "
         "pairs of channels; choose model.hidden_size and num_attention_heads with an even quotient",
         "model.hidden_size", "model.num_attention_heads")
    need(arch.norm_eps > 0 and arch.rope_base > 0,
         f"model.norm_eps ({arch.norm_eps}) and model.rope_base ({arch.rope_base}) must be > 0",
         "model.norm_eps", "model.rope_base")
    need(cfg.model.init_method_std >= 0, f"model.init_method_std must be >= 0, got {cfg.model.init_method_std}",
         "model.init_method_std")
    stages = pp * (vp or 1)
    need(arch.num_layers % stages == 0,
         f"{arch.num_layers} layers cannot be split into {n(PP, 'pipeline_parallel')} x "
         f"{n(VP, 'virtual_pipeline')} = {stages} equal stages: choose a layout whose product divides "
         f"{arch.num_layers}", PP, VP, "model.num_layers")
    if vp is not None:
        need(pp > 1, f"{n(VP, 'parallel.virtual_pipeline')} needs {n(PP, 'pipeline_parallel')} > 1 (or leave it out)",
             VP, PP)
        need(vp >= 2, f"{n(VP, 'parallel.virtual_pipeline')} must be >= 2 (leave it out for plain 1F1B)", VP)
    need(not p.sequence_parallel or tp > 1,
         f"parallel.sequence_parallel needs {n(TP, 'tensor_parallel')} > 1: set sequence_parallel=false or raise "
         f"{n(TP, 'tensor_parallel')}", "parallel.sequence_parallel", TP)
    need(not p.sequence_parallel or t.seq_length % tp == 0,
         f"sequence_parallel needs seq_length ({t.seq_length}) divisible by {n(TP, 'tensor_parallel')}={tp}",
         "parallel.sequence_parallel", "training.seq_length", TP)
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"global_batch_size {t.global_batch_size} is not divisible by micro_batch_size x data_parallel = "
         f"{t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}: make it a multiple of {t.micro_batch_size * dp}",
         "training.global_batch_size", "training.micro_batch_size")
    num_micro = t.global_batch_size // max(1, t.micro_batch_size * dp)
    if vp is not None and pp > 1:
        need(num_micro % pp == 0,
             f"the interleaved schedule needs the number of micro-batches per step ({num_micro}) to be a "
             f"multiple of {n(PP, 'pipeline_parallel')}={pp}: change global_batch_size or micro_batch_size",
             "training.global_batch_size", "training.micro_batch_size", PP, VP)
    need(t.seq_length >= 1, f"training.seq_length must be >= 1, got {t.seq_length}", "training.seq_length")
    need(t.seq_length <= arch.max_position_embeddings or cfg.model.preset.startswith("llama2"),
         f"seq_length {t.seq_length} exceeds the preset's {arch.max_position_embeddings} positions",
         "training.seq_length", "model.max_position_embeddings")
    need(t.train_iters >= 1, "training.train_iters must be >= 1", "training.train_iters")
    if t.train_iters >= 1:
        need(t.stop_after_step is None or 1 <= t.stop_after_step <= t.train_iters,
             f"training.stop_after_step={t.stop_after_step} is never reached: use a step from 1 to "
             f"training.train_iters ({t.train_iters}), or null", "training.stop_after_step", "training.train_iters")

        need(cfg.warmup_iters() < t.train_iters,  # megatron's scheduler asserts it
             f"the learning-rate warm-up ({cfg.warmup_iters()} steps) must end before training.train_iters "
             f"({t.train_iters}): lower optimizer.lr_warmup_iters or optimizer.warmup_fraction",
             "optimizer.lr_warmup_iters", "optimizer.warmup_fraction", "training.train_iters")
    need(0 <= t.seed < 2 ** 32, f"training.seed must be in [0, 2**32), got {t.seed}", "training.seed")
    need(t.max_consecutive_skips >= 1,
         f"training.max_consecutive_skips must be >= 1 (non-finite steps in a row before stopping), "
         f"got {t.max_consecutive_skips}", "training.max_consecutive_skips")
    need(t.recompute in ("none", "selective", "full"), "training.recompute must be none, selective or full",
         "training.recompute")
    if t.recompute == "full":
        # megatron recomputes groups of recompute_num_layers layers of each model chunk: 0 loops forever,
        # a group past the chunk's last layer fails with an IndexError.
        chunk_layers = arch.num_layers // (pp * (vp or 1))
        need(t.recompute_num_layers >= 1 and chunk_layers % t.recompute_num_layers == 0,
             f"training.recompute_num_layers={t.recompute_num_layers} must divide the {chunk_layers} layers of "
             f"each pipeline stage (model chunk): choose a divisor of {chunk_layers}", "training.recompute_num_layers")
    need(t.recompute == "none" or t.device != "cpu" or cfg.model.backend != "local",
         "training.recompute with model.backend=local does not run on CPU (megatron's local attention asks "
         "CUDA for its causal mask when recomputing): use model.backend=native or training.recompute=none",
         "training.recompute", "model.backend")
    need(t.device in ("cpu", "cuda"), f"training.device must be auto, cpu or cuda, got {t.device!r}", "training.device")
    need(t.device != "cuda" or env.cuda, "training.device=cuda but no CUDA device is visible", "training.device")
    need(t.precision in ("bf16", "fp32"), f"training.precision must be auto, bf16 or fp32, got {t.precision!r}",
         "training.precision")
    need(cfg.model.backend in ("auto", "transformer_engine", "native", "local"),
         f"model.backend must be auto, transformer_engine, native or local, got {cfg.model.backend!r}", "model.backend")
    need(cfg.model.cross_entropy in ("megatron", "melama"),
         f"model.cross_entropy must be megatron or melama, got {cfg.model.cross_entropy!r}", "model.cross_entropy")
    need(o.lr_decay_style in ("cosine", "linear", "constant"),
         "optimizer.lr_decay_style must be cosine, linear or constant", "optimizer.lr_decay_style")
    need(0 <= o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) must be between 0 and lr ({o.lr})",
         "optimizer.min_lr", "optimizer.lr")
    need(0 <= o.warmup_fraction < 1, "optimizer.warmup_fraction must be in [0, 1)", "optimizer.warmup_fraction")
    need(o.lr_warmup_iters is None or o.lr_warmup_iters >= 0, "optimizer.lr_warmup_iters must be >= 0 or null",
         "optimizer.lr_warmup_iters")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
         f"optimizer.beta1 ({o.beta1}) and optimizer.beta2 ({o.beta2}) must be in [0, 1)",
         "optimizer.beta1", "optimizer.beta2")
    need(o.eps >= 0 and o.weight_decay >= 0 and o.clip_grad >= 0,
         f"optimizer.eps ({o.eps}), weight_decay ({o.weight_decay}) and clip_grad ({o.clip_grad}; 0: no "
         "clipping) must be >= 0", "optimizer.eps", "optimizer.weight_decay", "optimizer.clip_grad")
    need(cfg.data.loader in ("default", "dali"), "data.loader must be default or dali", "data.loader")
    need(c.on_save_failure in ("stop", "continue"), "checkpoint.on_save_failure must be stop or continue",
         "checkpoint.on_save_failure")
    need(c.save_interval >= 1,
         f"checkpoint.save_interval must be >= 1 step, got {c.save_interval} (a value above "
         "training.train_iters saves only at the end)", "checkpoint.save_interval")
    need(c.keep_last is None or c.keep_last >= 1,
         f"checkpoint.keep_last must be >= 1, or null to keep every checkpoint; got {c.keep_last}",
         "checkpoint.keep_last")
    need(c.preemption_grace_s is None or c.preemption_grace_s > 0,
         f"checkpoint.preemption_grace_s must be > 0 seconds, or null (finish the step, then save); "
         f"got {c.preemption_grace_s}", "checkpoint.preemption_grace_s")
    need(lg.log_interval >= 1, f"logging.log_interval must be >= 1 step, got {lg.log_interval}", "logging.log_interval")
    need(lg.eval_interval >= 0, f"logging.eval_interval must be >= 0 (0: only at the end), got {lg.eval_interval}",
         "logging.eval_interval")
    need(lg.eval_iters >= 0, f"logging.eval_iters must be >= 0 (0: no validation), got {lg.eval_iters}",
         "logging.eval_iters")
    need(lg.peak_tflops is None or lg.peak_tflops > 0,
         f"logging.peak_tflops must be > 0, or null for the device table's value; got {lg.peak_tflops}",
         "logging.peak_tflops")
    need(c.optimizer_format in ("dp_reshardable", "fully_reshardable"),
         "checkpoint.optimizer_format must be dp_reshardable or fully_reshardable", "checkpoint.optimizer_format")

    if t.device == "cpu":
        need(not env.cuda, "training.device=cpu on a machine with CUDA: megatron on CPU needs CUDA hidden "
                           "(CUDA_VISIBLE_DEVICES=) — or use training.device=cuda", "training.device")
        need(cfg.model.backend != "transformer_engine", "model.backend=transformer_engine needs a GPU",
             "model.backend", "training.device")
    need(not p.overlap_param_gather or (p.use_distributed_optimizer and p.overlap_grad_reduce),
         "parallel.overlap_param_gather needs parallel.use_distributed_optimizer=true and "
         "parallel.overlap_grad_reduce=true (megatron overlaps the gather of the optimizer's shards)",
         "parallel.overlap_param_gather", "parallel.use_distributed_optimizer", "parallel.overlap_grad_reduce")
    need(cfg.model.backend != "local" or not p.sequence_parallel,
         "model.backend=local does not support sequence parallelism (its RMSNorm refuses it): use "
         "backend native or set parallel.sequence_parallel=false", "model.backend", "parallel.sequence_parallel")

    if t.fp8 is not None:
        need(t.fp8 in ("hybrid", "e4m3"), f"training.fp8 must be null, hybrid or e4m3, got {t.fp8!r}", "training.fp8")
        need(t.fp8_recipe in ("delayed", "tensorwise"), "training.fp8_recipe must be delayed or tensorwise",
             "training.fp8_recipe")
        need(env.transformer_engine,
             "training.fp8 needs Transformer Engine, which is not importable here: install it (NVIDIA's "
             "PyTorch container ships it) or set training.fp8=null", "training.fp8")
        need(env.fp8_capable,
             "training.fp8 needs an FP8-capable GPU (compute capability 8.9+: H100, H200, L40S, B200); "
             "this machine has none: set training.fp8=null", "training.fp8")
        need(t.precision == "bf16", "training.fp8 needs training.precision=bf16", "training.fp8", "training.precision")
        need(cfg.model.backend in ("auto", "transformer_engine"),
             f"training.fp8 runs in Transformer Engine's layers; model.backend={cfg.model.backend} would "
             "train in bf16 without a word: use model.backend=transformer_engine (or auto)",
             "training.fp8", "model.backend")
    if cfg.model.backend == "transformer_engine":
        need(env.transformer_engine, "model.backend=transformer_engine but Transformer Engine is not importable",
             "model.backend")

    need(t.loss_normalization in ("token", "sample"), "training.loss_normalization must be token or sample",
         "training.loss_normalization")

    if found:
        fail()
