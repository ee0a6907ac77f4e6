"""`melama convert`: Hugging Face LLaMA-2 checkpoints into this project's megatron checkpoints and back.

    melama convert import-hf --hf-dir Llama-2-7b-hf --out ckpt/llama2-7b --tp 2 --pp 1
    melama train ... checkpoint.init_from=ckpt/llama2-7b model.preset=llama2-7b
    melama convert export-hf --ckpt outputs/run/checkpoints --out me-llama-7b-hf --dtype bf16

Both directions stream. Import writes megatron's torch_dist format (PyTorch distributed checkpoint
files plus megatron's metadata.json/common.pt) through a save planner that builds each chunk from a
few HF tensor slices only when the writer asks for it, so memory holds about one chunk (at most
one tensor of one layer). Export loads one decoder layer at a time from the dist-checkpoint and
writes safetensors shards tensor by tensor (their headers are planned first). Outputs appear
atomically: a hidden temporary folder next to the destination is renamed when complete, and
removed on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import shutil
import struct
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, StorageMeta, TensorProperties
from torch.distributed.checkpoint.planner import (LoadPlan, SavePlan, SavePlanner, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from melama_mcore.errors import CheckpointError, UserError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Shared: atomic output folders, peak memory
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds."""
    if final.exists():
        raise UserError(f"{final} already exists: choose a new folder or delete it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder
    try:
        yield tmp
        for path in tmp.iterdir():  # some writers (safetensors) create private files
            path.chmod(0o666 & ~umask)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def dcp_errors(what: str):
    """PyTorch DCP reports failures as a CheckpointException (a BaseException whose text is a
    traceback): re-raise ours as they are, anything else as a one-line CheckpointError."""
    try:
        yield
    except CheckpointException as err:
        cause = next(iter(err.failures.values()))[0]
        if isinstance(cause, UserError):
            raise cause from None
        raise CheckpointError(f"{what}: {type(cause).__name__}: {str(cause).splitlines()[0]}") from None
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{what}: {type(err).__name__}: {err}") from None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face checkpoint lazily
# ---------------------------------------------------------------------------------------------
class HFCheckpoint:
    """Tensor names, shapes and dtypes of a HF folder, and reads of tensor slices, without ever
    holding more than the slice asked for (files are mapped per read, never kept open)."""

    def __init__(self, folder: Path):
        self.folder = folder
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
        self.config = json.loads((folder / "config.json").read_text())
        self.files = self._weight_files()
        self.index: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        for path in self.files:
            for name, shape, dtype in self._scan(path):
                self.index[name] = (path, shape, dtype)

    def _weight_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                missing = [n for n in names if not (self.folder / n).is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
                return [self.folder / n for n in names]
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.folder / single).is_file():
                return [self.folder / single]
        raise CheckpointError(f"{self.folder} has no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")

    @staticmethod
    def _scan(path: Path):
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        yield name, tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
            else:
                for name, t in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items():
                    yield name, tuple(t.shape), t.dtype
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None

    def read(self, name: str, index: tuple) -> torch.Tensor:
        path = self.index[name][0]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                tensor = f.get_slice(name)[index] if index else f.get_tensor(name)
        else:
            tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True)[name][index]
        # A view of a mapping of the file: only the slice's pages are read, and freed with the view.
        return tensor

    def check(self, arch: LlamaArch) -> torch.dtype:
        """Every expected tensor is present with its shape, all share one float dtype; returns it."""
        expected = sda.hf_shapes(arch)
        missing = [n for n in expected if n not in self.index]
        if missing:
            raise CheckpointError(f"{self.folder}: {len(missing)} tensors missing, e.g. {missing[0]} "
                                  "(an incomplete download, or another model than config.json describes)")
        unexpected = [n for n in self.index if n not in expected and not n.endswith("rotary_emb.inv_freq")]
        if unexpected:
            raise CheckpointError(f"{self.folder}: unsupported tensor {unexpected[0]} (a LLaMA-2 checkpoint "
                                  "has no biases and untied embeddings)")
        for name, shape in expected.items():
            if self.index[name][1] != shape:
                raise CheckpointError(f"{name} has shape {list(self.index[name][1])}, but config.json implies "
                                      f"{list(shape)}: the weights do not belong to this config")
        dtypes = {self.index[n][2] for n in expected}
        if len(dtypes) != 1 or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
            raise CheckpointError(f"{self.folder}: expected one floating-point dtype for all tensors, found "
                                  f"{sorted(map(str, dtypes))}")
        return dtypes.pop()


