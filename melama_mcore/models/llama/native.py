"""The `native` layer backend: megatron's tensor/sequence-parallel linears around this project's
modules, so nothing needs Transformer Engine or apex.

* RMSNorm through the fused kernel, with its weight marked for megatron to all-reduce its grad
  across TP under sequence parallelism (megatron's own torch RMSNorm refuses SP);
* SwiGLU through the fused kernel, on megatron's fused fc1 output;
* causal core attention on torch's scaled_dot_product_attention (flash / memory-efficient kernels
  on GPU, no s x s scores kept), with RoPE applied inside it by the fused rotary kernel.
The kernels are `melama_mcore.kernels` (CUDA from csrc/ on GPU, torch references on CPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from melama_mcore import kernels
from melama_mcore.models.llama.packed_attention import (apply_rotary_at, block_causal_mask, packed_causal_attention,
                                                        rope_angles_at)


class RMSNorm(torch.nn.Module):
    """RMSNorm whose weight megatron all-reduces across TP under sequence parallelism.

    With SP each TP rank normalises a different slice of the sequence, so the weight's gradient is
    partial per rank; megatron's `finalize_model_grads` sums grads of parameters marked
    `sequence_parallel=True` over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class SwiGLU(MegatronModule):
    """silu(gate) * up on megatron's fused fc1 output [..., gate | up], as one kernel.
    A MegatronModule because megatron's MLP asks its activation for a (here empty) sharded state."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.swiglu(x)


@functools.lru_cache(maxsize=8)
def rope_angles(head_dim: int, base: float, seq_len: int, device: torch.device) -> torch.Tensor:
    """megatron's RoPE angles [s, 1, 1, head_dim] for positions 0..s-1, shared by every layer."""
    rope = RotaryEmbedding(head_dim, rotary_percent=1.0, rotary_base=int(base), use_cpu_initialization=True)
    return rope.get_emb(seq_len).to(device)


@dataclass
class PackedRows(PackedSeqParams):
    """Several samples packed in each row of a micro-batch, in megatron's [s, b] layout: what
    SDPAttention needs, made once per micro-batch and shared by every layer."""

    attention_mask: torch.Tensor | None = None  # [b, 1, s, s], True where a query may attend
    position_ids: torch.Tensor | None = None  # [b, s], restarting in every sample

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, position_ids: torch.Tensor) -> "PackedRows":
        return cls(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                   attention_mask=block_causal_mask(cu_seqlens, position_ids.size(1)), position_ids=position_ids)


class SDPAttention(MegatronModule):
    """RoPE, then causal core attention on torch's scaled_dot_product_attention, in megatron's
    [s, b, h, d] layout.

    Drop-in for megatron's DotProductAttention (same constructor and forward), without the s x s
    score matrix in memory on GPU (flash / memory-efficient SDPA kernels), and with GQA handled by
    SDPA rather than by materialising repeated K/V heads. RoPE is applied here, with the fused
    kernel, because megatron's SelfAttention hard-codes its own unfused (or TE) RoPE: the native
    GPTModel is built without position embeddings and q/k arrive here unrotated. The sequence is
    whole here (SP gathers it in linear_qkv; context parallelism is not supported), so positions
    are 0..s-1 — or, for packed samples (`PackedRows`), restart in every sample, whose attention is
    confined to itself (packed_attention.py).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type=None, pg_collection=None, *,
                 rotary_base: float):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError("SDPAttention supports the causal mask only (LLaMA pre-training)")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.rotary_base = rotary_base

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support an attention bias")
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None:
            angles = rope_angles_at(packed_seq_params.position_ids, query.size(-1), self.rotary_base)
            query, key = apply_rotary_at(query, angles), apply_rotary_at(key, angles)
            return packed_causal_attention(query, key, value, scale=self.softmax_scale, dropout_p=dropout,
                                           mask=packed_seq_params.attention_mask)
        freqs = rope_angles(query.size(-1), self.rotary_base, query.size(0), query.device)
        query, key = kernels.apply_rotary(query, freqs), kernels.apply_rotary(key, freqs)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            dropout_p=dropout,
            enable_gqa=q.size(1) != k.size(1),
        )
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, h * d]


def native_layer_spec(rotary_base: float) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(module=SDPAttention, params={"rotary_base": rotary_base}),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=SwiGLU
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as the TE spec, where the norms are fused into the linears.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def native_block_spec(config: TransformerConfig, vp_stage: int | None, rotary_base: float) -> TransformerBlockSubmodules:
    """The decoder layers this pipeline stage (and virtual stage) builds, plus the final norm."""
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[native_layer_spec(rotary_base)] * layers, layer_norm=RMSNorm)
