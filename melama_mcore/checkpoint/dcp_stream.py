"""megatron's torch_dist dist-checkpoint files, written and read a piece at a time, without building
megatron's model or holding a state dict.

The format is PyTorch DCP (`.metadata` + `*.distcp`) plus megatron's `metadata.json` and
`common.pt`. Tensors are stored by global identity: each saved chunk is a box (offsets, sizes) of
a global tensor; decoder layers are stacked on a leading axis.

* writing: a DCP save planner whose write items are planned from chunk descriptions and whose
  data is built only when the writer asks for it, so memory holds about one chunk;
* reading: whole tensors, or one layer's slice of the stacked ones, reading only the chunks that
  overlap it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, SavePlan, SavePlanner, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from melama_mcore.checkpoint.integrity import check_no_code
from melama_mcore.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from melama_mcore.models.llama.state_dict_adapter import Chunk

OPTIMIZER_PREFIX = "optimizer."  # megatron's key prefix of optimizer state in a dist-checkpoint


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


@contextlib.contextmanager
def one_process():
    """DCP called with no_dist=True, on purpose: without the warning torch prints every time
    ("torch.distributed is disabled ..., assuming the intent is to save in a single process")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


# ---------------------------------------------------------------------------------------------
# Writing: a save planner that makes each chunk when the writer needs it
# ---------------------------------------------------------------------------------------------
class LazySavePlanner(SavePlanner):
    """A DCP save planner whose write items come from `chunks` (no state dict in memory) and whose
    data is built per item in resolve_data, when the writer asks for it, and checked against the plan."""

    def __init__(self, chunks: list[Chunk], objects: dict[str, bytes], read, dtype: torch.dtype, progress):
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


def write_dist_checkpoint(folder: Path, chunks: list[Chunk], objects: dict[str, bytes], read,
                          dtype: torch.dtype) -> None:
    """megatron's torch_dist format: PyTorch DCP files + megatron's metadata.json and common.pt.
    `chunks` describe every tensor box to write (built with `read` when written), `objects` the
    byte objects (megatron's per-layer `_extra_state`)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    with (tqdm(total=len(chunks), desc="import", unit="chunk") as progress, dcp_errors(f"cannot write {folder}"),
          one_process()):
        # One file per chunk: DCP's writer keeps the last tensor it wrote for each key of a file until
        # the file is complete, which with a single file would hold about a layer and the embeddings.
        dcp.save({}, storage_writer=DistCheckpointWriter(str(folder), single_file_per_rank=False, thread_count=1),
                 planner=LazySavePlanner(chunks, objects, read, dtype, progress), no_dist=True)
    torch.save({}, folder / "common.pt")  # a weights-only checkpoint has no common (unsharded) state
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(folder))


# ---------------------------------------------------------------------------------------------
# Reading: whole tensors, or one layer of the stacked ones
# ---------------------------------------------------------------------------------------------
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
    """The global tensors of a dist-checkpoint (any TP/PP it was saved at), straight from its DCP
    files. Its pickles are checked for code before DCP unpickles its index."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        check_no_code(ckpt)
        with dcp_errors(f"cannot read {ckpt}"):
            metadata = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        self.stored = {k: m for k, m in metadata.items() if isinstance(m, TensorStorageMetadata)}

    def model_keys(self) -> list[str]:
        """The model's tensors: a run's checkpoint also holds its optimizer state (keys under
        megatron's `optimizer.` prefix)."""
        return [k for k in self.stored if not k.startswith(OPTIMIZER_PREFIX)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta(key).properties.dtype

    def _meta(self, key: str) -> TensorStorageMetadata:
        if key not in self.stored:
            raise CheckpointError(f"{self.ckpt} has no tensor {key}")
        return self.stored[key]

    def _load(self, targets: dict) -> dict[str, torch.Tensor]:
        with dcp_errors(f"cannot read {self.ckpt}"), one_process():
            dcp.load({}, storage_reader=dcp.FileSystemReader(str(self.ckpt)), planner=SliceLoadPlanner(targets),
                     no_dist=True)
        return {key: target for key, (_, target) in targets.items()}

    def tensors(self, keys) -> dict[str, torch.Tensor]:
        """Whole tensors, as stored."""
        return self._load({k: ((0,) * len(self.shape(k)), torch.empty(self.shape(k), dtype=self.dtype(k)))
                           for k in keys})

    def layer(self, layer: int, keys) -> dict[str, torch.Tensor]:
        """Slice `layer` of stacked tensors (a leading axis over layers)."""
        loaded = self._load({k: ((layer,) + (0,) * (len(self.shape(k)) - 1),
                                 torch.empty((1, *self.shape(k)[1:]), dtype=self.dtype(k))) for k in keys})
        return {k: t[0] for k, t in loaded.items()}
