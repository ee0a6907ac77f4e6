"""Datasets under an initialised torch.distributed (gloo, 2 ranks): built rank 0 first through a shared
cache, every rank gets the same samples as a single-process build."""

from __future__ import annotations

import os

import pytest

from melama_mcore.data.preprocess import preprocess
from rank_launcher import run_ranks

WORKER = r"""
import sys, torch, torch.distributed as dist
from melama_mcore.data.dataset import build_pretraining_datasets
from melama_mcore.data.tokenizer import load_tokenizer
model, cache, out, *prefixes = sys.argv[1:]
distributed = cache != "-"
if distributed:
    dist.init_process_group("gloo")
spec = [{"name": f"s{i}", "weight": w, "train": p} for i, (w, p) in enumerate(zip((3, 1), prefixes))]
train, valid = build_pretraining_datasets(spec, tokenizer=load_tokenizer(model), seq_length=16, seed=2,
                                          train_samples=300, valid_samples=4,
                                          cache_dir=cache if distributed else None)
rank = dist.get_rank() if distributed else 0
torch.save({"train": torch.stack([train[i]["tokens"] for i in range(300)]),
            "valid": {k: torch.stack([v[i]["tokens"] for i in range(4)]) for k, v in valid.items()}},
           f"{out}.{rank}")
"""


@pytest.mark.slow
def test_gloo_two_ranks_match_single_process(tmp_path, corpus, spm_model):
    import torch

    prefixes = []
    for name in ("clinical", "general"):
        preprocess([str(corpus[name])], str(tmp_path / name), spm_model, progress=False)
        prefixes.append(str(tmp_path / f"{name}_text_document"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for nproc, cache, out in ((1, "-", "single"), (2, str(tmp_path / "cache"), "dist")):
        result = run_ranks(nproc, str(script), [spm_model, cache, str(tmp_path / out), *prefixes], env, timeout=60,
                           log_path=tmp_path / f"{out}.log")
        assert result.returncode == 0, result.stdout[-3000:]
    single = torch.load(tmp_path / "single.0")
    assert any((tmp_path / "cache").iterdir())  # rank 0 wrote megatron's index cache
    for rank in range(2):
        got = torch.load(tmp_path / f"dist.{rank}")
        assert torch.equal(got["train"], single["train"])
        assert got["valid"].keys() == single["valid"].keys()
        assert all(torch.equal(got["valid"][k], single["valid"][k]) for k in got["valid"])
