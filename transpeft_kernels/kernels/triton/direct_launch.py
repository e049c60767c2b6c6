"""Launching a planned kernel through its compiled kernel, without Triton's per-call dispatch.

``kernel[grid](*args, **meta)`` makes Triton bind every argument to the signature, work out the
specialisation of each one (type, 16-byte alignment of pointers, divisibility of integers), hash that
into a cache key and look the compiled kernel up, on every call: 7.5 us per launch with Triton 3.6 and
9 us with 3.9 on the development CPU, against 0.4 us for the compiled kernel's own launcher (measured
with the launch itself stubbed, under ``perf/triton_stub_driver.py``). With 6
launches per lora_linear fwd+bwd and 15 per gated MLP that is a quarter of our host path.

A launch plan already fixes everything the specialisation depends on except what the launcher passes
per call: the pointers (fresh outputs, seeds, stand-ins) and a few scalars. So the first launch of a
plan goes through Triton (which compiles if needed) and keeps the compiled kernel it returns, keyed by
the current device and the per-call arguments' specialisation (a pointer's 16-byte alignment; for an
integer: 1, divisible by 16, 32-bit); later launches with the same key call the compiled kernel's
launcher with exactly the arguments Triton's would get (grid, stream, function, metadata, hooks and
every parameter in signature order, constexprs included). The equivalence is tested on the CPU
against Triton's own path, argument for argument, through a stub driver that compiles for sm_90.

Falls back to ``kernel[grid]`` in the interpreter (the kernel is then not a JITFunction), in a dry run
(a recorder), outside the Triton versions it was checked against (``TESTED``) and when
``TRANSPEFT_TRITON_DIRECT_LAUNCH=0`` (read at import; tests flip ``ENABLED``). Caveat: a Triton
setting that changes the compiled code at run time (e.g. TRITON_DEBUG after the first launch) is not
seen by plans that already hold a compiled kernel.
"""
from __future__ import annotations

import os

import triton
from triton.runtime.jit import JITFunction

ENABLED = os.environ.get("TRANSPEFT_TRITON_DIRECT_LAUNCH", "1") not in ("0", "", "false", "False")


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# The launcher's calling convention is Triton's internals: 3.6 and 3.9 were checked argument for argument
# (3.7 and 3.8 lie between, with the same JITFunction.run). A newer Triton goes through kernel[grid] until
# test_triton_direct_launch.py has been run against it and this range widened.
TESTED = ((3, 6), (3, 9))
SUPPORTED = TESTED[0] <= _version(triton.__version__) <= TESTED[1]

if SUPPORTED:
    from triton import knobs
    from triton.runtime.driver import driver
else:  # a Triton outside TESTED: every launch goes through kernel[grid]
    knobs = driver = None


def _int_spec(v: int) -> tuple:
    """What Triton's specialisation reads of an integer argument (floats and bools: nothing but the type)."""
    return v == 1, v % 16 == 0, -2**31 <= v < 2**31


def _constexprs(kernel: JITFunction, n_args: int, meta: dict) -> tuple:
    """The parameters after the positional ones, in signature order (Triton passes constexprs too)."""
    out = []
    for name, param in list(kernel.signature.parameters.items())[n_args:]:
        if name in meta:
            out.append(meta[name])
        elif param.default is not param.empty:
            out.append(param.default)
        else:
            raise TypeError(f"{kernel.fn.__name__}: no value for parameter {name!r}")
    return tuple(out)


def launch(kernel, plan, ptrs: tuple, scalars: tuple = ()) -> None:
    """``kernel[plan.grid](*ptrs, *plan.head, *scalars, *plan.tail, **plan.meta)``, through the plan's
    compiled kernel when it has one for this device and these per-call arguments."""
    args = (*ptrs, *plan.head, *scalars, *plan.tail)
    if not (ENABLED and SUPPORTED and isinstance(kernel, JITFunction)):  # interpreter, dry run, old Triton
        kernel[plan.grid](*args, **plan.meta)
        return
    device = driver.active.get_current_device()
    # pointers: only the alignment (their dtypes are fixed by the plan: operands, outputs, int64 seeds)
    key = (device, *[p.data_ptr() % 16 == 0 for p in ptrs], *[_int_spec(s) for s in scalars if type(s) is int])
    hit = plan.compiled.get(key)
    if hit is None:
        compiled = kernel[plan.grid](*args, **plan.meta)
        if compiled is not None and hasattr(compiled, "packed_metadata"):
            plan.compiled[key] = (compiled, _constexprs(kernel, len(args), plan.meta))
        return
    compiled, constexprs = hit
    grid = plan.grid
    stream = driver.active.get_current_stream(device)
    full = (*args, *constexprs)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, compiled.launch_metadata(grid, stream, *full),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full)
