"""LLaMA-2 architectures by name. A recipe picks one with `model.preset` and may override fields."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from melama_mcore.errors import ConfigError

if TYPE_CHECKING:
    from melama_mcore.config.job_config import ModelConfig


@dataclass(frozen=True)
class LlamaArch:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads (GQA); = heads for multi-head attention
    ffn_hidden_size: int
    vocab_size: int | None  # None: taken from the tokenizer (tiny presets trained on the demo corpus)
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, LlamaArch] = {
    "llama2-7b": LlamaArch(32, 4096, 32, 32, 11008, 32000),
    "llama2-13b": LlamaArch(40, 5120, 40, 40, 13824, 32000),
    "llama2-70b": LlamaArch(80, 8192, 64, 8, 28672, 32000),
    # CPU sizes: GQA kept (2 KV groups) so every code path of the 70B layout is exercised.
    "tiny": LlamaArch(4, 128, 4, 2, 352, None, max_position_embeddings=256),
    "nano": LlamaArch(4, 64, 4, 2, 176, None, max_position_embeddings=128),
}


def parameter_count(arch: LlamaArch, vocab_size: int | None = None) -> int:
    """Exact parameter count of the unpadded model (embeddings and output layer untied)."""
    v = vocab_size or arch.vocab_size
    h, f = arch.hidden_size, arch.ffn_hidden_size
    kv = arch.num_query_groups * arch.head_dim
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o
    mlp = 3 * h * f  # gate, up, down
    layer = attention + mlp + 2 * h  # two RMSNorm weights
    return arch.num_layers * layer + h + 2 * v * h  # + final norm, embedding, output layer


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Embedding rows actually allocated: a multiple of divisible_by x TP (as Megatron-LM pads)."""
    multiple = divisible_by * tp
    return math.ceil(vocab_size / multiple) * multiple


def flops_per_token(arch: LlamaArch, seq_length: int, vocab_size: int) -> float:
    """Training model FLOPs per token (forward + backward), Megatron convention (see module doc).

    `vocab_size` is the output layer's width as built: pass the padded vocabulary,
    `output_vocab_size(cfg, arch)` (models/llama/model.py), as Megatron-LM does. It is required so that no caller
    silently counts the unpadded `arch.vocab_size`.

    Convention (Megatron's, stated so numbers can be compared): every GEMM counted as 2 x multiply-add
    FLOPs, x3 for forward + the two backward GEMMs, causal core attention halved (Megatron-LM since
    2025-03). Per token of a sequence of length s, per layer (h hidden, d_kv = KV groups x head_dim,
    f FFN): QKV 2h(h + 2 d_kv) + scores and context 2 x 2hs / 2 + output 2h^2 + SwiGLU MLP 6hf; plus
    the output layer 2hV. Activation recompute is not counted (it is not model FLOPs). torchtitan's
    6N + 12 L h s (no causal discount) gives a higher number for the same run."""
    h, f, s, v = arch.hidden_size, arch.ffn_hidden_size, seq_length, vocab_size
    d_kv = arch.num_query_groups * arch.head_dim
    per_layer = 2 * h * (h + 2 * d_kv) + 2 * h * s + 2 * h * h + 6 * h * f
    forward = arch.num_layers * per_layer + 2 * h * v
    return 3.0 * forward


def forward_flops_per_token(arch: LlamaArch, seq_length: int, vocab_size: int) -> tuple[float, float, float]:
    """(one decoder layer, its core attention, the output layer over `vocab_size` rows) forward FLOPs
    per token, derived from `flops_per_token` so that the convention lives in one place: what a
    strategy that trains part of the model (strategies/) and the planner count from."""
    no_layers = dataclasses.replace(arch, num_layers=0)
    total = flops_per_token(arch, seq_length, vocab_size)
    output = flops_per_token(no_layers, seq_length, vocab_size) / 3
    layer = (total / 3 - output) / arch.num_layers
    core_attention = (total - flops_per_token(arch, 0, vocab_size)) / 3 / arch.num_layers
    return layer, core_attention, output


def resolve_arch(model: "ModelConfig", tokenizer_vocab_size: int | None) -> LlamaArch:
    """The recipe's `model` section -> its architecture: the preset with the section's overrides
    applied; the vocabulary from the tokenizer when the preset has none."""
    if model.preset not in PRESETS:
        raise ConfigError(f"model.preset {model.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    arch = PRESETS[model.preset]
    fields = {f.name for f in dataclasses.fields(LlamaArch)}
    changes = {k: v for k, v in dataclasses.asdict(model).items() if k in fields and v is not None}
    arch = dataclasses.replace(arch, **changes)
    if arch.vocab_size is None:
        arch = dataclasses.replace(arch, vocab_size=tokenizer_vocab_size)
    if arch.vocab_size is None:
        raise ConfigError("model.vocab_size is not set and no tokenizer is configured (data.tokenizer)")
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > arch.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab_size} tokens but the model's vocabulary is "
            f"{arch.vocab_size}: use the model's tokenizer, or set model.vocab_size"
        )
    return arch
