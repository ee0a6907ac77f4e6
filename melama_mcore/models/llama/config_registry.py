"""LLaMA-2 architectures by name. A recipe picks one with `model.preset` and may override fields."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
