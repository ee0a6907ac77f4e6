"""Checks on where a command will write, made before it does any work: a folder that cannot be
created or written, a parent that is a file, an output name taken by a folder, or outputs that already
exist are found in the first second, not after hours of tokenising or generating.

Each check raises a one-line UserError that names the flag (or config key) the path came from, the
path, what is wrong and what to do. Missing folders are created, as `mkdir -p` would; the functions
return the folders they created, so that a command that fails later can remove them again
(`remove_created_folders`) and leave nothing behind. `check_new_folder` (an output that must not
exist yet: a converted checkpoint, published whole) creates nothing.

    check_output_dir(path, flag)              a folder to write files in (created)
    check_output_file(path, flag)             one file (its folder created; an existing file is replaced)
    check_output_prefix(prefix, flag, files)  the files of an output prefix (its folder created)
    check_new_folder(path, flag)              a folder that must not exist yet (nothing created)

and the one way every command writes a file: `write_atomic(path, text_or_bytes)` (whole or not at all).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from melama_mcore.errors import UserError

_PROBE_PREFIX = ".melama-write-check-"


def write_atomic(path: Path, content: str | bytes) -> Path:
    """Write `path` whole or not at all: a hidden temporary beside it, flushed to disk, then renamed
    over it, so a reader (or a crash) never meets half a file. A write that fails (a full disk) is
    a one-line UserError and leaves nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path} not written ({err.strerror or err}): free space or choose another place") from None
    return path


def check_output_dir(path, flag: str) -> list[Path]:
    """Make sure files can be written in folder `path` (given as `flag`, e.g. "--out"): create it and
    its missing parents, then create and remove a file in it. Returns the folders created (outermost
    first); UserError when the path cannot hold files, with nothing created left behind."""
    return _prepare_folder(Path(os.fspath(path)), f"{flag} {os.fspath(path)}", flag)


def _prepare_folder(path: Path, shown: str, flag: str) -> list[Path]:
    missing = []
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise UserError(f"{shown}: {folder} is a file, not a folder; choose another {flag}")
            break
        missing.append(folder)
    created, doing = [], None
    try:
        for folder in reversed(missing):
            doing = f"cannot create the folder {folder}"
            folder.mkdir(exist_ok=True)  # exist_ok: another rank of the same job may be creating it too
            created.append(folder)
        doing = f"cannot write in {path}"
        with tempfile.NamedTemporaryFile(dir=path, prefix=_PROBE_PREFIX):
            pass
    except OSError as err:
        remove_created_folders(created)
        raise UserError(f"{shown}: {doing} ({err.strerror or err}); choose a writable location for {flag} "
                        "or fix its permissions") from None
    return created


def check_output_prefix(prefix, flag: str, outputs=(), *, overwrite: bool = True,
                        overwrite_flag: str = "--overwrite") -> list[Path]:
    """Make sure the files `outputs` (full paths) of output prefix `prefix` (given as `flag`) can be
    written: the prefix's folder as check_output_dir does, no output taken by a folder and, unless
    `overwrite`, none existing already (UserError naming `overwrite_flag`). Returns the folders created."""
    prefix = os.fspath(prefix)
    shown = f"{flag} {prefix}"
    if not prefix or prefix.endswith(os.sep) or os.path.isdir(prefix):
        raise UserError(f"{shown}: a prefix is a folder plus the start of a file name (e.g. data/pubmed), "
                        "not a folder")
    outputs = [os.fspath(p) for p in outputs]
    for output in outputs:
        if os.path.isdir(output):
            raise UserError(f"{shown}: {output} is a folder; choose another prefix")
    existing = [output for output in outputs if os.path.lexists(output)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of its outputs)" if len(existing) > 1 else ""
        raise UserError(f"{shown}: {existing[0]} already exists{more}; pass {overwrite_flag} to replace what "
                        "was written there, or choose another prefix")
    return _prepare_folder(Path(prefix).parent, shown, flag)


def check_output_file(path, flag: str) -> list[Path]:
    """Make sure file `path` (given as `flag`, e.g. "--json") can be written: not a folder, its folder
    as check_output_dir does. Returns the folders created; an existing file will be replaced."""
    shown = f"{flag} {os.fspath(path)}"
    path = Path(os.fspath(path))
    if path.is_dir():
        raise UserError(f"{shown} is a folder; give a file name")
    return _prepare_folder(path.parent, shown, flag)


def check_new_folder(path, flag: str) -> None:
    """Make sure folder `path` (given as `flag`) can be created as a whole, creating nothing: it does
    not exist yet, and files can be written in its nearest existing parent folder (proved by
    creating and removing one). For outputs that are published whole (a rename), checked before
    the work that fills them."""
    shown = f"{flag} {os.fspath(path)}"
    path = Path(os.fspath(path))
    if path.exists() or path.is_symlink():
        raise UserError(f"{shown} already exists: choose a new folder, or delete it first")
    nearest = next(folder for folder in path.parents if folder.exists() or folder.is_symlink())
    if not nearest.is_dir():
        raise UserError(f"{shown}: {nearest} is a file, not a folder; choose another {flag}")
    try:
        with tempfile.NamedTemporaryFile(dir=nearest, prefix=_PROBE_PREFIX):
            pass
    except OSError as err:
        raise UserError(f"{shown}: cannot write in {nearest} ({err.strerror or err}); choose a writable location "
                        f"for {flag} or fix its permissions") from None


def remove_created_folders(created) -> None:
    """Remove the folders a check created, innermost first, as long as no file was written in them
    (empty folders made inside since, such as a run's data cache folder, go with them)."""
    for folder in reversed(list(created)):
        try:
            if any(files for _, _, files in os.walk(folder)):
                return  # something was written there: keep it
            shutil.rmtree(folder)
        except OSError:  # already gone, or not ours to remove: keep the rest
            return
