"""Hugging Face LLaMA <-> this project's megatron checkpoints: names and layouts, in one place.

A megatron checkpoint stores each tensor by its global (unsharded) identity. Decoder layers are
stacked: `decoder.layers.<module>.weight` has a leading axis over all layers, saved as one chunk
per layer (and per tensor-parallel rank). The layout facts the mapping rests on:

* `linear_qkv` rows are grouped per query (KV) group: for each group its q heads, then its k head,
  then its v head. HF keeps q_proj, k_proj and v_proj separate.
* `linear_fc1` is gate rows then up rows (HF gate_proj, up_proj); megatron saves the gate and up
  halves as separate chunks, per TP rank.
* RMSNorm weights are saved under the (TE-compatible) key of the linear that follows them.
* The embedding and output layer are padded to `padded_vocab` rows (a TP-friendly multiple); the
  padding is zero on import and stripped on export.
* Each linear also has an `_extra_state` object per layer (None for our layers; TE's FP8 state
  otherwise), stored as `<key>/shard_<layer>_<num_layers>`.

Everything here is pure layout: reading and writing files is the checkpoint room's business
(melama_mcore/checkpoint/), chaining the two the converter's (melama_mcore/checkpoint/convert.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import torch

from melama_mcore.errors import CheckpointError
from melama_mcore.models.llama.config_registry import PRESETS, LlamaArch

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
ATTN_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
LAYER_KEYS = (ATTN_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def hf_layer_names(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    return {
        "input_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "post_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


def hf_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Every tensor of a HF LlamaForCausalLM (untied, no biases) in file order, with its shape."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for layer in range(arch.num_layers):
        n = hf_layer_names(layer)
        shapes.update({n["input_norm"]: (h,), n["q"]: (q, h), n["k"]: (kv, h), n["v"]: (kv, h), n["o"]: (h, q),
                       n["post_norm"]: (h,), n["gate"]: (f, h), n["up"]: (f, h), n["down"]: (h, f)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def megatron_shapes(arch: LlamaArch, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model tensors in a megatron checkpoint of this architecture."""
    h, f, d, n = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.num_layers
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    return {
        EMBEDDING: (padded_vocab, h),
        ATTN_NORM: (n, h),
        QKV: (n, q + 2 * kv, h),
        PROJ: (n, h, q),
        MLP_NORM: (n, h),
        FC1: (n, 2 * f, h),
        FC2: (n, h, f),
        FINAL_NORM: (h,),
        OUTPUT: (padded_vocab, h),
    }


# ---------------------------------------------------------------------------------------------
# HF config.json <-> LlamaArch
# ---------------------------------------------------------------------------------------------
def _rope_theta(config: dict) -> float:
    """RoPE base from a transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`) config;
    refuses any RoPE scaling (LLaMA-2 has none, and the trunk implements plain RoPE only)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or ({} if params.get("rope_type", "default") == "default" else params)
    if scaling:
        raise CheckpointError(f"config.json: RoPE scaling {scaling} is not supported (plain RoPE only)")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def arch_from_hf_config(config: dict) -> LlamaArch:
    """The LlamaArch of a HF LLaMA config.json; refuses what the trunk's model cannot represent,
    naming the field."""
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type") != "llama" or archs != ["LlamaForCausalLM"]:
        raise CheckpointError(f"config.json: model_type {config.get('model_type')!r}, architectures {archs}: "
                              "only LlamaForCausalLM is supported")
    for field, supported in (("attention_bias", False), ("mlp_bias", False), ("tie_word_embeddings", False),
                             ("hidden_act", "silu")):
        if config.get(field, supported) != supported:
            raise CheckpointError(f"config.json: {field}={config[field]!r} is not supported "
                                  f"(LLaMA-2 needs {supported!r})")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise CheckpointError(f"config.json: head_dim={config.get('head_dim')} is not "
                              "hidden_size / num_attention_heads")
    return LlamaArch(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads, ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], max_position_embeddings=config.get("max_position_embeddings", 4096),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)), rope_base=_rope_theta(config),
    )


def hf_config(arch: LlamaArch, dtype: torch.dtype) -> dict:
    """config.json for transformers' LlamaForCausalLM (written by hand: no transformers needed to export)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups, "head_dim": arch.head_dim, "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings, "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_base, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def matching_preset(arch: LlamaArch) -> str:
    """The preset a converted checkpoint's config.yaml names, for its reader: every architecture field
    (ARCH_FIELDS, the context length included) is written explicitly beside it, so the preset decides
    nothing. The one of the same shape and context if there is one, else of the same context, else
    of the same shape, else llama2-7b."""
    def shape(a: LlamaArch) -> tuple:
        return a.num_layers, a.hidden_size, a.num_attention_heads, a.num_query_groups, a.ffn_hidden_size

    same_positions = [n for n, p in PRESETS.items() if p.max_position_embeddings == arch.max_position_embeddings]
    same_shape = [n for n, p in PRESETS.items() if shape(p) == shape(arch)]
    for candidates in ([n for n in same_positions if n in same_shape], same_positions, same_shape):
        if candidates:
            return candidates[0]
    return "llama2-7b"


