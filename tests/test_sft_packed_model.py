"""Packed samples through the real model: a packed micro-batch (several conversations per row,
positions restarting, attention confined to each, padding) gives the summed masked loss and the
gradients of the same conversations run one by one, within 1e-5, with each layer backend that runs
on CPU (native: SDPA with a block-diagonal mask and RoPE at restarted positions; local: megatron's
attention with a mask). The model is megatron's GPTModel as the trainer builds it, fp32."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from melama_mcore.config.job_config import load_config
    from melama_mcore.models.llama.model import BACKENDS, build_model_chunks
    from melama_mcore.startup import start

    backend = sys.argv[1]
    s = 24
    cfg = load_config(None, ["model.preset=nano", "model.vocab_size=128", "training.device=cpu",
                             f"training.seq_length={s}", f"model.backend={backend}",
                             "parallel.use_distributed_optimizer=false"])
    runtime = start(cfg)
    model = build_model_chunks(cfg, runtime.arch, backend)[0]
    g = torch.Generator().manual_seed(0)
    rows = [[7, 9, 8], [10, 9, 5]]  # conversation lengths; the second row ends in 5 positions of padding
    real = [[True, True, True], [True, True, False]]
    tokens = torch.randint(0, 128, (2, s), generator=g)
    labels = torch.randint(0, 128, (2, s), generator=g)
    mask = (torch.rand(2, s, generator=g) > 0.3).float()
    cu = torch.full((2, 5), -1)
    positions = torch.zeros(2, s, dtype=torch.long)
    for r, lengths in enumerate(rows):
        bounds = [0]
        for n, keep in zip(lengths, real[r]):
            positions[r, bounds[-1]:bounds[-1] + n] = torch.arange(n)
            if not keep:
                mask[r, bounds[-1]:] = 0.0  # padding: its own segment, loss 0
            bounds.append(bounds[-1] + n)
        cu[r, :len(bounds)] = torch.tensor(bounds)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions, "cu_seqlens": cu}

    def grads():
        out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    packed_batch, extra = BACKENDS[backend].pack(dict(batch))
    loss = model(packed_batch["tokens"], packed_batch["position_ids"], extra.pop("attention_mask", None),
                 labels=packed_batch["labels"], **extra)
    packed_sum = (loss * mask).sum()
    packed_sum.backward()
    packed = grads()

    one_by_one = 0.0
    for r, lengths in enumerate(rows):
        start_ = 0
        for n, keep in zip(lengths, real[r]):
            if keep:
                part = slice(start_, start_ + n)
                out = model(tokens[r:r + 1, part], torch.arange(n)[None], None, labels=labels[r:r + 1, part])
                total = (out * mask[r:r + 1, part]).sum()
                total.backward()
                one_by_one += total.item()
            start_ += n
    single = grads()
    worst = max(((packed[k] - single[k]).abs().max() / single[k].abs().max().clamp(min=1e-12)).item() for k in single)
    print(json.dumps({"packed": packed_sum.item(), "one_by_one": one_by_one, "grad_rel": worst,
                      "params": len(single), "same_params": sorted(packed) == sorted(single)}))
''')


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "local"])
def test_packed_batch_equals_its_conversations_one_by_one(backend):
    result = subprocess.run([sys.executable, "-c", SCRIPT, backend], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["same_params"] and got["params"] > 10
    assert got["packed"] == pytest.approx(got["one_by_one"], rel=1e-5)
    assert got["grad_rel"] < 1e-5, got
