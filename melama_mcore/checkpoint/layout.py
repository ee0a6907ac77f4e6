"""Where a checkpoint's files are, how a folder of them appears whole, and how one is found.

A run's checkpoints, under <output_dir>/checkpoints/:
    iter_0000100/          a complete checkpoint
    iter_0000200.partial/  a save in progress, or one a crash interrupted: never loaded
    latest                 the step of the newest complete checkpoint, replaced atomically

One checkpoint folder (a run's iter_*, or a weights-only folder written by `melama convert
import-hf` or `melama train --create-seed-checkpoint`):
    metadata.json, common.pt, .metadata, *.distcp   megatron's torch_dist dist-checkpoint
    checksums.json         crc32 of each of those files (integrity.py)
    model_identity.json    what the weights mean: architecture, tokenizer vocabulary (integrity.py)
    config.yaml            the configuration of the run (or the import) that wrote it

A folder appears only when complete, one of two ways: the ranks of a run write `<name>.partial/`
and rank 0 `publish`es it once all have finished (the trainer); a single process writes into a
hidden temporary folder beside the destination, renamed at the end and removed on any failure
(`atomic_dir`: the converter).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from melama_mcore.config.job_config import JobConfig, load_config
from melama_mcore.errors import CheckpointError, ConfigError, UserError
from melama_mcore.output_paths import check_new_folder, check_output_dir, remove_created_folders, write_atomic

LATEST = "latest"
PARTIAL = ".partial"
INCOMPLETE = ".incomplete"  # the converter's temporary folder (atomic_dir)
METADATA = "metadata.json"  # megatron's: written last by a dist-checkpoint save
CHECKSUMS = "checksums.json"  # crc32 of every file megatron wrote, checked before loading (checkpoint.verify_checksums)
IDENTITY = "model_identity.json"  # resolved architecture and tokenizer vocabulary of the run that saved
CONFIG = "config.yaml"
HF_CONFIG = "config.json"  # a Hugging Face model folder's: never one of this project's checkpoints


def step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def partial_dir(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


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
    weights-only folder -> the folder holding metadata.json. What is not one of those is refused
    with what to give instead: an interrupted save (`.partial`), a Hugging Face model folder."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.name.endswith(PARTIAL):
        complete = path.with_name(path.name[: -len(PARTIAL)])
        raise CheckpointError(f"{path} is an interrupted save, never published (a {PARTIAL} folder may lack "
                              f"files): give the run's folder or its checkpoints/ folder (its latest complete "
                              f"checkpoint), or a complete iter_* folder such as {complete.name} if it exists")
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            return step_dir(root, latest_step(root))
    if (path / METADATA).is_file():
        return path
    if (path / HF_CONFIG).is_file():
        raise CheckpointError(f"{path} is a Hugging Face model folder, not a checkpoint of this project: import it "
                              f"first with `melama convert import-hf --hf-dir {path} --out CKPT` and give CKPT")
    raise CheckpointError(f"{path} is not a checkpoint: expected a metadata.json, or a 'latest' marker of a run")


_STEP_FOLDER = re.compile(r"iter_(\d+)")


def checkpoint_step(folder: Path) -> int | None:
    """The step of a run's checkpoint folder, from its name (iter_0000200 -> 200); None for a
    folder of another name (a weights-only import)."""
    found = _STEP_FOLDER.fullmatch(folder.name)
    return int(found.group(1)) if found else None


def run_checkpoints(path: Path) -> tuple[dict[int, Path], list[Path]]:
    """Every complete checkpoint of a run (its output folder, or its checkpoints/ folder) by step, in
    step order, and the iter_* folders passed over: interrupted saves (.partial) and folders without
    metadata.json. CheckpointError when `path` holds no checkpoint of a run."""
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a folder")
    root = next((r for r in (path, path / "checkpoints") if r.is_dir() and any(r.glob("iter_*"))), None)
    if root is None:
        raise CheckpointError(f"{path} holds no checkpoint of a run: expected iter_* folders in it or in its "
                              "checkpoints/ folder")
    complete, skipped = {}, []
    for folder in sorted(root.glob("iter_*")):
        step = checkpoint_step(folder)
        if step is not None and (folder / METADATA).is_file():
            complete[step] = folder
        elif folder.is_dir():
            skipped.append(folder)
    return dict(sorted(complete.items())), skipped


# -- writing ------------------------------------------------------------------------------------------
def seal(folder: Path, checksums: dict[str, int] | None, identity: dict | None, config_yaml: str) -> None:
    """What makes a folder of dist-checkpoint files one of this project's checkpoints, written after
    the tensor files and before the folder is published: their checksums (None: not computed),
    the model identity (None: unknown) and the config."""
    if checksums is not None:
        write_atomic(folder / CHECKSUMS, json.dumps(checksums, indent=0))
    if identity is not None:
        write_atomic(folder / IDENTITY, json.dumps(identity))
    write_atomic(folder / CONFIG, config_yaml)


def publish(partial: Path, final: Path) -> None:
    """The rename that makes a checkpoint exist. A folder already at `final` is replaced (a re-save
    of the same step, e.g. preempted right after a save)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


@contextlib.contextmanager
def atomic_dir(final: Path, flag: str = "--out"):
    """Yield a hidden temporary folder beside `final`; rename it to `final` only if the block
    succeeds, remove it (and the parent folders it created) otherwise. An existing `final`, or one
    that cannot be created there, is a UserError naming `flag` (output_paths.check_new_folder, which
    a command also calls before its work); a write that fails (a full disk) a CheckpointError."""
    check_new_folder(final, flag)
    created = check_output_dir(final.parent, flag)
    try:
        # not `.partial`, which names a run's interrupted saves (refused by find_checkpoint): --verify
        # opens this folder as a checkpoint before it is published
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=INCOMPLETE, dir=final.parent))
    except OSError as err:
        remove_created_folders(created)
        raise UserError(f"{flag} {final}: cannot create it ({err.strerror or err})") from None
    umask = os.umask(0)
    os.umask(umask)
    published = False
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder
        yield tmp
        for path in tmp.iterdir():  # some writers (safetensors) create private files
            path.chmod(0o666 & ~umask)
        os.replace(tmp, final)
        published = True
    except OSError as err:
        raise CheckpointError(f"{final} not written: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not published:
            remove_created_folders(created)


# -- config.yaml --------------------------------------------------------------------------------------
def read_config(folder: Path) -> JobConfig:
    """The checkpoint's config.yaml: the configuration of the run (or the import) that wrote it."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG}: not a checkpoint written by this project")
    try:
        return load_config(path)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {str(err).splitlines()[0]}") from None
