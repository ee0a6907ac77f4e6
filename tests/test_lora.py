"""LoRA on the trunk's megatron model, checked against transformers + peft.

A random GQA LlamaForCausalLM is imported as the base; a random PEFT LoRA adapter (non-zero A and B
on q/k/v/o/gate/up/down and lm_head) is the reference. The framework model, with that adapter put
into its own adapters, runs under torchrun at TP1, TP2 with sequence parallelism, PP2 and TP2 x PP2
(this file is the worker): its logits and its adapter gradients for one backward step must equal
transformers + peft's, its optimizer (megatron's, over megatron's DDP) must hold the adapters only.
The TP2 x PP2 run also takes an optimizer step and saves an adapter-only dist-checkpoint: the TP1
run loads it, and the checkpoint exported as a PEFT folder loads in peft with the same logits.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

HF_CONFIG = dict(vocab_size=520, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=128,
                 tie_word_embeddings=False)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
# (tensor_parallel, pipeline_parallel, sequence_parallel); the TP2 x PP2 run goes first: TP1 loads its checkpoint.
LAYOUTS = {"2x2": (2, 2, False), "1x1": (1, 1, False), "2x1-sp": (2, 1, True), "1x2": (1, 2, False)}


@dataclass
class Peft:
    """The recipe's `peft:` section."""

    method: str = "lora"
    rank: int = 4
    alpha: float = 8.0  # scaling 2: a wrong scaling shows
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
                                                          "output_layer"])


def arch():
    from melama_mcore.models.llama import state_dict_adapter as sda

    return sda.arch_from_hf_config(dict(HF_CONFIG, model_type="llama"))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# The reference: transformers + peft
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peft_dir(hf_dir, tmp_path_factory) -> Path:
    """A PEFT adapter with random non-zero A and B on every target (saved by peft itself)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                           LoraConfig(r=Peft.rank, lora_alpha=Peft.alpha, target_modules=HF_TARGETS))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(folder, save_embedding_layers=False)
    return folder


def peft_model(hf_dir: Path, adapter: Path, trainable: bool = False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter, is_trainable=trainable)


@pytest.fixture(scope="module")
def inputs() -> dict:
    """Tokens, and the weights of the loss sum(logits * weights) the backward step uses."""
    g = torch.Generator().manual_seed(1)
    return {"tokens": torch.randint(0, HF_CONFIG["vocab_size"], (2, 12), generator=g),
            "weights": torch.randn(2, 12, HF_CONFIG["vocab_size"], generator=g)}


@pytest.fixture(scope="module")
def reference(hf_dir, peft_dir, inputs) -> dict:
    """peft's logits and its adapter gradients for that loss, as global adapter tensors."""
    from melama_mcore.models.llama.peft_adapter import from_peft

    model = peft_model(hf_dir, peft_dir, trainable=True)
    logits = model(inputs["tokens"]).logits
    (logits * inputs["weights"]).sum().backward()
    grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_" in n}
    return {"logits": logits.detach(), "grads": from_peft(grads, arch(), Peft(), HF_CONFIG["vocab_size"])}


# ---------------------------------------------------------------------------------------------
# The framework under torchrun
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(hf_dir, peft_dir, inputs, tmp_path_factory) -> dict[str, Path]:
    from rank_launcher import run_ranks  # here: the ranks need none of its imports

    from melama_mcore.checkpoint.convert import import_hf

    root = tmp_path_factory.mktemp("lora_runs")
    import_hf(hf_dir, root / "base", 1, 1, None, 128)
    torch.save(inputs, root / "inputs.pt")
    folders = {}
    for name, (tp, pp, sp) in LAYOUTS.items():
        out = root / name
        out.mkdir()
        result = run_ranks(tp * pp, __file__, [str(root), str(peft_dir), name], ENV, timeout=600,
                           log_path=root / f"{name}.log")
        assert result.returncode == 0, result.stdout[-5000:]
        folders[name] = out
    return folders


LM_HEAD_B = "output_layer.lora.lm_head.lora_B"


