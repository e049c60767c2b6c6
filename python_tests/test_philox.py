"""The Philox stream: known answers, an independent scalar oracle, Triton's tl.rand, mask semantics."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from transpeft_kernels.reference import keep_mask, philox_randint, philox_uniform
from transpeft_kernels.reference import philox as philox_module

M32 = 0xFFFFFFFF


def scalar_philox(seed: int, offset: int) -> int:
    """Philox4x32-10 with Python ints: an oracle written independently of the tensor code."""
    seed %= 2**64
    k0, k1 = seed & M32, seed >> 32
    c = [offset & M32, (offset >> 32) & M32, 0, 0]
    for _ in range(10):
        pa, pb = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((pb >> 32) ^ c[1] ^ k0) & M32, pb & M32, ((pa >> 32) ^ c[3] ^ k1) & M32, pa & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c[0]


def test_random123_known_answer():
    # Philox4x32-10 with counter 0 and key 0: first output word of the published test vector.
    assert int(philox_randint(0, torch.zeros(1, dtype=torch.int64))) == 0x6627E8D5


@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**32 + 5, 2**62 + 12345, 2**63 + 7, 2**64 - 1, -1])
def test_matches_scalar_oracle(seed):
    gen = torch.Generator().manual_seed(1)
    offsets = torch.cat([
        torch.arange(64, dtype=torch.int64),
        2**31 - 32 + torch.arange(64, dtype=torch.int64),
        2**32 - 32 + torch.arange(64, dtype=torch.int64),
        torch.randint(0, 2**62, (64,), generator=gen),
    ])
    got = philox_randint(seed, offsets).tolist()
    assert got == [scalar_philox(seed, o) for o in offsets.tolist()]


def test_seed_tensor_equals_int_seed():
    offsets = torch.arange(1000, dtype=torch.int64)
    for seed in (0, 99, 2**62 + 3):
        assert torch.equal(philox_randint(seed, offsets), philox_randint(torch.tensor(seed), offsets))
    assert torch.equal(philox_randint(-1, offsets), philox_randint(2**64 - 1, offsets))


def test_uniform_range_and_mean():
    u = philox_uniform(5, torch.arange(200_000, dtype=torch.int64))
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_keep_fraction(p):
    keep = keep_mask(11, 300, 517, p)
    assert keep.dtype == torch.bool and keep.shape == (300, 517)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01


def test_keep_mask_is_independent_of_chunking(monkeypatch):
    full = keep_mask(3, 70, 33, 0.3)
    monkeypatch.setattr(philox_module, "_CHUNK_ELEMENTS", 100)  # forces 3-row chunks
    assert torch.equal(keep_mask(3, 70, 33, 0.3), full)


def test_bad_seed_and_offsets():
    with pytest.raises(TypeError, match="offsets"):
        philox_randint(0, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="seed"):
        philox_randint(2**64, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="seed"):
        philox_randint(torch.tensor([1, 2]), torch.zeros(3, dtype=torch.int64))


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch, triton, triton.language as tl
    from transpeft_kernels.reference import philox_randint, philox_uniform

    @triton.jit
    def draw(out_i, out_f, seed, base, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = idx.to(tl.int64) + base
        ok = idx < n
        tl.store(out_i + idx, tl.randint(seed, offs).to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(out_f + idx, tl.rand(seed, offs), mask=ok)

    bad = 0
    for seed, base in [(0, 0), (123456789, 5), (2**40 + 7, 2**33 - 100), (2**62 + 12345, 2**31 - 64)]:
        n = 200
        oi = torch.full((n,), -1, dtype=torch.int64); of = torch.full((n,), -1.0)
        draw[(4,)](oi, of, seed, base, n, BLOCK=64)
        offs = torch.arange(n, dtype=torch.int64) + base
        bad += int(not torch.equal(oi, philox_randint(seed, offs)))
        bad += int(not torch.equal(of, philox_uniform(seed, offs)))
    print("MISMATCHES", bad)
    """
)


def test_bit_identical_to_triton_tl_rand():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MISMATCHES 0" in out.stdout
