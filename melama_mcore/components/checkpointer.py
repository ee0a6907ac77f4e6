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

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from melama_mcore.components.optimizer import ensure_optimizer_state, load_optimizer_state
from melama_mcore.config.job_config import JobConfig, dump_config
from melama_mcore.errors import CheckpointError, UserError
from melama_mcore.models.llama import lora

log = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL = ".partial"
CHECKSUMS = "checksums.json"  # crc32 of every file megatron wrote, checked before loading (checkpoint.verify_checksums)
IDENTITY = "model_identity.json"  # resolved architecture and tokenizer vocabulary of the run that saved


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


def find_checkpoint(path: Path) -> Path:
    """A run's checkpoints/ folder (its latest), a run's output folder, one iter_* folder, or a
    weights-only folder -> the folder holding metadata.json."""
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            return step_dir(root, latest_step(root))
    if (path / "metadata.json").is_file():
        return path
    raise CheckpointError(f"{path} is not a checkpoint: expected a metadata.json, or a 'latest' marker of a run")


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


# -- integrity: checksums, identity, no code in pickles -----------------------------------------------
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


def _my_share(names) -> list[str]:
    """Files are checksummed by all ranks together (each reads 1/world of the checkpoint)."""
    return sorted(names)[dist.get_rank()::dist.get_world_size()]


def _gather(local):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def _compute_checksums(folder: Path) -> dict[str, int]:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    merged: dict[str, int] = {}
    for part in _gather(file_checksums(folder, _my_share(names))):
        merged.update(part)
    return merged


def _verify_checksums(folder: Path) -> None:
    """CheckpointError naming every file whose bytes changed since the save (all ranks agree)."""
    path = folder / CHECKSUMS
    if not path.is_file():
        log.warning("%s has no %s (saved with checkpoint.verify_checksums=false, an older checkpoint, or a "
                    "conversion): its files cannot be verified", folder, CHECKSUMS)
        return
    saved = json.loads(path.read_text())
    problems = []
    for name in _my_share(saved):
        file = folder / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif (crc := _crc32(file)) != saved[name]:
            problems.append(f"{file}: checksum {crc:08x}, saved {saved[name]:08x} (corrupt or truncated)")
    problems = sorted(p for part in _gather(problems) for p in part)
    if problems:
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems)}. Restore the file, or "
                              f"delete {folder} and write an earlier step into {folder.parent / LATEST}")


def model_identity(arch, tokenizer, cfg: JobConfig | None = None) -> dict:
    """What a checkpoint's weights mean: the resolved architecture and the tokenizer's vocabulary;
    for an adapter checkpoint (peft.method=lora) also the adapters' settings and their base."""
    identity = {"arch": dataclasses.asdict(arch) if arch is not None else None, "tokenizer": None}
    if cfg is not None and cfg.peft.method != "none":
        identity["peft"] = {**dataclasses.asdict(cfg.peft), "base": cfg.checkpoint.init_from}
    if tokenizer is not None:
        backend = getattr(tokenizer, "_backend", None)
        n = tokenizer.vocab_size
        pieces = None
        if hasattr(backend, "id_to_piece"):
            pieces = [backend.id_to_piece(i) for i in range(n)]
        elif hasattr(backend, "convert_ids_to_tokens"):
            pieces = backend.convert_ids_to_tokens(list(range(n)))
        digest = hashlib.sha256("\0".join(map(str, pieces)).encode()).hexdigest() if pieces is not None else None
        identity["tokenizer"] = {"path": str(tokenizer.path), "vocab_size": n, "vocab_sha256": digest}
    return identity


