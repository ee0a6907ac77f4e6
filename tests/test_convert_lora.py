"""LoRA adapters out to Hugging Face: `melama convert export-peft` and `export-hf --merge-lora`,
checked against peft and transformers.

The `adapter_run` fixture writes an adapter checkpoint with the trainer's own code (the format in
docs/checkpoints.md): a torchrun of this file at TP2 x PP2 loads an imported base, adds LoRA on every
target, gives the adapters random non-zero values, takes one training step (the distributed
optimizer, as `melama train` runs by default), records the framework's fp32 logits, and saves with
the Checkpointer: model entries holding the adapters only, the optimizer state beside them,
config.yaml's `peft:` section, `checkpoint.init_from` naming the base. The exports must give the
framework's logits, read by peft and transformers, within 1e-5.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from convert_fixtures import ENV, HF_CONFIG, assert_refused, cli, convert, hf_logits, random_llama, relative_error

pytestmark = pytest.mark.slow

PEFT = {"method": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0,
        "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"]}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
STEP = 1


def arch():
    from melama_mcore.models.llama import state_dict_adapter as sda

    return sda.arch_from_hf_config(dict(HF_CONFIG, model_type="llama"))


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory) -> dict[str, Path]:
    """{"base": the imported base, "run": the adapter run's output folder, "logits": its logits file,
    "tokens": the tokens they were computed on}."""
    from melama_mcore.checkpoint.convert import import_hf
    from rank_launcher import run_ranks

    root = tmp_path_factory.mktemp("lora_export")
    random_llama(root / "hf")
    import_hf(root / "hf", root / "base", 1, 1, None, 128)
    torch.save(torch.randint(0, HF_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1)),
               root / "tokens.pt")
    result = run_ranks(4, __file__, [str(root)], ENV, timeout=600, log_path=root / "adapter_run.log")
    assert result.returncode == 0, result.stdout[-5000:]
    return {"hf": root / "hf", "base": root / "base", "run": root / "run", "logits": root / "logits.pt",
            "tokens": root / "tokens.pt"}


def test_export_peft_loads_in_peft_with_the_framework_logits(adapter_run, tmp_path):
    """On the base exported by export-hf with PeftModel, and alone with AutoPeftModelForCausalLM: the
    adapter names the Hugging Face folder its base was imported from."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from melama_mcore.checkpoint.peft_folder import check_peft_adapter

    base_hf, adapter = tmp_path / "base_hf", tmp_path / "adapter"
    assert convert("export-hf", "--ckpt", adapter_run["base"], "--out", base_hf).returncode == 0
    result = convert("export-peft", "--ckpt", adapter_run["run"], "--out", adapter)  # the run folder: its latest
    assert result.returncode == 0, result.stdout
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert sorted(config["target_modules"]) == sorted(HF_TARGETS)
    assert config["base_model_name_or_path"] == str(adapter_run["hf"].resolve())
    assert check_peft_adapter(adapter) == config
    tokens, ours = torch.load(adapter_run["tokens"]), torch.load(adapter_run["logits"])
    on_base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    alone = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32)  # loads the base it names
    for model in (PeftModel.from_pretrained(on_base, adapter), alone):
        with torch.no_grad():
            assert relative_error(model(tokens).logits, ours) < 1e-5
    assert relative_error(hf_logits(base_hf, tokens), ours) > 1e-2  # the adapters matter


def test_export_peft_names_the_hugging_face_base(adapter_run, tmp_path):
    """--base-hf: the base's export (checked to hold its weights) or a Hub id; another model is
    refused; a base not imported from a Hugging Face folder that is still here: none, and a warning
    that says what to pass."""
    base_hf, other_hf = tmp_path / "base_hf", tmp_path / "other_hf"
    assert convert("export-hf", "--ckpt", adapter_run["base"], "--out", base_hf, "--dtype", "bf16").returncode == 0
    named = {}
    for given in (base_hf, "meta-llama/Llama-2-7b-hf"):
        out = tmp_path / f"adapter{len(named)}"
        result = convert("export-peft", "--ckpt", adapter_run["run"], "--out", out, "--base-hf", given)
        assert result.returncode == 0, result.stdout
        named[str(given)] = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == {str(base_hf): str(base_hf.resolve()), "meta-llama/Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf"}

    random_llama(other_hf, seed=1)  # the same architecture, other weights
    out = tmp_path / "refused"
    assert_refused(convert("export-peft", "--ckpt", adapter_run["run"], "--out", out, "--base-hf", other_hf), out,
                   f"error: --base-hf {other_hf} is not the base the adapters were trained on, {adapter_run['base']}: "
                   "its model.norm.weight differs from the base's: other weights")
    assert_refused(convert("export-peft", "--ckpt", adapter_run["run"], "--out", out, "--base-hf", tmp_path / "x"),
                   out, f"error: --base-hf {tmp_path / 'x'} does not exist")

    base = tmp_path / "base"  # the same base, its import's origin not recorded
    shutil.copytree(adapter_run["base"], base)
    identity = json.loads((base / "model_identity.json").read_text())
    (base / "model_identity.json").write_text(json.dumps({k: v for k, v in identity.items() if k != "hf_source"}))
    result = convert("export-peft", "--ckpt", adapter_run["run"], "--out", out, "--base", base)
    assert result.returncode == 0, result.stdout
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert (f"adapter_config.json names no base model: {base} is not an import of a Hugging Face folder that is "
            "still here. Pass --base-hf") in result.stdout


