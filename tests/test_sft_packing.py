"""Packing: first-fit-decreasing against the textbook loop; plans deterministic under a seed, cached and
resumable; packed samples are the conversations with restarted positions; and a packed batch's loss and
gradients equal those of its conversations run one by one through a small attention model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from melama_mcore.data.loader import build_loader
from melama_mcore.data.sft.batch import loss_weights, packing_efficiency
from melama_mcore.data.sft.dataset import PackedSFTDataset, build_sft_datasets
from melama_mcore.data.sft.indexed import SFTIndexedData
from melama_mcore.data.sft.packing import build_plan, first_fit_decreasing
from melama_mcore.data.sft.preprocess import preprocess_sft
from melama_mcore.demo.instructions import write_synthetic_instructions
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.errors import DataError
from melama_mcore.models.llama.packed_attention import (apply_rotary_at, block_causal_mask, packed_causal_attention,
                                                        position_ids_from_cu_seqlens, rope_angles_at)

SEQ = 256


@pytest.fixture(scope="module")
def data(spm_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    paths = write_synthetic_instructions(out / "raw", samples=300, seed=3)
    prefixes = {}
    for name in ("medical_qa", "patient_chat"):
        preprocess_sft([str(paths[name])], str(out / name), spm_model, seq_length=SEQ, progress=False)
        prefixes[name] = f"{out}/{name}_sft_document"
    return prefixes


@pytest.fixture(scope="module")
def tok(spm_model):
    return load_tokenizer(spm_model)


def _textbook_ffd(sizes, capacity):
    bins = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):  # sorted() is stable: ties keep input order
        for members in bins:
            if sum(sizes[j] for j in members) + sizes[i] <= capacity:
                members.append(i)
                break
        else:
            bins.append([i])
    return bins


def test_first_fit_decreasing_equals_the_textbook_loop():
    rng = np.random.RandomState(0)
    for _ in range(30):
        sizes = rng.randint(1, 70, size=rng.randint(1, 150))
        offsets, members = first_fit_decreasing(sizes, 70)
        assert [members[a:b].tolist() for a, b in zip(offsets, offsets[1:])] == _textbook_ffd(sizes.tolist(), 70)
    with pytest.raises(ValueError):
        first_fit_decreasing(np.array([71]), 70)


def test_plan_is_deterministic_per_seed_and_made_of_whole_epochs():
    ids = np.arange(1000, 1200)
    positions = np.random.RandomState(1).randint(1, 100, size=200)
    plan = build_plan(ids, positions, 128, seed=5, num_sequences=300)
    again = build_plan(ids, positions, 128, seed=5, num_sequences=300)
    other = build_plan(ids, positions, 128, seed=6, num_sequences=300)
    assert np.array_equal(plan.members, again.members) and np.array_equal(plan.offsets, again.offsets)
    assert not np.array_equal(plan.members, other.members)
    assert len(plan) >= 300 and len(plan.members) == plan.epochs * 200
    one_epoch = len(build_plan(ids, positions, 128, seed=5, num_sequences=None))
    assert (plan.epochs - 1) * one_epoch < 300 <= plan.epochs * one_epoch  # no epoch more than needed
    for e in range(plan.epochs):  # every epoch is every conversation once
        assert sorted(plan.members[e * 200:(e + 1) * 200].tolist()) == ids.tolist()
    fill = [positions[plan.sequence(i) - 1000].sum() for i in range(len(plan))]
    assert max(fill) <= 128


def _single(prefix, tok, seed=0, samples=50, cache_dir=None, seq=SEQ):
    train, _ = build_sft_datasets([{"name": "a", "weight": 1, "train": prefix}], tokenizer=tok, seq_length=seq,
                                  seed=seed, train_samples=samples, valid_samples=0, split="100,0,0",
                                  cache_dir=cache_dir)
    return train


def _segments(sample):
    bounds = [int(c) for c in sample["cu_seqlens"] if c >= 0]
    return list(zip(bounds, bounds[1:]))


def test_samples_are_whole_conversations_with_restarted_positions(data, tok):
    blended = _single(data["patient_chat"], tok)
    train = blended.datasets[0]  # megatron blends even a single weighted source: its sample i is train[i]
    assert isinstance(train, PackedSFTDataset)
    assert all(torch.equal(blended[i]["tokens"], train[i]["tokens"]) for i in range(len(blended)))
    source = SFTIndexedData(data["patient_chat"])
    seen = []
    for i in range(len(train)):
        sample, members = train[i], train.plan.sequence(i)
        segments = _segments(sample)
        assert segments[0][0] == 0 and segments[-1][1] == SEQ
        for (a, b), conversation in zip(segments, members):
            ids, mask = source.sample(int(conversation))
            assert b - a == len(ids) - 1
            assert sample["tokens"][a:b].tolist() == ids[:-1].tolist()
            assert sample["labels"][a:b].tolist() == ids[1:].tolist()
            assert sample["loss_mask"][a:b].tolist() == mask[1:].tolist()
            assert sample["position_ids"][a:b].tolist() == list(range(b - a))
            assert sample["sample_loss_weight"][a:b].sum().item() == pytest.approx(1.0)
        real = sum(b - a for a, b in segments[:len(members)])
        assert int(sample["real_tokens"]) == real and int(sample["max_seqlen"]) == max(b - a for a, b in segments)
        if real < SEQ:  # the padding segment: no loss, positions from 0, the pad id (LLaMA: no pad, so EOS)
            assert len(segments) == len(members) + 1
            assert sample["loss_mask"][real:].sum() == 0 and sample["sample_loss_weight"][real:].sum() == 0
            assert sample["position_ids"][real:].tolist() == list(range(SEQ - real))
            assert set(sample["tokens"][real:].tolist()) == {tok.eos_id}
        seen += members[:len(members)].tolist()
    epoch = len(source)
    assert sorted(seen[:epoch]) == list(range(epoch))  # the first epoch holds every conversation once
    batch = next(build_loader(train, consumed_samples=0, micro_batch_size=4, dp_rank=0, dp_size=1))
    assert packing_efficiency(batch) == pytest.approx(batch["real_tokens"].sum().item() / (4 * SEQ))
    assert torch.equal(loss_weights(batch, "token"), batch["loss_mask"])
    assert torch.equal(loss_weights(batch, "sample"), batch["sample_loss_weight"])
    with pytest.raises(ValueError):
        loss_weights(batch, "sequence")


def _direct(prefix, tok, seed, cache_dir):
    """A PackedSFTDataset built as megatron's builder builds it (its blended wrapper's own cache needs
    torch.distributed, which these tests do not start)."""
    from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
    from megatron.core.datasets.utils import Split

    from melama_mcore.data.sft.dataset import _SFTTokenizerView

    config = BlendedMegatronDatasetConfig(random_seed=seed, sequence_length=SEQ, tokenizer=_SFTTokenizerView(tok),
                                          path_to_cache=cache_dir, blend=([prefix], None), split="100,0,0")
    low = PackedSFTDataset.build_low_level_dataset(prefix, config)
    return PackedSFTDataset(low, prefix, np.arange(len(low)), 50, Split.train, config)


def test_plan_cached_seeded_and_resumable(data, tok, tmp_path, monkeypatch):
    first = _direct(data["medical_qa"], tok, 1, str(tmp_path))
    assert len(list(tmp_path.glob("*-PackedSFTDataset-train-plan.npz"))) == 1
    monkeypatch.setattr("melama_mcore.data.sft.dataset.build_plan",
                        lambda *a, **k: pytest.fail("the cached plan should have been used"))
    cached = _direct(data["medical_qa"], tok, 1, str(tmp_path))
    assert np.array_equal(first.plan.members, cached.plan.members)
    monkeypatch.undo()
    assert np.array_equal(first.plan.members, _single(data["medical_qa"], tok, seed=1).datasets[0].plan.members)
    assert not np.array_equal(first.plan.members, _direct(data["medical_qa"], tok, 2, None).plan.members)
    # resuming from a consumed-sample count continues the same global sequence of samples
    run = list(itertools.islice(build_loader(first, consumed_samples=0, micro_batch_size=2, dp_rank=0, dp_size=1), 9))
    resumed = list(itertools.islice(build_loader(cached, consumed_samples=10, micro_batch_size=2, dp_rank=0,
                                                 dp_size=1), 4))
    for a, b in zip(run[5:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_blend_weights_and_sequence_length_check(data, tok):
    spec = [{"name": "qa", "weight": 1, "train": data["medical_qa"]},
            {"name": "chat", "weight": 3, "train": data["patient_chat"]}]
    train, valid = build_sft_datasets(spec, tokenizer=tok, seq_length=SEQ, seed=0, train_samples=400,
                                      valid_samples=2, split="90,10,0")
    ids = np.array([int(train[i]["dataset_id"]) for i in range(400)])
    assert np.bincount(ids, minlength=2).tolist() == [100, 300]  # megatron's blending hits the weights exactly
    assert sorted(valid) == ["chat", "qa"] and all(len(v) == 2 for v in valid.values())
    with pytest.raises(DataError, match=f"run preprocess-sft with --seq-length 64 \\(it was {SEQ}\\)"):
        _single(data["patient_chat"], tok, seq=64)


# ---- a small LLaMA-like attention model: the packed path, and the same samples one by one ---------------
class TinyLM(torch.nn.Module):
    def __init__(self, vocab, dim=32, heads=4, kv_heads=2, layers=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        width = (heads + 2 * kv_heads) * self.head_dim
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, width) for _ in range(layers))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.SiLU(),
                                                           torch.nn.Linear(64, dim)) for _ in range(layers))
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, cu_seqlens=None):
        """tokens [b, s]; packed rows with cu_seqlens, else each row one sample (positions 0..s-1)."""
        b, s = tokens.shape
        x = self.embed(tokens).transpose(0, 1)  # [s, b, dim]
        if cu_seqlens is None:
            angles = rope_angles_at(torch.arange(s).expand(b, s), self.head_dim, 10000)
        else:
            angles = rope_angles_at(position_ids_from_cu_seqlens(cu_seqlens, s), self.head_dim, 10000)
            mask = block_causal_mask(cu_seqlens, s)
        for qkv, proj, mlp in zip(self.qkv, self.proj, self.mlp):
            h = F.rms_norm(x, (x.size(-1),))
            q, k, v = qkv(h).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                    self.kv_heads * self.head_dim], -1)
            q, k, v = (t.reshape(s, b, -1, self.head_dim) for t in (q, k, v))
            q, k = apply_rotary_at(q, angles), apply_rotary_at(k, angles)
            scale = 1 / math.sqrt(self.head_dim)
            if cu_seqlens is None:  # plain causal attention, as for unpacked sequences
                attn = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True,
                                                      scale=scale, enable_gqa=True)
                attn = attn.permute(2, 0, 1, 3).reshape(s, b, -1)
            else:
                attn = packed_causal_attention(q, k, v, cu_seqlens, scale=scale, mask=mask)
            x = x + proj(attn)
            x = x + mlp(F.rms_norm(x, (x.size(-1),)))
        return self.out(x).transpose(0, 1)  # [b, s, vocab]


def _token_losses(model, tokens, labels, cu_seqlens=None):
    logits = model(tokens, cu_seqlens)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none")
    return losses.reshape(labels.shape)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed_batch(data, tok, n=3):
    train = _single(data["medical_qa"], tok, seed=4).datasets[0]
    batch = next(build_loader(train, consumed_samples=0, micro_batch_size=n, dp_rank=0, dp_size=1))
    return train, batch


@pytest.mark.parametrize("normalisation", ["token", "sample"])
def test_packed_batch_equals_its_samples_one_by_one(data, tok, normalisation):
    torch.manual_seed(0)
    model = TinyLM(tok.vocab_size)
    train, batch = _packed_batch(data, tok)
    weights = loss_weights(batch, normalisation)
    packed_losses = _token_losses(model, batch["tokens"], batch["labels"], batch["cu_seqlens"])
    packed_loss = (packed_losses * weights).sum()
    packed = _grads(model, packed_loss)
    source = SFTIndexedData(data["medical_qa"])
    total, conversations = 0.0, 0
    for row in range(batch["tokens"].size(0)):
        for conversation in train.plan.sequence(row):
            ids, mask = (torch.from_numpy(a.astype(np.int64)) for a in source.sample(int(conversation)))
            losses = _token_losses(model, ids[None, :-1], ids[None, 1:])[0]
            trained = mask[1:].float()
            total = total + ((losses * trained).sum() / (trained.sum() if normalisation == "sample" else 1))
            conversations += 1
    assert conversations > batch["tokens"].size(0)  # several conversations per packed row
    one_by_one = _grads(model, total)
    torch.testing.assert_close(packed_loss, total, rtol=1e-5, atol=0)
    for name, grad in packed.items():
        torch.testing.assert_close(grad, one_by_one[name], rtol=1e-5, atol=1e-5 * one_by_one[name].abs().max().item())
    if normalisation == "sample":
        assert weights.sum().item() == pytest.approx(conversations)


def test_masked_tokens_change_no_gradient(data, tok):
    torch.manual_seed(1)
    model = TinyLM(tok.vocab_size)
    _, batch = _packed_batch(data, tok)
    tokens, labels, mask, cu = batch["tokens"], batch["labels"], batch["loss_mask"], batch["cu_seqlens"]

    def run(tokens, labels):
        losses = _token_losses(model, tokens, labels, cu)
        return losses, _grads(model, (losses * mask).sum())

    base_losses, base = run(tokens, labels)
    untrained = mask == 0
    # (1) prompt and padding labels: whatever they are, no gradient changes
    other_labels = torch.where(untrained, torch.randint_like(labels, tok.vocab_size), labels)
    assert not torch.equal(other_labels, labels)
    _, grads = run(tokens, other_labels)
    assert all(torch.equal(grads[n], base[n]) for n in base)
    # (2) padding inputs: attention never reaches them, nothing changes
    padding = torch.arange(tokens.size(1))[None] >= batch["real_tokens"][:, None]
    assert padding.any()
    losses, grads = run(torch.where(padding, torch.randint_like(tokens, tok.vocab_size), tokens), labels)
    assert torch.equal(losses[~padding], base_losses[~padding])
    assert all(torch.allclose(grads[n], base[n], rtol=1e-6, atol=1e-7) for n in base)
    # (3) another conversation's prompt in the same row: this conversation's losses do not move
    (a0, a1), (b0, b1) = _segments({"cu_seqlens": cu[0]})[:2]
    changed = tokens.clone()
    changed[0, a0:a1] = torch.randint(0, tok.vocab_size, (a1 - a0,))
    losses, _ = run(changed, labels)
    assert torch.equal(losses[0, b0:b1], base_losses[0, b0:b1]) and not torch.equal(losses[0, a0:a1],
                                                                                     base_losses[0, a0:a1])