# ---------------------------------------------------------------------------------------------
# HF -> megatron: the chunks of a checkpoint, each computed from a few HF tensor slices
# ---------------------------------------------------------------------------------------------
# read(name, index) returns HF tensor `name` indexed by `index` (a tuple of slices), reading no more.
Reader = Callable[[str, tuple], torch.Tensor]


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a megatron tensor: `build(read)` makes it from the HF checkpoint."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    build: Callable[[Reader], torch.Tensor]


def _rows(a: int, b: int) -> tuple:
    return (slice(a, b),)


def _cols(a: int, b: int) -> tuple:
    return (slice(None), slice(a, b))


def _padded_rows(name: str, start: int, stop: int, vocab: int, read: Reader) -> torch.Tensor:
    """Rows [start, stop) of a vocab-sized tensor, zero beyond the real vocabulary."""
    real = read(name, _rows(min(start, vocab), min(stop, vocab)))  # possibly empty; gives width and dtype
    missing = stop - start - real.shape[0]
    if not missing:
        return real
    return torch.cat([real, real.new_zeros(missing, real.shape[1])])


def qkv_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v rows of `groups` consecutive KV groups -> megatron's per-group [q heads, k, v] rows."""
    cols = q.shape[-1]
    return torch.cat([q.reshape(groups, -1, cols), k.reshape(groups, -1, cols), v.reshape(groups, -1, cols)],
                     dim=1).reshape(-1, cols)


