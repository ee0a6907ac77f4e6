"""Hugging Face LLaMA-2 checkpoints into this project's checkpoints and back, and adapters out to
Hugging Face PEFT: the library behind `melama convert` (commands/convert.py) and `melama eval`'s
export of a megatron checkpoint.

    import_hf(hf_dir, out, tp, pp)          HF folder -> weights-only dist-checkpoint
    export_hf(ckpt, out)                    any checkpoint -> HF folder (merge_lora: adapters merged in)
    export_peft(ckpt, out)                  adapter checkpoint -> PEFT adapter folder (base_hf: the
                                            Hugging Face base adapter_config.json names)

Both directions stream: import builds each dist-checkpoint chunk from a few HF tensor slices when
the writer asks for it (dcp_stream.py), export reads one decoder layer at a time and writes
safetensors shards tensor by tensor (hf_folder.py). Outputs appear atomically (layout.atomic_dir);
a `verify` callback runs on the finished temporary folder, before the rename (the trunk's logits
against transformers': melama_mcore/logits.py). The name mapping is models/llama/state_dict_adapter.py;
what an adapter checkpoint holds and how it merges or becomes PEFT is its training strategy's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from melama_mcore.checkpoint.dcp_stream import DistCheckpointReader, write_dist_checkpoint
from melama_mcore.checkpoint.hf_folder import HFCheckpoint, copy_tokenizer, write_hf_model
from melama_mcore.checkpoint.integrity import file_checksums, model_identity
from melama_mcore.checkpoint.layout import atomic_dir, seal
from melama_mcore.checkpoint.opened import ADAPTERS, Checkpoint, open_checkpoint
from melama_mcore.checkpoint.peft_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from melama_mcore.config.job_config import dump_config
from melama_mcore.config.validate import TP, PP, VP, Environment, InvalidConfig, resolve, validate
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.errors import CheckpointError, UserError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch, padded_vocab_size
from melama_mcore.strategies import strategy_for

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHARD_BYTES = 5 * 10**9
LAYOUT_FLAGS = {TP: "--tp", PP: "--pp", VP: "--vp"}  # how `melama convert` names the layout settings
HF_SOURCE = "hf_source"  # model_identity.json of an import: the Hugging Face folder it was imported from
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # a Hugging Face Hub model id, e.g. meta-llama/Llama-2-7b-hf


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


def import_config_yaml(arch: LlamaArch, tp: int, pp: int, vp: int | None, divisible_by: int,
                       tokenizer: Path | None = None) -> str:
    """The checkpoint's config.yaml: the model section a run must match (the source's architecture,
    its context length as the sequence length), the layout converted for and the Hugging Face
    folder's tokenizer (data.tokenizer, when it has a sentencepiece one)."""
    cfg = sda.arch_config(arch, tp, pp, vp, divisible_by)
    cfg.training.seq_length = arch.max_position_embeddings
    cfg.data.tokenizer = str(tokenizer) if tokenizer is not None else cfg.data.tokenizer
    return dump_config(cfg)