# ---------------------------------------------------------------------------------------------
# import-hf: a save planner that makes each chunk when the writer needs it
# ---------------------------------------------------------------------------------------------
class LazySavePlanner(SavePlanner):
    """A DCP save planner whose write items come from `chunks` (no state dict in memory) and whose
    data is built per item in resolve_data, when the writer asks for it, and checked against the plan."""

    def __init__(self, chunks: list[sda.Chunk], objects: dict[str, bytes], read, dtype: torch.dtype, progress):
        self.chunks = {(c.key, c.offsets): c for c in chunks}
        self.objects, self.read, self.dtype, self.progress = objects, read, dtype, progress

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        pass

    def create_local_plan(self):
        items = [WriteItem(index=MetadataIndex(c.key, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(
                               chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                               properties=TensorProperties(dtype=self.dtype), size=torch.Size(c.global_shape)))
                 for c in self.chunks.values()]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self.objects]
        return SavePlan(items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan):
        return new_plan

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[write_item.index.fqn])
        chunk = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.build(self.read).contiguous()
        if tuple(tensor.shape) != chunk.sizes or tensor.dtype != self.dtype:
            raise CheckpointError(f"{chunk.key} at {chunk.offsets}: built {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"planned {chunk.sizes} {self.dtype}")
        self.progress.update(1)
        return tensor


class DistCheckpointWriter(dcp.FileSystemWriter):
    """DCP's file writer, recording no path in .metadata: it would name the temporary folder, and the
    trunk's checkpoint loader accepts only DCP's own classes in that pickle (no pathlib objects)."""

    def storage_meta(self) -> StorageMeta:
        return StorageMeta(save_id=self.save_id)


def write_dist_checkpoint(folder: Path, chunks, objects, read, dtype: torch.dtype) -> None:
    """megatron's torch_dist format: PyTorch DCP files + megatron's metadata.json and common.pt."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    with tqdm(total=len(chunks), desc="import", unit="chunk") as progress, dcp_errors(f"cannot write {folder}"):
        # One file per chunk: DCP's writer keeps the last tensor it wrote for each key of a file until
        # the file is complete, which with a single file would hold about a layer and the embeddings.
        dcp.save({}, storage_writer=DistCheckpointWriter(str(folder), single_file_per_rank=False, thread_count=1),
                 planner=LazySavePlanner(chunks, objects, read, dtype, progress), no_dist=True)
    torch.save({}, folder / "common.pt")  # a weights-only checkpoint has no common (unsharded) state
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(folder))


def write_identity_and_checksums(folder: Path, arch: LlamaArch) -> None:
    """What the trunk checks before loading: the architecture (no tokenizer: HF imports carry none)
    and the crc32 of every file."""
    from melama_mcore.components.checkpointer import CHECKSUMS, IDENTITY, file_checksums, model_identity

    (folder / IDENTITY).write_text(json.dumps(model_identity(arch, None)))
    (folder / CHECKSUMS).write_text(json.dumps(file_checksums(folder), indent=0))


def import_config_yaml(arch: LlamaArch, tp: int, pp: int, vp: int | None, divisible_by: int) -> str:
    """The checkpoint's config.yaml: the model section a run must match, and the layout converted for."""
    from melama_mcore.config.job_config import JobConfig, dump_config

    cfg = JobConfig()
    cfg.model.preset = sda.matching_preset(arch)
    for field in sda.ARCH_FIELDS:
        setattr(cfg.model, field, getattr(arch, field))
    cfg.model.make_vocab_size_divisible_by = divisible_by
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline = tp, pp, vp
    return dump_config(cfg)


def validate_layout(arch: LlamaArch, tp: int, pp: int, vp: int | None) -> None:
    problems = []
    if tp < 1 or pp < 1 or (vp is not None and vp < 2):
        problems.append("--tp and --pp must be >= 1, --vp >= 2")
    for what, n in (("attention heads", arch.num_attention_heads), ("KV groups", arch.num_query_groups),
                    ("ffn_hidden_size", arch.ffn_hidden_size)):
        if tp >= 1 and n % tp:
            problems.append(f"{what} ({n}) are not divisible by --tp {tp}")
    stages = pp * (vp or 1)
    if stages >= 1 and arch.num_layers % stages:
        problems.append(f"{arch.num_layers} layers cannot be split into --pp x --vp = {stages} equal stages")
    if problems:
        raise UserError("invalid layout: " + "; ".join(problems))


def import_hf(hf_dir: Path, out: Path, tp: int, pp: int, vp: int | None, divisible_by: int) -> tuple[LlamaArch, int]:
    from melama_mcore.models.llama.config_registry import padded_vocab_size

    hf = HFCheckpoint(hf_dir)
    arch = sda.arch_from_hf_config(hf.config)
    validate_layout(arch, tp, pp, vp)
    dtype = hf.check(arch)
    padded = padded_vocab_size(arch.vocab_size, divisible_by, tp)
    log.info("importing %s: %d layers, hidden %d, %d heads / %d KV groups, vocab %d (padded to %d for TP %d), %s",
             hf_dir, arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups,
             arch.vocab_size, padded, tp, dtype)
    with atomic_dir(out) as tmp:
        write_dist_checkpoint(tmp, sda.import_chunks(arch, padded, tp), sda.extra_state_objects(arch), hf.read, dtype)
        (tmp / "config.yaml").write_text(import_config_yaml(arch, tp, pp, vp, divisible_by))
        write_identity_and_checksums(tmp, arch)
    return arch, padded


# ---------------------------------------------------------------------------------------------
# export-hf: one layer at a time out of the dist-checkpoint, one safetensors shard at a time out
# ---------------------------------------------------------------------------------------------
def checkpoint_arch(ckpt: Path, tokenizer: str | None) -> tuple[LlamaArch, int, torch.dtype]:
    """Architecture (from config.yaml, checked against the stored tensors), padded vocab, stored dtype."""
    from melama_mcore.components.checkpointer import check_no_code
    from melama_mcore.config.job_config import load_config
    from melama_mcore.config.validate import resolve_arch
    from melama_mcore.data.tokenizer import load_tokenizer

    if not (ckpt / "config.yaml").is_file():
        raise CheckpointError(f"{ckpt} has no config.yaml: not a checkpoint written by this project")
    check_no_code(ckpt)  # DCP unpickles .metadata: refuse one that would run code, before it does
    cfg = load_config(ckpt / "config.yaml")
    vocab = None
    if cfg.model.vocab_size is None:  # the run took its vocabulary from its tokenizer
        source = tokenizer or cfg.data.tokenizer
        if not source:
            raise CheckpointError(f"{ckpt}/config.yaml states no vocab_size and names no tokenizer: pass --tokenizer")
        vocab = load_tokenizer(source).vocab_size
    arch = resolve_arch(cfg, vocab)
    stored = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    padded = stored[sda.EMBEDDING].size[0] if sda.EMBEDDING in stored else 0
    for key, shape in sda.megatron_shapes(arch, padded).items():
        if key not in stored:
            raise CheckpointError(f"{ckpt} has no tensor {key}: not a complete LLaMA checkpoint")
        if tuple(stored[key].size) != shape:
            raise CheckpointError(f"{ckpt}: {key} is {list(stored[key].size)} but its config.yaml describes "
                                  f"{list(shape)}: config and weights are from different models")
    if padded < arch.vocab_size:
        raise CheckpointError(f"{ckpt}: the embedding has {padded} rows, fewer than the vocabulary ({arch.vocab_size})")
    return arch, padded, stored[sda.EMBEDDING].properties.dtype


class SliceLoadPlanner(DefaultLoadPlanner):
    """A DCP load planner that fills each target tensor with the box of a stored tensor starting at
    the given offsets, reading only the chunks that overlap it (one layer of a stacked tensor).
    A module-level class: a class made per call sits in a reference cycle, and the layer it refers
    to would stay in memory until the garbage collector happens to run."""

    def __init__(self, targets: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False)
        self.targets = targets

    def create_local_plan(self):
        items = []
        for key, (offsets, target) in self.targets.items():
            box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=target.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [box])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.targets[index.fqn][1]


