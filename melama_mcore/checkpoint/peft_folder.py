"""Hugging Face PEFT adapter folders (adapter_config.json + adapter_model.safetensors or .bin), read
by any part of the project that takes one (`melama eval --adapter`), written by `melama convert
export-peft` (convert.py).

    check_peft_adapter(folder)   the adapter's config, once its weights are known to agree with it

peft itself reports a config whose LoRA rank `r` disagrees with the weights as a size-mismatch
traceback deep inside loading; here it is one line naming both files, found from the files'
headers (no tensor is read).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from melama_mcore.checkpoint.hf_folder import read_json_object
from melama_mcore.checkpoint.integrity import first_line, refusal_reason
from melama_mcore.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
# PEFT's LoRA tensor names: <module path>.lora_A[.<adapter name>].weight (linear layers), or
# <module path>.lora_embedding_A[.<adapter name>] (embeddings); A is [r, in], B is [out, r] (the
# embedding's A and B are stored [r, vocab] and [hidden, r] too).
_LORA_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<matrix>[AB])(?:\.[\w-]+)?(?:\.weight)?$")


def _read_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    return read_json_object(path)


def adapter_shapes(folder: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The adapter's weights file and its tensors' shapes, from the safetensors header (a .bin is
    mapped with torch's weights_only loader: a pickle that holds more than tensors is refused)."""
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(weights, "pt") as f:
                return weights, {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except SafetensorError as err:
            raise CheckpointError(f"{weights} is not a complete safetensors file ({err}): a truncated or damaged "
                                  "copy? Copy or export it again") from None
        except OSError as err:
            raise CheckpointError(f"cannot read {weights}: {err.strerror or err}") from None
    weights = folder / ADAPTER_WEIGHTS_BIN
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}: not a PEFT adapter folder")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{weights} holds more than tensors ({refusal_reason(err)}) and is not loaded: such a "
                              "pickle can run code") from None
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot read {weights}: {first_line(err)}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{weights}: expected a mapping of tensor names to tensors")
    return weights, {name: tuple(t.shape) for name, t in state.items()}


def _configured_rank(config: dict, module: str) -> int:
    """The rank PEFT gives `module`: its rank_pattern's first key that names the module's path (or
    its end), else `r`."""
    for key, rank in (config.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return rank
    return config["r"]


def check_peft_adapter(folder: Path) -> dict:
    """The adapter_config.json of PEFT adapter `folder`, after checking that its LoRA weights are
    the rank it says (`r`, or its `rank_pattern`): every lora_A is [r, in], every lora_B [out, r].
    A CheckpointError names both files otherwise, and what to do. Non-LoRA adapters are returned
    unchecked (peft checks its other methods itself)."""
    config = _read_config(folder)
    if config.get("peft_type") != "LORA":
        return config
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: r must be a positive integer (the LoRA rank), got {rank!r}")
    weights, shapes = adapter_shapes(folder)
    for name, shape in sorted(shapes.items()):
        match = _LORA_TENSOR.match(name)
        if match is None or len(shape) != 2:
            continue
        module, matrix = match["module"], match["matrix"]
        found = shape[0] if matrix == "A" else shape[1]
        expected = _configured_rank(config, module.removeprefix("base_model.model."))
        if found != expected:
            said = "r" if expected == rank else "rank_pattern"
            raise CheckpointError(
                f"{folder}: {ADAPTER_CONFIG} says {said} {expected}, but {weights.name} holds rank-{found} "
                f"matrices ({name} is {list(shape)}): the config and the weights come from different adapters. "
                f"Put the adapter's own {ADAPTER_CONFIG} beside its weights (or export it again)")
    return config
