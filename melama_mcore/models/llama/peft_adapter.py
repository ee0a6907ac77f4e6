"""LoRA adapters <-> Hugging Face PEFT adapter folders (`adapter_config.json` +
`adapter_model.safetensors`), which `peft.PeftModel.from_pretrained` loads on the exported base.

The framework's adapters are PEFT's tensor for tensor (see lora.py: one adapter per Hugging Face
module, each B in Hugging Face's row order), so the mapping is a renaming, the decoder tensors
unstacked per layer, and the padding rows of lm_head's B stripped (added back on the way in):

    decoder.layers.self_attention.linear_qkv.lora.q_proj.lora_A [L, r, h]
        -> base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight [r, h]
    output_layer.lora.lm_head.lora_B [padded vocab, r] -> base_model.model.lm_head.lora_B.weight [vocab, r]

The inputs are global (unsharded) tensors keyed by lora_tensors.adapter_key: what an adapter
dist-checkpoint stores, read at whatever TP/PP it was saved with. No peft import is needed to write a
folder (checkpoint/convert.py writes it).
"""

from __future__ import annotations

import torch

from melama_mcore.errors import CheckpointError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch
from melama_mcore.models.llama.lora_tensors import (LAYER_PREFIX, MATRICES, PIECES, TARGETS, adapter_key,
                                                    adapter_shapes, target_order)


def hf_module(piece: str, layer: int | None) -> str:
    """The Hugging Face module path of an adapter piece, e.g. model.layers.3.self_attn.q_proj."""
    if piece == "lm_head":
        return "lm_head"
    return sda.hf_layer_names(layer)[piece.removesuffix("_proj")].removesuffix(".weight")


def peft_key(piece: str, layer: int | None, matrix: str) -> str:
    """The tensor name PEFT saves (the adapter name removed), e.g.
    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.{hf_module(piece, layer)}.{matrix}.weight"


def peft_target_modules(peft) -> list[str]:
    return [piece for target in target_order(peft) for piece in PIECES[target]]


def peft_adapter_config(peft, base_model_name_or_path: str) -> dict:
    """adapter_config.json: plain LoRA on the Hugging Face module names, fields PEFT has long known."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": peft.rank, "lora_alpha": peft.alpha, "lora_dropout": peft.dropout,
        "target_modules": peft_target_modules(peft), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "modules_to_save": None, "inference_mode": True,
    }


def _layers(target: str, arch: LlamaArch) -> list[int | None]:
    return list(range(arch.num_layers)) if TARGETS[target].startswith(LAYER_PREFIX) else [None]


def check_adapters(adapters: dict[str, torch.Tensor], arch: LlamaArch, peft) -> int:
    """Every adapter tensor of the configuration is there with its global shape, nothing else;
    returns the lm_head B's (padded) rows."""
    lm_head_B = adapter_key("output_layer", "lm_head", "lora_B")
    padded = adapters[lm_head_B].shape[0] if lm_head_B in adapters else arch.vocab_size
    expected = adapter_shapes(arch, peft, padded)
    missing = [k for k in expected if k not in adapters]
    unexpected = [k for k in adapters if k not in expected]
    if missing or unexpected:
        problem = f"no tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise CheckpointError(f"adapters: {problem} (rank {peft.rank}, targets {', '.join(target_order(peft))})")
    for key, shape in expected.items():
        if tuple(adapters[key].shape) != shape:
            raise CheckpointError(f"adapters: {key} is {list(adapters[key].shape)}, expected {list(shape)} "
                                  f"for this model and rank {peft.rank}")
    if padded < arch.vocab_size:
        raise CheckpointError(f"adapters: {lm_head_B} has {padded} rows, fewer than the vocabulary ({arch.vocab_size})")
    return padded


def to_peft(adapters: dict[str, torch.Tensor], arch: LlamaArch, peft) -> dict[str, torch.Tensor]:
    """Global adapter tensors -> PEFT's adapter_model.safetensors tensors (views, in their dtype)."""
    check_adapters(adapters, arch, peft)
    out = {}
    for target in target_order(peft):
        for piece in PIECES[target]:
            for matrix in MATRICES:
                tensor = adapters[adapter_key(target, piece, matrix)]
                for layer in _layers(target, arch):
                    value = tensor if layer is None else tensor[layer]
                    if piece == "lm_head" and matrix == "lora_B":
                        value = value[: arch.vocab_size]
                    out[peft_key(piece, layer, matrix)] = value
    return out


def from_peft(tensors: dict[str, torch.Tensor], arch: LlamaArch, peft, padded_vocab: int) -> dict[str, torch.Tensor]:
    """The inverse: PEFT's tensors -> global adapter tensors, lm_head's B zero-padded to
    `padded_vocab` rows (a PEFT adapter trained elsewhere, into this framework)."""
    out = {}
    for target in target_order(peft):
        for piece in PIECES[target]:
            for matrix in MATRICES:
                layers = _layers(target, arch)
                names = [peft_key(piece, layer, matrix) for layer in layers]
                missing = [n for n in names if n not in tensors]
                if missing:
                    raise CheckpointError(f"PEFT adapter: no tensor {missing[0]}")
                value = tensors[names[0]] if layers == [None] else torch.stack([tensors[n] for n in names])
                if piece == "lm_head" and matrix == "lora_B":
                    value = torch.cat([value, value.new_zeros(padded_vocab - value.shape[0], value.shape[1])])
                out[adapter_key(target, piece, matrix)] = value
    check_adapters(out, arch, peft)
    return out