class DistCheckpointReader:
    """Reads whole megatron tensors, or one layer's slice of the stacked decoder tensors, straight from
    the checkpoint's PyTorch DCP files (megatron's torch_dist format)."""

    def __init__(self, ckpt: Path, arch: LlamaArch, padded_vocab: int, dtype: torch.dtype):
        self.ckpt, self.dtype = ckpt, dtype
        self.shapes = sda.megatron_shapes(arch, padded_vocab)

    def _load(self, targets: dict) -> dict[str, torch.Tensor]:
        with dcp_errors(f"cannot read {self.ckpt}"):
            dcp.load({}, storage_reader=dcp.FileSystemReader(str(self.ckpt)), planner=SliceLoadPlanner(targets),
                     no_dist=True)
        return {key: target for key, (_, target) in targets.items()}

    def tensors(self, keys) -> dict[str, torch.Tensor]:
        return self._load({k: ((0,) * len(self.shapes[k]), torch.empty(self.shapes[k], dtype=self.dtype))
                           for k in keys})

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        loaded = self._load({k: ((layer,) + (0,) * (len(self.shapes[k]) - 1),
                                 torch.empty((1, *self.shapes[k][1:]), dtype=self.dtype)) for k in sda.LAYER_KEYS})
        return {k: t[0] for k, t in loaded.items()}


