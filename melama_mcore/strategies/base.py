"""What a training strategy is: the one object that says which weights a run trains, and what follows
from that for the model, its checkpoints, its FLOPs and its start-up checks.

The trainer, the checkpointer, the exporter, the benchmark and the planner ask the strategy, never
the recipe's `peft.method` (strategies/__init__.py maps that to a strategy, once). Modelled on
torchtitan's model converters (convert the model, filter the converter's own state-dict keys, adapt
them to an external format):

    apply(chunks)          before megatron's DDP wrap: freeze, add modules (LoRA adapters), ...
    owns_key(key)          the state-dict keys the strategy added (LoRA: `.lora.`); nothing for full training
    checkpoint_holds_base  True: this run's checkpoints hold every weight. False: only its own keys,
                           and the frozen rest (the base) always comes from checkpoint.init_from: an
                           "adapter checkpoint", which names its base
    flops_per_token        the FLOPs one trained token costs as this strategy trains (MFU everywhere)

A strategy whose checkpoints hold only its own tensors (`AdapterStrategy`) also says how they leave
the project: checked, merged into the base (export-hf --merge-lora), or as a Hugging Face PEFT folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from melama_mcore.config.job_config import JobConfig, PeftConfig
    from melama_mcore.models.llama.config_registry import LlamaArch


class TrainingStrategy(Protocol):
    method: str  # the recipe's peft.method that selects it
    name: str  # for logs
    trained: str  # what trains, in a few words ("LoRA adapters")
    checkpoint_holds_base: bool
    trains_base: bool  # the base weights get gradients and optimizer state (planner memory, FLOPs)
    adapters: PeftConfig | None  # the LoRA adapters it adds (their settings), or None
    default_optimizer_format: str  # checkpoint.optimizer_format when `auto`
    megatron_linears_only: str | None  # why it needs megatron's own linears (no TE fused modules), or None

    def describe(self) -> str:
        """A few words for messages and logs, e.g. "LoRA rank 16"."""

    def config_problems(self, cfg: JobConfig) -> list[str]:
        """What this strategy needs of the rest of the recipe, each with what to change."""

    def apply(self, chunks: list, seed: int) -> None:
        """Change the unwrapped model chunks in place, before megatron's DDP wrap (so that DDP gives
        gradient buffers, and the optimizer state, to the trained parameters only)."""

    def owns_key(self, key: str) -> bool:
        """Whether a model state-dict key is one the strategy added."""

    def trainable_shapes(self, arch: LlamaArch, padded_vocab: int) -> dict[str, tuple[int, ...]]:
        """Global shapes of the trained tensors (checkpoint keys)."""

    def flops_per_token(self, arch: LlamaArch, seq_length: int, padded_vocab: int) -> float:
        """Model FLOPs of one trained token, forward and backward, Megatron's convention."""

    def identity(self, cfg: JobConfig) -> dict | None:
        """What a checkpoint records of the strategy beside the architecture (model_identity.json),
        or None when the weights mean what they would without it."""


class AdapterStrategy(TrainingStrategy, Protocol):
    """A strategy whose checkpoints hold its own tensors only (checkpoint_holds_base False)."""

    def settings(self) -> str:
        """Its settings in a few words, for logs ("rank 16, alpha 32, linear_qkv, linear_proj")."""

    def check_own_tensors(self, tensors: dict[str, torch.Tensor], arch: LlamaArch) -> int:
        """Every own tensor of the settings is there with its global shape, nothing else; returns the
        output layer's padded rows."""

    def merge(self, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor], arch: LlamaArch,
              layer: int | None) -> dict[str, torch.Tensor]:
        """Base tensors (one decoder layer's, or the output layer's: layer None) with the own tensors folded in."""

    def to_peft(self, own: dict[str, torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
        """The own tensors as a Hugging Face PEFT adapter's tensors."""

    def from_peft(self, tensors: dict[str, torch.Tensor], arch: LlamaArch, padded_vocab: int
                  ) -> dict[str, torch.Tensor]:
        """The inverse of to_peft."""

    def peft_config(self, base_model_name_or_path: str) -> dict:
        """The PEFT adapter's adapter_config.json."""
