"""The other two build routes of the CUDA backend's library, and what backend="cuda" says without it.

* JIT: kernels/cuda/build.py (``python -m transpeft_kernels build-cuda``) writes a build.ninja and runs
  ninja with nvcc; the result loads with ctypes and, without a GPU, a call fails with a CUDA error.
  Built for sm_80 only here to keep CI short (test_csrc_build.py builds sm_80 and sm_90a via CMake).
* setup.py: when it builds the library (TRANSPEFT_BUILD_CUDA, nvcc, torch.version.cuda).
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from transpeft_kernels import ops
from transpeft_kernels.kernels.cuda import build, launch, library

ROOT = Path(__file__).resolve().parent.parent


def test_backend_cuda_without_the_library_or_a_gpu_names_the_three_build_routes(monkeypatch, tmp_path):
    monkeypatch.delenv("TRANSPEFT_CUDA_EMULATE", raising=False)
    monkeypatch.setenv("TRANSPEFT_CUDA_LIB", str(tmp_path / "missing.so"))
    monkeypatch.setenv("TRANSPEFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(library, "_LOADED", None)
    packaged = Path(library.__file__).parent / build.LIB_NAME
    if packaged.is_file():
        pytest.skip(f"a library is installed in the package ({packaged})")
    with pytest.raises(RuntimeError) as err:
        ops.check_available("cuda")
    text = str(err.value)
    for route in ("TRANSPEFT_BUILD_CUDA=1 pip install --no-build-isolation -e .",
                  "python -m transpeft_kernels build-cuda", "cmake -S . -B build/cmake -G Ninja",
                  "TRANSPEFT_CUDA_LIB"):
        assert route in text, route
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in text
    with pytest.raises(RuntimeError, match="build-cuda"):
        library.load()


def test_jit_route_builds_a_loadable_library(tmp_path, monkeypatch):
    if build.find_nvcc() is None or build.find_ninja() is None:
        pytest.skip("nvcc or ninja not found")
    lib_path = build.build(tmp_path / "jit", archs=("80",))
    assert lib_path.is_file() and (tmp_path / "jit" / "build.ninja").is_file()
    monkeypatch.setenv("TRANSPEFT_CUDA_LIB", str(lib_path))
    monkeypatch.delenv("TRANSPEFT_CUDA_EMULATE", raising=False)
    monkeypatch.setattr(library, "_LOADED", None)
    lib = library.load()
    assert lib.path == lib_path and lib.error_string(35).startswith("CUDA driver version is insufficient")
    if not torch.cuda.is_available():  # host pointers must never reach a real GPU
        with pytest.raises(RuntimeError, match=r"transpeft_lora_shrink failed: CUDA error \d+"):
            launch.lora_shrink(torch.randn(4, 8), torch.randn(2, 8))
    # A second build is a no-op for ninja.
    assert build.build(tmp_path / "jit", archs=("80",)) == lib_path


def _setup_module():
    spec = importlib.util.spec_from_file_location("_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    import setuptools

    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: None  # import setup.py without running a build
    try:
        spec.loader.exec_module(module)
    finally:
        setuptools.setup = real_setup
    return module


@pytest.mark.parametrize("flag,nvcc,expected", [("1", None, True), ("0", "/usr/bin/nvcc", False),
                                                ("", None, False), ("", "/x/nvcc", torch.version.cuda is not None)])
def test_setup_py_builds_the_library_only_when_asked_or_possible(monkeypatch, flag, nvcc, expected):
    setup_py = _setup_module()
    b = setup_py._cuda_build_module()
    monkeypatch.setenv("TRANSPEFT_BUILD_CUDA", flag)
    monkeypatch.setattr(b, "find_nvcc", lambda: nvcc)
    wanted, why = setup_py._cuda_wanted(b)
    assert wanted is expected, why