def hf_tensors(reader: DistCheckpointReader, arch: LlamaArch):
    """(name, tensor) in HF file order, holding one layer at a time."""
    embedding = reader.tensors([sda.EMBEDDING])[sda.EMBEDDING]
    yield "model.embed_tokens.weight", embedding[: arch.vocab_size]
    del embedding
    for layer in range(arch.num_layers):
        yield from sda.hf_layer(arch, layer, reader.layer(layer)).items()
    rest = reader.tensors([sda.FINAL_NORM, sda.OUTPUT])
    yield "model.norm.weight", rest[sda.FINAL_NORM]
    yield "lm_head.weight", rest[sda.OUTPUT][: arch.vocab_size]


def plan_shards(arch: LlamaArch, dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Consecutive tensor names per output shard, each shard at most max_bytes (or one tensor)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in sda.hf_shapes(arch).items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def copy_tokenizer(source: Path, out: Path) -> None:
    """A HF tokenizer folder's files, or a sentencepiece model as tokenizer.model with a LlamaTokenizer config."""
    if source.is_dir():
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
        found = [n for n in names if (source / n).is_file()]
        if not found:
            raise UserError(f"--tokenizer {source}: no tokenizer files ({', '.join(names)}) in that folder")
        for name in found:
            shutil.copyfile(source / name, out / name)
    elif source.is_file() and source.suffix == ".model":
        shutil.copyfile(source, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
             "add_bos_token": True, "add_eos_token": False}, indent=2))
    else:
        raise UserError(f"--tokenizer {source}: expected a sentencepiece .model file or a tokenizer folder")