def _check_identity(folder: Path, identity: dict | None, with_adapters: bool = False) -> None:
    """Refuse a checkpoint saved for another model size or another tokenizer, naming the differences;
    `with_adapters` (resuming this run's own checkpoints): also for other adapter settings."""
    path = folder / IDENTITY
    if identity is None or not path.is_file():
        return
    saved = json.loads(path.read_text())
    diffs = []
    if with_adapters:
        mine, theirs = identity.get("peft") or {}, saved.get("peft") or {}
        for key in ("method", "rank", "alpha", "target_modules"):
            if mine.get(key, "none" if key == "method" else None) != theirs.get(key, "none" if key == "method" else None):
                diffs.append(f"peft.{key}: checkpoint {theirs.get(key)}, this run {mine.get(key)}")
    mine, theirs = identity.get("arch") or {}, saved.get("arch") or {}
    # Every field that gives the weights their meaning; positions are computed, not stored.
    for key in sorted((set(mine) & set(theirs)) - {"max_position_embeddings"}):
        if mine[key] != theirs[key]:
            diffs.append(f"model.{key}: checkpoint {theirs[key]}, this run {mine[key]}")
    tok, saved_tok = identity.get("tokenizer"), saved.get("tokenizer")
    if tok and saved_tok:
        if tok["vocab_size"] != saved_tok["vocab_size"]:
            diffs.append(f"tokenizer {tok['path']} has {tok['vocab_size']} tokens, the checkpoint was trained "
                         f"with {saved_tok['path']} ({saved_tok['vocab_size']} tokens)")
        elif tok["vocab_sha256"] and saved_tok["vocab_sha256"] and tok["vocab_sha256"] != saved_tok["vocab_sha256"]:
            diffs.append(f"tokenizer {tok['path']} has another vocabulary than {saved_tok['path']}, which the "
                         "checkpoint was trained with (same size, different pieces)")
    if diffs:
        raise CheckpointError(f"checkpoint {folder} does not fit this run: {'; '.join(diffs)}. Use the "
                              "checkpoint's model settings and tokenizer, or another output_dir")


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


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def check_no_code(folder: Path) -> None:
    """Before megatron unpickles anything: common.pt with torch's weights_only loader, DCP's .metadata
    with an allowlist of its own classes, and every pickled object inside the .distcp files with
    weights_only. A pickle that would import or call anything else is refused, never run."""
    common = folder / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any refusal means "not a plain-data pickle"
            raise CheckpointError(f"{common}: refused to unpickle ({_first_line(err)}): a checkpoint holds "
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
        raise CheckpointError(f"{meta_path}: refused to unpickle ({_first_line(err)}): this file may be "
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
            raise CheckpointError(f"{source}: object {key} refused to unpickle ({_first_line(err)}): this "
                                  "file may be malicious or corrupt") from None


def _layout() -> tuple[int, int, int]:
    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create `path` if needed and prove a file can be written in it, at start-up: an unwritable or
    file-occupied folder is found before any step, not at the first save."""
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise UserError(f"{what} {path} cannot be written ({reason}): choose another folder or fix its "
                        "permissions") from None


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
            error = f"{what} failed on rank {dist.get_rank()}: {_first_line(err)}"
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
        failures = [f"rank {rank}: {_first_line(exc[0] if isinstance(exc, tuple) else exc)}"
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
    def __init__(self, cfg: JobConfig, model_chunks, optimizer, scheduler, identity: dict | None = None):
        self.cfg = cfg
        self.lora = cfg.peft.method == "lora"  # checkpoints hold the adapters only; the base is init_from
        self.identity = identity  # model_identity(arch, tokenizer): checked on load, saved with each save
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.model_chunks = model_chunks  # unwrapped GPTModels
        self.optimizer = optimizer
        self.scheduler = scheduler

    # -- state dicts -----------------------------------------------------------------------------
    def _model_state(self, part: str | None = None) -> dict:
        """The model's sharded state: every weight, or with LoRA the trainable part (`adapters`, what
        this run's checkpoints hold) or the frozen `base` (what checkpoint.init_from holds)."""
        part = part or ("adapters" if self.lora else "all")
        state_of = {"all": lambda c: c.sharded_state_dict(prefix=""), "adapters": lora.adapter_sharded_state_dict,
                    "base": lora.base_sharded_state_dict}[part]
        return {f"model{i}": state_of(chunk) for i, chunk in enumerate(self.model_chunks)}

    def _load_into_chunks(self, loaded: dict, part: str) -> None:
        """Copy loaded weights into the chunks; a LoRA model loads its base and its adapters apart,
        each load leaving exactly the other part untouched."""
        for i, chunk in enumerate(self.model_chunks):
            if part == "all":
                chunk.load_state_dict(loaded[f"model{i}"])
                continue
            result = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
            wrong = list(result.unexpected_keys) + [k for k in result.missing_keys
                                                    if (".lora." in k) == (part == "adapters")]
            if wrong:
                raise CheckpointError(f"loading the {part} of the model left {len(wrong)} weights unset or "
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
        partial = final.with_name(final.name + PARTIAL)
        rank0 = dist.get_rank() == 0

        def prepare():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

        _agreed("preparing the checkpoint folder", prepare if rank0 else None)
        state = self._full_state(train_state, loading=False, with_rng=True)
        _start_writer_helper()
        _megatron_save(state, partial, self._optimizer_metadata())
        self._publish(partial, final)

        def make_latest():
            _write_atomically(self.root / LATEST, str(train_state.step))
            self._prune()

        _agreed("publishing the checkpoint", make_latest if rank0 else None)
        log.info("saved checkpoint %s", final)
        return final

    def save_weights(self, path: str) -> Path:
        """Model weights only, atomically (a seed checkpoint, or a Hugging Face import): the input of
        `checkpoint.init_from`. Layout-independent like every checkpoint here."""
        final = Path(path)
        partial = final.with_name(final.name + PARTIAL)
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

        def publish():
            if checksums is not None:
                _write_atomically(partial / CHECKSUMS, json.dumps(checksums, indent=0))
            if self.identity is not None:
                _write_atomically(partial / IDENTITY, json.dumps(self.identity))
            _write_atomically(partial / "config.yaml", dump_config(self.cfg))
            if final.exists():  # a re-save of the same step (e.g. preempted right after a save)
                shutil.rmtree(final)
            os.replace(partial, final)

        _agreed("writing the checkpoint's metadata", publish if dist.get_rank() == 0 else None)

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
        self._load_into_chunks(loaded, "adapters" if self.lora else "all")
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
        """Weights only (a Hugging Face import, or another run's checkpoint): fresh optimizer and schedule.
        A checkpoint of another architecture or tokenizer is refused, naming the fields."""
        ckpt = find_checkpoint(Path(path))
        part = "base" if self.lora else "all"
        self._load_into_chunks(self._load(self._model_state(part), ckpt), part)
        if self.optimizer is not None:
            # The mixed-precision and distributed optimizers keep fp32 main copies of the weights,
            # made when they were built: refresh them, or the first update writes the initial random
            # weights back (Megatron-LM's reload_model_params after a weights-only load).
            self.optimizer.reload_model_params()
        log.info("initialised weights from %s", ckpt)

    def load_adapters(self, path: Path) -> None:
        """The adapters of an adapter checkpoint (its base loaded first, with load_weights)."""
        self._load_into_chunks(self._load(self._model_state("adapters"), path), "adapters")
        log.info("loaded adapters from %s", path)

    def _check_before_load(self, path: Path, resuming: bool = False) -> None:
        """Model and tokenizer match (and adapters, when resuming), every file intact (unless
        checkpoint.verify_checksums is off), no pickle that could run code: or a CheckpointError
        naming the file and the mismatch, before anything is loaded."""
        if not (path / "metadata.json").is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no metadata.json)")
        _check_identity(path, self.identity, with_adapters=resuming)
        if self.cfg.checkpoint.verify_checksums:
            _verify_checksums(path)
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
