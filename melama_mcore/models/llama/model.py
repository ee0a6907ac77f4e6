"""LLaMA-2 as a megatron-core GPTModel, with a choice of layer implementation (backend).

Backends (`model.backend`):
* ``transformer_engine``: megatron's TE spec (fused norm+linear, TE attention, FP8). Needs TE + CUDA.
* ``native``: this project's spec: megatron's TP/SP linears, an RMSNorm that supports sequence
  parallelism, RMSNorm, SwiGLU and RoPE from `melama_mcore.kernels` (fused CUDA kernels on GPU,
  torch reference on CPU), and a causal attention core on torch's scaled_dot_product_attention
  (flash / memory-efficient kernels on GPU).
* ``local``: megatron's own local spec (unfused; its attention materialises s x s scores and its
  RMSNorm refuses sequence parallelism). A reference, and a fallback.
``auto`` picks TE when it is importable on a GPU, else ``native``, and logs why.

All three give the same parameter names in checkpoints (megatron's TE-compatible sharded keys), so
a checkpoint saved with one backend loads with another.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
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
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from melama_mcore import kernels
from melama_mcore.config.job_config import JobConfig
from melama_mcore.distributed import cpu_compat
from melama_mcore.models.llama.config_registry import LlamaArch, padded_vocab_size

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The native backend's modules
# ---------------------------------------------------------------------------------------------
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


class SDPAttention(MegatronModule):
    """RoPE, then causal core attention on torch's scaled_dot_product_attention, in megatron's
    [s, b, h, d] layout.

    Drop-in for megatron's DotProductAttention (same constructor and forward), without the s x s
    score matrix in memory on GPU (flash / memory-efficient SDPA kernels), and with GQA handled by
    SDPA rather than by materialising repeated K/V heads. RoPE is applied here, with the fused
    kernel, because megatron's SelfAttention hard-codes its own unfused (or TE) RoPE: the native
    GPTModel is built without position embeddings and q/k arrive here unrotated. The sequence is
    whole here (SP gathers it in linear_qkv; context parallelism is not supported), so positions
    are 0..s-1.
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
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention does not support packed sequences or attention bias")
        freqs = rope_angles(query.size(-1), self.rotary_base, query.size(0), query.device)
        query, key = kernels.apply_rotary(query, freqs), kernels.apply_rotary(key, freqs)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
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


class LlamaModel(GPTModel):
    """megatron's GPTModel, with the loss optionally through melama's vocab-parallel
    cross-entropy (`model.cross_entropy=melama`) instead of megatron's."""

    def __init__(self, *args, melama_cross_entropy: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.melama_cross_entropy = melama_cross_entropy

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.melama_cross_entropy:
            return super().compute_language_model_loss(labels, logits)
        # labels [b, s], logits [s, b, v / tp] -> loss [b, s], as megatron's
        loss = kernels.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Backend choice, TransformerConfig, model construction
# ---------------------------------------------------------------------------------------------
def choose_backend(requested: str, device: str, te_available: bool) -> str:
    if requested != "auto":
        log.info("layer backend: %s (requested)", requested)
        return requested
    if device == "cuda" and te_available:
        log.info("layer backend: transformer_engine (auto: Transformer Engine imports and CUDA is present)")
        return "transformer_engine"
    reason = "no CUDA" if device != "cuda" else "Transformer Engine is not installed"
    log.info("layer backend: native (auto: %s; kernels backend: %s)", reason, kernels.backend())
    return "native"


def block_spec(backend: str, config: TransformerConfig, vp_stage: int | None,
               rotary_base: float) -> TransformerBlockSubmodules:
    """The decoder layers this pipeline stage (and virtual stage) builds, plus the final norm."""
    if backend == "native":
        layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        spec = native_layer_spec(rotary_base)
        return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=RMSNorm)
    return get_gpt_decoder_block_spec(config, use_transformer_engine=backend == "transformer_engine",
                                      normalization="RMSNorm", vp_stage=vp_stage)


def transformer_config(cfg: JobConfig, arch: LlamaArch, backend: str) -> TransformerConfig:
    t, p = cfg.training, cfg.parallel
    gpu = t.device == "cuda"
    bf16 = t.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute = {}
    if t.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif t.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=t.recompute_num_layers)
    fp8 = {}
    if t.fp8 is not None:
        fp8 = dict(fp8=t.fp8, fp8_recipe=t.fp8_recipe, fp8_param=False)
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        # Routes the MLP activation through the spec's SwiGLU module (native backend); the flag's
        # name is TE's, the mechanism is megatron's generic "activation as a submodule".
        use_te_activation_func=backend == "native",
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.model.init_method_std,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        autocast_dtype=dtype if bf16 else None,
        use_cpu_initialization=not gpu,
        # The fusions below are CUDA-only (TE/apex/jit kernels) or implemented by our native spec.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,  # megatron's fused softmax needs apex's CUDA extension
        bias_dropout_fusion=gpu,
        apply_rope_fusion=gpu and backend == "transformer_engine",
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=gpu,
        deallocate_pipeline_outputs=True,
        # Pipeline p2p as Megatron-LM sets it: the interleaved schedule overlaps its sends and
        # receives (separate ops, ordered per rank parity); 1F1B batches them. Batched p2p under
        # interleaving pairs the wrong messages when both neighbours are one rank (PP=2: an
        # activation arrives as a gradient, silently), which is why Megatron-LM refuses it there.
        overlap_p2p_comm=p.virtual_pipeline is not None,
        batch_p2p_comm=p.virtual_pipeline is None,
        **recompute,
        **fp8,
    )
    if not gpu:
        fields.update(cpu_compat.TRANSFORMER_CONFIG_ON_CPU)
    return TransformerConfig(**fields)


def output_vocab_size(cfg: JobConfig, arch: LlamaArch) -> int:
    """Rows of the embedding and output layer as built: the vocabulary padded to a multiple of
    model.make_vocab_size_divisible_by x TP (as Megatron-LM); what FLOPs are counted over."""
    return padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_parallel)


def build_model_chunks(cfg: JobConfig, arch: LlamaArch, backend: str) -> list[LlamaModel]:
    """One GPTModel per virtual pipeline stage held by this rank (one without interleaving)."""
    config = transformer_config(cfg, arch, backend)
    vocab = output_vocab_size(cfg, arch)
    chunks = []
    for vp_stage in range(cfg.parallel.virtual_pipeline or 1):
        stage = vp_stage if cfg.parallel.virtual_pipeline else None
        model = LlamaModel(
            config=config,
            transformer_layer_spec=block_spec(backend, config, stage, arch.rope_base),
            vocab_size=vocab,
            max_sequence_length=cfg.training.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            # native: RoPE is applied by the spec's SDPAttention (fused kernel), see there
            position_embedding_type="none" if backend == "native" else "rope",
            rotary_base=int(arch.rope_base),
            vp_stage=stage,
            melama_cross_entropy=cfg.model.cross_entropy == "melama",
        )
        if cfg.training.device == "cuda":
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
