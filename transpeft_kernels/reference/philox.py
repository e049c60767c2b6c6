"""Counter-based Philox4x32-10 (Triton's ``tl.randint4x`` / ``tl.randint`` / ``tl.rand``) and the mask spec.

This is the one definition of every random draw the package makes inside a patched module: the
knowledge mask and the LoRA dropout masks. A backend (Triton, CUDA) must reproduce these bits exactly.

Philox recipe (all arithmetic mod 2**32):
    key:      k0 = seed & 0xFFFFFFFF, k1 = seed >> 32              (seed read as uint64)
    counter:  c0 = offset & 0xFFFFFFFF, c1 = offset >> 32, c2 = c3 = 0   (offset is int64)
    10 rounds of
        c0, c1, c2, c3 = hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0)
        k0, k1 = k0 + 0x9E3779B9, k1 + 0xBB67AE85
    with A = 0xD2511F53, B = 0xCD9E8D57.  ``randint4x`` is the final (c0, c1, c2, c3), ``randint`` c0.
    uniform:  x = int32(c0); x = ~x if x < 0; u = float32(x) * 4.6566127342e-10f   (u in [0, 1))

Mask spec (``keep_mask``): one Philox call gives 8 mask elements as 16-bit integers.
    For a (rows, cols) mask let C8 = ceil(cols / 8). Element (i, j) reads the Philox call at offset
    i * C8 + j // 8 (int64), lane l = j % 8:   v = (c[l // 2] >> (16 * (l % 2))) & 0xFFFF
    threshold T = keep_threshold(p) = round-half-to-even(p * 65536) (float64, on the host, in [0, 65536])
    keep iff v >= T  (an integer compare)
Keep probability (65536 - T) / 65536, resolution 2**-16. Groups of 8 never straddle rows, so the mask
of a token does not depend on tiling or the batch layout of a launch.

Everything runs in int64 torch tensors holding uint32 values; products are split into 16-bit
halves so that no intermediate exceeds 2**49 (int64 overflow would be undefined behaviour).
"""
from __future__ import annotations

import math
import numbers

import torch

_M32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
N_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # 2**-31, as Triton spells it; applied in float32
MASK_ELEMENTS_PER_CALL = 8  # 16-bit lanes per Philox4x32 call (4 outputs x 2 halves)
MASK_LANE_BITS = 16
MASK_LEVELS = 1 << MASK_LANE_BITS  # 65536: the threshold scale

# Bound the int64 temporaries of one Philox evaluation (~10 live tensors of this many elements): Philox
# calls per chunk (8 mask elements each). On a CPU 2**18 keeps the temporaries (~20 MiB) near the caches.
# On a GPU each of the ~150 elementwise ops of an evaluation is a kernel launch, so small chunks are
# launch-bound: on an H200 a gated MLP step with the torch backend took 973 ms at 2**18 and 139 ms at
# 2**22 (~320 MiB of temporaries, ~32 MiB per launch; one 8192 x 14336 mask 18.7 ms).
_CHUNK_ELEMENTS = 1 << 18
_DEVICE_CHUNK_ELEMENTS = 1 << 22


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for uint32 values a (int64 tensor) and constant b."""
    # In-place steps on fresh temporaries (a is not modified): fewer allocations of large tensors.
    p_lo = (a & 0xFFFF).mul_(b)  # < 2**48
    p_hi = (a >> 16).mul_(b)  # < 2**48
    hi = (p_lo >> 16).add_(p_hi).bitwise_right_shift_(16)  # (p_hi + (p_lo >> 16)) >> 16
    lo = p_hi.bitwise_and_(0xFFFF).bitwise_left_shift_(16).add_(p_lo).bitwise_and_(_M32)  # < 2**49 before the mask
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


def philox_randint4x(seed: int | torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(c0, c1, c2, c3) of Philox4x32-10 at each int64 offset (``tl.randint4x``), as int64 values in
    [0, 2**32). Each has the shape of offsets."""
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
        # c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a  (in place on the fresh hi_b, hi_a)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0 = (k0 + KEY_A) & _M32
        k1 = (k1 + KEY_B) & _M32
    return c0, c1, c2, c3


def philox_randint(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """c0 of Philox4x32-10 at each int64 offset, as int64 values in [0, 2**32). Same shape as offsets."""
    return philox_randint4x(seed, offsets)[0]


def philox_uniform(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) at each offset, bit-identical to ``tl.rand(seed, offsets)``."""
    c0 = philox_randint(seed, offsets)
    folded = torch.where(c0 >= 2**31, _M32 - c0, c0)  # int32 view, then ~x for negatives
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=c0.device)


def keep_threshold(p: float) -> int:
    """The integer threshold of a mask that drops with probability p: round-half-to-even(p * 65536),
    computed in float64 (exact: a power-of-two scale), a Python int in [0, 65536]. An element is kept
    iff its 16-bit lane value v satisfies v >= threshold, with probability (65536 - T) / 65536; p at most
    2**-17 rounds to T = 0 (keep all), p at or above 1 - 2**-17 to T = 65536 (keep none)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p: expected a float probability in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
    return round(p * MASK_LEVELS)  # Python's round() is half-to-even


def mask_groups(cols: int) -> int:
    """C8 = ceil(cols / 8): the Philox calls per mask row (the row stride of the group offsets)."""
    return -(-int(cols) // MASK_ELEMENTS_PER_CALL)


def keep_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (rows, cols) mask that drops each element with probability ``p`` (module docstring: the spec).

    Element (i, j) is kept iff lane j % 8 of the Philox4x32-10 call at offset i * ceil(cols/8) + j // 8
    (the 16-bit value (c[l // 2] >> 16 * (l % 2)) & 0xFFFF) is >= keep_threshold(p). The keep
    probability is (65536 - T) / 65536, within 2**-17 of 1 - p; callers that rescale kept values keep
    using 1 / (1 - p) as the factor. The row index is the token's position in the flattened
    (tokens, features) view, so the mask of a token does not depend on tiling, the batch layout of the
    launch, or dtype. Offsets are int64. One Philox evaluation per 8 elements.
    """
    threshold = keep_threshold(p)
    device = torch.device(device)
    groups = mask_groups(cols)
    out = torch.empty(rows, groups, MASK_ELEMENTS_PER_CALL, dtype=torch.bool, device=device)
    if rows == 0 or cols == 0:
        return torch.empty(rows, cols, dtype=torch.bool, device=device)
    chunk = _CHUNK_ELEMENTS if device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    rows_per_chunk = max(1, chunk // groups)
    group_idx = torch.arange(groups, dtype=torch.int64, device=device)
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        row_idx = torch.arange(start, stop, dtype=torch.int64, device=device)
        words = philox_randint4x(seed, row_idx[:, None] * groups + group_idx[None, :])
        chunk = out[start:stop]
        for lane in range(MASK_ELEMENTS_PER_CALL):
            word = words[lane // 2]  # in [0, 2**32)
            if lane % 2:  # (word >> 16) >= T  <=>  word >= T * 2**16   (<= 2**32: no int64 overflow)
                torch.ge(word, threshold << 16, out=chunk[:, :, lane])
            else:
                torch.ge(word & 0xFFFF, threshold, out=chunk[:, :, lane])
    flat = out.view(rows, groups * MASK_ELEMENTS_PER_CALL)
    return flat if groups * MASK_ELEMENTS_PER_CALL == cols else flat[:, :cols].contiguous()
