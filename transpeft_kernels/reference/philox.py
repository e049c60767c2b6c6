"""Counter-based Philox4x32-10, bit-identical to Triton's ``tl.randint`` / ``tl.rand``.

This is the one definition of every random draw the package makes inside a patched module: the
knowledge mask and the LoRA dropout masks. A backend (Triton, CUDA) must reproduce these bits exactly.

Recipe (all arithmetic mod 2**32):
    key:      k0 = seed & 0xFFFFFFFF, k1 = seed >> 32              (seed read as uint64)
    counter:  c0 = offset & 0xFFFFFFFF, c1 = offset >> 32, c2 = c3 = 0   (offset is int64)
    10 rounds of
        c0, c1, c2, c3 = hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0)
        k0, k1 = k0 + 0x9E3779B9, k1 + 0xBB67AE85
    with A = 0xD2511F53, B = 0xCD9E8D57.  ``randint`` is the final c0.
    uniform:  x = int32(c0); x = ~x if x < 0; u = float32(x) * 4.6566127342e-10f   (u in [0, 1))

Everything runs in int64 torch tensors holding uint32 values; products are split into 16-bit
halves so that no intermediate exceeds 2**49 (int64 overflow would be undefined behaviour).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
N_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # 2**-31, as Triton spells it; applied in float32

# Bound the int64 temporaries of one Philox evaluation (~10 live tensors of this many elements).
_CHUNK_ELEMENTS = 1 << 22


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for uint32 values a (int64 tensor) and constant b."""
    p_lo = (a & 0xFFFF) * b  # < 2**48
    p_hi = (a >> 16) * b  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def _as_seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed: expected a one-element int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed.reshape(()).to(device)
    if not isinstance(seed, int):
        raise TypeError(f"seed: expected int or int64 tensor, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: expected a value in [-2**63, 2**64), got {seed}")
    bits = seed & 0xFFFFFFFFFFFFFFFF
    return torch.tensor(bits - 2**64 if bits >= 2**63 else bits, dtype=torch.int64, device=device)


def philox_randint(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """c0 of Philox4x32-10 at each int64 offset, as int64 values in [0, 2**32). Same shape as offsets."""
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets: expected int64, got {offsets.dtype}")
    s = _as_seed_tensor(seed, offsets.device)
    k0 = s & _M32
    k1 = (s >> 32) & _M32  # arithmetic shift of a negative int64 seed: the mask keeps the uint64 bits
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, ROUND_B)
        hi_a, lo_a = _mulhilo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & _M32
        k1 = (k1 + KEY_B) & _M32
    return c0


def philox_uniform(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) at each offset, bit-identical to ``tl.rand(seed, offsets)``."""
    c0 = philox_randint(seed, offsets)
    folded = torch.where(c0 >= 2**31, _M32 - c0, c0)  # int32 view, then ~x for negatives
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=c0.device)


def keep_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (rows, cols) mask: element (i, j) is kept iff philox_uniform(seed, i * cols + j) >= float32(p).

    The row index is the token's position in the flattened (tokens, features) view, so the mask of a
    token does not depend on tiling, batch layout of the launch, or dtype. Offsets are int64.
    """
    device = torch.device(device)
    out = torch.empty(rows, cols, dtype=torch.bool, device=device)
    if rows == 0 or cols == 0:
        return out
    threshold = torch.tensor(p, dtype=torch.float32, device=device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // cols)
    col_idx = torch.arange(cols, dtype=torch.int64, device=device)
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        row_idx = torch.arange(start, stop, dtype=torch.int64, device=device)
        offsets = row_idx[:, None] * cols + col_idx[None, :]
        out[start:stop] = philox_uniform(seed, offsets) >= threshold
    return out
