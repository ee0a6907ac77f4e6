"""Full training: every weight trains, checkpoints hold them all (continual pre-training, full
fine-tuning). The strategy that changes nothing."""

from __future__ import annotations

from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import flops_per_token


class FullTraining:
    method = "none"
    name = "full training"
    trained = "every weight"
    checkpoint_holds_base = True
    trains_base = True
    adapters = None
    default_optimizer_format = "dp_reshardable"  # Megatron-LM's: no gather at save
    megatron_linears_only = None

    def __init__(self, peft=None):
        """Full training has no settings of its own (the rest of `peft:` does not apply)."""

    def describe(self) -> str:
        return self.name

    def config_problems(self, cfg) -> list[str]:
        return []

    def apply(self, chunks: list, seed: int) -> None:
        pass

    def owns_key(self, key: str) -> bool:
        return False

    def trainable_shapes(self, arch, padded_vocab: int) -> dict[str, tuple[int, ...]]:
        return sda.megatron_shapes(arch, padded_vocab)

    def flops_per_token(self, arch, seq_length: int, padded_vocab: int) -> float:
        return flops_per_token(arch, seq_length, padded_vocab)

    def identity(self, cfg) -> dict | None:
        return None
