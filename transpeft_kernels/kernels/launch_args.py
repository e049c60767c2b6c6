"""Argument checks and conversions shared by the Triton and CUDA launchers (torch only: importable
without triton and without the CUDA library)."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

# dtype codes, the same in the Triton constexprs and the CUDA C interface: 0 float32, 1 float16, 2 bfloat16
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# activation codes, the same in the Triton constexprs (triton/activations.py) and the CUDA C interface
# (transpeft::Activation in csrc/include/transpeft/activations.h)
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def dtype_code(t: torch.Tensor, name: str) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}") from None


@functools.lru_cache(maxsize=256)
def rounded_to(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` and back: the reference multiplies by scales held in the
    tensor's dtype (``keep.to(dtype) * scale``), so the kernels use the same rounded scale. Cached:
    it runs on every launch, and three tiny tensor ops cost ~15 us of host time each call."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).double())


# Launch-geometry arithmetic in plain ints: triton.cdiv / next_power_of_2 are constexpr functions in
# recent Triton releases, ~5 us of host time per call, and a launcher makes several per launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def check_2d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")


def unit_column_stride(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` (checked 2-D, of a kernel dtype) with unit column stride: copied only when its columns
    are strided. The elementwise kernels index rows by their stride and columns by position."""
    check_2d(t, name)
    dtype_code(t, name)
    return unit_columns(t)


def unit_columns(t: torch.Tensor) -> torch.Tensor:
    """unit_column_stride without the checks, for a launcher that checked ``t`` once already."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def check_out(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, name: str = "out") -> None:
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype):
        raise ValueError(f"{name}: expected shape {tuple(shape)} and dtype {dtype}, got {tuple(out.shape)} {out.dtype}")


def check_same_device(**tensors) -> torch.device:
    """The one device of the given tensors (None entries ignored); ValueError naming the odd one out."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n}: expected device {first}, got {d}")
    return first


def seed_on(seed: torch.Tensor | None, device: torch.device, name: str = "seed") -> torch.Tensor | None:
    """The int64 Philox key as a one-element tensor on ``device``. Kernels load it from memory, so
    no host sync is needed for a device seed, and the value never becomes a (re)specialised int arg."""
    if seed is None:
        return None
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"{name}: expected a one-element int64 tensor, got {seed!r}")
    s = seed if seed.dim() == 1 else seed.reshape(1)
    return s if s.device == device else s.to(device, non_blocking=True)  # no dispatch when already there


class ActBwdLoraGrads(NamedTuple):
    """Results of an ``act_bwd_lora`` (the Triton and the CUDA one). dg, du (M, I) in g's and u's dtypes;
    dB_g, dB_u (I, r) in each side's adapter dtype (None for a side without LoRA, or not asked for);
    dA_d (r_d, I) in the down adapter's dtype, or None. A tuple, so that pytree flattening (the
    performance model's byte count of a call's outputs) sees its tensors."""

    dg: torch.Tensor
    du: torch.Tensor
    dB_g: torch.Tensor | None
    dB_u: torch.Tensor | None
    dA_d: torch.Tensor | None