class SafetensorsWriter:
    """One safetensors file written tensor by tensor in a planned order: the header (names, dtypes,
    shapes, offsets) is known from the plan, so the shard never has to sit in memory."""

    CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype):
        header, offset = {}, 0
        for name, shape in entries:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": self.CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        self.entries, self.dtype, self.nbytes = iter(entries), dtype, offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned, shape = next(self.entries)
        if (name, tuple(tensor.shape), tensor.dtype) != (planned, shape, self.dtype):
            raise CheckpointError(f"internal: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"planned {planned} {shape}")
        self.file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)  # little-endian, as the format

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def export_hf(ckpt: Path, out: Path, dtype_name: str, tokenizer: str | None,
              max_shard_bytes: int) -> tuple[LlamaArch, int]:
    arch, padded, stored_dtype = checkpoint_arch(ckpt, tokenizer)
    dtype = stored_dtype if dtype_name == "auto" else DTYPES[dtype_name]
    shapes = sda.hf_shapes(arch)
    shards = plan_shards(arch, dtype, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    log.info("exporting %s (%d layers, vocab %d of %d padded rows) as %s in %d shard(s)",
             ckpt, arch.num_layers, arch.vocab_size, padded, dtype, len(shards))
    stream = hf_tensors(DistCheckpointReader(ckpt, arch, padded, stored_dtype), arch)
    with atomic_dir(out) as tmp, tqdm(total=len(shapes), desc="export", unit="tensor") as progress:
        total = 0
        for file, names in zip(files, shards):
            writer = SafetensorsWriter(tmp / file, [(n, shapes[n]) for n in names], dtype)
            try:
                for _ in names:
                    name, tensor = next(stream)
                    writer.write(name, tensor.to(dtype))
                    del tensor  # not kept alive while the next layer is read
                    progress.update(1)
            finally:
                writer.close()
            total += writer.nbytes
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(sda.hf_config(arch, dtype), indent=2))
        if tokenizer:
            copy_tokenizer(Path(tokenizer), tmp)
    return arch, padded


