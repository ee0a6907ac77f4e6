"""`melama convert`: Hugging Face LLaMA-2 checkpoints into this project's checkpoints and back, and
LoRA adapters out to Hugging Face PEFT.

    melama convert import-hf --hf-dir Llama-2-7b-hf --out ckpt/llama2-7b --tp 2 --pp 1
    melama train ... checkpoint.init_from=ckpt/llama2-7b model.preset=llama2-7b
    melama convert export-hf --ckpt outputs/run --out me-llama-7b-hf --dtype bf16
    melama convert export-peft --ckpt outputs/chat --out me-llama-7b-chat-lora
    melama convert export-hf --ckpt outputs/chat --out me-llama-7b-chat-hf --merge-lora

Both directions stream: import builds each dist-checkpoint chunk from a few HF tensor slices when
the writer asks for it (checkpoint/dcp_stream.py), export reads one decoder layer at a time and
writes safetensors shards tensor by tensor (checkpoint/hf_folder.py). Outputs appear atomically,
`--verify` included: the logits check runs on the finished temporary folder, before the rename
(checkpoint/layout.py). The name mapping is models/llama/state_dict_adapter.py, adapters'
models/llama/peft_adapter.py; this module chains them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import re
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from melama_mcore.checkpoint.dcp_stream import DistCheckpointReader, write_dist_checkpoint
from melama_mcore.checkpoint.hf_folder import HFCheckpoint, copy_tokenizer, write_hf_model
from melama_mcore.checkpoint.integrity import (file_checksums, identity_differences, model_identity, read_identity,
                                               verify_checksums)
from melama_mcore.checkpoint.layout import CONFIG, atomic_dir, find_checkpoint, read_config, seal
from melama_mcore.cli import positive_int
from melama_mcore.config.job_config import JobConfig, PeftConfig, dump_config
from melama_mcore.errors import CheckpointError, ConfigError, UserError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch, padded_vocab_size, resolve_arch

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHARD_BYTES = 5 * 10**9
# --verify, max |logit difference| / max |logit|, both sides in fp32 on the same weights: what is
# left is summation order (observed ~1e-6 on CPU).
FP32_TOLERANCE = 1e-4


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_verify_possible() -> None:
    """--verify loads the result with transformers and runs the framework's model on CPU: refuse
    before converting when either cannot happen here."""
    if importlib.util.find_spec("transformers") is None:
        raise UserError("--verify compares the logits with transformers', which is not installed: "
                        "pip install melama-mcore[hf] (or drop --verify)")
    if torch.cuda.is_available():
        raise UserError("--verify runs the framework's model on CPU, which megatron allows only with CUDA hidden: "
                        "prefix the command with CUDA_VISIBLE_DEVICES= (or drop --verify)")


# ---------------------------------------------------------------------------------------------
# import-hf
# ---------------------------------------------------------------------------------------------
# config/validate.py's words for the layout -> the converter's flags
_FLAGS = ((re.compile(r"(?:parallel\.)?tensor_parallel"), "--tp"),
          (re.compile(r"(?:parallel\.)?pipeline_parallel"), "--pp"),
          (re.compile(r"(?:parallel\.)?virtual_pipeline"), "--vp"),
          (re.compile(r"set it to null|null"), "leave it out"))


def check_layout(arch: LlamaArch, tp: int, pp: int, vp: int | None) -> None:
    """The trunk's own layout checks (config/validate.py) for a run of this architecture at
    TP x PP (x VP), told in the converter's flags, on one line."""
    from melama_mcore.config.validate import Environment, resolve, validate

    cfg = sda.arch_config(arch, tp, pp, vp)
    cfg.training.device, cfg.training.precision = "cpu", "fp32"
    cfg.training.seq_length = arch.max_position_embeddings
    cfg.training.global_batch_size = pp  # one micro-batch per pipeline stage: the interleaved schedule's rule
    env = Environment(world_size=tp * pp, cuda=False, transformer_engine=False, fp8_capable=False)
    try:
        validate(resolve(cfg, env), arch, env)
    except ConfigError as err:
        problems = [line.strip().removeprefix("- ") for line in str(err).splitlines()[1:]]
        for pattern, flag in _FLAGS:
            problems = [pattern.sub(flag, p) for p in problems]
        raise UserError("invalid layout: " + "; ".join(problems)) from None


