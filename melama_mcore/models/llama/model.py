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

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from melama_mcore import kernels
from melama_mcore.config.job_config import JobConfig
from melama_mcore.distributed import cpu_compat
from melama_mcore.models.llama.config_registry import LlamaArch, padded_vocab_size
from melama_mcore.models.llama import packed_attention
from melama_mcore.models.llama.native import PackedRows, native_block_spec

log = logging.getLogger(__name__)


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
# Layer backends: one row each
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """How one layer implementation plugs into megatron's GPTModel."""

    # (TransformerConfig, virtual stage, RoPE base) -> the decoder layers this stage builds + final norm
    block_spec: Callable[[TransformerConfig, int | None, float], TransformerBlockSubmodules]
    # "rope": megatron's GPTModel applies RoPE; "none": the backend's core attention does
    position_embedding: str
    # TransformerConfig fields this backend sets
    config: dict = field(default_factory=dict)
    # A packed micro-batch (several samples per row, data/sft) -> (the batch as this backend takes
    # it, the extra GPTModel.forward arguments that confine attention to each sample)
    pack: Callable[[dict], tuple[dict, dict]] | None = None


def _megatron_block_spec(use_transformer_engine: bool):
    def spec(config: TransformerConfig, vp_stage: int | None, rotary_base: float) -> TransformerBlockSubmodules:
        return get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine,
                                          normalization="RMSNorm", vp_stage=vp_stage)
    return spec


def _pack_thd(batch: dict) -> tuple[dict, dict]:
    flat, params = packed_attention.to_thd(batch)  # TE's fused attention and RoPE take THD boundaries
    return {**batch, **flat}, {"packed_seq_params": params}


def _pack_rows(batch: dict) -> tuple[dict, dict]:
    return batch, {"packed_seq_params": PackedRows.of(batch["cu_seqlens"], batch["position_ids"])}


def _pack_mask(batch: dict) -> tuple[dict, dict]:
    return batch, {"attention_mask": packed_attention.local_attention_mask(batch["cu_seqlens"], batch["tokens"].size(1))}


BACKENDS = {
    "transformer_engine": Backend(_megatron_block_spec(True), "rope", {"apply_rope_fusion": True}, _pack_thd),
    # use_te_activation_func routes the MLP activation through the spec's SwiGLU module: the flag's
    # name is TE's, the mechanism is megatron's generic "activation as a submodule".
    "native": Backend(native_block_spec, "none", {"use_te_activation_func": True}, _pack_rows),
    "local": Backend(_megatron_block_spec(False), "rope", {}, _pack_mask),
}


def choose_backend(requested: str, device: str, te_available: bool, megatron_linears_only: str | None = None) -> str:
    """The layer backend: the one requested, or for `auto` Transformer Engine when it imports on a GPU
    and nothing needs megatron's own linears (`megatron_linears_only`: why something does, e.g. the
    training strategy), else native."""
    if requested != "auto":
        log.info("layer backend: %s (requested)", requested)
        return requested
    if device == "cuda" and te_available and not megatron_linears_only:
        log.info("layer backend: transformer_engine (auto: Transformer Engine imports and CUDA is present)")
        return "transformer_engine"
    reason = ("no CUDA" if device != "cuda" else megatron_linears_only or "Transformer Engine is not installed")
    log.info("layer backend: native (auto: %s; kernels backend: %s)", reason, kernels.backend())
    return "native"


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
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=gpu,
        deallocate_pipeline_outputs=True,
        # The loss (and its gradient) is the mean over the loss-weighted tokens of the whole global
        # batch, not a mean of per-micro-batch means: megatron divides once, by the batch's total
        # weight, in finalize_model_grads. Equal for pre-training; exact for masked instruction data.
        calculate_per_token_loss=True,
        # Pipeline p2p as Megatron-LM sets it: the interleaved schedule overlaps its sends and
        # receives (separate ops, ordered per rank parity); 1F1B batches them. Batched p2p under
        # interleaving pairs the wrong messages when both neighbours are one rank (PP=2: an
        # activation arrives as a gradient, silently), which is why Megatron-LM refuses it there.
        overlap_p2p_comm=p.virtual_pipeline is not None,
        batch_p2p_comm=p.virtual_pipeline is None,
        **recompute,
        **fp8,
    )
    fields.update(BACKENDS[backend].config)
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
            transformer_layer_spec=BACKENDS[backend].block_spec(config, stage, arch.rope_base),
            vocab_size=vocab,
            max_sequence_length=cfg.training.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type=BACKENDS[backend].position_embedding,
            rotary_base=int(arch.rope_base),
            vp_stage=stage,
            melama_cross_entropy=cfg.model.cross_entropy == "melama",
        )
        model.backend = backend  # how a packed micro-batch enters it (BACKENDS[backend].pack)
        if cfg.training.device == "cuda":
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
