"""Every csrc/*.cu compiles for sm_80 and sm_90 and the shared object exports the C ABI that the
ctypes bridge expects, so a broken kernel cannot land unnoticed on a machine without a GPU."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from melama_mcore.kernels import _lib, build

try:
    NVCC = build.find_nvcc()
except build.BuildError as err:
    pytestmark = pytest.mark.skip(reason=str(err))

EXPECTED = sorted([*_lib._SIGNATURES, "melama_error_string", "melama_rms_norm_max_cols"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build.compile_to(tmp_path_factory.mktemp("kernels") / build.LIB_NAME, ("80", "90"))


def test_every_source_compiles_and_exports_the_abi(built):
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    nm = subprocess.run(["nm", "-D", "--defined-only", str(built)], capture_output=True, text=True,
                        check=True).stdout
    exported = sorted(line.split()[-1] for line in nm.splitlines() if " T melama_" in line)
    assert exported == EXPECTED


def test_library_loads_and_validates_arguments_without_a_gpu(built):
    lib = ctypes.CDLL(str(built))
    lib.melama_rms_norm_max_cols.restype = ctypes.c_int64
    assert lib.melama_rms_norm_max_cols() == 16384
    fn = lib.melama_swiglu_fwd
    fn.argtypes = _lib._SIGNATURES["melama_swiglu_fwd"]
    # An unknown dtype code is refused before anything touches the device.
    err = fn(None, None, 1, 8, 7, None)
    assert err != 0
    lib.melama_error_string.restype = ctypes.c_char_p
    assert b"invalid argument" in lib.melama_error_string(err)


def test_failed_build_raises_and_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cu").write_text("__global__ void k() { undeclared(); }\n")
    monkeypatch.setattr(build, "CSRC", src)
    out = tmp_path / "out" / build.LIB_NAME
    with pytest.raises(build.BuildError, match="undeclared"):
        build.compile_to(out, ("80",))
    assert list(out.parent.iterdir()) == []


def test_cache_key_follows_sources_and_archs(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "a.cu").write_text("// v1\n")
    monkeypatch.setattr(build, "CSRC", src)
    first = build.source_hash(("80", "90"))
    assert build.source_hash(("80", "90")) == first
    assert build.source_hash(("90",)) != first
    (src / "common.cuh").write_text("// header\n")
    assert build.source_hash(("80", "90")) != first


def test_wheel_carries_the_sources_and_the_ahead_of_time_build(tmp_path):
    """`MELAMA_BUILD_KERNELS=1 pip install .` on a CUDA machine: the wheel holds csrc/ and the
    compiled kernels, and the installed package finds both without a source checkout."""
    import os
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MELAMA_BUILD_KERNELS="1", MELAMA_KERNEL_ARCHS="80")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(root), "-w", str(tmp_path / "wheel")], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    kernels_dir = installed / "melama_mcore" / "kernels"
    assert sorted(p.name for p in (kernels_dir / "csrc").iterdir()) == sorted(
        p.name for p in (root / "csrc").iterdir())
    probe = ("import sys; from melama_mcore.kernels import build\n"
             "build.compile_to = None  # must not compile: the wheel has the build\n"
             "print(build.CSRC); print(build.library_path(('80',)))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(installed)), cwd=tmp_path).stdout.split()
    assert out[0] == str(kernels_dir / "csrc")
    assert Path(out[1]).is_relative_to(kernels_dir / "prebuilt") and Path(out[1]).is_file()