def qkv_split(qkv: torch.Tensor, arch: LlamaArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of qkv_grouped for the whole tensor."""
    g, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // g
    grouped = qkv.reshape(g, (per_group + 2) * d, -1)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    cols = qkv.shape[-1]
    return q.reshape(-1, cols), k.reshape(-1, cols), v.reshape(-1, cols)


def import_chunks(arch: LlamaArch, padded_vocab: int, tp: int) -> list[Chunk]:
    """The chunks a megatron save at tensor-parallel size `tp` writes, in a streaming-friendly order
    (embedding, layer by layer, final norm, output layer). Layer chunks keep a leading axis of 1."""
    shapes = megatron_shapes(arch, padded_vocab)
    h, f, d, n = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.num_layers
    g_per_rank, v_per_rank, f_per_rank = arch.num_query_groups // tp, padded_vocab // tp, f // tp
    q_rows = (arch.num_attention_heads // arch.num_query_groups) * d  # q rows per KV group
    q_cols_per_rank = arch.num_attention_heads * d // tp
    vocab = arch.vocab_size
    chunks: list[Chunk] = []

    def vocab_chunks(key: str, name: str) -> None:
        for r in range(tp):
            a, b = r * v_per_rank, (r + 1) * v_per_rank
            chunks.append(Chunk(key, shapes[key], (a, 0), (v_per_rank, h),
                                lambda read, a=a, b=b: _padded_rows(name, a, b, vocab, read)))

    vocab_chunks(EMBEDDING, "model.embed_tokens.weight")
    for layer in range(n):
        nm = hf_layer_names(layer)

        def add(key: str, offsets: tuple, sizes: tuple, build: Callable) -> None:
            chunks.append(Chunk(key, shapes[key], (layer, *offsets), (1, *sizes),
                                lambda read: build(read).unsqueeze(0)))

        add(ATTN_NORM, (0,), (h,), lambda read, nm=nm: read(nm["input_norm"], ()))
        for r in range(tp):
            g0, g1 = r * g_per_rank, (r + 1) * g_per_rank
            rows = g_per_rank * (q_rows + 2 * d)
            add(QKV, (r * rows, 0), (rows, h),
                lambda read, nm=nm, g0=g0, g1=g1: qkv_grouped(read(nm["q"], _rows(g0 * q_rows, g1 * q_rows)),
                                                              read(nm["k"], _rows(g0 * d, g1 * d)),
                                                              read(nm["v"], _rows(g0 * d, g1 * d)), g1 - g0))
        for r in range(tp):
            a, b = r * q_cols_per_rank, (r + 1) * q_cols_per_rank
            add(PROJ, (0, a), (h, b - a), lambda read, nm=nm, a=a, b=b: read(nm["o"], _cols(a, b)))
        add(MLP_NORM, (0,), (h,), lambda read, nm=nm: read(nm["post_norm"], ()))
        for half, name in ((0, "gate"), (1, "up")):  # megatron's swiglu chunks: all gate shards, then all up
            for r in range(tp):
                a, b = r * f_per_rank, (r + 1) * f_per_rank
                add(FC1, (half * f + a, 0), (b - a, h), lambda read, hf=nm[name], a=a, b=b: read(hf, _rows(a, b)))
        for r in range(tp):
            a, b = r * f_per_rank, (r + 1) * f_per_rank
            add(FC2, (0, a), (h, b - a), lambda read, nm=nm, a=a, b=b: read(nm["down"], _cols(a, b)))
    chunks.append(Chunk(FINAL_NORM, shapes[FINAL_NORM], (0,), (h,), lambda read: read("model.norm.weight", ())))
    vocab_chunks(OUTPUT, "lm_head.weight")
    return chunks


def extra_state_objects(arch: LlamaArch) -> dict[str, bytes]:
    """The per-layer `_extra_state` objects megatron expects next to each linear, serialised as its
    torch_dist strategy does (torch.save of a one-element list)."""
    buf = io.BytesIO()
    torch.save([None], buf)
    data = buf.getvalue()
    return {f"decoder.layers.{module}._extra_state/shard_{layer}_{arch.num_layers}": data
            for layer in range(arch.num_layers) for module in EXTRA_STATE_MODULES}


# ---------------------------------------------------------------------------------------------
# megatron -> HF
# ---------------------------------------------------------------------------------------------
def hf_layer(arch: LlamaArch, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One decoder layer's HF tensors from its megatron tensors (LAYER_KEYS -> that layer's slice)."""
    nm = hf_layer_names(layer)
    q, k, v = qkv_split(tensors[QKV], arch)
    gate, up = tensors[FC1].chunk(2, dim=0)
    return {nm["input_norm"]: tensors[ATTN_NORM], nm["q"]: q, nm["k"]: k, nm["v"]: v, nm["o"]: tensors[PROJ],
            nm["post_norm"]: tensors[MLP_NORM], nm["gate"]: gate, nm["up"]: up, nm["down"]: tensors[FC2]}


# ---------------------------------------------------------------------------------------------
# The architecture fields a converted checkpoint states in its config.yaml
# ---------------------------------------------------------------------------------------------
ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "vocab_size", "norm_eps", "rope_base", "max_position_embeddings")


def arch_config(arch: LlamaArch, tp: int = 1, pp: int = 1, vp: int | None = None, divisible_by: int = 128):
    """A JobConfig for this architecture (every field of ARCH_FIELDS explicit, the preset that
    resolves to it) at a TP/PP/VP layout: what a converted checkpoint's config.yaml states, and
    what the converter validates and runs the model with."""
    from melama_mcore.config.job_config import JobConfig

    cfg = JobConfig()
    cfg.model.preset = matching_preset(arch)
    for field in ARCH_FIELDS:
        setattr(cfg.model, field, getattr(arch, field))
    cfg.model.make_vocab_size_divisible_by = divisible_by
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline = tp, pp, vp
    return cfg


