"""The run's configuration: typed sections, read from a recipe YAML plus `section.key=value` overrides.

Every field has the Me-LLaMA recipe's value or a safe default; a recipe file under
`examples/configs/` states only what differs. Unknown keys are errors (a typo must not silently
train with a default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from melama_mcore.errors import ConfigError


@dataclass
class ModelConfig:
    preset: str = "tiny"
    # Any architecture field of the preset can be overridden (see models/llama/config_registry.py).
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None
    norm_eps: float | None = None
    rope_base: float | None = None
    max_position_embeddings: int | None = None  # the context the model was trained for (HF config.json's)
    # Layer implementation: auto | transformer_engine | native | local (see models/llama/model.py).
    backend: str = "auto"
    # Loss kernel: megatron (its fused vocab-parallel cross-entropy on GPU) | melama (csrc kernel:
    # one pass over the logits each way, one all-gather, no fp32 softmax kept; torch reference on
    # CPU). megatron stays the default until benchmarks/kernels.py on a GPU shows melama faster.
    cross_entropy: str = "megatron"
    init_method_std: float = 0.02
    # Pad the embedding table to a multiple of this x TP (as Megatron-LM does) for fast GEMMs.
    make_vocab_size_divisible_by: int = 128


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False
    # Data parallelism is what is left: world_size / (tensor_parallel * pipeline_parallel).
    # The production path (Megatron-LM's recipes), on GPU and CPU alike. None: the default below.
    use_distributed_optimizer: bool | None = None  # None: on (optimizer state sharded over DP)
    overlap_grad_reduce: bool | None = None  # None: follows the distributed optimizer
    overlap_param_gather: bool | None = None  # None: follows the distributed optimizer and grad reduce


@dataclass
class TrainingConfig:
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 128
    train_iters: int = 1000  # the schedule's length (warm-up and decay are fractions of it)
    # Save and exit after this step (1..train_iters), schedule unchanged (a rerun resumes).
    stop_after_step: int | None = None
    seed: int = 1234
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    fp8: str | None = None  # None | hybrid | e4m3  (Transformer Engine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise
    recompute: str = "none"  # none | selective | full
    # Full recompute: layers per recompute block (uniform method); must divide the layers of a pipeline stage.
    recompute_num_layers: int = 1
    # Non-finite loss or grad norm: skip the update; stop after this many in a row.
    max_consecutive_skips: int = 5
    # How instruction data's loss is averaged over the global batch (data/sft/batch.py): token (every
    # trained token weighs the same, Megatron-LM's default) | sample (every conversation weighs the
    # same, whatever its answer length). Pre-training counts every token either way.
    loss_normalization: str = "token"


@dataclass
class OptimizerConfig:
    # The Me-LLaMA continual pre-training recipe.
    lr: float = 8e-6
    min_lr: float = 8e-7
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-5
    clip_grad: float = 1.0
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    warmup_fraction: float = 0.05
    lr_warmup_iters: int | None = None  # overrides warmup_fraction when set


@dataclass
class DataConfig:
    tokenizer: str = ""  # a sentencepiece .model or a Hugging Face tokenizer folder
    # A blend YAML file, or the list of sources inline: [{name, weight, train: [prefixes], valid: [...]}]
    blend: Any = None
    split: str = "98,2,0"  # train,valid,test per source when a source names no valid prefixes
    loader: str = "default"  # default | dali
    cache_dir: str | None = None  # megatron's dataset index cache; default: <output_dir>/data_cache
    # Train although the data records another tokenizer (vocabulary) than data.tokenizer; refused by default.
    allow_tokenizer_mismatch: bool = False
    # Set by the trainer, not by a recipe (a recipe's value is replaced): the chat template the
    # instruction data was rendered with, {"name", "jinja", "system_prompt"} from its preprocess-sft
    # markers (null for pre-training data). Every checkpoint's config.yaml keeps it; `melama convert
    # export-hf`/`export-peft` write it into the tokenizer files, where `melama eval` reads it.
    chat_template: dict | None = None


@dataclass
class CheckpointConfig:
    # Steps between saves (above train_iters: only at the end); also saved at the end and on SIGTERM / SIGUSR1.
    save_interval: int = 1000
    resume: bool = True  # continue from <output_dir>/checkpoints when it holds a complete checkpoint
    init_from: str | None = None  # weights-only start (a Hugging Face import, or a run: its latest); ignored on resume
    keep_last: int | None = None  # delete older complete checkpoints beyond this many (>= 1; None: keep all)
    on_save_failure: str = "stop"  # stop | continue (a warning per failure; the last good one stays latest)
    # Seconds between SIGTERM/SIGUSR1 and the hard kill (SLURM --signal=TERM@N, torchrun --shutdown-timeout).
    # None: finish the current step, then save. Set: with pipeline_parallel=1, a step that would not
    # finish in time (measured step and save times) is abandoned at a micro-batch boundary and the
    # state before it is saved; the rerun redoes that step. See docs/fault_tolerance.md.
    preemption_grace_s: float | None = None
    # crc32 of every checkpoint file: computed after each save (checksums.json; all ranks share the
    # reads) and verified before each load. Costs one extra read of the whole checkpoint per save and
    # per resume (70B with optimizer state: ~1 TB, ~6 GB per rank on 160 ranks). False: neither is done,
    # so a corrupt or truncated file (bit rot, a partial copy) is no longer named before loading; it
    # fails inside megatron's load or loads silently wrong. The model-identity and no-code-in-pickles
    # checks stay on either way.
    verify_checksums: bool = True
    # How the distributed optimizer's state is stored (parallel.use_distributed_optimizer):
    # dp_reshardable (Megatron-LM's default: each rank writes its own shards, no communication;
    # resumes at any data-parallel size but the same TP/PP/VP) | fully_reshardable (gathered over DP
    # at each save and stored per parameter: resumes at any layout; costs the gather's time and
    # memory) | auto: fully_reshardable for LoRA (its state is the adapters', small), else
    # dp_reshardable. Weights always reshard; so does the plain optimizer's state.
    optimizer_format: str = "auto"


@dataclass
class PeftConfig:
    """The training strategy (strategies/): method none trains every weight, lora adapters on a frozen
    base (models/llama/lora.py)."""

    method: str = "none"  # none | lora
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # Among linear_qkv, linear_proj, linear_fc1, linear_fc2, output_layer (the fused q/k/v and
    # gate/up modules get one adapter per Hugging Face module: q_proj, k_proj, v_proj, gate_proj, up_proj).
    target_modules: list = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])


@dataclass
class LoggingConfig:
    log_interval: int = 1
    eval_interval: int = 0  # 0: only at the end
    eval_iters: int = 10  # global batches per validation; 0: no validation
    tensorboard: bool = True
    peak_tflops: float | None = None  # per GPU; default from the device table in components/metrics.py


@dataclass
class JobConfig:
    run_name: str = "melama"
    output_dir: str = "outputs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def warmup_iters(self) -> int:
        """Learning-rate warm-up steps: optimizer.lr_warmup_iters, else warmup_fraction of the run."""
        o = self.optimizer
        if o.lr_warmup_iters is not None:
            return o.lr_warmup_iters
        return int(round(o.warmup_fraction * self.training.train_iters))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    if value is None or hint is Any:
        return value
    options = getattr(hint, "__args__", (hint,))
    if float in options and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in options and isinstance(value, str):  # YAML reads 8e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if any(t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool))
           for t in options if isinstance(t, type)):
        return value
    names = " or ".join(t.__name__ for t in options if isinstance(t, type))
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


def _apply(section: Any, values: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key {where}.{key} (known: {known})".replace("root.", ""))
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{where}.{key}")
        else:
            setattr(section, key, _coerce(value, hints[key], f"{where}.{key}".replace("root.", "")))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Recipe YAML (optional) + overrides -> JobConfig. Relative paths are relative to the working directory."""
    cfg = JobConfig()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a config file: give a recipe YAML (see examples/configs/)")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        _apply(cfg, values, "root")
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _apply(cfg, nested, "root")
    return cfg


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