def import_hf(hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, vp: int | None = None, divisible_by: int = 128,
              verify: Verify | None = None) -> tuple[LlamaArch, int]:
    """A weights-only dist-checkpoint at `out` from a Hugging Face LlamaForCausalLM folder, checked for
    a run at TP x PP (x VP) and its vocabulary padded for TP; the folder's sentencepiece tokenizer
    (tokenizer.model) recorded as the checkpoint's."""
    hf = HFCheckpoint(hf_dir)
    arch = sda.arch_from_hf_config(hf.config)
    check_layout(arch, tp, pp, vp)
    dtype = hf.check(arch)
    padded = padded_vocab_size(arch.vocab_size, divisible_by, tp)
    # Meta's LLaMA-2 folders carry their sentencepiece model: recorded, eval-ppl and export-hf of the
    # import use it, and a run that starts from it with another vocabulary is refused (identity).
    spm = hf_dir.resolve() / "tokenizer.model"
    tokenizer = load_tokenizer(spm) if spm.is_file() else None
    log.info("importing %s: %d layers, hidden %d, %d heads / %d KV groups, vocab %d (padded to %d for TP %d), "
             "%d positions, %s", hf_dir, arch.num_layers, arch.hidden_size, arch.num_attention_heads,
             arch.num_query_groups, arch.vocab_size, padded, tp, arch.max_position_embeddings, dtype)
    with atomic_dir(out) as tmp:
        write_dist_checkpoint(tmp, sda.import_chunks(arch, padded, tp), sda.extra_state_objects(arch), hf.read, dtype)
        # The folder it came from is recorded too: the Hugging Face base of adapters trained on it (export_peft).
        identity = {**model_identity(arch, tokenizer), HF_SOURCE: str(hf_dir.resolve())}
        seal(tmp, file_checksums(tmp), identity,
             import_config_yaml(arch, tp, pp, vp, divisible_by, spm if tokenizer is not None else None))
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
              verify: Verify | None = None, require_tokenizer: bool = False,
              allow_tokenizer_mismatch: bool = False) -> tuple[LlamaArch, int]:
    """A transformers folder from a checkpoint of this project: its weights, or with `merge_lora` an
    adapter checkpoint's adapters merged into its base's (`base`: another base than the one it
    names); the run's tokenizer unless `tokenizer` names another (`require_tokenizer`: refuse a
    checkpoint that records none), refused when its vocabulary is not the one the checkpoint
    records unless `allow_tokenizer_mismatch`."""
    source = open_checkpoint(ckpt, tokenizer)
    adapters = source.kind == ADAPTERS
    if adapters and not merge_lora:
        raise UserError(f"{source.folder} is an adapter checkpoint ({source.strategy.describe()}): export the "
                        "adapters with `melama convert export-peft`, or merged into their base with --merge-lora")
    if merge_lora and not adapters:
        raise UserError(f"--merge-lora: {source.folder} holds no LoRA adapters (its config.yaml has no "
                        "peft.method: lora)")
    carried = source.tokenizer(tokenizer, allow_tokenizer_mismatch)
    if carried is None and require_tokenizer:
        raise CheckpointError(f"{source.folder}: its config.yaml names no tokenizer (data.tokenizer; an import of a "
                              "Hugging Face folder without tokenizer.model has none): export it with `melama convert "
                              f"export-hf --ckpt {source.folder} --tokenizer TOKENIZER --out DIR` and use DIR")
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
        log.warning("tokenizer: none: %s names no tokenizer (nor had the Hugging Face folder it was imported from); the export holds the "
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
                       base_model_name_or_path: str | None, dtype: torch.dtype | None = None, *,
                       tokenizer: Path | None = None, chat_template: dict | None = None) -> None:
    """A Hugging Face PEFT adapter folder at `out` (adapter_config.json + adapter_model.safetensors),
    which `peft.PeftModel.from_pretrained` loads on the exported base, from the global adapter
    tensors of the `peft:` settings; atomically (nothing appears there unless complete; an existing
    `out` is refused). `dtype`: of the written tensors (default: as given). `tokenizer` and
    `chat_template` (a tuned run's) are written beside them (copy_tokenizer)."""
    from safetensors.torch import save_file

    strategy = strategy_for(peft)
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous()
               for k, v in strategy.to_peft(adapters, arch).items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(strategy.peft_config(base_model_name_or_path), indent=2))
        if tokenizer is not None or chat_template is not None:
            copy_tokenizer(tokenizer, tmp, chat_template)


def hf_weights_differ(base: Checkpoint, hf_dir: Path) -> str | None:
    """Why Hugging Face folder `hf_dir` does not hold the weights of checkpoint `base`, or None. Its
    architecture must be the base's, and its RMSNorm weights equal the base's in its dtype (an export
    or an import of the base holds exactly those): a cheap test that tells another model, or the
    same model before or after further training, from the base. (LoRA leaves the norms alone: a
    merged export of adapters trained on the base passes.)"""
    hf = HFCheckpoint(hf_dir)
    try:
        arch = sda.arch_from_hf_config(hf.config)
    except UserError as err:
        return str(err)
    theirs = {**dataclasses.asdict(arch), "max_position_embeddings": None}
    mine = {**dataclasses.asdict(base.arch), "max_position_embeddings": None}
    if theirs != mine:
        field = next(k for k in mine if mine[k] != theirs[k])
        return f"its config.json describes another model ({field} {theirs[field]}, the base's {mine[field]})"
    reader, _, _ = base.weights()
    norms = reader.tensors([sda.FINAL_NORM, sda.ATTN_NORM, sda.MLP_NORM])
    pairs = [("model.norm.weight", norms[sda.FINAL_NORM])]
    for layer in range(arch.num_layers):
        names = sda.hf_layer_names(layer)
        pairs += [(names["input_norm"], norms[sda.ATTN_NORM][layer]), (names["post_norm"], norms[sda.MLP_NORM][layer])]
    for name, ours in pairs:
        stored = hf.read(name, ())
        if not torch.equal(ours.to(stored.dtype), stored):
            return f"its {name} differs from the base's: other weights"
    return None


