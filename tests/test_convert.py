"""HF LLaMA <-> megatron checkpoint conversion, checked against transformers itself.

A random GQA LlamaForCausalLM (built offline from a LlamaConfig, non-default RMSNorm eps and RoPE
base, random norm weights so any layout error shows) is imported at several TP/PP layouts; the
framework's fp32 logits (its real model, loaded by the trunk's checkpointer, run by megatron's
pipeline schedule under torchrun) must match transformers'. Run as a script, this file is that
torchrun worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trunk_fixtures import data_overrides, free_port, run_train

pytestmark = pytest.mark.slow

# The trunk's `nano` preset shapes, so a run can train the import with explicit model fields. The
# vocabulary holds the test tokenizer's and is padded (to 640 rows at TP 1, 768 at TP 2).
HF_CONFIG = dict(vocab_size=520, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=128,
                 tie_word_embeddings=False)
MODEL_OVERRIDES = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
                   "model.num_query_groups=2", "model.ffn_hidden_size=176", "model.vocab_size=520",
                   "model.norm_eps=1e-6", "model.rope_base=50000.0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model(tokens).logits


def framework_logits(ckpt: Path, tmp: Path, tokens: torch.Tensor, tp: int = 1, pp: int = 1) -> torch.Tensor:
    """The trunk's logits, from a torchrun of this file; every last-stage rank's gathered copy must agree."""
    torch.save(tokens, tmp / "tokens.pt")
    nproc = tp * pp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), __file__, str(ckpt), str(tmp), str(tp), str(pp)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    outputs = [torch.load(p) for p in sorted(tmp.glob("logits_rank*.pt"))]
    assert len(outputs) == tp  # the TP ranks of the last stage
    assert all(torch.equal(o, outputs[0]) for o in outputs)
    return outputs[0]


def cli(*args: str) -> subprocess.CompletedProcess:
    """`melama convert ...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "melama_mcore.cli", "convert", *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)


def convert(*args: str) -> subprocess.CompletedProcess:
    """The same in this process (what the CLI prints on stderr, as `stdout`), without the start-up cost."""
    from melama_mcore.cli import run_main
    from melama_mcore.models.llama.convert import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(main, list(map(str, args)))
    return subprocess.CompletedProcess(args, code, stdout=err.getvalue())


def safetensors_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(folder, max_shard_size="200KB")  # several shards, so the index path is used
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, HF_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def import_hf(hf: Path, out: Path, tp: int = 1, pp: int = 1):
    from melama_mcore.models.llama.convert import import_hf as run

    return run(hf, out, tp, pp, None, 128)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("imported,run", [((1, 1), (1, 1)), ((2, 1), (2, 1)), ((1, 2), (1, 2)), ((2, 2), (2, 2)),
                                          ((1, 1), (2, 2))],  # and at another layout (vocab padded 640 -> 768)
                         ids=["1x1", "2x1", "1x2", "2x2", "1x1-run-at-2x2"])
def test_import_logits_match_transformers(hf_dir, tokens, tmp_path, imported, run):
    ckpt = tmp_path / "ckpt"
    import_hf(hf_dir, ckpt, *imported)
    ours = framework_logits(ckpt, tmp_path, tokens, *run)
    reference = hf_logits(hf_dir, tokens)
    assert ours.shape == reference.shape
    assert relative_error(ours, reference) < 1e-5


def test_import_export_round_trip_is_bitwise(hf_dir, tmp_path):
    original = safetensors_dict(hf_dir)
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"
    import_hf(hf_dir, ckpt, tp=2)  # chunked for TP 2 and padded to 512 rows; stripped again below
    result = convert("export-hf", "--ckpt", ckpt, "--out", out, "--max-shard-size", "300KB")
    assert result.returncode == 0, result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    exported = safetensors_dict(out)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    hf_logits(out, torch.arange(8)[None])  # transformers loads it with no missing or unexpected keys


def test_bin_checkpoint_and_dtype(hf_dir, tmp_path):
    """A pytorch_model.bin (read with weights_only=True) in bf16, exported back as bf16 and as fp32."""
    bf16 = {k: v.to(torch.bfloat16) for k, v in safetensors_dict(hf_dir).items()}
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src)
    torch.save(bf16, src / "pytorch_model.bin")
    import_hf(src, tmp_path / "ckpt")
    assert convert("export-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "a").returncode == 0
    assert convert("export-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "b", "--dtype", "fp32").returncode == 0
    same, wide = safetensors_dict(tmp_path / "a"), safetensors_dict(tmp_path / "b")
    for name, tensor in bf16.items():
        assert torch.equal(same[name], tensor) and torch.equal(wide[name], tensor.float()), name


def test_import_train_export(hf_dir, tiny_data, tokens, tmp_path):  # noqa: F811
    ckpt, run, out = tmp_path / "ckpt", tmp_path / "run", tmp_path / "hf_out"
    import_hf(hf_dir, ckpt)
    run_train(run, [f"checkpoint.init_from={ckpt}", "training.train_iters=1", "optimizer.lr_warmup_iters=0",
                    *MODEL_OVERRIDES,
                    *data_overrides(tiny_data)])
    result = convert("export-hf", "--ckpt", run / "checkpoints", "--out", out, "--tokenizer", tiny_data["tokenizer"])
    assert result.returncode == 0, result.stdout
    trained, original = safetensors_dict(out), safetensors_dict(hf_dir)
    assert any(not torch.equal(trained[k], original[k]) for k in original)  # the step changed the weights
    ours = framework_logits(run / "checkpoints", tmp_path, tokens)
    assert relative_error(ours, hf_logits(out, tokens)) < 1e-5
    import sentencepiece
    from transformers import AutoTokenizer

    text = "the patient was given aspirin"
    pieces = sentencepiece.SentencePieceProcessor(model_file=tiny_data["tokenizer"]).encode(text)
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == [1, *pieces]  # LLaMA's BOS, then the same ids


def test_init_from_another_architecture_is_refused(hf_dir, tiny_data, tmp_path):  # noqa: F811
    ckpt = tmp_path / "ckpt"
    import_hf(hf_dir, ckpt)
    overrides = [o for o in MODEL_OVERRIDES if not o.startswith("model.norm_eps")]
    result = run_train(tmp_path / "run", [f"checkpoint.init_from={ckpt}", *overrides, *data_overrides(tiny_data)],
                       check=False)
    assert result.returncode == 2
    assert "model.norm_eps: checkpoint 1e-06, this run 1e-05" in result.stdout
    assert "Traceback" not in result.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: a clear one-line error, nothing written
# ---------------------------------------------------------------------------------------------
def copy_hf(hf_dir: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(hf_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def assert_refused(result: subprocess.CompletedProcess, out: Path, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    for phrase in phrases:
        assert phrase in result.stdout, result.stdout
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder left


@pytest.mark.parametrize("change,phrase", [
    ({"attention_bias": True}, "attention_bias"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE scaling"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only LlamaForCausalLM"),
    ({"intermediate_size": 352}, "mlp.gate_proj.weight has shape [176, 64], but config.json implies [352, 64]"),
])
def test_unsupported_or_mismatched_hf_config(hf_dir, tmp_path, change, phrase):
    src = copy_hf(hf_dir, tmp_path / "src", **change)
    assert_refused(convert("import-hf", "--hf-dir", src, "--out", tmp_path / "ckpt"), tmp_path / "ckpt", phrase)


def test_missing_shard_mixed_dtypes_and_bad_layout(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = copy_hf(hf_dir, tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[1]
    tensors = load_file(shard)
    shard.unlink()
    out = tmp_path / "ckpt"
    assert_refused(convert("import-hf", "--hf-dir", src, "--out", out), out, "missing", shard.name)
    save_file({k: v.half() for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    assert_refused(convert("import-hf", "--hf-dir", src, "--out", out), out, "one floating-point dtype")
    assert_refused(convert("import-hf", "--hf-dir", hf_dir, "--out", out, "--tp", "3"), out,
                   "attention heads (4) are not divisible by --tp 3")


def test_export_refuses_mismatched_or_corrupt_checkpoint(hf_dir, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"
    import_hf(hf_dir, ckpt)
    config = ckpt / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("hidden_size: 64", "hidden_size: 128"))
    assert_refused(convert("export-hf", "--ckpt", ckpt, "--out", out), out,
                   "config and weights are from different models")
    config.write_text(original)
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
    data = ckpt / next(v.relative_path for k, v in storage.items() if k.fqn == "output_layer.weight")  # read last
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated: fails after writing began
    assert_refused(convert("export-hf", "--ckpt", ckpt, "--out", out), out, "cannot read")
    checksums = json.loads((ckpt / "checksums.json").read_text())  # the trunk refuses it too, by checksum
    assert set(checksums) >= {p.name for p in ckpt.glob("*.distcp")} | {".metadata", "common.pt", "metadata.json"}
    assert_refused(convert("export-hf", "--ckpt", tmp_path, "--out", out), out, "is not a checkpoint")


def test_cli_import_verify(hf_dir, tmp_path):
    result = cli("import-hf", "--hf-dir", hf_dir, "--out", tmp_path / "ckpt", "--tp", "2", "--verify")
    assert result.returncode == 0, result.stdout
    assert "verify: max |logit difference| / max |logit|" in result.stdout


def test_cli_help_and_one_line_errors(tmp_path):
    result = cli("import-hf", "--help")
    assert result.returncode == 0 and "checkpoint.init_from" in result.stdout
    result = cli("export-hf", "--ckpt", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stdout.startswith("error: ") and "Traceback" not in result.stdout


# ---------------------------------------------------------------------------------------------
# Streaming: peak memory stays near one layer plus one output shard
# ---------------------------------------------------------------------------------------------
RSS_SCRIPT = """
import json, re, sys
from pathlib import Path
# Everything the conversion imports, so that only its data is measured.
import megatron.core.dist_checkpointing, safetensors.torch, torch.distributed.checkpoint
import melama_mcore.components.checkpointer, melama_mcore.config.validate, melama_mcore.data.tokenizer
from melama_mcore.models.llama import convert

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM): imports briefly use more
baseline = status("VmRSS")
src, out, direction = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if direction == "import":
    convert.import_hf(src, out, 2, 2, None, 128)
else:
    convert.export_hf(src, out, "auto", None, 64 * 2**20)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


def test_streaming_peak_rss(tmp_path):
    from safetensors.torch import save_file

    from melama_mcore.models.llama import state_dict_adapter as sda

    # 12 wide layers (46 MiB each in fp32), 560 MiB in all: several times the bound below.
    config = dict(HF_CONFIG, hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=512, architectures=["LlamaForCausalLM"], model_type="llama")
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    arch = sda.arch_from_hf_config(config)
    shapes = sda.hf_shapes(arch)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for layer in range(-1, arch.num_layers + 1):  # one file per layer; embeddings and head in the first/last
        names = [n for n in shapes if (f"layers.{layer}." in n) or (layer == -1 and "embed" in n)
                 or (layer == arch.num_layers and n in ("model.norm.weight", "lm_head.weight"))]
        file = f"part-{layer + 1:03d}.safetensors"
        save_file({n: torch.randn(shapes[n], generator=generator) for n in names}, src / file,
                  metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    layer_bytes = sum(torch.Size(s).numel() * 4 for n, s in shapes.items() if "layers.0." in n)
    total_bytes = sum(torch.Size(s).numel() * 4 for s in shapes.values())

    measured = {}
    for direction, source, out in (("import", src, tmp_path / "ckpt"), ("export", tmp_path / "ckpt", tmp_path / "out")):
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(source), str(out), direction],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        rss = json.loads(result.stdout.strip().splitlines()[-1])
        measured[direction] = rss["peak"] - rss["baseline"]
    shard_bytes = 64 * 2**20
    bound = 2 * (layer_bytes + shard_bytes)
    mib = {k: round(v / 2**20) for k, v in measured.items()}
    print(f"model {total_bytes / 2**20:.0f} MiB, layer {layer_bytes / 2**20:.0f} MiB, shard 64 MiB, "
          f"bound {bound / 2**20:.0f} MiB; peak RSS above baseline: {mib}")
    assert total_bytes > bound  # the model does not fit the bound: only streaming passes
    assert measured["import"] < bound and measured["export"] < bound, mib
    assert torch.equal(safetensors_dict(tmp_path / "out")["model.layers.11.mlp.down_proj.weight"],
                       safetensors_dict(src)["model.layers.11.mlp.down_proj.weight"])


# ---------------------------------------------------------------------------------------------
if __name__ == "__main__":  # torchrun worker: the framework's logits at a TP x PP layout
    from melama_mcore.models.llama import state_dict_adapter as sda
    from melama_mcore.models.llama.convert import framework_logits as run_forward

    ckpt, tmp, tp, pp = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    arch = sda.arch_from_hf_config(dict(HF_CONFIG, model_type="llama"))
    logits = run_forward(ckpt, arch, torch.load(tmp / "tokens.pt"), tp, pp)
    if logits is not None:
        torch.save(logits, tmp / f"logits_rank{os.environ['RANK']}.pt")
