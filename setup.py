"""Wheels carry the CUDA sources (csrc/ -> melama_mcore/kernels/csrc) so that an installed copy
can build its kernels on first use, and with MELAMA_BUILD_KERNELS=1 the compiled kernels too
(ahead of time, for MELAMA_KERNEL_ARCHS, default "80,90"). Editable installs use csrc/ in place.
Everything else is in pyproject.toml."""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        kernels = Path(self.build_lib) / "melama_mcore" / "kernels"
        shutil.copytree(Path(__file__).parent / "csrc", kernels / "csrc", dirs_exist_ok=True)
        if os.environ.get("MELAMA_BUILD_KERNELS") == "1":
            # build.py by path: importing the package would need torch in the build environment
            spec = importlib.util.spec_from_file_location("melama_kernels_build", kernels / "build.py")
            build = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(build)
            archs = tuple(os.environ.get("MELAMA_KERNEL_ARCHS", ",".join(build.DEFAULT_ARCHS)).split(","))
            print(f"melama: compiling the CUDA kernels for sm_{', sm_'.join(archs)}")
            build.compile_to(build.prebuilt_path(archs), archs)


setup(cmdclass={"build_py": BuildPyWithKernels})
