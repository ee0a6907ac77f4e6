"""`--model`, `--adapter` and `--tokenizer` -> what lm-eval loads.

PATH is one of
- a Hugging Face folder (config.json, weights, tokenizer), used as it is (its weight files are read
  before anything else: a missing or truncated shard is named, not met deep inside loading);
- one of this project's megatron checkpoints at any TP/PP layout (a run folder, its checkpoints/
  folder, one iter_* folder, a weights-only import), exported to a temporary Hugging Face folder by
  the checkpoint room's converter (what `melama convert export-hf` runs: the run's tokenizer, and the
  chat template it was tuned with, in the tokenizer files);
- a LoRA run (an adapter checkpoint): its base, found through the run's checkpoint.init_from, is
  exported as above and its adapters as a PEFT adapter folder beside it (what `melama convert
  export-peft` writes, with the run's tokenizer and chat template), which lm-eval applies on the base.
  Exact: the base's weights stay as trained and the adapters apply as in training, where a merged
  export would round base plus adapters to the base's dtype (bf16 loses small adapter updates); and
  cheap: the adapters are megabytes, the base is exported either way.
A megatron checkpoint's tokenizer (its data.tokenizer, or --tokenizer) must have the vocabulary the
checkpoint recorded (model_identity.json), unless `allow_tokenizer_mismatch`. The temporary folder
(`.hf-export-*` under --out) is removed afterwards, also after a failure or an interrupt.
This module is the one place that reaches into the checkpoint code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from melama_mcore.checkpoint.convert import export_hf, write_peft_adapter
from melama_mcore.checkpoint.hf_folder import HFCheckpoint
from melama_mcore.checkpoint.opened import ADAPTERS, Checkpoint, open_checkpoint
from melama_mcore.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MISMATCH_FLAG = "--allow-tokenizer-mismatch"


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


@dataclass(frozen=True)
class ModelSource:
    """What --model names, checked: a Hugging Face folder (`checkpoint` None) or a megatron checkpoint
    (opened, its files not yet verified: the export verifies them) with the tokenizer it is read with
    (`tokenizer_given`: by --tokenizer, not its config)."""

    path: Path
    checkpoint: Checkpoint | None = None
    tokenizer: Path | None = None
    tokenizer_given: bool = False
    allow_tokenizer_mismatch: bool = False  # the user's --allow-tokenizer-mismatch (already checked by locate)

    @property
    def is_lora_run(self) -> bool:
        return self.checkpoint is not None and self.checkpoint.kind == ADAPTERS

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"{self.path} (Hugging Face folder)"
        if self.is_lora_run:
            return (f"{self.path} (LoRA run {self.checkpoint.folder}: its base "
                    f"{self.checkpoint.cfg.checkpoint.init_from} plus its adapters)")
        return f"{self.path} (megatron checkpoint {self.checkpoint.folder})"


def locate(path: Path, tokenizer: Path | None = None, allow_tokenizer_mismatch: bool = False) -> ModelSource:
    """--model PATH (and --tokenizer), checked before any work: a Hugging Face folder's tokenizer and
    weight files, a megatron checkpoint's config and tokenizer (its vocabulary against the one the
    checkpoint recorded)."""
    if not path.exists():
        raise UserError(f"--model {path} does not exist")
    if is_hf_folder(path):
        if tokenizer is not None:
            raise UserError(f"--tokenizer applies to a megatron checkpoint; the Hugging Face folder {path} is read "
                            "with its own tokenizer")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"--model {path}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) beside config.json")
        HFCheckpoint(path)  # every weight file listed is there and whole (their headers are read, not the tensors)
        return ModelSource(path)
    ckpt = open_checkpoint(path, tokenizer, verify=False)
    return ModelSource(path, ckpt, checkpoint_tokenizer(ckpt, tokenizer, allow_tokenizer_mismatch), tokenizer is not None,
                       allow_tokenizer_mismatch)


def checkpoint_tokenizer(ckpt: Checkpoint, override: Path | None, allow_mismatch: bool) -> Path:
    """The tokenizer a megatron checkpoint is evaluated with (by `melama eval` and `eval-ppl`): --tokenizer,
    else the run's; refused when there is none, or when its vocabulary is not the one the checkpoint
    recorded (Checkpoint.tokenizer, as for an export)."""
    if override is None and not ckpt.cfg.data.tokenizer:
        raise CheckpointError(f"{ckpt.folder}: its config.yaml names no tokenizer (data.tokenizer; an import "
                              "of a Hugging Face folder without tokenizer.model has none): pass --tokenizer "
                              "TOKENIZER, the one its weights were trained with")
    return ckpt.tokenizer(override, allow_mismatch)


@dataclass(frozen=True)
class EvalModel:
    """What lm-eval loads: a Hugging Face folder, and the PEFT adapter folder applied on it (a LoRA run's);
    `template_origin`: where the chat template in their tokenizer files comes from, for a temporary export."""

    hf_dir: Path
    adapter: Path | None = None
    template_origin: str | None = None


@contextlib.contextmanager
def hf_folder(source: ModelSource, scratch: Path) -> Iterator[EvalModel]:
    """The Hugging Face folder (and adapter) to evaluate: --model itself, or a megatron checkpoint's
    export into a temporary folder under `scratch`, removed on exit (see the module doc)."""
    ckpt = source.checkpoint
    if ckpt is None:
        yield EvalModel(source.path)
        return
    with _temporary_folder(scratch) as tmp:
        if not source.is_lora_run:
            log.info("exporting megatron checkpoint %s to a temporary Hugging Face folder", ckpt.folder)
            export_hf(ckpt.folder, tmp / "model", tokenizer=source.tokenizer if source.tokenizer_given else None,
                      require_tokenizer=True, allow_tokenizer_mismatch=source.allow_tokenizer_mismatch)
            yield EvalModel(tmp / "model", template_origin=_origin(ckpt, source.tokenizer))
            return
        run = open_checkpoint(ckpt.folder)  # its files verified now (the adapters are small)
        base = run.base()
        log.info("LoRA run %s: exporting its base %s (checkpoint.init_from) to a temporary Hugging Face folder, "
                 "its adapters (%s) as a PEFT adapter applied on it", run.folder, base.folder, run.strategy.settings())
        export_hf(base.folder, tmp / "model", tokenizer=source.tokenizer, require_tokenizer=True,  # the run's
                  allow_tokenizer_mismatch=source.allow_tokenizer_mismatch)
        write_peft_adapter(tmp / "adapter", run.own_tensors(), run.arch, run.cfg.peft, str(base.folder),
                           tokenizer=source.tokenizer, chat_template=run.cfg.data.chat_template)  # as export-peft
        yield EvalModel(tmp / "model", tmp / "adapter", _origin(run, source.tokenizer))


def _origin(ckpt: Checkpoint, tokenizer: Path) -> str:
    """Where the template an export carries comes from: the run's config, else its tokenizer's own."""
    if ckpt.cfg.data.chat_template is not None:
        return f"data.chat_template in {ckpt.folder / 'config.yaml'}, exported with the model"
    return f"the chat template of its tokenizer {tokenizer}, exported with the model"


@contextlib.contextmanager
def _temporary_folder(scratch: Path) -> Iterator[Path]:
    """A `.hf-export-*` folder under `scratch`, removed on exit, also after a failure or an interrupt
    (`melama eval` turns SIGTERM into one); while it is removed, Ctrl-C and SIGTERM wait."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=scratch))
    try:
        yield tmp
    finally:
        with _signals_held():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM ignored inside (in the main thread; elsewhere handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def model_config(hf_dir: Path) -> dict:
    try:
        return json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{hf_dir / 'config.json'}: cannot read it ({type(err).__name__})") from None


# ---------------------------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------------------------
def _module_dims(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LLaMA projection a LoRA adapter can target."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    ffn = config["intermediate_size"]
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn),
            "down_proj": (ffn, hidden)}


def _adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    weights = adapter / "adapter_model.safetensors"
    try:
        if weights.is_file():
            from safetensors import safe_open

            with safe_open(weights, "pt") as f:
                return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        import torch

        state = torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True, mmap=True)
        return {name: tuple(t.shape) for name, t in state.items()}
    except FileNotFoundError:
        raise UserError(f"--adapter {adapter}: no adapter_model.safetensors or adapter_model.bin") from None
    except Exception as err:  # a damaged file: safetensors and torch raise their own types
        raise UserError(f"--adapter {adapter}: cannot read its weights ({type(err).__name__})") from None


LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
LORA_MATRIX = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def read_adapter_config(adapter: Path) -> dict:
    """The adapter folder's adapter_config.json."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{config_path}: not valid JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    return config


def check_adapter_rank(adapter: Path, adapter_config: dict) -> None:
    """Each LoRA matrix has the rank adapter_config.json gives its module (`r`, or the `rank_pattern`
    entry that names it): peft builds the layers from the config, then fails on the weights with a
    size-mismatch traceback per matrix."""
    if adapter_config.get("peft_type") != "LORA":
        return
    patterns = adapter_config.get("rank_pattern") or {}
    default = adapter_config.get("r", 8)  # peft's LoraConfig default
    for name, shape in _adapter_shapes(adapter).items():
        match = LORA_MATRIX.match(name)
        if not match or len(shape) != 2:
            continue
        module, which = match[1], match[2]
        # peft's rule (peft.utils.other.get_pattern_key): the first rank_pattern key that ends the module's name
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        rank = patterns[key] if key is not None else default
        got = shape[0] if which == "A" else shape[1]
        if got != rank:
            said = f"rank_pattern {key!r}" if key is not None else "r"
            raise UserError(f"--adapter {adapter}: its adapter_config.json gives {module} rank {rank} ({said}), but "
                            f"its lora_{which} has rank {got}: the config and the weights are of different adapters; "
                            "correct adapter_config.json or use the folder they were saved in together")


def check_adapter_fits(adapter: Path, adapter_config: dict, hf_dir: Path) -> None:
    """A LoRA adapter's matrices must fit the model's layers and projections (peft would otherwise fail
    deep inside loading, with a traceback). Other PEFT methods are left to peft."""
    if adapter_config.get("peft_type") != "LORA":
        return
    config = model_config(hf_dir)
    dims, layers = _module_dims(config), config["num_hidden_layers"]
    for name, shape in _adapter_shapes(adapter).items():
        match = LORA_KEY.search(name)
        if not match:
            continue
        layer, module, which = int(match[1]), match[2], match[3]
        if layer >= layers:
            raise UserError(f"--adapter {adapter} does not fit the model: it adapts layer {layer}, "
                            f"the model has {layers} layers")
        if module not in dims or len(shape) != 2:
            continue
        fan_in, fan_out = dims[module]
        got, want = (shape[1], fan_in) if which == "A" else (shape[0], fan_out)
        if got != want:
            raise UserError(f"--adapter {adapter} does not fit the model: {module} of layer {layer} has "
                            f"{'input' if which == 'A' else 'output'} size {want}, the adapter's lora_{which} "
                            f"{got} (an adapter trained on another base model)")
