"""LoRA: the base frozen, adapters trained (models/llama/lora.py: the layers; lora_tensors.py: the
global tensors; peft_adapter.py: the Hugging Face PEFT mapping). Checkpoints hold the adapters only
and name their base (checkpoint.init_from).

megatron is imported when adapters are added to a model, not before: the converter and `melama
eval` read adapter checkpoints through this strategy without building a model.
"""

from __future__ import annotations

import dataclasses
import math

from melama_mcore.models.llama import peft_adapter
from melama_mcore.models.llama.config_registry import forward_flops_per_token
from melama_mcore.models.llama.lora_tensors import (adapter_shapes, check_lora_settings, is_adapter_key, merge_lora,
                                                    target_order)


class LoRA:
    method = "lora"
    name = "LoRA"
    trained = "LoRA adapters"
    checkpoint_holds_base = False
    trains_base = False
    default_optimizer_format = "fully_reshardable"  # the adapters' state is small: gather it, reshard anywhere
    megatron_linears_only = "LoRA adapts megatron's own linears"

    def __init__(self, peft):
        check_lora_settings(peft)
        self.peft = self.adapters = peft

    def describe(self) -> str:
        return f"LoRA rank {self.peft.rank}"

    def settings(self) -> str:
        return f"rank {self.peft.rank}, alpha {self.peft.alpha:g}, {', '.join(target_order(self.peft))}"

    def config_problems(self, cfg) -> list[str]:
        problems = []
        if not cfg.checkpoint.init_from:
            problems.append("peft.method=lora trains adapters on a base model: set checkpoint.init_from to it (a "
                            "`melama convert import-hf` output or a run)")
        if cfg.model.backend not in ("auto", "native", "local"):
            problems.append("peft.method=lora adapts megatron's own linears: use model.backend=native or local "
                            "(Transformer Engine's fused modules are not supported)")
        return problems

    # -- the model ----------------------------------------------------------------------------------
    def apply(self, chunks: list, seed: int) -> None:
        from melama_mcore.models.llama.lora import apply_lora  # megatron's layers: only with a model

        apply_lora(chunks, self.peft, seed=seed)

    def owns_key(self, key: str) -> bool:
        return is_adapter_key(key)

    def trainable_shapes(self, arch, padded_vocab: int) -> dict[str, tuple[int, ...]]:
        return adapter_shapes(arch, self.peft, padded_vocab)

    def flops_per_token(self, arch, seq_length: int, padded_vocab: int) -> float:
        """Frozen linears compute no weight gradient (2 of full training's 3 passes; core attention's
        backward is unchanged), and every adapter parameter costs 6 FLOPs per token."""
        layer, core_attention, output = forward_flops_per_token(arch, seq_length, padded_vocab)
        adapters = sum(math.prod(shape) for shape in self.trainable_shapes(arch, padded_vocab).values())
        return arch.num_layers * (2 * layer + core_attention) + 2 * output + 6 * adapters

    def identity(self, cfg) -> dict:
        return {**dataclasses.asdict(self.peft), "base": cfg.checkpoint.init_from}

    # -- adapter checkpoints leaving the project --------------------------------------------------------
    def check_own_tensors(self, tensors, arch) -> int:
        return peft_adapter.check_adapters(tensors, arch, self.peft)

    def merge(self, tensors, own, arch, layer):
        return merge_lora(tensors, own, arch, self.peft, layer)

    def to_peft(self, own, arch):
        return peft_adapter.to_peft(own, arch, self.peft)

    def from_peft(self, tensors, arch, padded_vocab: int):
        return peft_adapter.from_peft(tensors, arch, self.peft, padded_vocab)

    def peft_config(self, base_model_name_or_path: str) -> dict:
        return peft_adapter.peft_adapter_config(self.peft, base_model_name_or_path)
