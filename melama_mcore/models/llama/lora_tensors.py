"""LoRA adapters as global tensors, without megatron: their keys, shapes and settings, the fused B of
a fused megatron module, and merging into base weights (export-hf --merge-lora). The layers that
train them are lora.py's; the converter and the strategy registry use this module without building
a model (and without importing megatron).

Adapter tensors have their own global keys (`<layer key>.lora.<hf module>.lora_A|lora_B`, decoder
layers stacked like the base), so an adapter checkpoint saved at one TP/PP layout loads at any other.
One adapter per Hugging Face module the megatron module stands for (lora.py says why):

    linear_qkv   -> q_proj, k_proj, v_proj   column-parallel, rows fused per query group
    linear_proj  -> o_proj                   row-parallel
    linear_fc1   -> gate_proj, up_proj       column-parallel, rows fused gate | up (per TP rank)
    linear_fc2   -> down_proj                row-parallel
    output_layer -> lm_head                  column-parallel, vocabulary padded
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from melama_mcore.errors import ConfigError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch

# Recipe name (`peft.target_modules`) -> the module's global key prefix in a checkpoint.
TARGETS = {
    "linear_qkv": "decoder.layers.self_attention.linear_qkv",
    "linear_proj": "decoder.layers.self_attention.linear_proj",
    "linear_fc1": "decoder.layers.mlp.linear_fc1",
    "linear_fc2": "decoder.layers.mlp.linear_fc2",
    "output_layer": "output_layer",
}
# The Hugging Face modules each target stands for, in megatron's fused row order.
PIECES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
    "output_layer": ("lm_head",),
}
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1", "output_layer")
MATRICES = ("lora_A", "lora_B")
LAYER_PREFIX = "decoder.layers."


# ---------------------------------------------------------------------------------------------
# Settings (the recipe's `peft:` section with peft.method=lora)
# ---------------------------------------------------------------------------------------------
def check_lora_settings(peft) -> None:
    """A ConfigError naming the key for LoRA settings this module cannot honour. `peft` has the
    recipe's `peft:` fields: rank, alpha, dropout, target_modules."""
    if isinstance(peft.rank, bool) or not isinstance(peft.rank, int) or peft.rank < 1:
        raise ConfigError(f"peft.rank must be a positive integer, got {peft.rank!r}")
    if isinstance(peft.alpha, bool) or not isinstance(peft.alpha, (int, float)) or not peft.alpha > 0:
        raise ConfigError(f"peft.alpha must be a positive number, got {peft.alpha!r}")
    if isinstance(peft.dropout, bool) or not isinstance(peft.dropout, (int, float)) or not 0 <= peft.dropout < 1:
        raise ConfigError(f"peft.dropout must be in [0, 1), got {peft.dropout!r}")
    targets = list(peft.target_modules or [])
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise ConfigError(f"peft.target_modules must be a non-empty list of distinct names among "
                          f"{', '.join(TARGETS)}, got {peft.target_modules!r}")


def lora_scaling(peft) -> float:
    """PEFT's scaling of the adapter output (no rsLoRA)."""
    return peft.alpha / peft.rank


def target_order(peft) -> list[str]:
    """The configured targets in a canonical order (that of TARGETS)."""
    return [t for t in TARGETS if t in peft.target_modules]


# ---------------------------------------------------------------------------------------------
# Global adapter tensors: keys and shapes (what an adapter checkpoint stores)
# ---------------------------------------------------------------------------------------------
def adapter_key(target: str, piece: str, matrix: str) -> str:
    """Global key of one adapter tensor, e.g. decoder.layers.self_attention.linear_qkv.lora.q_proj.lora_A."""
    return f"{TARGETS[target]}.lora.{piece}.{matrix}"


