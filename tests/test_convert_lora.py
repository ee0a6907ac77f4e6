"""LoRA adapters out to Hugging Face: `melama convert export-peft` and `export-hf --merge-lora`,
checked against peft and transformers.

The `adapter_run` fixture builds an adapter checkpoint as the trainer writes one (the contract in
docs/checkpoints.md): a torchrun of this file at TP2 x PP2 loads an imported base, adds LoRA on every
target, gives the adapters random non-zero values, takes one optimizer step (megatron's optimizer
over megatron's DDP), records the framework's fp32 logits, and saves a run checkpoint whose model
entries hold the adapters only (the optimizer state beside them), with config.yaml's `peft:`
section, `checkpoint.init_from` naming the base, and the base's identity plus a `peft` entry.
The exports must give the framework's logits, read by peft and transformers, within 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_convert import assert_refused, cli, convert, hf_logits, relative_error

pytestmark = pytest.mark.slow

HF_CONFIG = dict(vocab_size=520, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=128,
                 tie_word_embeddings=False)
PEFT = {"method": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0,
        "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"]}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
STEP = 1


def arch():
    from melama_mcore.models.llama import state_dict_adapter as sda

    return sda.arch_from_hf_config(dict(HF_CONFIG, model_type="llama"))


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory) -> dict[str, Path]:
    """{"base": the imported base, "run": the adapter run's output folder, "logits": its logits file}."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from melama_mcore.commands.convert import import_hf
    from trunk_fixtures import free_port

    root = tmp_path_factory.mktemp("lora_export")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(root / "hf")
    import_hf(root / "hf", root / "base", 1, 1, None, 128)
    torch.save(torch.randint(0, HF_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1)),
               root / "tokens.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
           __file__, str(root)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:]
    return {"base": root / "base", "run": root / "run", "logits": root / "logits.pt", "tokens": root / "tokens.pt"}


def test_export_peft_loads_in_peft_with_the_framework_logits(adapter_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_hf, adapter = tmp_path / "base_hf", tmp_path / "adapter"
    assert convert("export-hf", "--ckpt", adapter_run["base"], "--out", base_hf).returncode == 0
    result = convert("export-peft", "--ckpt", adapter_run["run"], "--out", adapter)  # the run folder: its latest
    assert result.returncode == 0, result.stdout
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert sorted(config["target_modules"]) == sorted(HF_TARGETS)
    assert config["base_model_name_or_path"] == str(adapter_run["base"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32), adapter)
    with torch.no_grad():
        logits = model(torch.load(adapter_run["tokens"])).logits
    ours = torch.load(adapter_run["logits"])
    assert relative_error(logits, ours) < 1e-5
    assert relative_error(hf_logits(base_hf, torch.load(adapter_run["tokens"])), ours) > 1e-2  # the adapters matter


def test_merge_lora_export_gives_the_framework_logits(adapter_run, tmp_path):
    merged = tmp_path / "merged"
    result = convert("export-hf", "--ckpt", adapter_run["run"] / "checkpoints", "--out", merged, "--merge-lora")
    assert result.returncode == 0, result.stdout
    assert "merging LoRA (rank 4, alpha 8" in result.stdout
    ours = torch.load(adapter_run["logits"])
    assert relative_error(hf_logits(merged, torch.load(adapter_run["tokens"])), ours) < 1e-5


def test_merge_lora_bf16_verify(adapter_run, tmp_path):
    """--verify runs the framework with the adapters (loaded at TP 1 from the TP2 x PP2 checkpoint)
    against transformers on the merged bf16 export, within the bound bf16's rounding implies."""
    result = cli("export-hf", "--ckpt", adapter_run["run"], "--out", tmp_path / "merged", "--merge-lora", "--dtype",
                 "bf16", "--verify")
    assert result.returncode == 0, result.stdout
    assert "rounding the weights to bfloat16 moves the framework's logits by" in result.stdout
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_adapter_exports_refuse_what_does_not_fit(adapter_run, tmp_path):
    out, run = tmp_path / "out", adapter_run["run"]
    assert_refused(convert("export-hf", "--ckpt", run, "--out", out), out,
                   "is an adapter checkpoint (LoRA rank 4): export the adapters with `melama convert export-peft`")
    assert_refused(convert("export-peft", "--ckpt", adapter_run["base"], "--out", out), out, "holds no LoRA adapters")
    assert_refused(convert("export-hf", "--ckpt", adapter_run["base"], "--out", out, "--merge-lora"), out,
                   "--merge-lora:", "holds no LoRA adapters")
    assert_refused(convert("export-peft", "--ckpt", run, "--out", out, "--base", tmp_path / "nowhere"), out,
                   f"the base model {tmp_path / 'nowhere'} (--base) does not exist here")
    other = tmp_path / "other"  # another model: layers of another width
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**dict(HF_CONFIG, intermediate_size=128))).save_pretrained(tmp_path / "other_hf")
    assert convert("import-hf", "--hf-dir", tmp_path / "other_hf", "--out", other).returncode == 0
    assert_refused(convert("export-hf", "--ckpt", run, "--out", out, "--merge-lora", "--base", other), out,
                   "is not the model the adapters of", "model.ffn_hidden_size: checkpoint 128, this run 176")


