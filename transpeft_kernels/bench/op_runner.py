"""Measuring one op-level case: every implementation, every pass, side by side on the same tensors.

Per implementation: build it, check its numerics against the reference (a mismatch is recorded as
``numerics_mismatch`` and that implementation is not timed), count the bytes its forward saves for
backward, then per pass time the median of many warm calls and measure the peak memory of one call.

Passes, with x (M, d) requiring grad and the adapter factors trainable, base weights frozen:
    fwd      the training-mode forward (the graph is built, then dropped)
    bwd      torch.autograd.grad of a forward built just before it, untimed
    fwd+bwd  both
"""
from __future__ import annotations

import gc
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.env import cuda_fp32_matmul
from ..memory import saved_activation_bytes
from . import numerics
from .cases import PASSES, OpCase
from .impls import Impl, OpSetup, availability, build_impl, build_setup
from .records import add_speedups, make_record
from .timing import buffer_count, peak_memory, time_calls


def make_inputs(setup: OpSetup, count: int, seed: int = 1):
    """``count`` rotating input sets: x (M, d) leaves requiring grad and dy (M, n or d), in the case dtype."""
    case, dev, dt = setup.case, setup.device, setup.dtype
    out = case.n if case.op == "lora_linear" else case.d
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(case.M, case.d, generator=gen).to(dev, dt).requires_grad_(True) for _ in range(count)]
    dys = [torch.randn(case.M, out, generator=gen).to(dev, dt) for _ in range(count)]
    return xs, dys


@dataclass(frozen=True)
class PassCalls:
    """What one pass times: ``call(prepare(i))`` for buffer i, ``prepare`` untimed."""

    call: Callable[[object], object]
    prepare: Callable[[int], object]


def pass_calls(impl: Impl, pass_: str, xs, dys, params) -> PassCalls:
    """bwd times torch.autograd.grad of a forward built just before it, untimed: each backward consumes
    a fresh graph, as in training (no retain_graph, which compiled backwards with donated buffers refuse)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass: expected one of {PASSES}, got {pass_!r}")
    if impl.is_floor:
        f, b = pass_ in ("fwd", "fwd+bwd"), pass_ in ("bwd", "fwd+bwd")

        def floor(i):
            with torch.no_grad():
                return (impl.floor_fwd(xs[i]) if f else None, impl.floor_bwd(dys[i]) if b else None)

        return PassCalls(floor, _index)

    def grad(y, i):
        return torch.autograd.grad(y, [xs[i], *params], dys[i])

    if pass_ == "fwd":
        return PassCalls(lambda i: impl.forward(xs[i]), _index)
    if pass_ == "fwd+bwd":
        return PassCalls(lambda i: grad(impl.forward(xs[i]), i), _index)
    return PassCalls(lambda yi: grad(*yi), lambda i: (impl.forward(xs[i]), i))


def _index(i: int) -> int:
    return i


def run_case(case: OpCase, impl_names, device: torch.device, preset, env: dict, log=print,
             skip: dict[str, str] | None = None) -> list[dict]:
    """All records of one case (every impl x pass), speedups filled in, with torch's fp32 matmuls as the
    case says (``case.fp32_matmul``; restored afterwards). ``skip``: implementations not to run on this
    case, with the reason recorded."""
    with cuda_fp32_matmul(case.fp32_matmul):
        return _run_case(case, impl_names, device, preset, env, log, skip)


def _run_case(case: OpCase, impl_names, device: torch.device, preset, env: dict, log, skip) -> list[dict]:
    skip = skip or {}
    torch._dynamo.reset()  # per-case modules would otherwise pile up guards until dynamo gives up compiling
    setup = build_setup(case, device)
    elt = setup.dtype.itemsize
    out_features = case.n if case.op == "lora_linear" else case.d
    buffers = buffer_count(case.M * (case.d + out_features) * elt, device)
    xs, dys = make_inputs(setup, buffers)
    frozen = setup.base_weights() + setup.params
    by_pass: dict[str, list[dict]] = {p: [] for p in case.passes}

    def rec(impl_name, pass_, **fields):
        by_pass[pass_].append(make_record(env, preset.name, **case.fields(), **{"pass": pass_, "impl": impl_name}, **fields))

    for name in impl_names:
        reason = skip.get(name) or availability(name, device)
        if reason is not None:
            for p in case.passes:
                rec(name, p, status="skipped", reason=reason)
            continue
        try:
            impl = build_impl(name, setup, preset.compile_backend)
            check = None
            if not impl.is_floor:
                check = numerics.check(impl, setup, min(case.M, preset.check_tokens))
            saved = None
            if not impl.is_floor:
                # One untimed forward and backward first, so that torch.compile traces outside the hooks.
                torch.autograd.grad(impl.forward(xs[0]), [xs[0], *setup.params], dys[0])
                try:
                    saved = saved_activation_bytes(lambda: impl.forward(xs[0]), exclude=frozen)
                except Exception as e:  # e.g. a compiler refusing saved-tensor hooks: time it anyway
                    log(f"bench: {name}: saved bytes not measured ({type(e).__name__}: {e})")
            for p in case.passes:
                calls = pass_calls(impl, p, xs, dys, setup.params)
                timing = time_calls(calls.call, device, warmup=preset.warmup, reps=preset.reps, buffers=buffers,
                                    prepare=calls.prepare)
                peak, extra = peak_memory(calls.call, device, calls.prepare)
                rec(name, p, status="ok", median_ms=round(timing.median_ms, 5), iqr_ms=round(timing.iqr_ms, 5),
                    reps=len(timing.times_ms), timer=timing.method, buffers=timing.buffers, peak_mem_bytes=peak,
                    peak_extra_bytes=extra, saved_bytes=saved, compile_backend=impl.compile_backend,
                    numerics_rel_err=None if check is None else check.max_rel_err,
                    numerics_worst=None if check is None else check.worst,
                    numerics_mode="n/a (floor)" if check is None else check.mode)
        except numerics.NumericsMismatch as e:
            log(f"!!! NUMERICS MISMATCH: {e}")
            for p in case.passes:
                rec(name, p, status="numerics_mismatch", reason=str(e))
        except Exception as e:  # one broken implementation must not lose the others' figures
            log(f"!!! {name} failed on {case.key}: {type(e).__name__}: {e}")
            log(traceback.format_exc(limit=6))
            for p in case.passes:
                rec(name, p, status="error", reason=f"{type(e).__name__}: {e}"[:500])
        finally:
            gc.collect()
    records = []
    for p in case.passes:
        add_speedups(by_pass[p])
        records += by_pass[p]
    del setup, xs, dys
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records
