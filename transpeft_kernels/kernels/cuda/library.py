"""Finding and loading libtranspeft_cuda.so with ctypes, and calling into it.

Where the library is looked for, first found wins:
  1. $TRANSPEFT_CUDA_LIB: an explicit path (e.g. the CMake build: build/cmake/libtranspeft_cuda.so);
  2. next to this file: put there by ``pip install`` / setup.py when it built the extension;
  3. the JIT cache: ``python -m transpeft_kernels build-cuda`` writes default_cache_dir()/cuda.
With TRANSPEFT_CUDA_EMULATE=1 the emulation library is loaded instead (the same kernel sources built
by g++ against csrc/emulation/simt, one fiber per CUDA thread; built on first use), and the "cuda"
backend runs CPU tensors: a test tool that runs the kernels' own code without a GPU, never a fast path.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from . import build as _build
from .abi import ABI_VERSION, ENTRY_POINTS, AbiMismatch, check_library

__all__ = ["ABI_VERSION", "AbiMismatch", "BUILD_ROUTES", "Library", "candidate_paths", "emulating", "find_library",
           "load"]

BUILD_ROUTES = (
    "build it one of three ways: "
    "(1) at install time: `TRANSPEFT_BUILD_CUDA=1 pip install --no-build-isolation -e .` (needs nvcc and a CUDA torch); "
    "(2) just in time into the cache: `python -m transpeft_kernels build-cuda` (needs nvcc and ninja); "
    "(3) with CMake: `cmake -S . -B build/cmake -G Ninja && cmake --build build/cmake --target transpeft_cuda`, then "
    "`export TRANSPEFT_CUDA_LIB=$PWD/build/cmake/libtranspeft_cuda.so`"
)


def emulating() -> bool:
    """True when TRANSPEFT_CUDA_EMULATE=1: the host emulation library runs CPU tensors."""
    return os.environ.get("TRANSPEFT_CUDA_EMULATE", "0") not in ("", "0")


def candidate_paths() -> list[Path]:
    paths = []
    explicit = os.environ.get("TRANSPEFT_CUDA_LIB")
    if explicit:
        paths.append(Path(explicit))
    paths.append(Path(__file__).resolve().parent / _build.LIB_NAME)
    paths.append(_build.default_cache_dir() / "cuda" / _build.LIB_NAME)
    return paths


def find_library() -> Path | None:
    """The first existing library path in search order, or None (emulation aside)."""
    return next((p for p in candidate_paths() if p.is_file()), None)


class Library:
    """A loaded libtranspeft_cuda (or its emulation) with checked calls."""

    def __init__(self, path: Path, emulated: bool):
        self.path = path
        self.emulated = emulated
        self._lib = ctypes.CDLL(str(path))
        self._lib.transpeft_cuda_error_string.restype = ctypes.c_char_p
        self._lib.transpeft_cuda_error_string.argtypes = [ctypes.c_int]
        check_library(self._lib, path, rebuild_hint(path, emulated))
        self._fns = {}
        for name, struct in ENTRY_POINTS.items():
            fn = getattr(self._lib, name)
            fn.argtypes = [ctypes.POINTER(struct), ctypes.c_uint64]
            fn.restype = ctypes.c_int
            self._fns[name] = fn

    def error_string(self, code: int) -> str:
        return self._lib.transpeft_cuda_error_string(code).decode()

    def call(self, name: str, args: ctypes.Structure, stream: int = 0) -> None:
        """Call an entry point with its argument struct (kernels/cuda/abi.py); RuntimeError with the
        CUDA error name on a non-zero return."""
        expected = ENTRY_POINTS[name]
        if type(args) is not expected:
            raise TypeError(f"{name}: expected a {expected.__name__}, got {type(args).__name__}")
        code = self._fns[name](ctypes.byref(args), stream)
        if code != 0:
            raise RuntimeError(f"{name} failed: CUDA error {code} ({self.error_string(code)}) [{self.path}]")


def rebuild_hint(path: Path, emulated: bool) -> str:
    """How to replace a stale library at ``path``."""
    if emulated:  # rebuilt from csrc/ on first use when its sources digest is missing or differs
        return f"delete {path.parent} and rerun to rebuild the emulation from this checkout's csrc/"
    return f"rebuild it from this checkout's csrc/ ({BUILD_ROUTES})"


_LOADED: Library | None = None


def load() -> Library:
    """The library for this process (loaded once). RuntimeError naming the build routes when absent."""
    global _LOADED
    if _LOADED is not None and _LOADED.emulated == emulating():
        return _LOADED
    if emulating():
        _LOADED = Library(_build.build_emulation(), emulated=True)
        return _LOADED
    path = find_library()
    if path is None:
        where = ", ".join(str(p) for p in candidate_paths())
        raise RuntimeError(f"backend='cuda': libtranspeft_cuda.so was not found (looked in {where}); {BUILD_ROUTES}.")
    _LOADED = Library(path, emulated=False)
    return _LOADED
