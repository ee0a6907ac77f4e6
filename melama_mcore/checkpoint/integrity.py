"""What is checked before a checkpoint is loaded: its files are the bytes that were saved (crc32 in
checksums.json), its weights belong to the model that loads them (model_identity.json), and no
pickle inside it can run code. The trainer's checkpointer and the converter use the same checks.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
import re
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from melama_mcore.checkpoint.layout import CHECKSUMS, IDENTITY, LATEST
from melama_mcore.data.tokenizer import vocabulary_difference
from melama_mcore.errors import CheckpointError, CheckpointMismatchError
from melama_mcore.strategies import strategy_for

if TYPE_CHECKING:
    from melama_mcore.config.job_config import JobConfig

log = logging.getLogger(__name__)


# -- checksums ---------------------------------------------------------------------------------------
def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_checksums(folder: Path, names=None) -> dict[str, int]:
    """crc32 of the named files of a folder (default: all of them), in checksums.json's format."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if names is None else names
    return {n: _crc32(folder / n) for n in names}


def verify_checksums(folder: Path, share: Callable[[Iterable[str]], list[str]] = sorted,
                     combine: Callable[[list[str]], list[str]] = list) -> None:
    """CheckpointError naming every file whose bytes changed since the save. `share` picks the files
    this process reads, `combine` merges every process's findings (the trainer splits the reads
    over its ranks and all ranks agree); the defaults read everything here."""
    path = folder / CHECKSUMS
    if not path.is_file():
        log.warning("%s has no %s (saved with checkpoint.verify_checksums=false, an older checkpoint, or a "
                    "conversion): its files cannot be verified", folder, CHECKSUMS)
        return
    saved = json.loads(path.read_text())
    problems = []
    for name in share(saved):
        file = folder / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif (crc := _crc32(file)) != saved[name]:
            problems.append(f"{file}: checksum {crc:08x}, saved {saved[name]:08x} (corrupt or truncated)")
    problems = sorted(combine(problems))
    if problems:
        remedy = (f"delete {folder} and write an earlier step into {folder.parent / LATEST}"
                  if (folder.parent / LATEST).is_file() else "write the checkpoint again")
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems)}. Restore the file, or {remedy}")


# -- identity ----------------------------------------------------------------------------------------
def model_identity(arch, tokenizer, cfg: JobConfig | None = None) -> dict:
    """What a checkpoint's weights mean: the resolved architecture and the tokenizer's vocabulary;
    with `cfg`, what its training strategy records (an adapter checkpoint: the adapters' settings and
    their base)."""
    identity = {"arch": dataclasses.asdict(arch) if arch is not None else None, "tokenizer": None}
    strategy_identity = strategy_for(cfg.peft).identity(cfg) if cfg is not None else None
    if strategy_identity is not None:
        identity["peft"] = strategy_identity
    if tokenizer is not None:
        identity["tokenizer"] = tokenizer_record(tokenizer)
    return identity


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint records of its tokenizer (data/tokenizer.py's Tokenizer): the vocabulary's
    size and sha256 (Tokenizer.vocab_sha256, the digest data markers record too)."""
    return {"path": str(tokenizer.path), "vocab_size": tokenizer.vocab_size, "vocab_sha256": tokenizer.vocab_sha256}


def read_identity(folder: Path) -> dict | None:
    path = folder / IDENTITY
    return json.loads(path.read_text()) if path.is_file() else None


def identity_differences(saved: dict, identity: dict, with_adapters: bool = False) -> list[str]:
    """Every difference that gives weights another meaning: architecture fields (positions are
    computed, not stored) and the tokenizer's vocabulary; `with_adapters`: also adapter settings."""
    diffs = []
    if with_adapters:
        mine, theirs = identity.get("peft") or {}, saved.get("peft") or {}
        for key in ("method", "rank", "alpha", "target_modules"):
            default = "none" if key == "method" else None
            if mine.get(key, default) != theirs.get(key, default):
                diffs.append(f"peft.{key}: checkpoint {theirs.get(key)}, this run {mine.get(key)}")
    mine, theirs = identity.get("arch") or {}, saved.get("arch") or {}
    for key in sorted((set(mine) & set(theirs)) - {"max_position_embeddings"}):
        if mine[key] != theirs[key]:
            diffs.append(f"model.{key}: checkpoint {theirs[key]}, this run {mine[key]}")
    tok, saved_tok = identity.get("tokenizer"), saved.get("tokenizer")
    if tok and saved_tok and (difference := vocabulary_difference(saved_tok, tok)):
        diffs.append(f"tokenizer {tok['path']} ({difference}) is not {saved_tok['path']} "
                     f"({saved_tok['vocab_size']:,} tokens), which the checkpoint was trained with")
    return diffs


def check_identity(folder: Path, identity: dict | None, with_adapters: bool = False) -> None:
    """Refuse a checkpoint saved for another model size or another tokenizer, naming the differences;
    `with_adapters` (resuming this run's own checkpoints): also for other adapter settings."""
    saved = read_identity(folder)
    if identity is None or saved is None:
        return
    diffs = identity_differences(saved, identity, with_adapters)
    if diffs:
        advice = ("It is this run's own checkpoint: resume with the settings it was saved with, or start a new "
                  "run in another output_dir" if with_adapters else
                  "Set model.* and data.tokenizer to the checkpoint's, or start from a checkpoint of this model "
                  "(checkpoint.init_from)")
        raise CheckpointMismatchError(f"checkpoint {folder} does not fit this run: {'; '.join(diffs)}. {advice}")


# -- no code in pickles ------------------------------------------------------------------------------
# DCP's .metadata is a plain pickle; these are the only globals a genuine one refers to.
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "TensorWriteData", "WriteItem", "WriteItemType", "BytesIOWriteData")),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def refusal_reason(err: BaseException) -> str:
    """Why a pickle did not load, in a few words of our own. torch's text for a weights_only refusal
    advises loading the file without that protection; it is never passed on."""
    text = str(err)
    if match := re.search(r"GLOBAL ([\w.]+) was not an allowed global", text):
        return f"it refers to {match[1]}, which is not plain data"
    if "Weights only load failed" in text:
        match = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\. Please|\n|$)", text)
        return match[1] if match and match[1] else "it holds objects other than tensors and plain data"
    return first_line(err)


def check_no_code(folder: Path) -> None:
    """Before megatron unpickles anything: common.pt with torch's weights_only loader, DCP's .metadata
    with an allowlist of its own classes, and every pickled object inside the .distcp files with
    weights_only. A pickle that would import or call anything else is refused, never run."""
    common = folder / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any refusal means "not a plain-data pickle"
            raise CheckpointError(f"{common}: refused to unpickle ({refusal_reason(err)}): a checkpoint holds "
                                  "tensors and plain data only; this file may be malicious") from None
    meta_path = folder / ".metadata"
    if not meta_path.is_file():
        return
    try:
        with open(meta_path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        items = {index.fqn: info for index, info in metadata.storage_data.items()}
        byte_keys = [k for k, v in metadata.state_dict_metadata.items() if type(v).__name__ == "BytesStorageMetadata"]
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{meta_path}: refused to unpickle ({first_line(err)}): this file may be "
                              "malicious or corrupt") from None
    for key in byte_keys:
        info = items.get(key)
        if info is None:
            continue
        source = folder / info.relative_path
        if source.parent != folder:
            raise CheckpointError(f"{meta_path}: {key} points outside the checkpoint ({info.relative_path})")
        try:
            with open(source, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{source}: object {key} refused to unpickle ({refusal_reason(err)}): this "
                                  "file may be malicious or corrupt") from None
