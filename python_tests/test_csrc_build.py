"""The C++ side builds with CMake + Ninja and its ctest host tests pass; with nvcc present, the device
headers also compile for sm_80 and sm_90a."""
import shutil
import subprocess
from pathlib import Path

import pytest

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


def test_cmake_build_and_ctest(tmp_path):
    cmake, ninja = shutil.which("cmake"), _ninja()
    if cmake is None or ninja is None or shutil.which("g++") is None:
        pytest.skip("cmake, ninja or g++ not found")
    build = tmp_path / "build"

    def run(*cmd):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    configure = run(cmake, "-S", ROOT, "-B", build, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}")
    log = run(cmake, "--build", build, "--verbose")
    tests = run(shutil.which("ctest") or "ctest", "--test-dir", build, "--output-on-failure")
    assert "100% tests passed" in tests
    if "CUDA device check enabled" in configure:
        assert "sm_80" in log and "sm_90a" in log
