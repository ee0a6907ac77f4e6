"""The wheel list of prepare.sh (wheels.txt) and the check of what it downloaded. Standard library
only: prepare.sh runs it with whatever python3 has pip.

    python3 benchmarks/gpu_check/wheels.py binary|sdist     # the list's NAME==VERSION, one a line
    python3 benchmarks/gpu_check/wheels.py check DIR         # every listed wheel, nothing else, <= 60 MiB

A wheel travels to the GPU machine inside the working tree, which may hold 64 MiB in all: the wheels
get 60 of them, the tree itself about 1.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

LIST = Path(__file__).with_name("wheels.txt")
MIB = 2**20
LIMIT_BYTES = 60 * MIB
# What the GPU machine's image runs (KINDS.md): CPython 3.12 on x86-64 Linux, glibc new enough for
# every manylinux tag pip is allowed to pick (prepare.sh names them).
PYTHON_TAGS = {"cp312", "py312", "py3"}
ABI_TAGS = {"cp312", "abi3", "none"}
PLATFORM = re.compile(r"^(any|(manylinux(1|2010|2014|_2_\d+)_x86_64))$")


class WheelError(Exception):
    """What prepare.sh downloaded is not what the list asks for, or is too large."""


@dataclass(frozen=True)
class Entry:
    name: str  # as written in the list
    version: str
    sdist: bool  # pure Python, published as a source distribution only: built into a wheel here

    @property
    def key(self) -> str:
        return normalize(self.name)

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def normalize(name: str) -> str:
    """PEP 503: the same project whatever its spelling (DataProperty, dataproperty, data_property)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_list(text: str) -> list[Entry]:
    """`name==version [sdist]  # why` lines; blank lines and comments ignored."""
    entries, seen = [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line[0])
        if match is None or line[1:] not in ([], ["sdist"]):
            raise WheelError(f"wheels.txt:{number}: expected 'name==version' or 'name==version sdist', got {raw!r}")
        entry = Entry(match[1], match[2], line[1:] == ["sdist"])
        if entry.key in seen:
            raise WheelError(f"wheels.txt:{number}: {entry.name} is listed twice (two versions stop the install)")
        seen.add(entry.key)
        entries.append(entry)
    return entries


def read_list(path: Path = LIST) -> list[Entry]:
    return parse_list(path.read_text())


def wheel_tags(filename: str) -> tuple[str, str, str, str, str]:
    """(normalized name, version, python tag, abi tag, platform tag) of a wheel file name (PEP 427)."""
    parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise WheelError(f"{filename}: not a wheel file name")
    name, version, *_, python, abi, platform = parts
    return normalize(name), version, python, abi, platform


def runs_on_the_gpu_machine(python: str, abi: str, platform: str) -> bool:
    """Whether pip on CPython 3.12 / x86-64 Linux installs a wheel of these (possibly compressed) tags."""
    return (any(p in PYTHON_TAGS for p in python.split(".")) and any(a in ABI_TAGS for a in abi.split("."))
            and any(PLATFORM.match(p) for p in platform.split(".")))


def check_folder(folder: Path, entries: list[Entry], limit: int = LIMIT_BYTES) -> list[tuple[str, int]]:
    """Every listed project as exactly one wheel of its version that installs on the GPU machine,
    nothing unlisted, and all of it within `limit` bytes. Returns (file name, bytes), largest first."""
    files = sorted(folder.iterdir())
    by_key = {e.key: e for e in entries}
    problems, found = [], {}
    for path in files:
        if not path.is_file() or not path.name.endswith(".whl"):
            problems.append(f"{path.name}: not a wheel")
            continue
        name, version, python, abi, platform = wheel_tags(path.name)
        entry = by_key.get(name)
        if entry is None:
            problems.append(f"{path.name}: not in wheels.txt")
        elif version != entry.version:
            problems.append(f"{path.name}: wheels.txt asks for {entry.requirement}")
        elif not runs_on_the_gpu_machine(python, abi, platform):
            problems.append(f"{path.name}: does not install on CPython 3.12 / x86-64 Linux")
        if name in found:
            problems.append(f"{path.name}: a second wheel of {name} (two versions stop the install)")
        found[name] = path
    problems += [f"{e.requirement}: no wheel" for e in entries if e.key not in found]
    if problems:
        raise WheelError("; ".join(problems))
    sizes = sorted(((p.name, p.stat().st_size) for p in files), key=lambda item: -item[1])
    total = sum(size for _, size in sizes)
    if total > limit:
        largest = ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in sizes[:3])
        raise WheelError(f"the wheels take {total / MIB:.1f} MiB, over the {limit / MIB:.0f} MiB that may travel "
                         f"with the working tree (largest: {largest}): shorten wheels.txt")
    return sizes


def main(argv: list[str]) -> int:
    try:
        if argv[:1] in (["binary"], ["sdist"]) and len(argv) == 1:
            for entry in read_list():
                if entry.sdist == (argv[0] == "sdist"):
                    print(entry.requirement)
            return 0
        if argv[:1] == ["check"] and len(argv) == 2:
            sizes = check_folder(Path(argv[1]), read_list())
            for name, size in sizes:
                print(f"{size / MIB:8.2f} MiB  {name}")
            print(f"{sum(s for _, s in sizes) / MIB:8.2f} MiB  in {len(sizes)} wheels "
                  f"(limit {LIMIT_BYTES / MIB:.0f} MiB)")
            return 0
    except WheelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("usage: wheels.py binary | sdist | check DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