def import_config_yaml(arch: LlamaArch, tp: int, pp: int, vp: int | None, divisible_by: int) -> str:
    """The checkpoint's config.yaml: the model section a run must match (the source's architecture,
    its context length as the sequence length) and the layout converted for."""
    cfg = sda.arch_config(arch, tp, pp, vp, divisible_by)
    cfg.training.seq_length = arch.max_position_embeddings
    return dump_config(cfg)


def import_hf(hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, vp: int | None = None, divisible_by: int = 128,
              verify: bool = False) -> tuple[LlamaArch, int]:
    if verify:
        check_verify_possible()
    hf = HFCheckpoint(hf_dir)
    arch = sda.arch_from_hf_config(hf.config)
    check_layout(arch, tp, pp, vp)
    dtype = hf.check(arch)
    padded = padded_vocab_size(arch.vocab_size, divisible_by, tp)
    log.info("importing %s: %d layers, hidden %d, %d heads / %d KV groups, vocab %d (padded to %d for TP %d), "
             "%d positions, %s", hf_dir, arch.num_layers, arch.hidden_size, arch.num_attention_heads,
             arch.num_query_groups, arch.vocab_size, padded, tp, arch.max_position_embeddings, dtype)
    with atomic_dir(out) as tmp:
        write_dist_checkpoint(tmp, sda.import_chunks(arch, padded, tp), sda.extra_state_objects(arch), hf.read, dtype)
        # Weights only: an import records no tokenizer (a run from it names one in data.tokenizer).
        seal(tmp, file_checksums(tmp), model_identity(arch, None), import_config_yaml(arch, tp, pp, vp, divisible_by))
        if verify:
            verify_logits(hf_dir, tmp, arch, padded)
    return arch, padded


# ---------------------------------------------------------------------------------------------
# Reading this project's checkpoints for export
# ---------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """One of this project's checkpoints, its files verified, described by what it records."""

    folder: Path
    cfg: JobConfig  # its config.yaml
    peft: PeftConfig | None  # the LoRA settings of an adapter checkpoint
    arch: LlamaArch
    identity: dict | None  # its model_identity.json

    def recorded_identity(self) -> dict:
        return self.identity or model_identity(self.arch, None)


def open_checkpoint(path: Path, tokenizer: Path | None = None) -> Checkpoint:
    """A run's folder, its checkpoints/ folder (the latest), one iter_* folder or a weights-only folder.
    The architecture is its config.yaml's; the vocabulary and the context length are those its
    model_identity.json records (the resolved ones: config.yaml has no key for the context length,
    and a run may take its vocabulary from its tokenizer), else the tokenizer's vocabulary."""
    from melama_mcore.data.tokenizer import load_tokenizer

    folder = find_checkpoint(path)
    cfg, peft = read_config(folder)
    verify_checksums(folder)
    identity = read_identity(folder)
    recorded = (identity or {}).get("arch") or {}
    vocab = recorded.get("vocab_size")
    if cfg.model.vocab_size is None and vocab is None:
        source = tokenizer or cfg.data.tokenizer
        if not source:
            raise CheckpointError(f"{folder / CONFIG} states no vocab_size and names no tokenizer: pass --tokenizer")
        vocab = load_tokenizer(str(source)).vocab_size
    arch = resolve_arch(cfg.model, vocab)
    if "max_position_embeddings" in recorded:
        arch = dataclasses.replace(arch, max_position_embeddings=recorded["max_position_embeddings"])
    return Checkpoint(folder, cfg, peft, arch, identity)


def model_weights(ckpt: Checkpoint) -> tuple[DistCheckpointReader, int, torch.dtype]:
    """A reader of the checkpoint's model tensors, checked against its architecture; the padded
    vocabulary (embedding rows) and the stored dtype."""
    reader = DistCheckpointReader(ckpt.folder)
    padded = reader.shape(sda.EMBEDDING)[0] if sda.EMBEDDING in reader.stored else 0
    for key, shape in sda.megatron_shapes(ckpt.arch, padded).items():
        if key not in reader.stored:
            raise CheckpointError(f"{ckpt.folder} has no tensor {key}: not a complete LLaMA checkpoint")
        if reader.shape(key) != shape:
            raise CheckpointError(f"{ckpt.folder}: {key} is {list(reader.shape(key))} but its config.yaml describes "
                                  f"{list(shape)}: config and weights are from different models")
    if padded < ckpt.arch.vocab_size:
        raise CheckpointError(f"{ckpt.folder}: the embedding has {padded} rows, fewer than the vocabulary "
                              f"({ckpt.arch.vocab_size})")
    return reader, padded, reader.dtype(sda.EMBEDDING)


