"""Crash-safe, resharding checkpoints on megatron's dist-checkpointing.

Layout under <output_dir>/checkpoints/:
    iter_0000100/          a complete checkpoint (megatron dist-checkpoint + config.yaml)
    iter_0000200.partial/  a save in progress, or one a crash interrupted: never loaded
    latest                 the step of the newest complete checkpoint, replaced atomically

A save writes into `.partial`, every rank finishes, then rank 0 renames the folder and only then
rewrites `latest`. A crash at any point leaves `latest` naming the previous complete checkpoint.

Tensors are stored by their global (unsharded) identity, so a checkpoint saved at one TP/PP/VP
layout loads at another. Model chunks all use the same key prefix for that reason. Per-rank RNG
state is restored only when the layout is unchanged (it has no meaning across layouts).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from melama_mcore.config.job_config import JobConfig, dump_config
from melama_mcore.errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL = ".partial"


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consecutive_skips: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: Path) -> int | None:
    """The step named by `latest`, if it names a complete checkpoint folder."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker} is corrupt (expected a step number): delete it or restore it")
    step = int(text)
    if not step_dir(root, step).is_dir():
        raise CheckpointError(f"{marker} names step {step}, but {step_dir(root, step)} is missing")
    return step


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _writer_helper_init() -> None:
    """Runs in megatron's checkpoint-writer helper process (a spawned multiprocessing Manager). SLURM
    signals every process of a job at preemption; the helper must survive SIGTERM/SIGUSR1 or the
    preemption save it serves fails with a broken pipe. It exits when its rank dies instead (a rank
    killed with SIGKILL would otherwise leave it running forever)."""
    import signal
    import threading
    import time

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _start_writer_helper() -> None:
    """Start megatron's results-queue helper ourselves, once, with _writer_helper_init (megatron
    starts it lazily with default signal handling)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already started, or a megatron version without it
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_writer_helper_init)
    filesystem_async._results_queue = manager.Queue()
    filesystem_async._melama_manager = manager  # keep it referenced for the life of the process


def _layout() -> tuple[int, int, int]:
    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _rng_sharded_object(with_data: bool) -> ShardedObject:
    state = None
    if with_data:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject(
        "rng_state",
        state,
        _layout(),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


class Checkpointer:
    def __init__(self, cfg: JobConfig, model_chunks, optimizer, scheduler):
        self.cfg = cfg
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.model_chunks = model_chunks  # unwrapped GPTModels
        self.optimizer = optimizer
        self.scheduler = scheduler

    # -- state dicts -----------------------------------------------------------------------------
    def _model_state(self) -> dict:
        return {f"model{i}": chunk.sharded_state_dict(prefix="") for i, chunk in enumerate(self.model_chunks)}

    def _optimizer_metadata(self) -> dict:
        # Stored in model space so the distributed optimizer's state reshards across layouts.
        return {"distrib_optim_sharding_type": "fully_sharded_model_space"}

    def _full_state(self, train_state: TrainState | None, loading: bool, with_rng: bool) -> dict:
        model_state = self._model_state()
        state = dict(model_state)
        state["optimizer"] = self.optimizer.sharded_state_dict(
            model_state, is_loading=loading, metadata=self._optimizer_metadata()
        )
        state["scheduler"] = self.scheduler.state_dict()
        state["train_state"] = train_state.to_dict() if train_state else None
        state["layout"] = list(_layout())
        if with_rng:
            state["rng_state"] = _rng_sharded_object(with_data=not loading)
        return state

    # -- save ------------------------------------------------------------------------------------
    def save(self, train_state: TrainState) -> Path:
        """Save and publish atomically. Raises OSError/RuntimeError on failure (the caller decides)."""
        final = step_dir(self.root, train_state.step)
        partial = final.with_name(final.name + PARTIAL)
        rank0 = dist.get_rank() == 0
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        state = self._full_state(train_state, loading=False, with_rng=True)
        _start_writer_helper()
        dist_checkpointing.save(state, str(partial), content_metadata=self._optimizer_metadata())
        dist.barrier()
        if rank0:
            _write_atomically(partial / "config.yaml", dump_config(self.cfg))
            if final.exists():  # a re-save of the same step (e.g. preempted right after a save)
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_atomically(self.root / LATEST, str(train_state.step))
            self._prune()
        dist.barrier()
        log.info("saved checkpoint %s", final)
        return final

    def save_weights(self, path: str) -> Path:
        """Model weights only, atomically (a seed checkpoint, or a Hugging Face import): the input of
        `checkpoint.init_from`. Layout-independent like every checkpoint here."""
        final = Path(path)
        partial = final.with_name(final.name + PARTIAL)
        if dist.get_rank() == 0:
            if final.exists():
                raise CheckpointError(f"{final} already exists: choose a new folder or delete it")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(self._model_state(), str(partial))
        dist.barrier()
        if dist.get_rank() == 0:
            _write_atomically(partial / "config.yaml", dump_config(self.cfg))
            os.replace(partial, final)
        dist.barrier()
        log.info("saved weights to %s", final)
        return final

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        if not keep:
            return
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and not p.name.endswith(PARTIAL))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------
    def clean_partial(self) -> None:
        """Report and remove saves that a crash interrupted (rank 0, before anything loads)."""
        if dist.get_rank() == 0 and self.root.is_dir():
            for leftover in self.root.glob(f"iter_*{PARTIAL}"):
                log.warning("removing %s: an interrupted save, never published as latest", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        dist.barrier()

    def resume(self) -> TrainState | None:
        """Load the latest complete checkpoint of this run, if there is one; else None."""
        self.clean_partial()
        step = latest_step(self.root) if self.root.is_dir() else None
        if step is None:
            return None
        path = step_dir(self.root, step)
        common = dist_checkpointing.load_common_state_dict(str(path))
        same_layout = list(common.get("layout") or []) == list(_layout())
        state = self._full_state(None, loading=True, with_rng=same_layout)
        loaded = self._load(state, path)
        for chunk, key in zip(self.model_chunks, (f"model{i}" for i in range(len(self.model_chunks)))):
            chunk.load_state_dict(loaded[key])
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            rng = loaded["rng_state"]
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            log.info("checkpoint layout (pp, tp, dp) %s differs from this run's %s: weights, optimizer "
                     "and schedule resharded; per-rank RNG state not restored", common.get("layout"), list(_layout()))
        train_state = TrainState(**loaded["train_state"])
        log.info("resumed from %s (step %d, %d samples consumed)", path, train_state.step, train_state.consumed_samples)
        return train_state

    def load_weights(self, path: str, arch=None) -> None:
        """Weights only (a Hugging Face import, or another run's checkpoint): fresh optimizer and schedule.
        With the run's `arch`, a checkpoint of another architecture is refused, naming the fields."""
        ckpt = Path(path)
        if (ckpt / LATEST).is_file():
            ckpt = step_dir(ckpt, latest_step(ckpt))
        if arch is not None:
            from melama_mcore.models.llama.state_dict_adapter import check_arch_matches

            check_arch_matches(ckpt, arch)
        loaded = self._load(self._model_state(), ckpt)
        for i, chunk in enumerate(self.model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
        log.info("initialised weights from %s", ckpt)

    def _load(self, state: dict, path: Path) -> dict:
        if not (path / "metadata.json").is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no metadata.json)")
        try:
            return dist_checkpointing.load(state, str(path))
        except CheckpointError:
            raise
        except Exception as err:  # megatron raises several types for a mismatched or corrupt checkpoint
            raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
