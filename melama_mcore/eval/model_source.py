"""`--model` and `--adapter` -> what lm-eval loads.

PATH is a Hugging Face folder (config.json, weights, tokenizer) used as it is, or one of this
project's megatron checkpoints at any TP/PP layout (a run folder, its checkpoints/ folder, one
iter_* folder, a weights-only import), which is exported to a temporary Hugging Face folder by the
checkpoint room's converter (what `melama convert export-hf` runs; it carries the run's tokenizer)
and removed afterwards.
This module is the one place that reaches into the checkpoint code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from melama_mcore.checkpoint.convert import export_hf
from melama_mcore.checkpoint.layout import find_checkpoint
from melama_mcore.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def locate(path: Path) -> Path | None:
    """None for a Hugging Face folder (checked for a tokenizer), else the megatron checkpoint folder."""
    if not path.exists():
        raise UserError(f"--model {path} does not exist")
    if is_hf_folder(path):
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"--model {path}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) beside config.json")
        return None
    return find_checkpoint(path)


@contextlib.contextmanager
def hf_folder(path: Path, scratch: Path) -> Iterator[Path]:
    """The Hugging Face folder to evaluate: PATH itself, or a megatron checkpoint's export into a
    temporary folder under `scratch` (deleted on exit, also after a failure)."""
    ckpt = locate(path)
    if ckpt is None:
        yield path
        return
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=scratch))
    try:
        log.info("exporting megatron checkpoint %s to a temporary Hugging Face folder", ckpt)
        export_hf(ckpt, tmp / "model", require_tokenizer=True)
        yield tmp / "model"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