def export_tokenizer(ckpt: Checkpoint, override: Path | None) -> Path | None:
    """The tokenizer an export carries: --tokenizer, else the one the run trained with (data.tokenizer
    in its config.yaml); None when there is none (a weights-only import records no tokenizer)."""
    if override is not None:
        if not override.exists():
            raise UserError(f"--tokenizer {override} does not exist")
        return override
    if not ckpt.cfg.data.tokenizer:
        return None
    path = Path(ckpt.cfg.data.tokenizer)
    if not path.exists():
        raise CheckpointError(f"{ckpt.folder}: the tokenizer its config.yaml names (data.tokenizer), {path}, does "
                              "not exist here: pass --tokenizer PATH to `melama convert export-hf`")
    return path


def find_base(adapter: Checkpoint, override: Path | None) -> Checkpoint:
    """The base model of an adapter checkpoint: --base, else its checkpoint.init_from; refused when
    its identity (architecture, tokenizer vocabulary) differs from the one the adapters recorded."""
    given = override or adapter.cfg.checkpoint.init_from
    origin = "--base" if override else f"checkpoint.init_from in {adapter.folder / CONFIG}"
    if not given:
        raise CheckpointError(f"{adapter.folder}: its config.yaml names no base model (checkpoint.init_from): "
                              "pass --base PATH")
    if not Path(given).exists():
        raise CheckpointError(f"the base model {given} ({origin}) does not exist here: pass --base PATH")
    base = open_checkpoint(Path(given))
    if base.peft is not None:
        raise CheckpointError(f"the base model {base.folder} ({origin}) is itself an adapter checkpoint")
    diffs = identity_differences(base.recorded_identity(), adapter.recorded_identity())
    if diffs:
        raise CheckpointError(f"the base model {base.folder} ({origin}) is not the model the adapters of "
                              f"{adapter.folder} were trained on: {'; '.join(diffs)}")
    return base


def read_adapters(adapter: Checkpoint) -> dict[str, torch.Tensor]:
    """The global adapter tensors of an adapter checkpoint (saved at any TP/PP), checked against its
    LoRA settings and architecture: every tensor there, none else."""
    from melama_mcore.models.llama.lora import is_adapter_key
    from melama_mcore.models.llama.peft_adapter import check_adapters

    reader = DistCheckpointReader(adapter.folder)
    keys = reader.model_keys()
    others = [k for k in keys if not is_adapter_key(k)]
    if others:
        raise CheckpointError(f"{adapter.folder} holds {others[0]}: an adapter checkpoint holds LoRA tensors only")
    adapters = reader.tensors(keys)
    check_adapters(adapters, adapter.arch, adapter.peft)
    return adapters


# ---------------------------------------------------------------------------------------------
# export-hf, export-peft
# ---------------------------------------------------------------------------------------------
Adjust = Callable[[dict[str, torch.Tensor], "int | None"], dict[str, torch.Tensor]]


def hf_tensors(reader: DistCheckpointReader, arch: LlamaArch, adjust: Adjust | None = None):
    """(name, tensor) in HF file order, holding one layer at a time. `adjust(tensors, layer)` may
    change each group of megatron tensors first (layer None: the final norm and output layer)."""
    adjust = adjust or (lambda tensors, layer: tensors)
    embedding = reader.tensors([sda.EMBEDDING])[sda.EMBEDDING]
    yield "model.embed_tokens.weight", embedding[: arch.vocab_size]
    del embedding
    for layer in range(arch.num_layers):
        yield from sda.hf_layer(arch, layer, adjust(reader.layer(layer, sda.LAYER_KEYS), layer)).items()
    rest = adjust(reader.tensors([sda.FINAL_NORM, sda.OUTPUT]), None)
    yield "model.norm.weight", rest[sda.FINAL_NORM]
    yield "lm_head.weight", rest[sda.OUTPUT][: arch.vocab_size]


