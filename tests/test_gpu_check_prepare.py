"""benchmarks/gpu_check/prepare.sh and its wheel list, without the network: the list covers what the
GPU machine's image lacks (the project's dependencies and the carried wheels' own requirements, all
in the image or carried), its versions are the ones the project pins, and prepare.sh asks pip for
exactly the list (cp312 manylinux x86-64, --only-binary, --no-deps), keeps .whl/ unless everything
arrived, and refuses more than 60 MiB. pip is replaced by a stand-in that writes wheels of a chosen
size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks" / "gpu_check"
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import wheels  # noqa: E402

# pip's markers as they evaluate on the GPU machine (CPython 3.12, x86-64 Linux)
GPU_MACHINE = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_machine": "x86_64",
               "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def image_packages() -> set[str]:
    lines = (HERE / "image_packages.txt").read_text().splitlines()
    return {wheels.normalize(line) for line in lines if line.strip() and not line.startswith("#")}


def project_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and its `eval` extra (what `melama train` and `melama eval` need)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["eval"]]


def applies(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({**GPU_MACHINE, "extra": e}) for e in extras | {""})


def test_the_list_parses_and_pins_what_the_project_pins():
    entries = wheels.read_list()
    listed = {e.key: e for e in entries}
    assert listed["megatron-core"].version == "0.16.1" and not listed["megatron-core"].sdist
    pinned = {wheels.normalize(r.name): str(r.specifier).removeprefix("==") for r in project_requirements()
              if str(r.specifier).startswith("==")}
    for key, entry in listed.items():
        if key in pinned:
            assert entry.version == pinned[key], f"wheels.txt {entry.requirement}, pyproject.toml pins {pinned[key]}"
    image = image_packages()
    assert not image & set(listed), f"already in the GPU image, nothing to carry: {sorted(image & set(listed))}"


def test_the_image_and_the_list_cover_every_requirement():
    """Every dependency of the project (core and eval), and every requirement of each carried wheel
    (as the version installed here declares it, extras followed), is in the GPU image or in wheels.txt."""
    listed = {e.key: e for e in wheels.read_list()}
    have = image_packages() | set(listed)
    declared = {}
    for key, entry in listed.items():
        try:
            declared[key] = [Requirement(r) for r in requires(entry.name) or []]
        except PackageNotFoundError:
            pytest.fail(f"{entry.name} is not installed here: install the eval extra to check its requirements")
    todo = [("melama-mcore", r) for r in project_requirements() if applies(r, set())]
    missing, followed = [], set()
    while todo:
        who, req = todo.pop()
        key = wheels.normalize(req.name)
        if key not in have:
            missing.append(f"{who} needs {req}")
        elif key in listed and (key, frozenset(req.extras)) not in followed:
            followed.add((key, frozenset(req.extras)))
            todo += [(f"{key} {version(key)}", r) for r in declared[key] if applies(r, req.extras)]
    assert not missing, "add to wheels.txt (or the image lacks it): " + "; ".join(sorted(missing))


@pytest.mark.parametrize("text, problem", [
    ("megatron-core>=0.16\n", "expected 'name==version'"),
    ("lm-eval==0.4.13 wheel\n", "expected 'name==version'"),
    ("DataProperty==1.1.1\ndataproperty==1.1.2\n", "listed twice"),
])
def test_a_malformed_list_is_refused_with_its_line(text, problem):
    with pytest.raises(wheels.WheelError, match=problem):
        wheels.parse_list("# comment\n\n" + text)


LIST = wheels.parse_list("megatron-core==0.16.1\nDataProperty==1.1.1\nword2number==1.1 sdist\n")
GOOD = {"megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl": 3,
        "dataproperty-1.1.1-py3-none-any.whl": 1, "word2number-1.1-py3-none-any.whl": 1}


def folder(tmp_path: Path, files: dict[str, float]) -> Path:
    """Wheels of the given sizes in MiB (sparse files: nothing is written)."""
    for name, mib in files.items():
        with open(tmp_path / name, "wb") as f:
            f.truncate(int(mib * wheels.MIB))
    return tmp_path


def test_the_check_accepts_the_list_within_the_limit(tmp_path):
    sizes = wheels.check_folder(folder(tmp_path, GOOD), LIST, limit=5 * wheels.MIB)
    assert sizes[0] == (next(iter(GOOD)), 3 * wheels.MIB) and sum(s for _, s in sizes) == 5 * wheels.MIB


def test_the_check_refuses_more_than_the_limit_naming_the_largest(tmp_path):
    with pytest.raises(wheels.WheelError, match=r"take 5\.0 MiB, over the 4 MiB .*largest: megatron_core-0\.16\.1"):
        wheels.check_folder(folder(tmp_path, GOOD), LIST, limit=4 * wheels.MIB)
    assert wheels.LIMIT_BYTES == 60 * wheels.MIB


@pytest.mark.parametrize("change, problem", [
    ({"dataproperty-1.1.1-py3-none-any.whl": None}, "DataProperty==1.1.1: no wheel"),
    ({"pytz-2026.6-py2.py3-none-any.whl": 0.1}, "not in wheels.txt"),
    ({"dataproperty-1.1.1-py3-none-any.whl": None, "dataproperty-1.1.2-py3-none-any.whl": 0.1},
     "asks for DataProperty==1.1.1"),
    ({"megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl": None,
      "megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl": 3}, "does not install on CPython 3.12"),
    ({"megatron_core-0.16.1-cp312-cp312-macosx_11_0_arm64.whl": 3}, "does not install on CPython 3.12"),
    ({"notes.txt": 0.0}, "notes.txt: not a wheel"),
])
def test_the_check_refuses_what_the_list_does_not_ask_for(tmp_path, change, problem):
    files = {name: mib for name, mib in {**GOOD, **change}.items() if mib is not None}
    with pytest.raises(wheels.WheelError, match=re.escape(problem)):
        wheels.check_folder(folder(tmp_path, files), LIST)


FAKE_PIP = """
import json, os, sys
args = sys.argv[1:]
with open(os.environ["PIP_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
dest = args[args.index("-d" if args[0] == "download" else "-w") + 1]
with_value = {"-d", "-w", "--python-version", "--implementation", "--abi", "--platform"}
requirements = [a for i, a in enumerate(args[1:], 1) if not a.startswith("-") and args[i - 1] not in with_value]
for requirement in requirements:
    name, version = requirement.split("==")
    with open(os.path.join(dest, f"{name.replace('-', '_')}-{version}-py3-none-any.whl"), "wb") as f:
        f.truncate(int(os.environ["WHEEL_BYTES"]))
"""


def run_prepare(tmp_path: Path, wheel_bytes: int) -> tuple[subprocess.CompletedProcess, Path, list[list[str]]]:
    """prepare.sh with `python -m pip` answered by FAKE_PIP (everything else: this Python; -S: both
    need only the standard library, and start faster without site-packages)."""
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then shift 2; '
                      f'exec {sys.executable} -S {tmp_path / "fake_pip.py"} "$@"; fi\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    dest, log = tmp_path / "whl", tmp_path / "pip.log"
    dest.mkdir()
    (dest / "old.whl").write_text("from an earlier prepare")
    env = dict(os.environ, PYTHON=str(python), PIP_LOG=str(log), WHEEL_BYTES=str(wheel_bytes))
    result = subprocess.run(["bash", str(HERE / "prepare.sh"), str(dest)], capture_output=True, text=True, env=env,
                            timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, dest, calls


def test_prepare_downloads_exactly_the_list_for_the_gpu_machine(tmp_path):
    result, dest, calls = run_prepare(tmp_path, wheel_bytes=1000)
    assert result.returncode == 0, result.stderr
    entries = wheels.read_list()
    binary = [e.requirement for e in entries if not e.sdist]
    download, *builds = calls
    assert download[0] == "download" and download[-len(binary):] == binary
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in download
    options = list(zip(download, download[1:]))
    assert ("--python-version", "3.12") in options and ("--implementation", "cp") in options
    assert ("--abi", "cp312") in options and ("--platform", "manylinux2014_x86_64") in options
    assert [(b[0], b[-1]) for b in builds] == [("wheel", e.requirement) for e in entries if e.sdist]
    assert all("--no-deps" in b and f"--no-binary={b[-1].split('==')[0]}" in b for b in builds)
    assert sorted(wheels.wheel_tags(p.name)[0] for p in dest.iterdir()) == sorted(e.key for e in entries)
    assert "MiB  in 24 wheels" in result.stdout and "run.sh OUT_DIR" in result.stdout


def test_prepare_over_60_mib_fails_and_keeps_the_old_folder(tmp_path):
    result, dest, _ = run_prepare(tmp_path, wheel_bytes=3 * wheels.MIB)  # 24 wheels: 72 MiB
    assert result.returncode == 1
    assert "error: the wheels take 72.0 MiB, over the 60 MiB" in result.stderr
    assert [p.name for p in dest.iterdir()] == ["old.whl"]
