"""The fixed-order sum of a split reduction's fp32 partials, cast to the result's dtype, in one launch.

token_reduce and act_bwd_lora split their token / row range over programs and write one fp32 partial per
split (deterministic: no atomics). Their result is the sum over the splits in the adapter's or weight's
dtype. ``part.sum(0).to(dtype)`` made that two launches for a 16-bit result (a sum, then a cast), one per
split reduction: six pairs per gated MLP step with bf16 adapters. Here it is one:

    out[i] = cast(((part[0, i] + part[1, i]) + part[2, i]) + ...)      fp32 sums in split order

which is also the order a sequential fp32 loop adds them in (the tests compare bit for bit; the sum starts
from +0, so a sum of zeros is +0 where a loop starting from part[0] may keep a -0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, direct_launch, plans
from ._common import DTYPE_CODES, cast_like, cdiv


@triton.jit
def split_sum_kernel(part_ptr, out_ptr, n_splits, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    for _ in range(0, n_splits):  # the pointers step a split at a time: no 32-bit split x n product
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += n
    tl.store(out_ptr + offs, cast_like(acc, out_ptr), mask=ok)


_PLANS = plans.plan_cache("split_sum")


def split_sum(part: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """part (splits, *shape), contiguous fp32 -> (*shape) in ``dtype``: the partials summed in split order
    in fp32, then rounded once. ``out``: a contiguous tensor of that shape and dtype to write into."""
    key = (plans.signature(part), dtype, plans.signature(out), plans.tuning_state())
    plan = _PLANS.get(key, lambda: _plan(part, dtype, out))
    res = torch.empty(part.shape[1:], dtype=dtype, device=part.device) if out is None else out
    if not plan.empty:
        direct_launch.launch(split_sum_kernel, plan, (part, res))
    elif res.numel():  # no splits: an empty sum
        res.zero_()
    return res


def _plan(part, dtype, out) -> plans.LaunchPlan:
    if part.dtype != torch.float32 or not part.is_contiguous() or part.dim() < 1:
        raise ValueError(f"part: expected contiguous float32 partials (splits, ...), got {part.dtype} "
                         f"{tuple(part.shape)} with strides {part.stride()}")
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    if out is not None and (out.shape != part.shape[1:] or out.dtype != dtype or not out.is_contiguous()
                            or out.device != part.device):
        raise ValueError(f"out: expected a contiguous {dtype} tensor of shape {tuple(part.shape[1:])} on "
                         f"{part.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    n = part[0].numel() if part.shape[0] else 0
    if n == 0 or part.shape[0] == 0:
        return plans.NOTHING
    c = configs.SPLIT_SUM.default_for(configs.arch_of(part.device), None)
    return plans.LaunchPlan((cdiv(n, c["BLOCK"]),), (part.shape[0], n),
                            meta=dict(num_warps=c.num_warps, num_stages=c.num_stages, **c.kwargs()))