# ---------------------------------------------------------------------------------------------
# --verify: the framework's logits against transformers'
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def framework_logits(ckpt: Path, arch: LlamaArch, tokens: torch.Tensor, tp: int = 1, pp: int = 1,
                     vp: int | None = None, divisible_by: int = 128) -> torch.Tensor | None:
    """fp32 CPU logits [batch, seq, vocab] of the trunk's model initialised from `ckpt` at a TP/PP/VP
    layout. Call it on every rank (torchrun) or alone for 1x1; the last pipeline stage returns the
    logits gathered across TP with the vocab padding stripped, other ranks None."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from melama_mcore.components.checkpointer import Checkpointer, model_identity
    from melama_mcore.config.job_config import JobConfig
    from melama_mcore.config.validate import detect_environment, resolve
    from melama_mcore.distributed import parallel
    from melama_mcore.models.llama.model import build_model_chunks

    cfg = JobConfig()
    for field in sda.ARCH_FIELDS:
        setattr(cfg.model, field, getattr(arch, field))
    cfg.model.make_vocab_size_divisible_by, cfg.model.backend = divisible_by, "native"
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline = tp, pp, vp
    cfg.training.device, cfg.training.precision, cfg.training.seq_length = "cpu", "fp32", tokens.shape[1]
    resolve(cfg, detect_environment(parallel.world_size_from_env()))
    parallel.initialize(cfg)
    try:
        chunks = build_model_chunks(cfg, arch, "native")
        Checkpointer(cfg, chunks, None, None, identity=model_identity(arch, None)).load_weights(str(ckpt))
        for chunk in chunks:
            chunk.eval()
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        microbatches = pp if vp else 1  # the interleaved schedule needs a multiple of pp micro-batches

        def forward_step(data_iterator, model):
            return model(next(data_iterator), positions, None), lambda out, non_loss_data=False: out

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([tokens] * microbatches) for _ in chunks],
            model=chunks, num_microbatches=microbatches, seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0], forward_only=True, collect_non_loss_data=True)
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0].contiguous())
        return logits[..., : arch.vocab_size].float()
    finally:
        parallel.shutdown()


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits.float()


def verify(hf_dir: Path, ckpt: Path, arch: LlamaArch, padded_vocab: int, tolerance: float = 1e-4) -> float:
    """Max |difference| / max |logit| over a few random tokens, fp32 on CPU; raises above tolerance.
    (fp32 is exact up to summation order; a bf16/fp16 side adds its own rounding.)"""
    tokens = torch.randint(0, arch.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    # One process at TP 1, padded like the checkpoint (whatever TP it was padded for).
    ours = framework_logits(ckpt, arch, tokens, divisible_by=padded_vocab)
    theirs = hf_logits(hf_dir, tokens)
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    log.info("verify: max |logit difference| / max |logit| = %.2e over %d tokens", error, tokens.numel())
    if error > tolerance:
        raise CheckpointError(f"verification failed: logits differ by {error:.2e} (relative) > {tolerance:.0e}")
    return error


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB or 500MB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama convert",
        description="Convert LLaMA-2 checkpoints between Hugging Face (safetensors or .bin) and this project's "
                    "megatron dist-checkpoints. Both directions stream (about one decoder layer "
                    "in memory) and write atomically (nothing appears at --out unless the conversion completes).")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import-hf", help="HF folder -> weights-only dist-checkpoint for `checkpoint.init_from`",
        description="Read config.json + weights of a HF LlamaForCausalLM and write a weights-only megatron "
                    "checkpoint. Train from it with checkpoint.init_from=OUT and the model fields written in "
                    "OUT/config.yaml (a run with another architecture is refused). The checkpoint loads at any "
                    "TP/PP/VP; --tp/--pp/--vp name the layout it is validated and chunked for, and --tp sets the "
                    "vocabulary padding (a multiple of 128 x TP; a run at another TP loads the real rows and "
                    "pads its own way).")
    imp.add_argument("--hf-dir", required=True, type=Path, help="folder with config.json and *.safetensors or *.bin")
    imp.add_argument("--out", required=True, type=Path, help="new folder for the checkpoint (must not exist)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate and pad for (default 1)")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate for (default 1)")
    imp.add_argument("--vp", type=int, default=None, help="virtual pipeline stages per rank (default none)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                     help="pad the vocabulary to a multiple of N x TP, as the trunk does (default 128)")
    imp.add_argument("--verify", action="store_true",
                     help="afterwards, compare fp32 logits of transformers and the framework on a few tokens "
                          "(loads both full models in memory)")
    exp = sub.add_parser(
        "export-hf", help="dist-checkpoint -> HF safetensors folder",
        description="Write any checkpoint of this project (a run's folder or its checkpoints/ folder: the latest; "
                    "one iter_* folder; a weights-only folder; saved at any TP/PP) as sharded safetensors with "
                    "model.safetensors.index.json and config.json, loadable by "
                    "transformers.AutoModelForCausalLM.from_pretrained. Vocabulary padding is stripped.")
    exp.add_argument("--ckpt", required=True, type=Path, help="checkpoint folder (see above)")
    exp.add_argument("--out", required=True, type=Path, help="new folder for the HF model (must not exist)")
    exp.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                     help="weights dtype (default auto: as stored in the checkpoint)")
    exp.add_argument("--tokenizer", help="a sentencepiece .model or a HF tokenizer folder to copy alongside; "
                                         "also the vocabulary size when the run took it from its tokenizer")
    exp.add_argument("--max-shard-size", type=_size, default=_size("5GB"), help="per safetensors file (default 5GB)")
    exp.add_argument("--verify", action="store_true",
                     help="afterwards, compare fp32 logits of the framework and of transformers on the export")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if args.command == "import-hf":
        arch, padded = import_hf(args.hf_dir, args.out, args.tp, args.pp, args.vp, args.make_vocab_size_divisible_by)
        log.info("wrote %s (peak RSS %.0f MiB)", args.out, peak_rss_mib())
        if args.verify:
            verify(args.hf_dir, args.out, arch, padded)
    else:
        from melama_mcore.components.checkpointer import find_checkpoint

        ckpt = find_checkpoint(args.ckpt)
        arch, padded = export_hf(ckpt, args.out, args.dtype, args.tokenizer, args.max_shard_size)
        log.info("wrote %s (peak RSS %.0f MiB)", args.out, peak_rss_mib())
        if args.verify:
            verify(args.out, ckpt, arch, padded)
    return 0


if __name__ == "__main__":  # the guard matters: megatron's checkpoint code may spawn into this module
    import sys

    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
