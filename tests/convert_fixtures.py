"""Helpers for the conversion tests (test_convert.py, test_convert_lora.py): the command as a user
runs it, in a subprocess or in this process, the reference logits of transformers, and what a
refused conversion must look like."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

# A random GQA LLaMA with the trunk's `nano` shapes, non-default RMSNorm eps and RoPE base; its
# vocabulary holds the test tokenizer's and is padded (to 640 rows at TP 1, 768 at TP 2).
HF_CONFIG = dict(vocab_size=520, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=128,
                 tie_word_embeddings=False)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def random_llama(folder: Path, seed: int = 0, **save_kwargs) -> Path:
    """A LlamaForCausalLM with HF_CONFIG and random weights (norm weights included), saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(folder, **save_kwargs)
    return folder


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model(tokens).logits


def cli(*args: str) -> subprocess.CompletedProcess:
    """`melama convert ...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "melama_mcore.cli", "convert", *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)


def convert(*args: str) -> subprocess.CompletedProcess:
    """The same in this process (what the CLI prints on stderr and logs, as `stdout`), without the
    start-up cost."""
    from melama_mcore.cli import run_main
    from melama_mcore.commands.convert import main

    err = io.StringIO()
    root, handler = logging.getLogger(), logging.StreamHandler(err)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(err):
            code = run_main(main, list(map(str, args)))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(args, code, stdout=err.getvalue())


def safetensors_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_refused(result: subprocess.CompletedProcess, out: Path, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    for phrase in phrases:
        assert phrase in result.stdout, result.stdout
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder left
