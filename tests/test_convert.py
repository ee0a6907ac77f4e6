"""HF LLaMA <-> megatron checkpoint conversion, checked against transformers itself.

A random GQA LlamaForCausalLM (built offline from a LlamaConfig, non-default RMSNorm eps and RoPE
base, random norm weights so any layout error shows) is imported at several TP/PP layouts; the
framework's fp32 logits (its real model, loaded by the trunk's checkpointer, run by megatron's
pipeline schedule under torchrun) must match transformers'. Run as a script, this file is that
torchrun worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from convert_fixtures import (ENV, HF_CONFIG, assert_refused, cli, convert, hf_logits, random_llama,
                              relative_error, safetensors_dict)
from rank_launcher import run_ranks
from trunk_fixtures import data_overrides, run_train

pytestmark = pytest.mark.slow

# The trunk's `nano` preset shapes, so a run can train the import with explicit model fields. The
# vocabulary holds the test tokenizer's and is padded (to 640 rows at TP 1, 768 at TP 2).
MODEL_OVERRIDES = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
                   "model.num_query_groups=2", "model.ffn_hidden_size=176", "model.vocab_size=520",
                   "model.norm_eps=1e-6", "model.rope_base=50000.0"]


def framework_logits(ckpt: Path, tmp: Path, tokens: torch.Tensor, tp: int = 1, pp: int = 1) -> torch.Tensor:
    """The trunk's logits, from ranks running this file; every last-stage rank's gathered copy must agree."""
    torch.save(tokens, tmp / "tokens.pt")
    result = run_ranks(tp * pp, __file__, [str(ckpt), str(tmp), str(tp), str(pp)], ENV, timeout=300,
                       log_path=tmp / "logits.log")
    assert result.returncode == 0, result.stdout[-4000:]
    outputs = [torch.load(p) for p in sorted(tmp.glob("logits_rank*.pt"))]
    assert len(outputs) == tp  # the TP ranks of the last stage
    assert all(torch.equal(o, outputs[0]) for o in outputs)
    return outputs[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    folder = random_llama(tmp_path_factory.mktemp("hf") / "llama", max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 1  # several shards, so the index path is used
    return folder


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, HF_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def import_hf(hf: Path, out: Path, tp: int = 1, pp: int = 1):
    from melama_mcore.checkpoint.convert import import_hf as run

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
    result = convert("export-hf", "--ckpt", run / "checkpoints", "--out", out)  # the run's tokenizer by default
    assert result.returncode == 0, result.stdout
    assert f"tokenizer: {tiny_data['tokenizer']} (the run's, data.tokenizer), copied into the export" in result.stdout
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
                   "invalid layout: 4 attention heads are not divisible by --tp=3")
    assert_refused(convert("import-hf", "--hf-dir", hf_dir, "--out", out, "--pp", "3", "--vp", "2"), out,
                   "4 layers cannot be split into --pp x --vp = 6 equal stages")
    assert_refused(convert("import-hf", "--hf-dir", hf_dir, "--out", out, "--vp", "2"), out,
                   "--vp needs --pp > 1")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = convert("import-hf", "--hf-dir", hf_dir, "--out", blocker / "ckpt")
    assert result.returncode == 2 and "Traceback" not in result.stdout
    assert result.stdout.strip().splitlines()[-1] == (f"error: --out {blocker / 'ckpt'}: {blocker} is a file, not a "
                                                      "folder; choose another --out")


def only_error(result: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (nothing logged before it, no traceback)."""
    assert result.returncode == 2 and "Traceback" not in result.stdout, result.stdout
    [line] = result.stdout.strip().splitlines()
    return line


