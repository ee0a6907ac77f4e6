"""Build csrc/*.cu into one shared object with nvcc, cached by a hash of sources and flags.

    python -m melama_mcore.kernels.build [--arch 80 --arch 90] [--out DIR]

builds ahead of time into the cache (default: sm_80 and sm_90, the A100/H100 targets) and prints
the path; `MELAMA_BUILD_KERNELS=1 pip install .` does the same into the installed package (see
setup.py). At run time `library_path()` takes the installed build, else the cached one, else builds
for the current GPU on first use. Cache: `$MELAMA_KERNELS_CACHE` or
`~/.cache/melama_mcore/kernels/<hash>/libmelama_kernels.so`, written to a temporary name and renamed
(atomic), under a file lock so that the ranks of one node build once.

Only the standard library is used here: setup.py runs this file without torch.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# An installed wheel carries the sources inside the package; a source checkout has them at the top.
CSRC = HERE / "csrc" if (HERE / "csrc").is_dir() else HERE.parents[1] / "csrc"
LIB_NAME = "libmelama_kernels.so"
DEFAULT_ARCHS = ("80", "90")
FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--threads", "0")


class BuildError(RuntimeError):
    """nvcc or the sources are missing, or compilation failed (the message says which)."""


def find_nvcc() -> str:
    """nvcc from $MELAMA_NVCC, $PATH or $CUDA_HOME/bin (default /usr/local/cuda)."""
    candidates = [os.environ.get("MELAMA_NVCC"), shutil.which("nvcc"),
                  str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")]
    for nvcc in candidates:
        if nvcc and os.access(nvcc, os.X_OK):
            return nvcc
    raise BuildError("nvcc not found (set MELAMA_NVCC, CUDA_HOME or PATH)")


def sources() -> list[Path]:
    cu = sorted(CSRC.glob("*.cu"))
    if not cu:
        raise BuildError(f"no CUDA sources in {CSRC} (is this a source checkout?)")
    return cu


def nvcc_command(nvcc: str, archs: tuple[str, ...], out: Path) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [nvcc, *FLAGS, *gencode, "-o", str(out), *map(str, sources())]


def source_hash(archs: tuple[str, ...]) -> str:
    """Key of every source and header, the flags and the archs: any change makes a new build."""
    h = hashlib.sha256(" ".join((*FLAGS, *archs)).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    root = os.environ.get("MELAMA_KERNELS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "melama_mcore" / "kernels"


def compile_to(out: Path, archs: tuple[str, ...]) -> Path:
    """Compile every csrc/*.cu for `archs` into `out` (renamed into place only on success)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(nvcc_command(find_nvcc(), archs, Path(tmp)), capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise BuildError(f"nvcc failed ({proc.returncode}):\n{proc.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def prebuilt_path(archs: tuple[str, ...]) -> Path:
    """Where `MELAMA_BUILD_KERNELS=1 pip install` puts the build for `archs`, inside the package."""
    return HERE / "prebuilt" / source_hash(archs) / LIB_NAME


def library_path(archs: tuple[str, ...]) -> Path:
    """The installed or cached shared object for `archs`, building it into the cache if absent."""
    if (prebuilt := prebuilt_path(archs)).exists():
        return prebuilt
    directory = cache_root() / source_hash(archs)
    lib = directory / LIB_NAME
    if lib.exists():
        return lib
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        return lib if lib.exists() else compile_to(lib, archs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="compute capability, e.g. 80 (repeatable)")
    parser.add_argument("--out", type=Path, help="write here instead of the cache")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)
    try:
        path = compile_to(args.out / LIB_NAME, archs) if args.out else library_path(archs)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
