"""Crash-safe, resharding checkpoints on megatron's dist-checkpointing.

The folder layout (iter_XXXXXXX, .partial, `latest`) and the integrity checks are the checkpoint
room's (layout.py, integrity.py). A save writes into `.partial`, every rank finishes, then rank 0
renames the folder and only then rewrites `latest`. A crash at any point leaves `latest` naming the
previous complete checkpoint.

Tensors are stored by their global (unsharded) identity, so a checkpoint saved at one TP/PP/VP
layout loads at another. Model chunks all use the same key prefix for that reason. Per-rank RNG
state is restored only when the layout is unchanged (it has no meaning across layouts).
"""

from __future__ import annotations

import logging
import queue
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

from melama_mcore.checkpoint.integrity import (check_identity, check_no_code, file_checksums, first_line,
                                               verify_checksums)
from melama_mcore.checkpoint.layout import (LATEST, PARTIAL, find_checkpoint, latest_step, partial_dir, publish, seal,
                                            step_dir)
from melama_mcore.components.optimizer import ensure_optimizer_state, load_optimizer_state
from melama_mcore.config.job_config import JobConfig, dump_config
from melama_mcore.errors import CheckpointError
from melama_mcore.output_paths import write_atomic
from melama_mcore.strategies import TrainingStrategy, strategy_for

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consecutive_skips: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _use_in_process_results_queue() -> None:
    """megatron's file writer hands its results back through a queue that it creates, lazily, in a
    spawned multiprocessing Manager, because an asynchronous save writes from another process. Saves
    here are synchronous: megatron writes and reads the results in this process, so a plain queue
    does. The Manager would re-import the training module in a new process at the first save (seconds
    of CPU per rank) and be one more process for SLURM's preemption signal to kill mid-save."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


# -- integrity: checksums over all ranks (integrity.py has the checks) -----------------------------------
def _my_share(names) -> list[str]:
    """Files are checksummed by all ranks together (each reads 1/world of the checkpoint)."""
    return sorted(names)[dist.get_rank()::dist.get_world_size()]


def _gather(local):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def _all_ranks(problems: list[str]) -> list[str]:
    return [p for part in _gather(problems) for p in part]


def _compute_checksums(folder: Path) -> dict[str, int]:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    merged: dict[str, int] = {}
    for part in _gather(file_checksums(folder, _my_share(names))):
        merged.update(part)
    return merged


def _layout() -> tuple[int, int, int]:
    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


class SaveFailed(RuntimeError):
    """A checkpoint save failed on at least one rank; every rank raises it with the same message."""


def _agreed(what: str, action) -> None:
    """Run `action` on this rank (None: nothing to do here), then agree with every rank: a failure
    anywhere raises SaveFailed everywhere, so no rank waits in a collective for one that gave up."""
    error = None
    if action is not None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - reported on every rank, with the rank that failed
            error = f"{what} failed on rank {dist.get_rank()}: {first_line(err)}"
    errors = [e for e in _gather(error) if e]
    if errors:
        raise SaveFailed("; ".join(errors))


def _megatron_save(state: dict, folder: Path, optimizer_metadata: dict) -> None:
    """megatron's save. A rank whose files fail to write (a full disk) reports it to the coordinator,
    and megatron raises on every rank (details on rank 0 only): turn that into one SaveFailed, with
    the same message on every rank."""
    try:
        dist_checkpointing.save(state, str(folder), content_metadata=optimizer_metadata)
    except CheckpointException as err:
        failures = [f"rank {rank}: {first_line(exc[0] if isinstance(exc, tuple) else exc)}"
                    for rank, exc in sorted(err.failures.items())]
        message = [f"writing the checkpoint files failed on {'; '.join(failures)}" if failures else None]
        dist.broadcast_object_list(message, src=0)
        raise SaveFailed(message[0] or "writing the checkpoint files failed") from None


def _model_parallel_layout(cfg: JobConfig) -> tuple[int, int, int | None]:
    """What a dp_reshardable optimizer state is tied to: how the model is split (TP, PP, VP)."""
    p = cfg.parallel
    return p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline


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
    """Saves and loads a model's state as its training strategy says: every weight, or (a strategy
    whose checkpoints hold its own tensors only: LoRA) those, with the frozen rest, the base, loaded
    from checkpoint.init_from.

    Model state comes in three parts: `all` (every weight), `own` (what this run's checkpoints hold:
    `all`, or the strategy's own tensors) and `base` (what checkpoint.init_from gives this run:
    everything but the strategy's own tensors)."""

    def __init__(self, cfg: JobConfig, model_chunks, optimizer, scheduler, identity: dict | None = None,
                 strategy: TrainingStrategy | None = None):
        self.cfg = cfg
        self.strategy = strategy or strategy_for(cfg.peft)
        self.identity = identity  # model_identity(arch, tokenizer, cfg): checked on load, saved with each save
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.model_chunks = model_chunks  # unwrapped GPTModels
        self.optimizer = optimizer
        self.scheduler = scheduler

    # -- state dicts -----------------------------------------------------------------------------
    def _in_part(self, part: str):
        """Which state-dict keys belong to a part of the model state (see the class docstring)."""
        owns = self.strategy.owns_key
        if part == "own" and not self.strategy.checkpoint_holds_base:
            return owns
        if part == "base":
            return lambda key: not owns(key)
        return lambda key: True

    def _model_state(self, part: str = "own") -> dict:
        """The model's sharded state: one part of it (see the class docstring), per model chunk."""
        keep = self._in_part(part)
        return {f"model{i}": {k: v for k, v in chunk.sharded_state_dict(prefix="").items() if keep(k)}
                for i, chunk in enumerate(self.model_chunks)}

    def _load_into_chunks(self, loaded: dict, part: str) -> None:
        """Copy loaded weights into the chunks, each load of a part leaving exactly the rest untouched."""
        belongs = self._in_part(part)
        for i, chunk in enumerate(self.model_chunks):
            result = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
            wrong = list(result.unexpected_keys) + [k for k in result.missing_keys if belongs(k)]
            if wrong:
                raise CheckpointError(f"loading the {part} weights of the model left {len(wrong)} weights unset or "
                                      f"unexpected, e.g. {wrong[0]}")

    def _optimizer_metadata(self, sharding_type: str | None = None) -> dict:
        """How the distributed optimizer lays out its state (megatron's content metadata, stored with
        the checkpoint). `dp_reshardable` (the default, as Megatron-LM's): every rank writes its own
        flat shards, no communication, reshards across DP only. `fully_reshardable`: shards are
        gathered over DP at save and stored per parameter, so the checkpoint resumes at any TP/PP,
        at the price of the gather (time, and memory for a DP group's optimizer state).
        The plain optimizer's state is per parameter either way."""
        metadata = {"chained_optim_avoid_prefix": True, "singleton_local_shards": False}
        if self.cfg.parallel.use_distributed_optimizer:
            metadata["distrib_optim_sharding_type"] = sharding_type or self.cfg.checkpoint.optimizer_format
        return metadata

    def _full_state(self, train_state: TrainState | None, loading: bool, with_rng: bool,
                    optimizer_metadata: dict | None = None) -> dict:
        model_state = self._model_state()
        state = dict(model_state)
        ensure_optimizer_state(self.optimizer)
        state["optimizer"] = self.optimizer.sharded_state_dict(
            model_state, is_loading=loading, metadata=optimizer_metadata or self._optimizer_metadata()
        )
        state["scheduler"] = self.scheduler.state_dict()
        state["train_state"] = train_state.to_dict() if train_state else None
        state["layout"] = list(_layout())
        state["model_parallel"] = list(_model_parallel_layout(self.cfg))
        if with_rng:
            state["rng_state"] = _rng_sharded_object(with_data=not loading)
        return state

    # -- save ------------------------------------------------------------------------------------
    def save(self, train_state: TrainState) -> Path:
        """Save and publish atomically. A failure on any rank raises SaveFailed on every rank, with
        one message naming the ranks and their errors, and leaves `latest` as it was."""
        final = step_dir(self.root, train_state.step)
        partial = partial_dir(final)
        rank0 = dist.get_rank() == 0

        def prepare():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

        _agreed("preparing the checkpoint folder", prepare if rank0 else None)
        state = self._full_state(train_state, loading=False, with_rng=True)
        _use_in_process_results_queue()
        _megatron_save(state, partial, self._optimizer_metadata())
        self._publish(partial, final)

        def make_latest():
            write_atomic(self.root / LATEST, str(train_state.step))
            self._prune()

        _agreed("publishing the checkpoint", make_latest if rank0 else None)
        log.info("saved checkpoint %s", final)
        return final

    def save_weights(self, path: str) -> Path:
        """Model weights only, atomically (a seed checkpoint, or a Hugging Face import): the input of
        `checkpoint.init_from`. Layout-independent like every checkpoint here."""
        final = Path(path)
        partial = partial_dir(final)
        if final.exists():  # every rank sees the same path
            raise CheckpointError(f"{final} already exists: choose a new folder or delete it")

        def prepare():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

        _agreed("preparing the folder", prepare if dist.get_rank() == 0 else None)
        _megatron_save(self._model_state(), partial, None)
        self._publish(partial, final)
        log.info("saved weights to %s", final)
        return final

    def _publish(self, partial: Path, final: Path) -> None:
        """After every rank wrote its files: checksums (unless checkpoint.verify_checksums is off),
        identity and config beside them, then the rename that makes the checkpoint exist (rank 0)."""
        checksums = _compute_checksums(partial) if self.cfg.checkpoint.verify_checksums else None

        def seal_and_publish():
            seal(partial, checksums, self.identity, dump_config(self.cfg))
            publish(partial, final)

        _agreed("writing the checkpoint's metadata", seal_and_publish if dist.get_rank() == 0 else None)

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        if not keep:
            return
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and not p.name.endswith(PARTIAL))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------
    def latest(self) -> int | None:
        """The step of this run's newest complete checkpoint, if any."""
        return latest_step(self.root) if self.root.is_dir() else None

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
        self._check_before_load(path, resuming=True)
        common = dist_checkpointing.load_common_state_dict(str(path))
        same_layout = list(common.get("layout") or []) == list(_layout())
        saved_metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
        self._check_optimizer_reshard(path, common, saved_metadata)
        state = self._full_state(None, loading=True, with_rng=same_layout,
                                 optimizer_metadata=self._optimizer_metadata(
                                     saved_metadata.get("distrib_optim_sharding_type")))
        loaded = self._load(state, path, checked=True)
        self._load_into_chunks(loaded, "own")
        load_optimizer_state(self.optimizer, loaded["optimizer"])
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

    def _check_optimizer_reshard(self, path: Path, common: dict, saved_metadata: dict) -> None:
        """The optimizer state must fit this run: the same kind of optimizer, and a dp_reshardable
        state only at the model-parallel layout it was saved at."""
        saved_type = saved_metadata.get("distrib_optim_sharding_type")
        if (saved_type is not None) != bool(self.cfg.parallel.use_distributed_optimizer):
            saved, mine = ("with", "without") if saved_type else ("without", "with")
            raise CheckpointError(
                f"{path} was saved {saved} the distributed optimizer, and this run is {mine} it: set "
                f"parallel.use_distributed_optimizer={str(saved_type is not None).lower()} to resume, or start "
                f"a new output_dir from its weights (checkpoint.init_from={path})")
        saved_mp = common.get("model_parallel")
        if saved_type != "dp_reshardable" or saved_mp is None or list(saved_mp) == list(_model_parallel_layout(self.cfg)):
            return
        (tp, pp, vp), (my_tp, my_pp, my_vp) = saved_mp, _model_parallel_layout(self.cfg)
        raise CheckpointError(
            f"{path} holds distributed-optimizer state in dp_reshardable format, saved at TP {tp} x PP {pp}"
            f"{f' x VP {vp}' if vp else ''}; this run is TP {my_tp} x PP {my_pp}{f' x VP {my_vp}' if my_vp else ''}. "
            f"Resume at TP {tp} x PP {pp}{f' x VP {vp}' if vp else ''} (any data-parallel size), or start a new "
            f"output_dir from its weights (checkpoint.init_from={path}: fresh optimizer and schedule). To make "
            "future checkpoints reshardable across TP/PP, save with checkpoint.optimizer_format=fully_reshardable")

    def load_weights(self, path: str) -> None:
        """What checkpoint.init_from gives this run (the weights, or the base of a strategy's own
        tensors) from a Hugging Face import or another run's checkpoint: fresh optimizer and
        schedule. A checkpoint of another architecture or tokenizer is refused, naming the fields."""
        ckpt = find_checkpoint(Path(path))
        self._load_into_chunks(self._load(self._model_state("base"), ckpt), "base")
        if self.optimizer is not None:
            # The mixed-precision and distributed optimizers keep fp32 main copies of the weights,
            # made when they were built: refresh them, or the first update writes the initial random
            # weights back (Megatron-LM's reload_model_params after a weights-only load).
            self.optimizer.reload_model_params()
        log.info("initialised weights from %s", ckpt)

    def load_own(self, path: Path) -> None:
        """What a checkpoint of this strategy holds (the adapters of an adapter checkpoint; its base
        loaded first, with load_weights), without optimizer state."""
        self._load_into_chunks(self._load(self._model_state("own"), path), "own")
        log.info("loaded the %s weights of %s", self.strategy.describe(), path)

    def _check_before_load(self, path: Path, resuming: bool = False) -> None:
        """Model and tokenizer match (and adapters, when resuming), every file intact (unless
        checkpoint.verify_checksums is off), no pickle that could run code: or a CheckpointError
        naming the file and the mismatch, before anything is loaded."""
        if not (path / "metadata.json").is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no metadata.json)")
        check_identity(path, self.identity, with_adapters=resuming)
        if self.cfg.checkpoint.verify_checksums:
            verify_checksums(path, share=_my_share, combine=_all_ranks)
        else:
            log.info("%s: file checksums not verified (checkpoint.verify_checksums=false)", path)
        check_no_code(path)

    def _load(self, state: dict, path: Path, checked: bool = False) -> dict:
        if not checked:
            self._check_before_load(path)
        try:
            return dist_checkpointing.load(state, str(path))
        except CheckpointError:
            raise
        except Exception as err:  # megatron raises several types for a mismatched or corrupt checkpoint
            raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