def test_a_shard_without_a_tensor_its_index_names_is_named(hf_dir, tmp_path):
    """Issue 19: a shard that lacks a tensor the index maps to it (a damaged download): one line
    naming the file and the tensor, found from the headers before anything is converted. (A shard
    missing, and one cut short: test_missing_shard_..., test_truncated_safetensors_...)"""
    from safetensors.torch import load_file, save_file

    src, out = copy_hf(hf_dir, tmp_path / "src"), tmp_path / "ckpt"
    shard = sorted(src.glob("*.safetensors"))[2]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard, metadata={"format": "pt"})
    result = convert("import-hf", "--hf-dir", src, "--out", out)
    assert_refused(result, out)
    assert only_error(result) == (f"error: {shard} does not hold {dropped}, which model.safetensors.index.json says it "
                                  "does: a damaged or incomplete download? Fetch that file again")


def test_outputs_are_checked_before_anything_is_read(tmp_path):
    """--out is a new folder, published whole: one that exists, lies under a file or where nothing
    can be written is refused before the input is looked at (here the input does not even exist),
    and what was there is left as it was."""
    missing, existing, blocker = tmp_path / "nowhere", tmp_path / "existing", tmp_path / "a_file"
    existing.mkdir()
    (existing / "mine.txt").write_text("kept")
    blocker.write_text("")
    for command, source in (("import-hf", "--hf-dir"), ("export-hf", "--ckpt"), ("export-peft", "--ckpt")):
        assert only_error(convert(command, source, missing, "--out", existing)) == (
            f"error: --out {existing} already exists: choose a new folder, or delete it first")
        assert only_error(convert(command, source, missing, "--out", blocker / "new" / "out")) == (
            f"error: --out {blocker / 'new' / 'out'}: {blocker} is a file, not a folder; choose another --out")
        assert only_error(convert(command, source, missing, "--out", "/proc/melama/out")).startswith(
            "error: --out /proc/melama/out: cannot write in /proc (")
    assert [p.name for p in existing.iterdir()] == ["mine.txt"] and blocker.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "existing"]


