"""Attention over packed sequences: several samples in one sequence, each seeing only itself.

A packed micro-batch marks its samples with `cu_seqlens`: per row the segment boundaries
0 = c0 < c1 < ... < ck = s, then -1 fill (as the SFT datasets collate them, [b, s + 1]); or, in THD
form (megatron's `PackedSeqParams`, micro-batch flattened to one row), a 1-D [k + 1] tensor.
Positions restart at 0 in every segment and attention is causal within the segment only, so a packed
row computes exactly what its samples compute one by one.

For each layer backend:
- `native` (SDPAttention): `packed_causal_attention` — torch SDPA with a block-diagonal causal mask
  (`block_causal_mask`, built once per micro-batch and shared by the layers), RoPE at the restarted
  positions with `rope_angles_at` + `apply_rotary_at` (the same kernel as unpacked sequences).
  Chosen because it is exact, one kernel call, differentiable, and runs the same on CPU and GPU.
  FlexAttention's document masking would skip the masked blocks, but it is only fast under
  torch.compile (Triton on GPU, C++ on CPU: minutes of compile time in CI), and its eager CPU path
  materialises the scores and warns that its backward may be wrong; flash-attn's varlen kernel is
  GPU-only and not installed here. With a mask, SDPA uses its memory-efficient kernel on GPU (not
  flash), which computes masked blocks too: the price of packing is attention over the whole
  sequence rather than over each sample (attention is a small share of a LLaMA layer's FLOPs at 4k).
- `transformer_engine`: `to_thd` flattens the micro-batch and returns megatron's `PackedSeqParams`
  (qkv_format "thd", cu_seqlens) for TE's fused attention and megatron's THD RoPE.
- `local`: `local_attention_mask` gives megatron's DotProductAttention mask (True = masked out). Its
  RoPE uses positions 0..s-1 of the packed row; RoPE scores depend on position differences only,
  so this equals restarted positions up to float rounding of large angles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from melama_mcore import kernels

PER_TOKEN_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "sample_loss_weight")


def _as_rows(cu_seqlens: Tensor) -> Tensor:
    return cu_seqlens if cu_seqlens.dim() == 2 else cu_seqlens.reshape(1, -1)


def segment_ids(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """[b, s] int64: which segment each position of each row belongs to."""
    rows = _as_rows(cu_seqlens).long()
    bounds = torch.where(rows < 0, torch.full_like(rows, seq_len + 1), rows).contiguous()
    positions = torch.arange(seq_len, device=rows.device).expand(rows.size(0), seq_len).contiguous()
    return torch.searchsorted(bounds, positions, right=True) - 1


def position_ids_from_cu_seqlens(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """[b, s] int64 positions restarting at 0 in every segment (what the SFT datasets give as
    position_ids; here for attention modules that receive only the boundaries)."""
    rows = _as_rows(cu_seqlens).long()
    starts = torch.gather(rows.clamp(min=0), 1, segment_ids(rows, seq_len))
    return torch.arange(seq_len, device=rows.device) - starts


def block_causal_mask(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """[b, 1, s, s] bool, True where query i may attend to key j: same segment and j <= i (SDPA's
    convention). Every position attends at least to itself, so no row is empty."""
    seg = segment_ids(cu_seqlens, seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def local_attention_mask(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """megatron's DotProductAttention mask for packed rows: [b, 1, s, s] bool, True = masked out."""
    return ~block_causal_mask(cu_seqlens, seq_len)


def packed_causal_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor | None = None, *,
                            scale: float, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Causal attention confined to each segment, in megatron's layouts.

    query [s, b, hq, d], key/value [s, b, hkv, d] (GQA: hq a multiple of hkv) with cu_seqlens [b, k]
    -> [s, b, hq * d]; or THD query [t, hq, d], key/value [t, hkv, d] with cu_seqlens [k] -> [t, hq * d].
    `mask` (block_causal_mask of the same boundaries) may be passed to build it once per micro-batch.
    """
    thd = query.dim() == 3
    if thd:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    s, b = query.shape[:2]
    if mask is None:
        mask = block_causal_mask(cu_seqlens, s)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=q.size(1) != k.size(1))
    out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
    return out.squeeze(1) if thd else out


def rope_angles_at(position_ids: Tensor, head_dim: int, base: float) -> Tensor:
    """megatron's RoPE angles (rotate-half layout, as RotaryEmbedding.get_emb) at the given positions:
    position_ids [b, s] -> [s, b, 1, head_dim]; THD [t] -> [t, 1, 1, head_dim]. The same fp32 arithmetic
    as megatron's, so positions 0..s-1 give its angles bit for bit."""
    device = position_ids.device
    inv_freq = 1.0 / (float(base) ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    rows = position_ids if position_ids.dim() == 2 else position_ids.reshape(1, -1)
    freqs = rows.t().to(torch.float32)[..., None] * inv_freq  # [s, b, head_dim / 2]
    return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]


def apply_rotary_at(t: Tensor, angles: Tensor) -> Tensor:
    """RoPE with per-token angles (rope_angles_at), through the same kernel as unpacked sequences:
    t [s, b, h, d] with angles [s, b, 1, rot], or THD t [t, h, d] with angles [t, 1, 1, rot]."""
    if t.dim() == 3:
        return kernels.apply_rotary(t.unsqueeze(1), angles).squeeze(1)
    s, b, h, d = t.shape
    rotated = kernels.apply_rotary(t.reshape(s * b, 1, h, d), angles.reshape(s * b, 1, 1, angles.size(-1)))
    return rotated.reshape(s, b, h, d)


def thd_cu_seqlens(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """Per-row boundaries [b, k] (-1 fill) -> the 1-D int32 boundaries of the rows laid end to end."""
    rows = _as_rows(cu_seqlens)
    parts = [torch.zeros(1, dtype=torch.int32, device=rows.device)]
    for r in range(rows.size(0)):
        row = rows[r][rows[r] >= 0]
        parts.append((row[1:] + r * seq_len).to(torch.int32))
    return torch.cat(parts)


def to_thd(batch: dict[str, Tensor]):
    """A packed micro-batch [b, s] -> (the same batch as one row [1, b * s], megatron's PackedSeqParams
    with qkv_format "thd"): what the transformer_engine backend takes (pass packed_seq_params to
    GPTModel.forward). Sample boundaries stay where they were; rows become consecutive segments."""
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = batch["tokens"].shape
    flat = {key: value.reshape(1, b * s) for key, value in batch.items() if key in PER_TOKEN_FIELDS}
    cu = thd_cu_seqlens(batch["cu_seqlens"], s)
    longest = int(batch["max_seqlen"].max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
    return flat, params
