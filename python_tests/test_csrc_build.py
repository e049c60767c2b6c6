"""The C++ side builds with CMake + Ninja and its ctest host tests pass; with nvcc present, the device
headers compile and the CUDA backend's library (transpeft_cuda) builds for sm_80 and sm_90a, loads
through ctypes, and (without a GPU) fails a call cleanly with a CUDA error instead of crashing."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
    except ImportError:
        return None
    path = Path(ninja.BIN_DIR) / "ninja"
    return str(path) if path.exists() else None


def test_cmake_build_and_ctest(tmp_path, monkeypatch):
    cmake, ninja = shutil.which("cmake"), _ninja()
    if cmake is None or ninja is None or shutil.which("g++") is None:
        pytest.skip("cmake, ninja or g++ not found")
    build = tmp_path / "build"

    def run(*cmd):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    configure = run(cmake, "-S", ROOT, "-B", build, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}")
    log = run(cmake, "--build", build, "--verbose")
    tests = run(shutil.which("ctest") or "ctest", "--test-dir", build, "--output-on-failure")
    assert "100% tests passed" in tests
    for name in ("test_philox", "test_activations", "test_dtypes", "test_fused_host"):
        assert name in tests
    if "transpeft_cuda enabled" not in configure:
        return
    assert "sm_80" in log and "sm_90a" in log
    kernel_lines = [line for line in log.splitlines() if "masked_gated_act.cu" in line and "nvcc" in line]
    assert kernel_lines and all("sm_80" in line and "sm_90a" in line for line in kernel_lines), kernel_lines
    lib_path = build / "libtranspeft_cuda.so"
    assert lib_path.is_file()

    from transpeft_kernels.kernels.cuda import launch, library

    monkeypatch.setenv("TRANSPEFT_CUDA_LIB", str(lib_path))
    monkeypatch.delenv("TRANSPEFT_CUDA_EMULATE", raising=False)
    monkeypatch.setattr(library, "_LOADED", None)
    lib = library.load()
    assert lib.path == lib_path and not lib.emulated
    if not torch.cuda.is_available():  # host pointers must never reach a real GPU
        with pytest.raises(RuntimeError, match="CUDA error"):
            launch.masked_gated_act_fwd(torch.randn(4, 16), torch.randn(4, 16), "silu", 0.0, False, None)