# ---------------------------------------------------------------------------------------------
# The torchrun worker: an adapter checkpoint, as the trainer writes one
# ---------------------------------------------------------------------------------------------
def worker(root: Path) -> None:
    import torch.distributed as dist
    import yaml
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from melama_mcore.checkpoint.checkpointer import Checkpointer
    from melama_mcore.checkpoint.integrity import file_checksums, model_identity
    from melama_mcore.checkpoint.layout import LATEST, partial_dir, publish, seal, step_dir, write_atomically
    from melama_mcore.components.optimizer import build_optimizer
    from melama_mcore.config.validate import detect_environment, resolve
    from melama_mcore.distributed import parallel
    from melama_mcore.models.llama import state_dict_adapter as sda
    from melama_mcore.models.llama.lora import adapter_shapes, adapter_sharded_state_dict, apply_lora
    from melama_mcore.models.llama.model import build_model_chunks, output_vocab_size

    a, peft = arch(), type("Peft", (), PEFT)
    tokens = torch.load(root / "tokens.pt")
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    cfg = sda.arch_config(a, tp=2, pp=2)
    cfg.output_dir, cfg.checkpoint.init_from = str(root / "run"), str(root / "base")
    cfg.model.backend = "native"
    cfg.training.device, cfg.training.precision, cfg.training.seq_length = "cpu", "fp32", tokens.shape[1]
    cfg.optimizer.lr = 1e-2
    resolve(cfg, detect_environment(parallel.world_size_from_env()))
    parallel.initialize(cfg)

    chunks = build_model_chunks(cfg, a, "native")
    Checkpointer(cfg, chunks, None, None, identity=model_identity(a, None)).load_weights(str(root / "base"))
    apply_lora(chunks, peft, seed=cfg.training.seed)
    generator = torch.Generator().manual_seed(3)  # non-zero A and B, global tensors: each rank its slice
    values = {k: torch.randn(s, generator=generator) * 0.1
              for k, s in sorted(adapter_shapes(a, peft, output_vocab_size(cfg, a)).items())}
    with torch.no_grad():
        for chunk in chunks:
            for sh in adapter_sharded_state_dict(chunk).values():
                sh.data.copy_(values[sh.key][sh.global_slice()])
    model = parallel.wrap_for_training(cfg, chunks)
    optimizer = build_optimizer(cfg, model)

    def run(forward_only: bool):
        def loss_func(out, non_loss_data=False):  # forward only: the logits; training: any loss
            return out if non_loss_data else ((out.float() ** 2).mean(), {})

        def forward_step(data_iterator, chunk):
            return chunk(next(data_iterator), positions, None), loss_func

        if forward_only:
            for chunk in chunks:
                chunk.eval()
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=model, num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=forward_only,
            collect_non_loss_data=forward_only)

    run(forward_only=False)
    optimizer.step()  # the adapters train; the optimizer now has state to save
    outputs = run(forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        logits = gather_from_tensor_model_parallel_region(outputs[0].contiguous())[..., : a.vocab_size]
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(logits, root / "logits.pt")

    checkpoints = root / "run" / "checkpoints"
    final = step_dir(checkpoints, STEP)
    partial = partial_dir(final)
    if dist.get_rank() == 0:
        partial.mkdir(parents=True)
    dist.barrier()
    model_state = {f"model{i}": adapter_sharded_state_dict(c) for i, c in enumerate(chunks)}
    metadata = {"chained_optim_avoid_prefix": True, "singleton_local_shards": False}
    state = {**model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=False,
                                                                      metadata=metadata)}
    dist_checkpointing.save(state, str(partial), content_metadata=metadata)
    dist.barrier()
    if dist.get_rank() == 0:
        identity = {**model_identity(a, None), "peft": dict(PEFT)}
        config = {**cfg.to_dict(), "peft": dict(PEFT)}
        seal(partial, file_checksums(partial), identity, yaml.safe_dump(config, sort_keys=False))
        publish(partial, final)
        write_atomically(checkpoints / LATEST, str(STEP))
    dist.barrier()
    parallel.shutdown()


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writer spawns into this module
    worker(Path(sys.argv[1]))