def test_a_peft_adapter_whose_rank_disagrees_with_its_weights_is_refused(adapter_run, tmp_path):
    """checkpoint/peft_folder.check_peft_adapter, what every reader of a PEFT adapter folder calls:
    one line naming both files (peft itself fails with a size-mismatch traceback)."""
    from melama_mcore.checkpoint.peft_folder import check_peft_adapter
    from melama_mcore.errors import CheckpointError

    adapter = tmp_path / "adapter"
    assert convert("export-peft", "--ckpt", adapter_run["run"], "--out", adapter).returncode == 0
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CheckpointError) as refused:
        check_peft_adapter(adapter)
    assert str(refused.value) == (
        f"{adapter}: adapter_config.json says r 8, but adapter_model.safetensors holds rank-4 matrices "
        "(base_model.model.lm_head.lora_A.weight is [4, 64]): the config and the weights come from different "
        "adapters. Put the adapter's own adapter_config.json beside its weights (or export it again)")
    config_file.write_text(json.dumps({**config, "r": 8, "rank_pattern": {t: 4 for t in HF_TARGETS}}))
    assert check_peft_adapter(adapter)["r"] == 8  # every module's rank comes from the pattern: 4
    config_file.write_text(json.dumps({**config, "rank_pattern": {"q_proj": 2}}))
    with pytest.raises(CheckpointError, match=r"says rank_pattern 2, but .* holds rank-4 .*q_proj\.lora_A"):
        check_peft_adapter(adapter)
    config_file.write_text(json.dumps(config))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{weights} is not a complete safetensors file"):
        check_peft_adapter(adapter)


def test_exports_of_adapters_print_no_library_warnings(adapter_run, tmp_path):
    from melama_mcore.logs import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # the filters a command runs with
        quiet_libraries()
        assert convert("export-peft", "--ckpt", adapter_run["run"], "--out", tmp_path / "adapter").returncode == 0
        assert convert("export-hf", "--ckpt", adapter_run["run"], "--out", tmp_path / "merged",
                       "--merge-lora").returncode == 0
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


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
# The torchrun worker: an adapter checkpoint, written by the trainer's own code
# ---------------------------------------------------------------------------------------------
def worker(root: Path) -> None:
    """What `melama train` does for a LoRA run, with its defaults (the distributed optimizer, its
    overlapped reduce and gather): the base from checkpoint.init_from, one step, the Checkpointer's
    save. The adapters start random (non-zero A and B) instead of PEFT's zero B."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from melama_mcore import step
    from melama_mcore.checkpoint.checkpointer import Checkpointer, TrainState
    from melama_mcore.checkpoint.integrity import model_identity
    from melama_mcore.components.optimizer import build_optimizer, build_scheduler
    from melama_mcore.distributed import parallel
    from melama_mcore.models.llama import state_dict_adapter as sda
    from melama_mcore.models.llama.lora import adapter_sharded_state_dict, apply_lora
    from melama_mcore.models.llama.lora_tensors import adapter_shapes
    from melama_mcore.models.llama.model import build_model_chunks, output_vocab_size
    from melama_mcore.startup import start

    a, tokens = arch(), torch.load(root / "tokens.pt")
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    cfg = sda.arch_config(a, tp=2, pp=2)
    cfg.output_dir, cfg.checkpoint.init_from = str(root / "run"), str(root / "base")
    for key, value in PEFT.items():
        setattr(cfg.peft, key, value)
    cfg.training.device, cfg.training.precision, cfg.training.seq_length = "cpu", "fp32", tokens.shape[1]
    cfg.training.micro_batch_size = cfg.training.global_batch_size = tokens.shape[0]
    cfg.optimizer.lr, cfg.optimizer.lr_warmup_iters = 1e-2, 0
    runtime = start(cfg)
    assert cfg.parallel.use_distributed_optimizer and cfg.checkpoint.optimizer_format == "fully_reshardable"

    chunks = build_model_chunks(cfg, a, runtime.backend)
    apply_lora(chunks, cfg.peft, seed=cfg.training.seed)
    model = parallel.wrap_for_training(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    checkpointer = Checkpointer(cfg, chunks, optimizer, build_scheduler(cfg, optimizer),
                                identity=model_identity(a, None, cfg))
    checkpointer.load_weights(cfg.checkpoint.init_from)
    generator = torch.Generator().manual_seed(3)  # global tensors: each rank copies its slice
    values = {k: torch.randn(s, generator=generator) * 0.1
              for k, s in sorted(adapter_shapes(a, cfg.peft, output_vocab_size(cfg, a)).items())}
    with torch.no_grad():
        for chunk in chunks:
            for sh in adapter_sharded_state_dict(chunk).values():
                sh.data.copy_(values[sh.key][sh.global_slice()])
    optimizer.reload_model_params()  # the optimizer's fp32 copies of the adapters

    batch = {"tokens": tokens, "position_ids": positions, "labels": tokens.roll(-1, dims=1),
             "loss_mask": torch.ones(tokens.shape)}
    step.zero_grads(model, optimizer)
    totals = step.Schedule(cfg, model, runtime.device).run([iter([batch]) for _ in model])
    updated, _ = step.optimizer_step(optimizer, cfg.optimizer.clip_grad, step.data_parallel_mean(totals),
                                     runtime.device)
    assert updated
    step.sync_params(model, cfg)

    def logits_step(data_iterator, chunk):
        return chunk(next(data_iterator), positions, None), lambda out, non_loss_data=False: out

    with step.evaluating(model, cfg):
        outputs = get_forward_backward_func()(
            forward_step_func=logits_step, data_iterator=iter([tokens]), model=model, num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True, collect_non_loss_data=True)
    if parallel_state.is_pipeline_last_stage():
        logits = gather_from_tensor_model_parallel_region(outputs[0].contiguous())[..., : a.vocab_size]
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(logits, root / "logits.pt")
    checkpointer.save(TrainState(step=STEP, consumed_samples=tokens.shape[0]))
    parallel.shutdown()


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writer spawns into this module
    worker(Path(sys.argv[1]))
