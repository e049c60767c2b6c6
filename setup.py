"""Build script: the Python package, plus the CUDA backend's library when it can be built.

The library (libtranspeft_cuda.so, csrc/kernels compiled by nvcc; see
transpeft_kernels/kernels/cuda/build.py) is built into the package when
    TRANSPEFT_BUILD_CUDA=1                     always (fails without nvcc);
    TRANSPEFT_BUILD_CUDA=0                     never;
    unset                                      nvcc is found AND the torch importable while building is a
                                               CUDA build (torch.version.cuda is not None).
pip builds in an isolated environment without torch by default, so on a GPU machine use
``pip install --no-build-isolation -e .`` or set TRANSPEFT_BUILD_CUDA=1. Without the library the
package installs and works; backend="cuda" then says how to build it (e.g. ``python -m
transpeft_kernels build-cuda``, for which a regular install ships the csrc/ sources in the package).
"""
import importlib.util
import os
import tempfile
from pathlib import Path
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CUDA_PACKAGE = Path("transpeft_kernels") / "kernels" / "cuda"


def _cuda_build_module():
    # By path: the package itself may not be importable yet (its dependencies are not installed).
    spec = importlib.util.spec_from_file_location("_transpeft_cuda_build", ROOT / CUDA_PACKAGE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_wanted(build) -> tuple[bool, str]:
    flag = os.environ.get("TRANSPEFT_BUILD_CUDA", "").strip()
    if flag == "1":
        return True, "TRANSPEFT_BUILD_CUDA=1"
    if flag == "0":
        return False, "TRANSPEFT_BUILD_CUDA=0"
    if build.find_nvcc() is None:
        return False, "nvcc not found"
    try:
        import torch
    except ImportError:
        return False, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return False, "the torch here is a CPU build"
    return True, f"nvcc found and torch {torch.__version__} has CUDA {torch.version.cuda}"


class BuildPyWithCuda(build_py):
    """build_py, then the CUDA library into the package (the source tree for an editable install)."""

    def run(self):
        super().run()
        build = _cuda_build_module()
        editable = getattr(self, "editable_mode", False)
        if not editable:  # ship the sources so that the JIT route (build-cuda) works from a wheel
            for sub in ("include", "kernels", "emulation"):
                shutil.copytree(ROOT / "csrc" / sub, Path(self.build_lib) / CUDA_PACKAGE / "csrc" / sub,
                                dirs_exist_ok=True)
        wanted, why = _cuda_wanted(build)
        if not wanted:
            print(f"transpeft_kernels: not building the CUDA library ({why}); backend='cuda' will explain how")
            return
        print(f"transpeft_kernels: building the CUDA library ({why}); this takes a few minutes")
        dest = (ROOT if editable else Path(self.build_lib)) / CUDA_PACKAGE
        with tempfile.TemporaryDirectory(prefix="transpeft_cuda_") as tmp:
            lib = build.build(tmp)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, dest / build.LIB_NAME)
        print(f"transpeft_kernels: installed {dest / build.LIB_NAME}")


setup(cmdclass={"build_py": BuildPyWithCuda})
