"""What every command prints, decided in one place.

* Library warnings that ask nothing of the user (megatron announcing that Transformer Engine or apex
  is absent and it falls back to torch, deprecations inside libraries) are silenced when the
  package is imported, before megatron is, so they never precede a command's own output.
* Logging: INFO from rank 0; the last rank (which holds the loss under pipeline parallelism) adds
  the step and validation metrics; every rank says its warnings; each line names its rank when
  there are several.
"""

from __future__ import annotations

import logging
import warnings

_NOT_ACTIONABLE = (
    # megatron-core: the optional fused libraries are absent; it says so at import, once per module
    r".*(Transformer Engine|Apex|apex).* (not installed|is not installed).*",
    r".*Falling back to.*",
    # torch, about the ShardedTensor megatron's dist-checkpointing builds for every save and load
    r".*Please use DTensor instead.*",
)
_LIBRARIES = ("megatron", "torch", "transformers", "lm_eval", "datasets", "peft", "accelerate")
_NOISY_LOGGERS = ("megatron", "torch.distributed", "httpx", "datasets", "lm_eval", "transformers", "accelerate")


def quiet_libraries() -> None:
    for pattern in _NOT_ACTIONABLE:
        warnings.filterwarnings("ignore", message=pattern)
    for library in _LIBRARIES:  # their deprecation notices are addressed to us, not to users
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=library)
        warnings.filterwarnings("ignore", category=FutureWarning, module=library)
    # megatron-core's own notes about its internals (deprecated config spellings it sets itself, ...)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")


METRICS_LOGGER = "melama_mcore.components.metrics"


def setup_logging(rank: int = 0, world_size: int = 1) -> None:
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S", force=True)
    if rank == world_size - 1:
        logging.getLogger(METRICS_LOGGER).setLevel(logging.INFO)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
