"""Hugging Face LLaMA-2 checkpoints into this project's checkpoints and back, and adapters out to
Hugging Face PEFT: the library behind `melama convert` (commands/convert.py) and `melama eval`'s
export of a megatron checkpoint.

    import_hf(hf_dir, out, tp, pp)          HF folder -> weights-only dist-checkpoint
    export_hf(ckpt, out)                    any checkpoint -> HF folder (merge_lora: adapters merged in)
    export_peft(ckpt, out)                  adapter checkpoint -> PEFT adapter folder

Both directions stream: import builds each dist-checkpoint chunk from a few HF tensor slices when
the writer asks for it (dcp_stream.py), export reads one decoder layer at a time and writes
safetensors shards tensor by tensor (hf_folder.py). Outputs appear atomically (layout.atomic_dir);
a `verify` callback runs on the finished temporary folder, before the rename (the trunk's logits
against transformers': melama_mcore/logits.py). The name mapping is models/llama/state_dict_adapter.py;
what an adapter checkpoint holds and how it merges or becomes PEFT is its training strategy's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from melama_mcore.checkpoint.dcp_stream import DistCheckpointReader, write_dist_checkpoint
from melama_mcore.checkpoint.hf_folder import HFCheckpoint, copy_tokenizer, write_hf_model
from melama_mcore.checkpoint.integrity import file_checksums, model_identity
from melama_mcore.checkpoint.layout import atomic_dir, seal
from melama_mcore.checkpoint.opened import ADAPTERS, open_checkpoint
from melama_mcore.config.job_config import dump_config
from melama_mcore.config.validate import TP, PP, VP, Environment, InvalidConfig, resolve, validate
from melama_mcore.errors import CheckpointError, UserError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch, padded_vocab_size
from melama_mcore.strategies import strategy_for

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHARD_BYTES = 5 * 10**9
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LAYOUT_FLAGS = {TP: "--tp", PP: "--pp", VP: "--vp"}  # how `melama convert` names the layout settings


@dataclass(frozen=True)
class Conversion:
    """What a conversion wrote, for a check before it is published (`verify`)."""

    hf_dir: Path  # the Hugging Face side (the source of an import, the temporary folder of an export)
    checkpoint: Path  # the megatron checkpoint with the same weights (a temporary folder for an import)
    arch: LlamaArch
    padded_vocab: int
    rounded_to: torch.dtype | None = None  # the export rounded the weights to this dtype
    adapters: Path | None = None  # the adapter checkpoint merged into `checkpoint`'s weights


Verify = Callable[[Conversion], None]


# ---------------------------------------------------------------------------------------------
# import-hf
# ---------------------------------------------------------------------------------------------
def check_layout(arch: LlamaArch, tp: int, pp: int, vp: int | None) -> None:
    """The trunk's own layout checks (config/validate.py) for a run of this architecture at
    TP x PP (x VP), told in the converter's flags, on one line."""
    cfg = sda.arch_config(arch, tp, pp, vp)
    cfg.training.device, cfg.training.precision = "cpu", "fp32"
    cfg.training.seq_length = arch.max_position_embeddings
    cfg.training.global_batch_size = pp  # one micro-batch per pipeline stage: the interleaved schedule's rule
    env = Environment(world_size=tp * pp, cuda=False, transformer_engine=False, fp8_capable=False)
    try:
        validate(resolve(cfg, env), arch, env, names=LAYOUT_FLAGS)
    except InvalidConfig as err:
        raise UserError("invalid layout: " + "; ".join(p.message for p in err.problems)) from None


def import_config_yaml(arch: LlamaArch, tp: int, pp: int, vp: int | None, divisible_by: int) -> str:
    """The checkpoint's config.yaml: the model section a run must match (the source's architecture,
    its context length as the sequence length) and the layout converted for."""
    cfg = sda.arch_config(arch, tp, pp, vp, divisible_by)
    cfg.training.seq_length = arch.max_position_embeddings
    return dump_config(cfg)


def import_hf(hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, vp: int | None = None, divisible_by: int = 128,
              verify: Verify | None = None) -> tuple[LlamaArch, int]:
    """A weights-only dist-checkpoint at `out` from a Hugging Face LlamaForCausalLM folder, checked for
    a run at TP x PP (x VP) and its vocabulary padded for TP."""
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
        if verify is not None:
            verify(Conversion(hf_dir, tmp, arch, padded))
    return arch, padded


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