def peft_base_name(base: Checkpoint, base_hf: str | None) -> str | None:
    """What adapter_config.json names as `base_model_name_or_path`, the model PEFT's
    AutoPeftModelForCausalLM loads the adapter on: `base_hf` (a Hugging Face folder holding the base's
    weights, checked; or a Hub model id, taken as given), else the folder the base was imported from
    (model_identity.json records it) while it still holds those weights, else None (PeftModel loads
    the adapter on a base it is given)."""
    if base_hf is not None:
        path = Path(base_hf)
        if not path.exists():
            if HUB_ID.fullmatch(base_hf) and not path.parent.exists():  # "outputs/base-hf" with outputs/ here: a path
                log.info("--base-hf %s: a Hugging Face Hub model id, named as given", base_hf)
                return base_hf
            raise UserError(f"--base-hf {base_hf} does not exist: give the Hugging Face folder of the base (`melama "
                            f"convert export-hf --ckpt {base.folder} --out BASE_HF`), or its Hub model id")
        problem = hf_weights_differ(base, path)
        if problem is not None:
            raise UserError(f"--base-hf {base_hf} is not the base the adapters were trained on, {base.folder}: "
                            f"{problem}. Give its export (`melama convert export-hf --ckpt {base.folder} --out "
                            "BASE_HF`)")
        return str(path.resolve())
    source = (base.identity or {}).get(HF_SOURCE)
    if source is not None and Path(source).is_dir():
        try:
            problem = hf_weights_differ(base, Path(source))
        except UserError as err:  # no longer a readable Hugging Face folder
            problem = str(err)
        if problem is None:
            log.info("adapter_config.json names the Hugging Face folder the base was imported from, %s", source)
            return source
        log.warning("%s, which the base %s was imported from, changed since (%s)", source, base.folder, problem)
    log.warning("adapter_config.json names no base model: %s is not an import of a Hugging Face folder that is still "
                "here. Pass --base-hf (its export: `melama convert export-hf --ckpt %s --out BASE_HF`) so that "
                "AutoPeftModelForCausalLM.from_pretrained loads the adapter on it", base.folder, base.folder)
    return None


def export_peft(ckpt: Path, out: Path, base: Path | None = None, base_hf: str | None = None) -> None:
    """A Hugging Face PEFT adapter folder from an adapter checkpoint (saved at any TP/PP); its
    adapter_config.json names the Hugging Face base (`peft_base_name`)."""
    source = open_checkpoint(ckpt)
    if source.kind != ADAPTERS:
        raise UserError(f"{source.folder} holds no LoRA adapters (its config.yaml has no peft.method: lora): "
                        "export a model with `melama convert export-hf`")
    base_model = source.base(base)
    adapters = source.own_tensors()
    log.info("%s (%s), trained on the base %s", source.strategy.name, source.strategy.settings(), base_model.folder)
    hf_base = peft_base_name(base_model, base_hf)
    # The tokenizer (and the tuning template) go into the adapter folder: AutoTokenizer reads it there.
    write_peft_adapter(out, adapters, source.arch, source.cfg.peft, hf_base,
                       tokenizer=source.tokenizer(), chat_template=source.cfg.data.chat_template)
    if hf_base is not None:
        log.info("load it with peft.AutoPeftModelForCausalLM.from_pretrained(%r)", str(out))
    else:
        log.info("load it with peft.PeftModel.from_pretrained(base, %r) on that base exported by "
                 "`melama convert export-hf --ckpt %s --out BASE_HF`", str(out), base_model.folder)
