"""Launch plans: what a launcher works out from its operands once, reused on every later call.

A launcher's host work splits in two. Everything that depends only on the operands' shapes, strides,
dtypes, devices and address alignment, and on its scalar options (argument checks, the launch config
and whether to tune it, the grid, the token splits, the strides and constexprs passed to the kernel) is
the *plan*, computed on the first call with a given ``signature`` and cached. What changes from call to
call (the tensors' addresses, a scaling factor, fresh outputs) is handled on the hot path.

Why: the first H200 run measured lora_linear fwd+bwd at ~2-2.5 ms whatever the projection shape,
with a wide spread between runs, against 0.3-0.7 ms of kernels by the model: the signature of a GPU
waiting for the host (not yet proven by a profile). Working the plan out on every call took 13-22 us
per launch on the development CPU with the kernels stubbed (benchmarks/host_overhead.py); a cached plan
leaves the signature, a dict lookup, the output allocation and the launch itself: 5-12 us.

Launchers with plans: lora_shrink, lora_expand_add (and lora_expand_into), token_reduce, gate_up_lora_act, act_bwd_lora,
split_sum and masked_gated_act_fwd/bwd (everything the default cuBLAS-based paths launch). The Triton GEMMs
(gemm_lora_expand, gate_up_act; only with TRANSPEFT_TRITON_BASE_GEMM=triton) still work it out per call.

Launchers launch through ``direct_launch.launch(kernel, plan, pointers, scalars)``: the plan also keeps
the compiled kernels its launches used, so that later launches skip Triton's own per-call dispatch.

The signature includes the tuning state (``TRANSPEFT_TRITON_AUTOTUNE``, a dry run in progress and torch's
fp32 matmul precision), so switching any of them takes effect on the next call. A checked argument that is not part of
the signature would be checked only once per signature: every launcher keys on everything its checks read.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..env import dry_run
from ._common import fp32_lora_precision
from .configs import autotune_enabled

MAX_PLANS = 512  # per launcher; a long run of new shapes (e.g. every sequence length) clears and refills


@dataclass(eq=False)
class LaunchPlan:
    """A launcher's worked-out launch. ``grid``: empty when there is nothing to launch (an empty operand).
    ``head`` and ``tail``: the kernel's non-pointer arguments before and after those given per call
    (scalings; a launcher's comment says where the split is). ``meta``: constexprs, num_warps,
    num_stages. ``n_splits``: the token or row splits of a split reduction (its partial buffers).
    ``compiled``: the compiled kernels direct_launch keeps for this plan (filled on its launches)."""

    grid: tuple
    head: tuple = ()
    tail: tuple = ()
    meta: dict | None = None
    n_splits: int = 1
    compiled: dict = field(default_factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        return not self.grid


NOTHING = LaunchPlan(())


def signature(t: torch.Tensor | None) -> tuple | None:
    """What of a tensor a plan may depend on: shape, strides, dtype, device and whether its address is
    16-byte aligned (Triton specialises pointer arguments on that)."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0


def tuning_state() -> tuple:
    """The process-wide settings a launch plan depends on: autotuning on or off, the dry-run target, and
    the precision of fp32 adapters' LoRA dots (torch's fp32 matmul precision, ``_common.lora_code``)."""
    return autotune_enabled(), dry_run(), fp32_lora_precision()


class PlanCache:
    """Plans of one launcher by signature (a hashable tuple the launcher builds from its arguments)."""

    def __init__(self, name: str, maxsize: int = MAX_PLANS):
        self.name = name
        self.maxsize = maxsize
        self._plans: dict = {}

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        plan = self._plans.get(key)
        if plan is None:
            plan = build()  # raises on bad arguments: nothing is cached then
            if len(self._plans) >= self.maxsize:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()


CACHES: dict[str, PlanCache] = {}


def plan_cache(name: str) -> PlanCache:
    """The (one, process-wide) plan cache of launcher ``name``."""
    cache = CACHES.get(name)
    if cache is None:
        cache = CACHES[name] = PlanCache(name)
    return cache


def clear_all() -> None:
    """Forget every plan (tests; after changing a config table at run time)."""
    for cache in CACHES.values():
        cache.clear()