def unpadded(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lm_head B's rows beyond the vocabulary (padding for TP) get no gradient: checked, then cut."""
    assert not grads[LM_HEAD_B][HF_CONFIG["vocab_size"]:].any()
    return {**grads, LM_HEAD_B: grads[LM_HEAD_B][: HF_CONFIG["vocab_size"]]}


def assemble(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Global tensors from every rank's shards (key, global shape, box, local tensor); replicated
    shards must agree exactly."""
    result: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob(f"{name}_rank*.pt")):
        for key, shape, box, local in torch.load(path):
            target = result.setdefault(key, torch.full(shape, float("nan")))
            index = tuple(slice(a, b) for a, b in box)
            seen = target[index]
            assert torch.isnan(seen).all() or torch.equal(seen, local.reshape(seen.shape)), f"{key}: replicas differ"
            target[index] = local.reshape(seen.shape)
    assert not any(torch.isnan(t).any() for t in result.values())
    return result


@pytest.mark.slow
@pytest.mark.parametrize("layout", [*LAYOUTS, "1x1-local"])
def test_logits_match_peft(runs, reference, layout):
    ours = torch.load(runs[layout.removesuffix("-local")] / ("logits_local.pt" if "local" in layout else "logits.pt"))
    assert ours.shape == reference["logits"].shape
    assert relative_error(ours, reference["logits"]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapter_grads_match_peft(runs, reference, layout):
    ours = unpadded(assemble(runs[layout], "grads"))
    assert ours.keys() == reference["grads"].keys()
    for key, grad in reference["grads"].items():
        assert relative_error(ours[key], grad) < 1e-5, key


@pytest.mark.slow
def test_tp2_sequence_parallel_grads_equal_tp1(runs):
    tp1, tp2 = unpadded(assemble(runs["1x1"], "grads")), unpadded(assemble(runs["2x1-sp"], "grads"))
    for key, grad in tp1.items():
        assert relative_error(tp2[key], grad) < 1e-5, key


def expected_adapter_params(tp: int, pp: int, stage: int) -> tuple[int, int]:
    """(tensors, elements) of the adapters on one rank, from the sharding rule by hand: column-parallel
    pieces hold all of A and 1/tp of B's rows, row-parallel pieces 1/tp of A's columns and all of B."""
    r, h, f, kv = Peft.rank, 64, 176, 2 * 16
    layer = (r * h + h * r // tp) + 2 * (r * h + kv * r // tp)  # q, k, v
    layer += r * h // tp + h * r  # o
    layer += 2 * (r * h + f * r // tp)  # gate, up
    layer += r * f // tp + h * r  # down
    layers = 4 // pp
    tensors, elements = layers * 14, layers * layer
    if stage == pp - 1:  # lm_head: A whole, B 1/tp of the padded vocabulary (640 at TP1, 768 at TP2)
        tensors, elements = tensors + 2, elements + r * h + (640 if tp == 1 else 768) // tp * r
    return tensors, elements


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_base_frozen_and_optimizer_holds_adapters_only(runs, layout):
    tp, pp, _ = LAYOUTS[layout]
    reports = [json.loads(p.read_text()) for p in sorted(runs[layout].glob("report_rank*.json"))]
    assert len(reports) == tp * pp
    for report in reports:
        assert report["trainable_non_adapter"] == []
        assert report["grad_buffer_params"] == report["adapter_params"]  # DDP allocated for adapters only
        assert (report["optimizer_params"], report["optimizer_elements"]) == \
            expected_adapter_params(tp, pp, report["pp_rank"])
        assert report["adapter_params"] == report["optimizer_params"]
        if layout == "2x2":  # after an optimizer step
            assert report["base_bitwise_unchanged"] and report["optimizer_state_params"] == report["adapter_params"]
        if layout == "1x1":
            assert report["bf16_adapter_dtypes"] == ["torch.bfloat16"]


@pytest.mark.slow
def test_adapter_checkpoint_saved_at_tp2_pp2_loads_at_tp1(runs):
    before, after = torch.load(runs["2x2"] / "logits.pt"), torch.load(runs["2x2"] / "logits_after_step.pt")
    assert relative_error(after, before) > 1e-3  # the step changed the adapters
    assert relative_error(torch.load(runs["1x1"] / "logits_loaded.pt"), after) < 1e-5


def read_dist_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist-checkpoint, whole (global), with PyTorch DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in reader.read_metadata().state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.mark.slow
def test_trained_adapters_export_to_peft(runs, hf_dir, inputs, tmp_path):
    """The TP2 x PP2 run's adapters after a step (not the reference's), written as a PEFT folder."""
    from melama_mcore.checkpoint.convert import write_peft_adapter

    adapters = read_dist_checkpoint(runs["2x2"] / "adapter_ckpt")
    assert adapters["output_layer.lora.lm_head.lora_B"].shape == (768, Peft.rank)  # saved padded for TP 2
    out = tmp_path / "exported"
    write_peft_adapter(out, adapters, arch(), Peft(), str(hf_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", 4, 8.0, str(hf_dir))
    assert sorted(config["target_modules"]) == sorted(HF_TARGETS)
    with torch.no_grad():
        logits = peft_model(hf_dir, out)(inputs["tokens"]).logits
    assert relative_error(logits, torch.load(runs["2x2"] / "logits_after_step.pt")) < 1e-5


# ---------------------------------------------------------------------------------------------
# In one process: the mapping, merging, configuration errors
# ---------------------------------------------------------------------------------------------
def test_peft_tensors_round_trip_and_load_in_peft(hf_dir, peft_dir, reference, inputs, tmp_path):
    from safetensors.torch import load_file

    from melama_mcore.checkpoint.convert import write_peft_adapter
    from melama_mcore.models.llama.peft_adapter import from_peft, to_peft

    original = load_file(peft_dir / "adapter_model.safetensors")
    adapters = from_peft(original, arch(), Peft(), padded_vocab=768)
    assert adapters["decoder.layers.self_attention.linear_qkv.lora.k_proj.lora_B"].shape == (4, 32, 4)
    back = to_peft(adapters, arch(), Peft())
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    write_peft_adapter(tmp_path / "out", adapters, arch(), Peft(), str(hf_dir))
    with torch.no_grad():
        logits = peft_model(hf_dir, tmp_path / "out")(inputs["tokens"]).logits
    assert relative_error(logits, reference["logits"]) < 1e-6


def test_merge_equals_peft_merge_and_unload(hf_dir, peft_dir, tmp_path):
    """Folded into the base weights as export-hf reads them (one layer at a time from the
    dist-checkpoint), then mapped to Hugging Face names: peft's merged weights."""
    from safetensors.torch import load_file

    from melama_mcore.checkpoint.dcp_stream import DistCheckpointReader
    from melama_mcore.checkpoint.convert import import_hf
    from melama_mcore.models.llama import state_dict_adapter as sda
    from melama_mcore.models.llama.lora_tensors import merge_lora
    from melama_mcore.models.llama.peft_adapter import from_peft

    a = arch()
    import_hf(hf_dir, tmp_path / "base", 2, 1, None, 128)  # the base padded for TP 2 (768 rows),
    reader = DistCheckpointReader(tmp_path / "base")
    peft_tensors = load_file(peft_dir / "adapter_model.safetensors")
    adapters = from_peft(peft_tensors, a, Peft(), padded_vocab=640)  # the adapters for TP 1
    ours = {}
    for layer in range(a.num_layers):
        merged_layer = merge_lora(reader.layer(layer, sda.LAYER_KEYS), adapters, a, Peft(), layer)
        ours.update(sda.hf_layer(a, layer, merged_layer))
    ours["lm_head.weight"] = merge_lora(reader.tensors([sda.OUTPUT]), adapters, a, Peft())[sda.OUTPUT][: a.vocab_size]
    merged = peft_model(hf_dir, peft_dir).merge_and_unload().state_dict()
    base = load_file(hf_dir / "model.safetensors")
    for name, tensor in ours.items():
        assert torch.allclose(tensor, merged[name], rtol=0, atol=1e-6), name
    assert not torch.allclose(ours["lm_head.weight"], base["lm_head.weight"], atol=1e-3)  # the adapter mattered


@pytest.mark.parametrize("change,phrase", [
    ({"method": "qlora"}, "peft.method must be one of none, lora"),
    ({"rank": 0}, "peft.rank must be a positive integer"),
    ({"alpha": -1}, "peft.alpha must be a positive number"),
    ({"dropout": 1.0}, "peft.dropout must be in [0, 1)"),
    ({"target_modules": ["q_proj"]}, "peft.target_modules must be a non-empty list of distinct names among "
                                     "linear_qkv, linear_proj, linear_fc1, linear_fc2, output_layer"),
    ({"target_modules": []}, "peft.target_modules"),
    ({"target_modules": ["linear_qkv", "linear_qkv"]}, "peft.target_modules"),
])
def test_bad_peft_config_is_a_config_error(change, phrase):
    from melama_mcore.errors import ConfigError
    from melama_mcore.strategies import strategy_for as check_peft_config

    with pytest.raises(ConfigError) as err:
        check_peft_config(Peft(**change))
    assert phrase in str(err.value)


def test_write_refuses_incomplete_adapters_and_existing_folder(hf_dir, peft_dir, tmp_path):
    from safetensors.torch import load_file

    from melama_mcore.errors import CheckpointError, UserError
    from melama_mcore.checkpoint.convert import write_peft_adapter
    from melama_mcore.models.llama.peft_adapter import from_peft

    adapters = from_peft(load_file(peft_dir / "adapter_model.safetensors"), arch(), Peft(), padded_vocab=640)
    out = tmp_path / "out"
    missing = {k: v for k, v in adapters.items() if "down_proj.lora_B" not in k}
    with pytest.raises(CheckpointError, match="no tensor decoder.layers.mlp.linear_fc2.lora.down_proj.lora_B"):
        write_peft_adapter(out, missing, arch(), Peft(), str(hf_dir))
    wrong = {**adapters, "decoder.layers.self_attention.linear_qkv.lora.q_proj.lora_A": torch.zeros(4, 8, 64)}
    with pytest.raises(CheckpointError, match=r"is \[4, 8, 64\], expected \[4, 4, 64\] for this model and rank 4"):
        write_peft_adapter(out, wrong, arch(), Peft(), str(hf_dir))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_peft_adapter(out, adapters, arch(), Peft(), str(hf_dir))


# ---------------------------------------------------------------------------------------------
# The torchrun worker
# ---------------------------------------------------------------------------------------------
def worker(root: Path, peft_dir: Path, name: str) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from safetensors.torch import load_file

    from melama_mcore.components.optimizer import build_optimizer
    from melama_mcore.config.job_config import JobConfig
    from melama_mcore.distributed import parallel
    from melama_mcore.models.llama import state_dict_adapter as sda
    from melama_mcore.models.llama.lora import adapter_sharded_state_dict, apply_lora, base_sharded_state_dict
    from melama_mcore.models.llama.model import build_model_chunks, output_vocab_size
    from melama_mcore.models.llama.peft_adapter import from_peft
    from melama_mcore.startup import start

    tp, pp, sp = LAYOUTS[name]
    out, a, peft = root / name, arch(), Peft()
    inputs = torch.load(root / "inputs.pt")
    tokens, positions = inputs["tokens"], torch.arange(12).expand(2, 12)
    cfg = JobConfig()
    for f in sda.ARCH_FIELDS:
        setattr(cfg.model, f, getattr(a, f))
    cfg.model.backend = "native"
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.sequence_parallel = tp, pp, sp
    cfg.training.device, cfg.training.precision, cfg.training.seq_length = "cpu", "fp32", 12
    cfg.optimizer.lr = 1e-2
    # The plain optimizer: its param groups are the model's own parameters, counted below by identity
    # (the distributed optimizer's are fp32 shard copies; tests/test_convert_lora.py trains with it).
    cfg.parallel.use_distributed_optimizer = False
    start(cfg)
    rank = dist.get_rank()
    padded = output_vocab_size(cfg, a)
    reference_adapters = from_peft(load_file(peft_dir / "adapter_model.safetensors"), a, peft, padded)

    def load_into(chunks, state_of, folder: Path) -> None:
        """Part of a dist-checkpoint into the chunks; the other part must be exactly what is missing."""
        loaded = dist_checkpointing.load({f"model{i}": state_of(c) for i, c in enumerate(chunks)}, str(folder))
        for i, chunk in enumerate(chunks):
            missing, unexpected = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
            other = base_sharded_state_dict if state_of is adapter_sharded_state_dict else adapter_sharded_state_dict
            expected = sorted(k for k in other(chunk) if not k.endswith("_extra_state"))  # megatron defaults those
            assert not unexpected and sorted(missing) == expected, (missing, unexpected)

    def lora_model(backend: str, config: JobConfig = cfg) -> list:
        """Built, adapted, base loaded (after apply_lora, as a run from checkpoint.init_from), the
        reference adapter put in through the adapters' sharded state (each rank its global slice)."""
        chunks = build_model_chunks(config, a, backend)
        apply_lora(chunks, peft, seed=config.training.seed)
        load_into(chunks, base_sharded_state_dict, root / "base")
        with torch.no_grad():
            for chunk in chunks:
                for sh in adapter_sharded_state_dict(chunk).values():
                    sh.data.copy_(reference_adapters[sh.key][sh.global_slice()])
        return chunks

    def run(model, forward_only: bool) -> torch.Tensor | None:
        """One micro-batch through megatron's schedule; loss sum(logits * weights) (vocab padding
        weighted 0); the gathered logits on the last stage."""
        weights = torch.zeros(2, 12, padded)
        weights[..., : a.vocab_size] = inputs["weights"]
        width = padded // tp
        local = weights[..., parallel_state.get_tensor_model_parallel_rank() * width:][..., :width]

        def loss_func(logits):
            gathered = gather_from_tensor_model_parallel_region(logits.detach().contiguous())[..., : a.vocab_size]
            return (logits * local).sum(), gathered

        def forward_step(data_iterator, chunk):
            return chunk(next(data_iterator), positions, None), loss_func

        result = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=model, num_microbatches=1,
            seq_length=12, micro_batch_size=2, forward_only=forward_only)
        return result[0] if parallel_state.is_pipeline_last_stage() else None

    def save_last_stage(tensor, file: str) -> None:
        if tensor is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(tensor, out / file)

    chunks = lora_model("native")
    adapter_params = [p for c in chunks for n, p in c.named_parameters() if ".lora." in n]
    base_before = [p.detach().clone() for c in chunks for n, p in c.named_parameters() if ".lora." not in n]
    model = parallel.wrap_for_training(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    optimized = [p for o in optimizers for g in o.optimizer.param_groups for p in g["params"]]
    ids = {id(p) for p in adapter_params}
    save_last_stage(run(model, forward_only=False), "logits.pt")
    grads = [(sh.key, sh.global_shape, [(o, o + n) for o, n in zip(sh.global_offset, (1,) * sh.prepend_axis_num
                                                                     + tuple(sh.local_shape))], sh.data.main_grad)
             for c in chunks for sh in adapter_sharded_state_dict(c).values()]
    torch.save(grads, out / f"grads_rank{rank}.pt")
    report = {
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "adapter_params": len(adapter_params),
        "trainable_non_adapter": [n for c in chunks for n, p in c.named_parameters()
                                  if p.requires_grad and ".lora." not in n],
        "grad_buffer_params": len({id(p) for m in model for b in m.buffers for p in b.params}),
        "optimizer_params": len(optimized) if {id(p) for p in optimized} == ids else -1,
        "optimizer_elements": sum(p.numel() for p in optimized),
    }
    if name == "2x2":
        optimizer.step()
        report["optimizer_state_params"] = sum(len(o.optimizer.state) for o in optimizers)
        base_after = [p for c in chunks for n, p in c.named_parameters() if ".lora." not in n]
        report["base_bitwise_unchanged"] = all(torch.equal(x, y) for x, y in zip(base_before, base_after))
        save_last_stage(run(model, forward_only=True), "logits_after_step.pt")
        if rank == 0:
            (out / "adapter_ckpt").mkdir()
        dist.barrier()
        dist_checkpointing.save({f"model{i}": adapter_sharded_state_dict(c) for i, c in enumerate(chunks)},
                                str(out / "adapter_ckpt"))
    if name == "1x1":
        for chunk in chunks:  # the TP2 x PP2 run's trained adapters, saved there
            chunk.eval()
        load_into(chunks, adapter_sharded_state_dict, root / "2x2" / "adapter_ckpt")
        save_last_stage(run(model, forward_only=True), "logits_loaded.pt")
        save_last_stage(run(lora_model("local"), forward_only=True), "logits_local.pt")
        cfg.training.precision = "bf16"  # built only: megatron's bf16 optimizer needs CUDA
        bf16 = build_model_chunks(cfg, a, "native")
        apply_lora(bf16, peft)
        report["bf16_adapter_dtypes"] = sorted({str(p.dtype) for c in bf16 for n, p in c.named_parameters()
                                                if ".lora." in n})
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))
    parallel.shutdown()


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writer spawns into this module
    worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
