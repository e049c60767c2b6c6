"""csrc/include/transpeft/philox.h, compiled by g++ on the host, against the Python reference.

Builds csrc/tests/philox_shim.cpp into a shared library in pytest's tmp dir, loads it with ctypes,
and checks randint, randint4x, uniform and the keep mask (both the 8-lane and the one-element path)
bit for bit. No CMake and no GPU involved.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from transpeft_kernels.reference import keep_mask, philox_randint, philox_uniform
from transpeft_kernels.reference.philox import keep_threshold, philox_randint4x

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "csrc" / "tests" / "philox_shim.cpp"
INCLUDE = ROOT / "csrc" / "include"

SEEDS = [0, 1, 123456789, 2**32 + 5, 2**62 + 12345, 2**63, 2**63 + 987654321, 2**64 - 1, 0x5DEECE66D1234567]


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: cannot build the Philox host shim")
    lib_path = tmp_path_factory.mktemp("philox_shim") / "libphilox_shim.so"
    cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{INCLUDE}", str(SHIM), "-o", str(lib_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building the shim failed:\n{' '.join(cmd)}\n{proc.stderr}")
    lib = ctypes.CDLL(str(lib_path))
    for name in ("transpeft_philox_randint", "transpeft_philox_randint4x", "transpeft_philox_uniform"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fn.restype = None
    lib.transpeft_philox_keep_mask.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32,
                                               ctypes.c_void_p]
    lib.transpeft_philox_keep_mask.restype = None
    return lib


def _offsets() -> torch.Tensor:
    """A few thousand int64 offsets (read as uint64 by the shim): edges, then random ones of every size."""
    gen = torch.Generator().manual_seed(1234)
    edges = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 160000 * 14336 + 7, 300000 * 14336 + 7,
             2**63 - 1, -(2**63), -1]  # the last two are offsets 2**63 and 2**64 - 1 as uint64
    small = torch.randint(0, 2**32, (1500,), generator=gen, dtype=torch.int64)
    large = torch.randint(-(2**63), 2**63 - 1, (1500,), generator=gen, dtype=torch.int64)
    return torch.cat([torch.tensor(edges, dtype=torch.int64), small, large]).contiguous()


def _call(fn, seed: int, offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    fn(seed, offsets.data_ptr(), offsets.numel(), out.data_ptr())
    return out


@pytest.mark.parametrize("seed", SEEDS, ids=hex)
def test_randint_matches_reference(shim: ctypes.CDLL, seed: int) -> None:
    offsets = _offsets()
    got = _call(shim.transpeft_philox_randint, seed, offsets, torch.empty(offsets.numel(), dtype=torch.int32))
    got = got.to(torch.int64) & 0xFFFFFFFF  # the uint32 values, as the reference returns them
    want = philox_randint(seed, offsets)
    mismatch = (got != want).nonzero().flatten()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} mismatches, first at offset {offsets[mismatch[0]].item()}: "
        f"got {got[mismatch[0]].item():#010x}, want {want[mismatch[0]].item():#010x}"
    )


@pytest.mark.parametrize("seed", SEEDS, ids=hex)
def test_uniform_matches_reference_bitwise(shim: ctypes.CDLL, seed: int) -> None:
    offsets = _offsets()
    got = _call(shim.transpeft_philox_uniform, seed, offsets, torch.empty(offsets.numel(), dtype=torch.float32))
    want = philox_uniform(seed, offsets)
    mismatch = (got.view(torch.int32) != want.view(torch.int32)).nonzero().flatten()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} mismatches, first at offset {offsets[mismatch[0]].item()}: "
        f"got {got[mismatch[0]].item()!r}, want {want[mismatch[0]].item()!r}"
    )
    assert 0.0 <= got.min().item() and got.max().item() < 1.0


def test_random123_known_answer(shim: ctypes.CDLL) -> None:
    out = _call(shim.transpeft_philox_randint, 0, torch.zeros(1, dtype=torch.int64), torch.empty(1, dtype=torch.int32))
    assert out.item() & 0xFFFFFFFF == 0x6627E8D5


@pytest.mark.parametrize("seed", SEEDS[:4], ids=hex)
def test_randint4x_matches_reference(shim: ctypes.CDLL, seed: int) -> None:
    offsets = _offsets()
    got = _call(shim.transpeft_philox_randint4x, seed, offsets, torch.empty(offsets.numel(), 4, dtype=torch.int32))
    want = torch.stack(philox_randint4x(seed, offsets), dim=-1)
    assert torch.equal(got.to(torch.int64) & 0xFFFFFFFF, want)


@pytest.mark.parametrize("rows,cols,p", [(7, 64, 0.1), (5, 37, 0.3), (3, 5, 0.5), (4, 13, 1.2 / 65536), (2, 24, 1 - 2**-18)])
def test_keep_mask_matches_reference(shim: ctypes.CDLL, rows: int, cols: int, p: float) -> None:
    for seed in (3, 2**63 + 987654321):
        out = torch.full((rows, cols), 7, dtype=torch.uint8)
        shim.transpeft_philox_keep_mask(seed, rows, cols, keep_threshold(p), out.data_ptr())
        assert torch.equal(out.bool(), keep_mask(seed, rows, cols, p)) and int(out.max()) <= 1