def merging(adapters: dict[str, torch.Tensor], arch: LlamaArch, peft) -> Adjust:
    """An `adjust` for hf_tensors that merges LoRA adapters into the base tensors, in fp32 (the
    export rounds once, to its dtype)."""
    from melama_mcore.models.llama.lora import merge_lora

    return lambda tensors, layer: merge_lora({k: t.float() for k, t in tensors.items()}, adapters, arch, peft, layer)


def export_hf(ckpt: Path, out: Path, dtype_name: str = "auto", tokenizer: Path | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, *, merge_lora: bool = False, base: Path | None = None,
              verify: bool = False, require_tokenizer: bool = False) -> tuple[LlamaArch, int]:
    """A transformers folder from a checkpoint of this project: its weights, or with `merge_lora` an
    adapter checkpoint's adapters merged into its base's; the run's tokenizer unless `tokenizer`
    names another (`require_tokenizer`: refuse a checkpoint that records none)."""
    if verify:
        check_verify_possible()
    source = open_checkpoint(ckpt, tokenizer)
    if source.peft is not None and not merge_lora:
        raise UserError(f"{source.folder} is an adapter checkpoint (LoRA rank {source.peft.rank}): export the "
                        "adapters with `melama convert export-peft`, or merged into their base with --merge-lora")
    if merge_lora and source.peft is None:
        raise UserError(f"--merge-lora: {source.folder} holds no LoRA adapters (its config.yaml has no "
                        "peft.method: lora)")
    carried = export_tokenizer(source, tokenizer)
    if carried is None and require_tokenizer:
        raise CheckpointError(f"{source.folder}: its config.yaml names no tokenizer (data.tokenizer; a weights-only "
                              f"import has none): export it with `melama convert export-hf --ckpt {source.folder} "
                              "--tokenizer TOKENIZER --out DIR` and use DIR")
    weights_of = find_base(source, base) if merge_lora else source
    reader, padded, stored = model_weights(weights_of)
    adjust = None
    if merge_lora:
        from melama_mcore.models.llama.lora import target_order

        adapters = read_adapters(source)
        log.info("merging LoRA (rank %d, alpha %g, %s) of %s into %s", source.peft.rank, source.peft.alpha,
                 ", ".join(target_order(source.peft)), source.folder, weights_of.folder)
        adjust = merging(adapters, source.arch, source.peft)
    arch = source.arch
    dtype = stored if dtype_name == "auto" else DTYPES[dtype_name]
    log.info("exporting %s (%d layers, vocab %d of %d padded rows, %d positions) as %s", weights_of.folder,
             arch.num_layers, arch.vocab_size, padded, arch.max_position_embeddings, dtype)
    if carried is not None:
        log.info("tokenizer: %s (%s), copied into the export", carried,
                 "--tokenizer" if tokenizer is not None else "the run's, data.tokenizer")
    else:
        log.warning("tokenizer: none: %s names no tokenizer (weights-only imports have none); the export holds the "
                    "model only, pass --tokenizer to add one", source.folder)
    with atomic_dir(out) as tmp:
        write_hf_model(tmp, sda.hf_shapes(arch), dtype, hf_tensors(reader, arch, adjust), max_shard_bytes,
                       sda.hf_config(arch, dtype))
        if carried is not None:
            copy_tokenizer(carried, tmp)
        if verify:
            rounded = dtype != torch.float32 and (merge_lora or dtype != stored)
            verify_logits(tmp, weights_of.folder, arch, padded, rounded_to=dtype if rounded else None,
                          adapter=source.folder if merge_lora else None)
    return arch, padded


