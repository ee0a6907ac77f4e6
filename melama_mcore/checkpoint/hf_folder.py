"""Hugging Face LLaMA model folders: read lazily (config.json + safetensors or .bin shards), written
as sharded safetensors tensor by tensor, and the tokenizer files beside the weights (with the chat
template a run was tuned with)."""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from melama_mcore.checkpoint.integrity import refusal_reason
from melama_mcore.errors import CheckpointError, UserError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch
from melama_mcore.output_paths import write_atomic

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' file for it, read before tokenizer_config.json's


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (config.json, an index, adapter_config.json); one-line errors."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read it ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


class HFCheckpoint:
    """Tensor names, shapes and dtypes of a HF folder, and reads of tensor slices, without ever
    holding more than the slice asked for (files are mapped per read, never kept open). Pickled
    `.bin` weights are read with torch's weights_only loader: one that holds more than tensors is
    refused, never run.

    Opening one checks that its weights are complete, reading only the files' headers: every shard
    its index names is there and whole (a safetensors file cut short is found by its header), and
    holds the tensors the index says it does; each problem is a one-line CheckpointError naming the
    file. Any reader of a Hugging Face folder can open it for that check alone."""

    def __init__(self, folder: Path):
        self.folder = folder
        if not (folder / "config.json").is_file():
            raise CheckpointError(self._not_hf_reason(folder))
        self.config = read_json_object(folder / "config.json")
        self.files, weight_map, index = self._weight_files()
        self.index: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        held: dict[Path, set[str]] = {}
        for path in self.files:
            for name, shape, dtype in self._scan(path):
                self.index[name] = (path, shape, dtype)
                held.setdefault(path, set()).add(name)
        for name, file in weight_map.items():
            if name not in held.get(folder / file, ()):
                raise CheckpointError(f"{folder / file} does not hold {name}, which {index.name} says it does: "
                                      "a damaged or incomplete download? Fetch that file again")

    @staticmethod
    def _not_hf_reason(folder: Path) -> str:
        if not folder.exists():
            return f"{folder} does not exist"
        if not folder.is_dir():
            return f"{folder} is a file: give the Hugging Face model's folder (config.json and the weights)"
        if any((root / marker).is_file() for root in (folder, folder / "checkpoints")
               for marker in ("metadata.json", "latest")):
            return (f"{folder} is a checkpoint of this project, not a Hugging Face model folder: it needs no import "
                    f"(train from it with checkpoint.init_from={folder}); make a Hugging Face folder of it with "
                    f"`melama convert export-hf --ckpt {folder} --out HF`")
        return f"{folder} has no config.json: not a Hugging Face model folder"

    def _weight_files(self) -> tuple[list[Path], dict[str, str], Path | None]:
        """The weight files, the index's tensor -> file map ({} without an index) and the index."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                weight_map = read_json_object(index).get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise CheckpointError(f"{index}: no weight_map of tensor names to files")
                names = sorted(set(weight_map.values()))
                missing = [n for n in names if not (self.folder / n).is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)} (an "
                                          "incomplete download? Fetch them again)")
                return [self.folder / n for n in names], weight_map, index
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.folder / single).is_file():
                return [self.folder / single], {}, None
        raise CheckpointError(f"{self.folder} has no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")

    @staticmethod
    def _scan(path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        yield name, tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                return
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
            for name, t in state.items():
                yield name, tuple(t.shape), t.dtype
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a complete safetensors file ({err}): a truncated or damaged "
                                  "download? Fetch it again") from None
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path} holds more than tensors ({refusal_reason(err)}) and is not loaded: "
                                  "such a pickle can run code. Use the model's safetensors weights") from None
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: {(str(err).splitlines() or [type(err).__name__])[0]}") from None

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
# Writing: sharded safetensors, one tensor at a time
# ---------------------------------------------------------------------------------------------
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


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Consecutive tensor names per output shard, each shard at most max_bytes (or one tensor)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_hf_model(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                   tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int, config: dict) -> int:
    """A transformers model folder: `tensors` (name, tensor) in the order of `shapes`, converted to
    `dtype`, written as model-XXXXX-of-XXXXX.safetensors shards of at most max_shard_bytes with
    their index, and config.json. Holds one tensor at a time; returns the number of shards."""
    shards = plan_shards(shapes, dtype, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = 0
    with tqdm(total=len(shapes), desc="export", unit="tensor") as progress:
        for file, names in zip(files, shards):
            writer = SafetensorsWriter(folder / file, [(n, shapes[n]) for n in names], dtype)
            try:
                for _ in names:
                    name, tensor = next(tensors)
                    writer.write(name, tensor.to(dtype))
                    del tensor  # not kept alive while the next layer is read
                    progress.update(1)
            finally:
                writer.close()
            total += writer.nbytes
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return len(shards)


def copy_tokenizer(source: Path | None, out: Path, chat_template: dict | None = None) -> None:
    """A HF tokenizer folder's files (its chat_template.jinja too), or a sentencepiece model as
    tokenizer.model with a LlamaTokenizer config: what `transformers.AutoTokenizer.from_pretrained(out)`
    reads (None: no tokenizer); then `chat_template`, a tuned run's (write_chat_template). Each file
    appears whole (written under a temporary name, then renamed): export-peft adds them to a
    published folder."""
    if source is None:
        pass
    elif source.is_dir():
        found = [n for n in TOKENIZER_FILES if (source / n).is_file()]
        if not found:
            raise UserError(f"tokenizer {source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in that folder")
        for name in found + ([CHAT_TEMPLATE_FILE] if (source / CHAT_TEMPLATE_FILE).is_file() else []):
            write_atomic(out / name, (source / name).read_bytes())
    elif source.is_file() and source.suffix == ".model":
        write_atomic(out / "tokenizer.model", source.read_bytes())
        write_atomic(out / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
             "add_bos_token": True, "add_eos_token": False}, indent=2).encode())
    else:
        raise UserError(f"tokenizer {source}: expected a sentencepiece .model file or a tokenizer folder")
    write_chat_template(out, chat_template)


def write_chat_template(folder: Path, chat_template: dict | None) -> None:
    """A tuned run's chat template (its data.chat_template: {"name", "jinja", "system_prompt"}) into
    the tokenizer files of `folder`, where Hugging Face keeps it and every reader finds it
    (`tokenizer.apply_chat_template`, lm-eval's --apply_chat_template, vLLM, `melama eval`):
    chat_template.jinja (what transformers writes, and reads first) and `chat_template` in
    tokenizer_config.json when there is one (what older transformers read). A template the copied
    tokenizer carried is replaced; None (a run that was not instruction-tuned) changes nothing."""
    if chat_template is None:
        return
    jinja = chat_template["jinja"]
    write_atomic(folder / CHAT_TEMPLATE_FILE, jinja.encode("utf-8"))
    config = folder / "tokenizer_config.json"
    if config.is_file():
        write_atomic(config, json.dumps({**read_json_object(config), "chat_template": jinja}, indent=2).encode())

