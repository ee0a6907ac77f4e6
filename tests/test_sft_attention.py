"""Packed attention for the native backend, and the boundary conversions for the other backends,
against float64 formulas written here and against megatron-core's own RoPE angles."""

from __future__ import annotations

import math

import pytest
import torch

import melama_mcore.kernels as kernels
from melama_mcore.models.llama.packed_attention import (apply_rotary_at, block_causal_mask, local_attention_mask,
                                                        packed_causal_attention, position_ids_from_cu_seqlens,
                                                        rope_angles_at, segment_ids, thd_cu_seqlens, to_thd)

S = 12
# row 0: segments of 5, 3, 4 positions (full); row 1: 7 and 2, then a padding segment of 3
CU = torch.tensor([[0, 5, 8, 12] + [-1] * 10, [0, 7, 9, 12] + [-1] * 10], dtype=torch.int32)


def test_segments_positions_and_masks_by_hand():
    assert segment_ids(CU, S).tolist() == [[0] * 5 + [1] * 3 + [2] * 4, [0] * 7 + [1] * 2 + [2] * 3]
    assert position_ids_from_cu_seqlens(CU, S).tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2]]
    mask = block_causal_mask(CU, S)
    assert mask.shape == (2, 1, S, S) and mask.dtype == torch.bool
    for i in range(S):
        for j in range(S):
            same = segment_ids(CU, S)[0, i] == segment_ids(CU, S)[0, j]
            assert mask[0, 0, i, j] == (bool(same) and j <= i)
    assert torch.equal(local_attention_mask(CU, S), ~mask)
    # 1-D (THD) boundaries are one row
    assert torch.equal(block_causal_mask(torch.tensor([0, 5, 8, 12]), S), mask[:1])


def attention64(q, k, v, scale):
    """Causal softmax attention of one sequence, float64, K/V heads repeated for GQA: [n, h, d] -> [n, h*d]."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    n = q.shape[0]
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(n, -1)


def _qkv(b, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, b, heads, dim, generator=g), torch.randn(S, b, kv_heads, dim, generator=g),
            torch.randn(S, b, kv_heads, dim, generator=g))


def _per_segment64(q, k, v, cu, scale):
    out = torch.zeros(S, q.shape[1], q.shape[2] * q.shape[3], dtype=torch.float64)
    for r in range(q.shape[1]):
        bounds = [int(c) for c in cu[r] if c >= 0]
        for a, e in zip(bounds, bounds[1:]):
            out[a:e, r] = attention64(q[a:e, r], k[a:e, r], v[a:e, r], scale)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_packed_attention_equals_each_segment_alone_float64(kv_heads):
    q, k, v = (t.requires_grad_() for t in _qkv(2, kv_heads=kv_heads))
    scale = 1 / math.sqrt(8)
    out = packed_causal_attention(q, k, v, CU, scale=scale)
    expected = _per_segment64(q.detach(), k.detach(), v.detach(), CU, scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # gradients against float64 autograd through the reference
    dy = torch.randn_like(out)
    (out * dy).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (_per_segment64(*leaves, CU, scale) * dy.double()).sum().backward()
    for got, leaf in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), leaf.grad, rtol=1e-5, atol=1e-5)


def test_thd_layout_and_prebuilt_mask():
    q, k, v = _qkv(1)
    scale = 0.3
    sbhd = packed_causal_attention(q, k, v, CU[:1], scale=scale)
    thd = packed_causal_attention(q[:, 0], k[:, 0], v[:, 0], torch.tensor([0, 5, 8, 12], dtype=torch.int32),
                                  scale=scale)
    assert thd.shape == (S, 4 * 8)
    torch.testing.assert_close(thd, sbhd[:, 0], rtol=0, atol=0)
    prebuilt = packed_causal_attention(q, k, v, scale=scale, mask=block_causal_mask(CU[:1], S))
    torch.testing.assert_close(prebuilt, sbhd, rtol=0, atol=0)


def test_rope_angles_equal_megatron_bit_for_bit():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    dim, base = 16, 10000
    rope = RotaryEmbedding(dim, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)
    freqs = rope.get_freqs_non_repeated(4096)
    expected = torch.cat((freqs, freqs), -1)[:, None, None, :]  # what get_emb returns, [s, 1, 1, d]
    got = rope_angles_at(torch.arange(4096)[None], dim, base)
    assert got.shape == (4096, 1, 1, dim) and torch.equal(got, expected)
    # restarted positions read the same table
    positions = position_ids_from_cu_seqlens(CU, S)
    packed = rope_angles_at(positions, dim, base)
    assert packed.shape == (S, 2, 1, dim)
    assert torch.equal(packed[:, 1, 0], expected[positions[1], 0, 0])
    assert rope_angles_at(positions[0], dim, base).shape == (S, 1, 1, dim)  # THD


def test_rotary_at_restarted_positions_equals_each_sample_alone():
    t = torch.randn(S, 2, 3, 16)
    positions = position_ids_from_cu_seqlens(CU, S)
    out = apply_rotary_at(t, rope_angles_at(positions, 16, 10000))
    for r in range(2):
        bounds = [int(c) for c in CU[r] if c >= 0]
        for a, e in zip(bounds, bounds[1:]):
            alone = kernels.apply_rotary(t[a:e, r:r + 1], rope_angles_at(torch.arange(e - a)[None], 16, 10000))
            torch.testing.assert_close(out[a:e, r:r + 1], alone, rtol=0, atol=0)
    thd = apply_rotary_at(t[:, 0], rope_angles_at(positions[0], 16, 10000))
    torch.testing.assert_close(thd, out[:, 0], rtol=0, atol=0)


def test_to_thd_flattens_rows_and_boundaries():
    batch = {"tokens": torch.arange(2 * S).reshape(2, S), "labels": torch.zeros(2, S, dtype=torch.long),
             "loss_mask": torch.ones(2, S), "position_ids": position_ids_from_cu_seqlens(CU, S),
             "sample_loss_weight": torch.ones(2, S), "cu_seqlens": CU,
             "max_seqlen": torch.tensor([5, 7], dtype=torch.int32), "real_tokens": torch.tensor([12, 9])}
    flat, params = to_thd(batch)
    assert set(flat) == {"tokens", "labels", "loss_mask", "position_ids", "sample_loss_weight"}
    assert flat["tokens"].shape == (1, 2 * S) and torch.equal(flat["tokens"][0], torch.arange(2 * S))
    expected = [0, 5, 8, 12, 19, 21, 24]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == expected
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == params.max_seqlen_kv == 7
    assert thd_cu_seqlens(CU[0], S).tolist() == [0, 5, 8, 12]
    # the flattened boundaries give the same segments and positions as the rows
    assert torch.equal(position_ids_from_cu_seqlens(params.cu_seqlens_q, 2 * S)[0], flat["position_ids"][0])
