"""`loader: dali`: the default loader's micro-batches, fed through an NVIDIA DALI pipeline.

The batches are assembled exactly as the default loader assembles them (same indices, same
collate) and handed to DALI through `fn.external_source`; DALI prefetches them on its own thread
and, with a GPU, copies them to the device through pinned buffers. Without a GPU the pipeline runs
on CPU (`device_id=None`). So both loaders yield identical batches and resume identically.
Requires the optional extra: `pip install melama-mcore[dali]`.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

from melama_mcore.errors import ConfigError

PREFETCH_DEPTH = 2


def build_dali_loader(batches: Iterator[dict[str, torch.Tensor]], *, micro_batch_size: int,
                      device: str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """`batches`: the default loader's collated micro-batches (CPU tensors), in order."""
    try:
        from nvidia.dali import fn, pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError:
        raise ConfigError("loader 'dali' needs NVIDIA DALI: pip install melama-mcore[dali] "
                          "(nvidia-dali-cuda130), or use loader 'default'") from None
    on_gpu = device != "cpu"
    if on_gpu and not torch.cuda.is_available():
        raise ConfigError(f"loader 'dali' on device {device!r}, but CUDA is not available")

    first = next(batches)
    keys = list(first)

    def arrays():
        for batch in itertools.chain([first], batches):
            yield tuple(batch[key].numpy() for key in keys)

    device_id = torch.device(device).index if on_gpu else None
    if on_gpu and device_id is None:
        device_id = torch.cuda.current_device()

    @pipeline_def(batch_size=micro_batch_size, num_threads=1, device_id=device_id,
                  prefetch_queue_depth=PREFETCH_DEPTH)
    def pipeline():
        outputs = fn.external_source(source=arrays(), num_outputs=len(keys), batch=True)
        return tuple(out.gpu() for out in outputs) if on_gpu else tuple(outputs)

    pipe = pipeline()
    pipe.build()
    # size=-1: the source is infinite; the iterator runs until the caller stops.
    return (out[0] for out in DALIGenericIterator(pipe, keys, size=-1))
