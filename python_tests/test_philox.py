"""The Philox stream: known answers, an independent scalar oracle, Triton's tl.rand / tl.randint4x, the
mask spec (8 16-bit lanes per call, integer thresholds) and its Triton implementation philox_keep."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from transpeft_kernels.reference import keep_mask, philox_randint, philox_uniform
from transpeft_kernels.reference import philox as philox_module
from transpeft_kernels.reference.philox import keep_threshold, philox_randint4x

M32 = 0xFFFFFFFF


def scalar_philox4(seed: int, offset: int) -> list[int]:
    """Philox4x32-10 with Python ints: an oracle written independently of the tensor code."""
    seed %= 2**64
    k0, k1 = seed & M32, seed >> 32
    c = [offset & M32, (offset >> 32) & M32, 0, 0]
    for _ in range(10):
        pa, pb = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((pb >> 32) ^ c[1] ^ k0) & M32, pb & M32, ((pa >> 32) ^ c[3] ^ k1) & M32, pa & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def scalar_philox(seed: int, offset: int) -> int:
    return scalar_philox4(seed, offset)[0]


def scalar_keep(seed: int, cols: int, i: int, j: int, p: float) -> bool:
    """The mask spec element by element: lane j % 8 of the call at i * ceil(cols / 8) + j // 8."""
    c = scalar_philox4(seed, i * ((cols + 7) // 8) + j // 8)
    lane = j % 8
    v = (c[lane // 2] >> (16 * (lane % 2))) & 0xFFFF
    return v >= round(p * 65536)


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


def test_randint4x_matches_scalar_oracle():
    offsets = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 + 3, 2**40 + 17], dtype=torch.int64)
    for seed in (0, 7, 2**63 + 7):
        words = philox_randint4x(seed, offsets)
        got = [[int(w[k]) for w in words] for k in range(len(offsets))]
        assert got == [scalar_philox4(seed, o) for o in offsets.tolist()]


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
    # 155k draws: the keep rate's standard deviation is < 0.0013; 5 sigma
    assert abs(keep.float().mean().item() - (65536 - keep_threshold(p)) / 65536) < 0.0065


@pytest.mark.parametrize("seed,rows,cols,p", [(11, 5, 13, 0.3), (2**63 + 7, 3, 8, 0.1), (5, 4, 17, 0.5), (9, 2, 1, 0.2)])
def test_keep_mask_matches_the_spec_element_by_element(seed, rows, cols, p):
    got = keep_mask(seed, rows, cols, p).tolist()
    assert got == [[scalar_keep(seed, cols, i, j, p) for j in range(cols)] for i in range(rows)]


def test_keep_mask_groups_never_straddle_rows():
    # Row i of a (rows, cols) mask is row 0 of a mask whose seed offsets start at i * C8: a token's
    # mask depends only on its row index, so any tiling or row subset of a launch gives the same bits.
    full = keep_mask(4, 9, 21, 0.4)
    assert torch.equal(keep_mask(4, 6, 21, 0.4), full[:6])


def test_keep_threshold_edges():
    assert keep_threshold(0.0) == 0
    assert keep_threshold(0.1) == round(0.1 * 65536) == 6554
    assert keep_threshold(0.5) == 32768
    assert keep_threshold(2**-17) == 0  # exactly half: rounds to even
    assert keep_threshold(3 * 2**-17) == 2  # 1.5 -> 2 (even)
    assert keep_threshold(5 * 2**-17) == 2  # 2.5 -> 2 (even)
    assert keep_threshold(1e-9) == 0
    assert keep_threshold(1 - 2**-16) == 65535
    assert keep_threshold(1 - 2**-18) == 65536
    assert isinstance(keep_threshold(0.3), int)
    for bad in (-0.1, 1.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\)"):
            keep_threshold(bad)
    with pytest.raises(TypeError, match="p"):
        keep_threshold("0.1")
    with pytest.raises(ValueError, match="p"):
        keep_mask(0, 2, 2, 1.0)


def test_keep_mask_threshold_edge_cases():
    assert bool(keep_mask(3, 64, 64, 0.0).all())
    assert bool(keep_mask(3, 64, 64, 1e-9).all())  # T = 0: a 16-bit value is always >= 0
    assert not bool(keep_mask(3, 64, 64, 1 - 2**-18).any())  # T = 65536: nothing kept
    # p = 1 - 2**-16: T = 65535, only the value 0xFFFF is kept
    # (2**20 draws: about 16 expected, deterministic for this seed)
    m = keep_mask(3, 1024, 1024, 1 - 2**-16)
    assert 0 < int(m.sum()) < 48
    # tiny p: T = 1, only the value 0 is dropped
    m = keep_mask(3, 1024, 1024, 1.2 / 65536)
    assert 0 < int((~m).sum()) < 48


def test_keep_mask_is_independent_of_chunking(monkeypatch):
    full = keep_mask(3, 70, 33, 0.3)
    monkeypatch.setattr(philox_module, "_CHUNK_ELEMENTS", 20)  # 5 groups per row: forces 4-row chunks
    assert torch.equal(keep_mask(3, 70, 33, 0.3), full)


def test_keep_mask_at_offsets_past_2_31():
    # A (2**28 + 4, 64) mask has group offsets past 2**31 in its last rows: check them against the
    # scalar oracle through a one-row mask shifted by the row (the same offsets).
    rows, cols = 2**28 + 4, 64
    groups = torch.arange(rows - 2, rows, dtype=torch.int64)[:, None] * 8 + torch.arange(8)[None, :]
    assert groups.min() > 2**31
    words = philox_randint4x(77, groups)
    lanes = torch.stack([(words[l // 2] >> (16 * (l % 2))) & 0xFFFF for l in range(8)], dim=-1).reshape(2, cols)
    want = [[scalar_keep(77, cols, i, j, 0.3) for j in range(cols)] for i in range(rows - 2, rows)]
    assert (lanes >= keep_threshold(0.3)).tolist() == want


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
    from transpeft_kernels.reference import keep_mask, philox_randint, philox_uniform
    from transpeft_kernels.reference.philox import keep_threshold, philox_randint4x
    from transpeft_kernels.kernels.triton._common import philox4x32_10, philox_keep

    @triton.jit
    def draw(out_i, out_f, seed, base, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = idx.to(tl.int64) + base
        ok = idx < n
        tl.store(out_i + idx, tl.randint(seed, offs).to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(out_f + idx, tl.rand(seed, offs), mask=ok)

    @triton.jit
    def draw4(out, seed_ptr, base, n, OURS: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = idx.to(tl.int64) + base
        ok = idx < n
        seed = tl.load(seed_ptr)
        if OURS:  # the kernels' own Philox (one 64-bit product per multiply)
            c0, c1, c2, c3 = philox4x32_10(seed, offs)
        else:
            c0, c1, c2, c3 = tl.randint4x(seed, offs)
        tl.store(out + 4 * idx, c0.to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(out + 4 * idx + 1, c1.to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(out + 4 * idx + 2, c2.to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(out + 4 * idx + 3, c3.to(tl.int64) & 0xFFFFFFFF, mask=ok)

    @triton.jit(do_not_specialize=["threshold"])
    def keep_tile(out, seed_ptr, M, N, threshold, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        keep = philox_keep(tl.load(seed_ptr), rows, tl.program_id(1) * BN, N, threshold, BN)
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        tl.store(out + rows.to(tl.int64)[:, None] * N + cols[None, :], keep.to(tl.int8), mask=ok)

    bad = 0
    for seed, base in [(0, 0), (123456789, 5), (2**40 + 7, 2**33 - 100), (2**62 + 12345, 2**31 - 64),
                       (2**64 - 3, 2**62 + 11)]:
        n = 200
        oi = torch.full((n,), -1, dtype=torch.int64); of = torch.full((n,), -1.0)
        draw[(4,)](oi, of, seed, base, n, BLOCK=64)
        offs = torch.arange(n, dtype=torch.int64) + base
        bad += int(not torch.equal(oi, philox_randint(seed, offs)))
        bad += int(not torch.equal(of, philox_uniform(seed, offs)))
        for ours in (False, True):
            o4 = torch.full((n, 4), -1, dtype=torch.int64)
            draw4[(4,)](o4, torch.tensor([seed - 2**64 if seed >= 2**63 else seed]), base, n, OURS=ours, BLOCK=64)
            bad += int(not torch.equal(o4, torch.stack(philox_randint4x(seed, offs), dim=-1)))
    # philox_keep (every kernel's mask) against keep_mask: several tile shapes, ragged edges, the
    # threshold edges (T = 0, 1, 65535, 65536)
    for seed, M, N, p, BM, BN in [(3, 37, 53, 0.3, 16, 16), (2**40 + 7, 20, 64, 0.1, 8, 32),
                                  (5, 9, 100, 0.5, 16, 64), (7, 5, 13, 1 - 2**-18, 8, 16),
                                  (9, 5, 21, 1e-7, 8, 16), (11, 6, 40, 1.2 / 65536, 8, 16),
                                  (13, 6, 40, 1 - 2**-16, 8, 16)]:
        out = torch.full((M, N), -1, dtype=torch.int8)
        keep_tile[(triton.cdiv(M, BM), triton.cdiv(N, BN))](out, torch.tensor([seed]), M, N, keep_threshold(p), BM=BM, BN=BN)
        bad += int(not torch.equal(out.bool(), keep_mask(seed, M, N, p))) + int((out == -1).any())
    print("MISMATCHES", bad)
    """
)


def test_bit_identical_to_triton_tl_rand_randint4x_and_philox_keep():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MISMATCHES 0" in out.stdout