def test_inputs_of_the_wrong_kind_say_what_to_give(hf_dir, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    import_hf(hf_dir, ckpt)
    assert_refused(convert("import-hf", "--hf-dir", ckpt, "--out", out), out,
                   f"error: {ckpt} is a checkpoint of this project, not a Hugging Face model folder: it needs no "
                   f"import (train from it with checkpoint.init_from={ckpt})")
    weights = sorted(hf_dir.glob("*.safetensors"))[0]
    assert_refused(convert("import-hf", "--hf-dir", weights, "--out", out), out,
                   f"error: {weights} is a file: give the Hugging Face model's folder (config.json and the weights)")
    assert_refused(convert("export-hf", "--ckpt", hf_dir, "--out", out), out,
                   f"error: {hf_dir} is a Hugging Face model folder, not a checkpoint of this project: import it first "
                   f"with `melama convert import-hf --hf-dir {hf_dir} --out CKPT`")
    partial = tmp_path / "run" / "checkpoints" / "iter_0000002.partial"  # a save a crash interrupted
    shutil.copytree(ckpt, partial)
    for command in ("export-hf", "export-peft"):
        assert_refused(convert(command, "--ckpt", partial, "--out", out), out,
                       f"error: {partial} is an interrupted save, never published", "give the run's folder or its "
                       "checkpoints/ folder (its latest complete checkpoint)")


def test_export_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(hf_dir, tmp_path, spm_model, other_spm_model):
    """--tokenizer with another vocabulary than the checkpoint records (same size, other pieces):
    refused naming both, unless --allow-tokenizer-mismatch; one with more tokens than the model's
    vocabulary is refused either way."""
    from melama_mcore.checkpoint.integrity import model_identity
    from melama_mcore.data.tokenizer import load_tokenizer

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    import_hf(hf_dir, ckpt)
    identity_file = ckpt / "model_identity.json"
    identity = json.loads(identity_file.read_text())  # as a run trained with spm_model records it
    recorded = model_identity(None, load_tokenizer(spm_model))["tokenizer"]
    identity_file.write_text(json.dumps({**identity, "tokenizer": recorded}))
    assert_refused(convert("export-hf", "--ckpt", ckpt, "--out", out, "--tokenizer", other_spm_model), out,
                   f"error: --tokenizer {other_spm_model} (400 tokens, another vocabulary) is not the tokenizer {ckpt} "
                   f"was trained with, {spm_model} (400 tokens): token ids would mean other text",
                   "or pass --allow-tokenizer-mismatch if you mean it")
    result = convert("export-hf", "--ckpt", ckpt, "--out", out, "--tokenizer", other_spm_model,
                     "--allow-tokenizer-mismatch")
    assert result.returncode == 0 and "using it anyway (--allow-tokenizer-mismatch)" in result.stdout
    assert (out / "tokenizer.model").read_bytes() == Path(other_spm_model).read_bytes()
    assert convert("export-hf", "--ckpt", ckpt, "--out", tmp_path / "same", "--tokenizer", spm_model).returncode == 0
    config = ckpt / "config.yaml"  # a model of 300 tokens
    config.write_text(config.read_text().replace("vocab_size: 520", "vocab_size: 300"))
    identity_file.write_text(json.dumps({**identity, "arch": {**identity["arch"], "vocab_size": 300}}))
    assert_refused(convert("export-hf", "--ckpt", ckpt, "--out", tmp_path / "wide", "--tokenizer", spm_model,
                           "--allow-tokenizer-mismatch"), tmp_path / "wide",
                   f"error: --tokenizer {spm_model} has 400 tokens, more than the vocabulary of {ckpt} (300)")


def test_an_import_records_the_tokenizer_of_its_folder(hf_dir, tmp_path, spm_model):
    """Meta's folders carry tokenizer.model: the import records it (config.yaml and the vocabulary in
    model_identity.json), so its export, eval and eval-ppl need no --tokenizer."""
    from melama_mcore.checkpoint.hf_folder import copy_tokenizer
    from melama_mcore.checkpoint.integrity import model_identity
    from melama_mcore.config.job_config import load_config
    from melama_mcore.data.tokenizer import load_tokenizer

    hf, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    shutil.copytree(hf_dir, hf)
    copy_tokenizer(Path(spm_model), hf)
    import_hf(hf, ckpt)
    assert load_config(ckpt / "config.yaml").data.tokenizer == str((hf / "tokenizer.model").resolve())
    recorded = json.loads((ckpt / "model_identity.json").read_text())["tokenizer"]
    expected = model_identity(None, load_tokenizer(spm_model))["tokenizer"]
    assert {k: recorded[k] for k in ("vocab_size", "vocab_sha256")} == {k: expected[k] for k in ("vocab_size", "vocab_sha256")}
    result = convert("export-hf", "--ckpt", ckpt, "--out", out)
    assert result.returncode == 0, result.stdout
    assert (out / "tokenizer.model").read_bytes() == Path(spm_model).read_bytes()


def test_conversions_print_no_library_warnings(hf_dir, tmp_path):
    """torch's "torch.distributed is disabled ..." (DCP called for one process, on purpose) and the
    like are not printed: the warning filters as a command has them, every warning recorded."""
    from melama_mcore.logs import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        quiet_libraries()
        assert convert("import-hf", "--hf-dir", hf_dir, "--out", tmp_path / "ckpt").returncode == 0
        assert convert("export-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "out").returncode == 0
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


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
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    checksums = json.loads((ckpt / "checksums.json").read_text())
    assert set(checksums) >= {p.name for p in ckpt.glob("*.distcp")} | {".metadata", "common.pt", "metadata.json"}
    assert_refused(convert("export-hf", "--ckpt", ckpt, "--out", out), out, "is damaged", data.name,
                   "corrupt or truncated")  # named by its checksum before anything is read
    (ckpt / "checksums.json").unlink()  # unverifiable: the truncation is met after writing began
    assert_refused(convert("export-hf", "--ckpt", ckpt, "--out", out), out, "cannot read")
    deeper = tmp_path / "new" / "hf_out"  # the folders made for it go too
    result = convert("export-hf", "--ckpt", ckpt, "--out", deeper)
    assert result.returncode == 2 and "cannot read" in result.stdout and not (tmp_path / "new").exists()
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


def test_truncated_safetensors_and_unsafe_pickle_are_refused(hf_dir, tmp_path):
    """import-hf of a damaged download, and of a .bin whose pickle would import a class: one line
    naming the file, never torch's advice to load it without weights_only."""
    src, out = copy_hf(hf_dir, tmp_path / "src"), tmp_path / "ckpt"
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = convert("import-hf", "--hf-dir", src, "--out", out)
    assert_refused(result, out, f"{shard} is not a complete safetensors file", "Fetch it again")
    assert result.stdout.strip().splitlines()[-1].startswith(f"error: {shard} is not a complete safetensors file")

    unsafe = tmp_path / "bin"
    unsafe.mkdir()
    shutil.copy(hf_dir / "config.json", unsafe)
    torch.save({**safetensors_dict(hf_dir), "extra": Exploit()}, unsafe / "pytorch_model.bin")
    result = convert("import-hf", "--hf-dir", unsafe, "--out", out)
    assert_refused(result, out, f"error: {unsafe / 'pytorch_model.bin'} holds more than tensors (it refers to "
                                "print, which is not plain data) and is not loaded: such a pickle can run code")
    assert "weights_only" not in result.stdout and "a weights file ran code" not in result.stdout


class Exploit:
    def __reduce__(self):  # unpickling calls print(...): any function could be called instead
        return (print, ("a weights file ran code",))


VERIFY_WHERE_IT_CANNOT_RUN = """
import sys
import torch
if sys.argv[1] == "no-transformers":
    sys.modules["transformers"] = None  # as if not installed: importing it fails
else:
    torch.cuda.is_available = lambda: True  # as on a GPU node
from melama_mcore.cli import main
sys.exit(main(["convert", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("where,message", [
    ("no-transformers", "error: --verify compares the logits with transformers', which is not installed: "
                        "pip install melama-mcore[hf] (or drop --verify)"),
    ("cuda-visible", "error: --verify runs the framework's model on CPU, which megatron allows only with CUDA "
                     "hidden: prefix the command with CUDA_VISIBLE_DEVICES= (or drop --verify)"),
])
def test_verify_that_cannot_run_is_refused_before_converting(hf_dir, tmp_path, where, message):
    ckpt = tmp_path / "ckpt"
    import_hf(hf_dir, ckpt)
    for args in (["import-hf", "--hf-dir", hf_dir, "--out", tmp_path / "out"],
                 ["export-hf", "--ckpt", ckpt, "--out", tmp_path / "out"]):
        result = subprocess.run([sys.executable, "-c", VERIFY_WHERE_IT_CANNOT_RUN, where, *map(str, args), "--verify"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)
        assert_refused(result, tmp_path / "out")
        assert result.stdout.strip().splitlines() == [message]  # before any conversion began: nothing logged


BROKEN_EXPORT = """
import sys
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.cli import main

mapping = sda.hf_layer
def gate_and_up_swapped(arch, layer, tensors):  # a mapping defect --verify must catch
    out, names = mapping(arch, layer, tensors), sda.hf_layer_names(layer)
    out[names["gate"]], out[names["up"]] = out[names["up"]], out[names["gate"]]
    return out
sda.hf_layer = gate_and_up_swapped
sys.exit(main(["convert", *sys.argv[1:]]))
"""


def test_export_verify_bound_follows_the_dtype(hf_dir, tmp_path):
    """bf16 rounds the fp32 checkpoint's weights (a relative error of a few 1e-3 on the logits, above
    fp32's 1e-4): verified within the bound the rounding implies. A defective export fails that bound
    and leaves nothing at --out."""
    ckpt = tmp_path / "ckpt"
    import_hf(hf_dir, ckpt)
    result = cli("export-hf", "--ckpt", ckpt, "--out", tmp_path / "bf16", "--dtype", "bf16", "--verify")
    assert result.returncode == 0, result.stdout
    shift = float(re.search(r"rounding the weights to bfloat16 moves the framework's logits by (\S+) ",
                            result.stdout)[1])
    error, bound = re.search(r"max \|logit difference\| / max \|logit\| = (\S+) over 16 tokens \(bound (\S+)\)",
                             result.stdout).groups()
    assert 1e-4 < shift < 2**-7  # bf16's rounding shows, below its machine epsilon
    assert float(error) <= float(bound) == pytest.approx(1e-4 + 2 * shift, rel=0.01)
    assert float(error) == pytest.approx(shift, rel=0.01)  # the export holds exactly the rounded weights

    out = tmp_path / "broken"
    broken = subprocess.run([sys.executable, "-c", BROKEN_EXPORT, "export-hf", "--ckpt", str(ckpt), "--out",
                             str(out), "--dtype", "bf16", "--verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)
    assert_refused(broken, out, "error: verification failed: logits differ by", "nothing was written")


def test_conversions_carry_the_source_architecture(tmp_path):
    """A shape no preset has, with its own context length, RoPE base and norm eps: config.yaml states
    them (a run resolves to exactly this architecture), and export writes them back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from melama_mcore.config.job_config import load_config
    from melama_mcore.models.llama import state_dict_adapter as sda
    from melama_mcore.models.llama.config_registry import resolve_arch

    source = dict(HF_CONFIG, num_hidden_layers=2, hidden_size=48, intermediate_size=96, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=50000.0)
    hf = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(**source)).save_pretrained(hf)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert convert("import-hf", "--hf-dir", hf, "--out", ckpt).returncode == 0
    cfg = load_config(ckpt / "config.yaml")
    assert cfg.training.seq_length == 256 and cfg.model.preset != "llama2-7b"
    assert resolve_arch(cfg.model, None) == sda.arch_from_hf_config(json.loads((hf / "config.json").read_text()))
    result = convert("export-hf", "--ckpt", ckpt, "--out", out)
    assert result.returncode == 0, result.stdout
    assert f"tokenizer: none: {ckpt} names no tokenizer (nor had the Hugging Face folder it was imported from)" in result.stdout
    exported = json.loads((out / "config.json").read_text())
    original = json.loads((hf / "config.json").read_text())
    for key in ("architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings"):
        assert exported[key] == original[key], key
    assert exported["rope_theta"] == (original.get("rope_parameters") or original)["rope_theta"]
    config = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(config.replace("tokenizer: ''", f"tokenizer: {tmp_path / 'gone.model'}"))
    assert_refused(convert("export-hf", "--ckpt", ckpt, "--out", tmp_path / "again"), tmp_path / "again",
                   f"the tokenizer its config.yaml names (data.tokenizer), {tmp_path / 'gone.model'}, does not exist "
                   "here: pass --tokenizer PATH")


# ---------------------------------------------------------------------------------------------
# Streaming: peak memory stays near one layer plus one output shard
# ---------------------------------------------------------------------------------------------
RSS_SCRIPT = """
import json, re, sys
from pathlib import Path
# Everything the conversion imports, so that only its data is measured.
import megatron.core.dist_checkpointing, safetensors.torch, torch.distributed.checkpoint
import melama_mcore.checkpoint.checkpointer, melama_mcore.config.validate, melama_mcore.data.tokenizer
from melama_mcore.checkpoint import convert

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
    from melama_mcore.logits import framework_logits as run_forward

    ckpt, tmp, tp, pp = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    arch = sda.arch_from_hf_config(dict(HF_CONFIG, model_type="llama"))
    logits = run_forward(ckpt, arch, torch.load(tmp / "tokens.pt"), tp, pp)
    if logits is not None:
        torch.save(logits, tmp / f"logits_rank{os.environ['RANK']}.pt")