def export_peft(ckpt: Path, out: Path, base: Path | None = None) -> None:
    """A Hugging Face PEFT adapter folder from an adapter checkpoint (saved at any TP/PP)."""
    from melama_mcore.models.llama.peft_adapter import peft_target_modules, write_peft_adapter

    source = open_checkpoint(ckpt)
    if source.peft is None:
        raise UserError(f"{source.folder} holds no LoRA adapters (its config.yaml has no peft.method: lora): "
                        "export a model with `melama convert export-hf`")
    base_model = find_base(source, base)
    adapters = read_adapters(source)
    log.info("LoRA rank %d, alpha %g on %s, trained on the base %s", source.peft.rank, source.peft.alpha,
             ", ".join(peft_target_modules(source.peft)), base_model.folder)
    write_peft_adapter(out, adapters, source.arch, source.peft, str(base_model.folder))
    log.info("load it with peft.PeftModel.from_pretrained(base, %r) on that base exported by "
             "`melama convert export-hf --ckpt %s --out BASE_HF`", str(out), base_model.folder)


# ---------------------------------------------------------------------------------------------
# --verify: the framework's logits against transformers'
# ---------------------------------------------------------------------------------------------
def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits.float()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def verify_logits(hf_dir: Path, ckpt: Path, arch: LlamaArch, padded_vocab: int,
                  rounded_to: torch.dtype | None = None, adapter: Path | None = None) -> float:
    """Max |difference| / max |logit| between transformers on `hf_dir` and the framework on `ckpt`
    (+ `adapter`), over a few random tokens, both in fp32 on CPU; a CheckpointError above the bound.

    The bound follows the export's dtype. On the same weights only summation order differs:
    FP32_TOLERANCE. When the export rounded the weights (`rounded_to`: bf16, fp16), the framework runs
    a second time with its own weights rounded to that dtype as the export rounds them; the shift of
    its logits is what this dtype's rounding does to these very logits, and the bound is
    FP32_TOLERANCE + 2 x that shift (for a plain export the export's weights are exactly the rounded
    ones; merged adapters are rounded once after the merge, a rounding of the same size)."""
    from melama_mcore.models.llama.logits import framework_logits

    tokens = torch.randint(0, arch.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    # One process at TP 1, padded like the checkpoint (whatever TP it was padded for).
    ours = framework_logits(ckpt, arch, tokens, divisible_by=padded_vocab, adapter=adapter)
    bound = FP32_TOLERANCE
    if rounded_to is not None:
        shift = relative_error(framework_logits(ckpt, arch, tokens, divisible_by=padded_vocab, adapter=adapter,
                                                round_to=rounded_to), ours)
        bound += 2 * shift
        log.info("verify: rounding the weights to %s moves the framework's logits by %.2e (relative): bound %.2e",
                 str(rounded_to).removeprefix("torch."), shift, bound)
    error = relative_error(hf_logits(hf_dir, tokens), ours)
    log.info("verify: max |logit difference| / max |logit| = %.2e over %d tokens (bound %.1e)", error,
             tokens.numel(), bound)
    if error > bound:
        raise CheckpointError(f"verification failed: logits differ by {error:.2e} (relative) > {bound:.1e}; "
                              "nothing was written")
    return error


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB or 500MB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama convert",
        description="Convert LLaMA-2 checkpoints between Hugging Face (safetensors or .bin) and this project's "
                    "megatron dist-checkpoints, and LoRA adapters to Hugging Face PEFT. Both directions stream "
                    "(about one decoder layer in memory) and write atomically (nothing appears at --out unless "
                    "the conversion, and --verify when asked, succeed).")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import-hf", help="HF folder -> weights-only dist-checkpoint for `checkpoint.init_from`",
        description="Read config.json + weights of a HF LlamaForCausalLM and write a weights-only megatron "
                    "checkpoint. Train from it with checkpoint.init_from=OUT and the model fields written in "
                    "OUT/config.yaml (a run with another architecture is refused). The checkpoint loads at any "
                    "TP/PP/VP; --tp/--pp/--vp name the layout it is validated and chunked for, and --tp sets the "
                    "vocabulary padding (a multiple of 128 x TP; a run at another TP loads the real rows and "
                    "pads its own way). Pickled .bin weights are read with torch's weights_only loader.")
    imp.add_argument("--hf-dir", required=True, type=Path, help="folder with config.json and *.safetensors or *.bin")
    imp.add_argument("--out", required=True, type=Path, help="new folder for the checkpoint (must not exist)")
    imp.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size to validate and pad for (default 1)")
    imp.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size to validate for (default 1)")
    imp.add_argument("--vp", type=positive_int, default=None, help="virtual pipeline stages per rank (default none)")
    imp.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128, metavar="N",
                     help="pad the vocabulary to a multiple of N x TP, as the trunk does (default 128)")
    imp.add_argument("--verify", action="store_true",
                     help="before publishing, compare fp32 logits of transformers and the framework on a few "
                          "tokens (loads both full models in memory; needs transformers: melama-mcore[hf])")
    exp = sub.add_parser(
        "export-hf", help="dist-checkpoint -> HF safetensors folder (with --merge-lora: adapters merged)",
        description="Write a checkpoint of this project (a run's folder or its checkpoints/ folder: the latest; "
                    "one iter_* folder; a weights-only folder; saved at any TP/PP) as sharded safetensors with "
                    "model.safetensors.index.json and config.json, loadable by "
                    "transformers.AutoModelForCausalLM.from_pretrained. Vocabulary padding is stripped; the "
                    "architecture, context length, RoPE base and norm eps are the checkpoint's. The tokenizer "
                    "the run trained with (data.tokenizer in the checkpoint's config.yaml) is copied alongside, "
                    "so AutoTokenizer, lm-eval and vLLM load the folder as it is; a weights-only import records "
                    "none (--tokenizer adds one). With --merge-lora, --ckpt is an adapter checkpoint (a run "
                    "with peft.method=lora) and the adapters are merged into the weights of its base.")
    exp.add_argument("--ckpt", required=True, type=Path, help="checkpoint folder (see above)")
    exp.add_argument("--out", required=True, type=Path, help="new folder for the HF model (must not exist)")
    exp.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                     help="weights dtype (default auto: as stored in the checkpoint)")
    exp.add_argument("--tokenizer", type=Path,
                     help="a sentencepiece .model or a HF tokenizer folder to copy alongside instead of the run's; "
                          "also the vocabulary size when the checkpoint records none")
    exp.add_argument("--merge-lora", action="store_true",
                     help="--ckpt is an adapter checkpoint: write its base with the LoRA adapters merged in")
    exp.add_argument("--base", type=Path,
                     help="with --merge-lora: the base model (default: the checkpoint.init_from the adapter run "
                          "recorded)")
    exp.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                     help="per safetensors file (default 5GB)")
    exp.add_argument("--verify", action="store_true",
                     help="before publishing, compare fp32 logits of the framework and of transformers on the "
                          "export, within a bound that follows --dtype (needs transformers: melama-mcore[hf])")
    peft = sub.add_parser(
        "export-peft", help="adapter checkpoint -> Hugging Face PEFT adapter folder",
        description="Write the LoRA adapters of an adapter checkpoint (a run with peft.method=lora; its folder, "
                    "checkpoints/ folder or one iter_* folder; saved at any TP/PP) as a PEFT adapter: "
                    "adapter_config.json (peft_type LORA, r, lora_alpha, target_modules in Hugging Face names) "
                    "and adapter_model.safetensors, which peft.PeftModel.from_pretrained loads on the base "
                    "exported with `melama convert export-hf`.")
    peft.add_argument("--ckpt", required=True, type=Path, help="adapter checkpoint (see above)")
    peft.add_argument("--out", required=True, type=Path, help="new folder for the adapter (must not exist)")
    peft.add_argument("--base", type=Path,
                      help="the base model the adapters were trained on (default: the checkpoint.init_from the "
                           "adapter run recorded); checked against the architecture the adapters recorded")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if args.command == "import-hf":
        import_hf(args.hf_dir, args.out, args.tp, args.pp, args.vp, args.make_vocab_size_divisible_by, args.verify)
    elif args.command == "export-hf":
        if args.base is not None and not args.merge_lora:
            raise UserError("--base names the base model of --merge-lora: add --merge-lora, or leave --base out")
        export_hf(args.ckpt, args.out, args.dtype, args.tokenizer, args.max_shard_size, merge_lora=args.merge_lora,
                  base=args.base, verify=args.verify)
    else:
        export_peft(args.ckpt, args.out, args.base)
    log.info("wrote %s (peak RSS %.0f MiB)", args.out, peak_rss_mib())
    return 0


if __name__ == "__main__":  # the guard matters: megatron's checkpoint code may spawn into this module
    import sys

    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