def export_hf(ckpt: Path, out: Path, dtype_name: str = "auto", tokenizer: Path | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, *, merge_lora: bool = False, base: Path | None = None,
              verify: Verify | None = None, require_tokenizer: bool = False) -> tuple[LlamaArch, int]:
    """A transformers folder from a checkpoint of this project: its weights, or with `merge_lora` an
    adapter checkpoint's adapters merged into its base's (`base`: another base than the one it
    names); the run's tokenizer unless `tokenizer` names another (`require_tokenizer`: refuse a
    checkpoint that records none)."""
    source = open_checkpoint(ckpt, tokenizer)
    adapters = source.kind == ADAPTERS
    if adapters and not merge_lora:
        raise UserError(f"{source.folder} is an adapter checkpoint ({source.strategy.describe()}): export the "
                        "adapters with `melama convert export-peft`, or merged into their base with --merge-lora")
    if merge_lora and not adapters:
        raise UserError(f"--merge-lora: {source.folder} holds no LoRA adapters (its config.yaml has no "
                        "peft.method: lora)")
    carried = source.tokenizer(tokenizer)
    if carried is None and require_tokenizer:
        raise CheckpointError(f"{source.folder}: its config.yaml names no tokenizer (data.tokenizer; a weights-only "
                              f"import has none): export it with `melama convert export-hf --ckpt {source.folder} "
                              "--tokenizer TOKENIZER --out DIR` and use DIR")
    weights_of = source.base(base) if merge_lora else source
    reader, padded, stored = weights_of.weights()
    adjust = None
    if merge_lora:
        own = source.own_tensors()
        log.info("merging %s (%s) of %s into %s", source.strategy.name, source.strategy.settings(), source.folder,
                 weights_of.folder)
        # in fp32: the export rounds once, to its dtype
        adjust = lambda tensors, layer: source.strategy.merge(  # noqa: E731
            {k: t.float() for k, t in tensors.items()}, own, source.arch, layer)
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
            copy_tokenizer(carried, tmp, source.cfg.data.chat_template)
        if verify is not None:
            rounded = dtype != torch.float32 and (merge_lora or dtype != stored)
            verify(Conversion(tmp, weights_of.folder, arch, padded, rounded_to=dtype if rounded else None,
                              adapters=source.folder if merge_lora else None))
    return arch, padded


def write_peft_adapter(out: Path, adapters: dict[str, torch.Tensor], arch: LlamaArch, peft,
                       base_model_name_or_path: str, dtype: torch.dtype | None = None) -> None:
    """A Hugging Face PEFT adapter folder at `out` (adapter_config.json + adapter_model.safetensors),
    which `peft.PeftModel.from_pretrained` loads on the exported base, from the global adapter
    tensors of the `peft:` settings; atomically (nothing appears there unless complete; an existing
    `out` is refused). `dtype`: of the written tensors (default: as given)."""
    from safetensors.torch import save_file

    strategy = strategy_for(peft)
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous()
               for k, v in strategy.to_peft(adapters, arch).items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(strategy.peft_config(base_model_name_or_path), indent=2))


def export_peft(ckpt: Path, out: Path, base: Path | None = None) -> None:
    """A Hugging Face PEFT adapter folder from an adapter checkpoint (saved at any TP/PP)."""
    source = open_checkpoint(ckpt)
    if source.kind != ADAPTERS:
        raise UserError(f"{source.folder} holds no LoRA adapters (its config.yaml has no peft.method: lora): "
                        "export a model with `melama convert export-hf`")
    base_model = source.base(base)
    adapters = source.own_tensors()
    log.info("%s (%s), trained on the base %s", source.strategy.name, source.strategy.settings(), base_model.folder)
    write_peft_adapter(out, adapters, source.arch, source.cfg.peft, str(base_model.folder))
    copy_tokenizer(source.tokenizer(), out, source.cfg.data.chat_template)  # AutoTokenizer reads the adapter folder
    log.info("load it with peft.PeftModel.from_pretrained(base, %r) on that base exported by "
             "`melama convert export-hf --ckpt %s --out BASE_HF`", str(out), base_model.folder)