def piece_shapes(arch: LlamaArch, padded_vocab: int) -> dict[str, tuple[int, int]]:
    """(out, in) of the base weight each Hugging Face piece stands for (lm_head: padded rows)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f), "lm_head": (padded_vocab, h)}


def adapter_shapes(arch: LlamaArch, peft, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Global shape of every adapter tensor of this configuration; decoder tensors are stacked over
    layers like the base (a leading axis of num_layers)."""
    shapes = {}
    pieces = piece_shapes(arch, padded_vocab)
    for target in target_order(peft):
        layers = (arch.num_layers,) if TARGETS[target].startswith(LAYER_PREFIX) else ()
        for piece in PIECES[target]:
            out, inp = pieces[piece]
            shapes[adapter_key(target, piece, "lora_A")] = (*layers, peft.rank, inp)
            shapes[adapter_key(target, piece, "lora_B")] = (*layers, out, peft.rank)
    return shapes


def is_adapter_key(key: str) -> bool:
    return ".lora." in key


# ---------------------------------------------------------------------------------------------
# The fused B: the pieces' B's as one block matrix in megatron's row order
# ---------------------------------------------------------------------------------------------
def fused_lora_B(target: str, lora_Bs: list[torch.Tensor], groups: int) -> torch.Tensor:
    """[fused out rows, rank * pieces]: piece i's B in column block i, rows arranged as megatron's
    fused weight (linear_qkv: per query group its q, k, v rows; linear_fc1: gate rows, then up rows).
    Then fused_lora_B(...) @ cat(A's) is the fused module's B @ A, and for activations u = cat(A_i x)
    F.linear(u, fused_lora_B(...)) is every piece's B_i u_i in the fused output layout. `groups`: the
    query groups the rows hold (all for global tensors, this rank's under TP)."""
    if len(lora_Bs) == 1:
        return lora_Bs[0]
    rank, n = lora_Bs[0].shape[1], len(lora_Bs)
    blocks = [F.pad(b, (i * rank, (n - 1 - i) * rank)) for i, b in enumerate(lora_Bs)]
    if target == "linear_qkv":
        return sda.qkv_grouped(*blocks, groups)
    return torch.cat(blocks)  # linear_fc1


# ---------------------------------------------------------------------------------------------
# Merging (export-hf --merge-lora), on global tensors
# ---------------------------------------------------------------------------------------------
MERGEABLE = {sda.QKV: "linear_qkv", sda.PROJ: "linear_proj", sda.FC1: "linear_fc1", sda.FC2: "linear_fc2",
             sda.OUTPUT: "output_layer"}


def merge_lora(tensors: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], arch: LlamaArch, peft,
               layer: int | None = None) -> dict[str, torch.Tensor]:
    """Base tensors with the adapters folded in: W + alpha / rank * B @ A, computed in fp32 and
    returned in W's dtype. `tensors` maps state_dict_adapter keys to global megatron tensors: one
    decoder layer's slices (QKV, PROJ, FC1, FC2; `layer` its index), as checkpoint.dcp_stream's
    DistCheckpointReader.layer gives them, or the output layer (OUTPUT, `layer` None). `adapters` are
    global adapter tensors by adapter_key. Keys without adapters pass through. The output layer's
    rows beyond the vocabulary are padding: the adapter's, stored at another TP, may be longer or
    shorter, and only the real rows are merged."""
    merged = dict(tensors)
    targets = set(target_order(peft))
    for key, weight in tensors.items():
        target = MERGEABLE.get(key)
        if target not in targets:
            continue
        pick = (lambda t: t[layer]) if layer is not None else (lambda t: t)
        As = [pick(adapters[adapter_key(target, p, "lora_A")]).float() for p in PIECES[target]]
        Bs = [pick(adapters[adapter_key(target, p, "lora_B")]).float() for p in PIECES[target]]
        rows = arch.vocab_size if target == "output_layer" else weight.shape[0]
        if target == "output_layer":
            Bs = [b[:rows] for b in Bs]
        delta = fused_lora_B(target, Bs, arch.num_query_groups) @ torch.cat(As) * lora_scaling(peft)
        out = weight.float().clone()
        out[:rows] += delta
        merged[key] = out.to(weight.dtype)
    return merged
