"""pytest-benchmark over the op-level cases and implementations of ``python -m transpeft_kernels bench``
(same cases.py, impls.py, numerics check and pass definitions; one implementation of the suite).

    PYTHONPATH=. python -m pytest benchmarks/test_bench_ops.py --benchmark-json out/bench/pytest.json
    TPK_BENCH_SMOKE=1 python -m pytest benchmarks/test_bench_ops.py     # the tiny CPU configuration

Without a GPU every test skips, unless TPK_BENCH_SMOKE=1. TPK_BENCH_PRESET picks the GPU preset
(gpu by default; full is hours). Each test checks the implementation's numerics against the reference
once per case before timing it. pytest-benchmark times host-side around a synchronised call, so its
figures include launch and synchronisation latency; the CLI's CUDA-event medians (results.jsonl) are the
figures of record, and this suite is for tracking regressions with pytest-benchmark's compare tools.
The training step is measured by the CLI only.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from transpeft_kernels.bench import cases as bench_cases
from transpeft_kernels.bench import numerics
from transpeft_kernels.bench.impls import IMPL_NAMES, availability, build_impl, build_setup
from transpeft_kernels.bench.op_runner import make_inputs, pass_calls
from transpeft_kernels.bench.records import environment
from transpeft_kernels.bench.timing import buffer_count, synchronize

warnings.filterwarnings("ignore", category=FutureWarning)

SMOKE = os.environ.get("TPK_BENCH_SMOKE", "") not in ("", "0")
PRESET = bench_cases.preset("smoke" if SMOKE else os.environ.get("TPK_BENCH_PRESET", "gpu"))
DEVICE = torch.device("cuda" if PRESET.device == "cuda" and torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    PRESET.device == "cuda" and not torch.cuda.is_available(),
    reason="GPU benchmarks need a CUDA GPU; set TPK_BENCH_SMOKE=1 for the CPU smoke configuration",
)

PARAMS = [
    pytest.param(case, impl, p, id=f"{case.op}-{case.model}-{case.label}-M{case.M}-r{case.r}-q{case.lora_dropout}-{p}-{impl}")
    for case in PRESET.cases if isinstance(case, bench_cases.OpCase)
    for p in case.passes for impl in IMPL_NAMES
]


class _CaseCache:
    """The tensors and implementations of the case being benchmarked; tests run case by case, so one
    case at a time stays allocated (a GPU holds one large case, not the whole preset)."""

    def __init__(self):
        self.case = None

    def get(self, case):
        if case != self.case:
            self.case, self.impls, self.checked = None, {}, set()
            torch._dynamo.reset()
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            self.setup = build_setup(case, DEVICE)
            out = case.n if case.op == "lora_linear" else case.d
            self.buffers = buffer_count(case.M * (case.d + out) * self.setup.dtype.itemsize, DEVICE)
            self.xs, self.dys = make_inputs(self.setup, self.buffers)
            self.case = case
        return self

    def impl(self, name):
        if name not in self.impls:
            impl = build_impl(name, self.setup, PRESET.compile_backend)
            if not impl.is_floor:
                numerics.check(impl, self.setup, min(self.case.M, PRESET.check_tokens))  # raises on mismatch
            self.impls[name] = impl
        return self.impls[name]


_CACHE = _CaseCache()
_ENV = None


@pytest.mark.parametrize("case,impl_name,pass_", PARAMS)
def test_op(benchmark, case, impl_name, pass_):
    global _ENV
    reason = availability(impl_name, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    if PRESET.cpu_threads is not None:
        torch.set_num_threads(PRESET.cpu_threads)
    cached = _CACHE.get(case)
    impl = cached.impl(impl_name)
    calls = pass_calls(impl, pass_, cached.xs, cached.dys, cached.setup.params)
    counter = iter(range(10**9))

    def prepare():
        return (calls.prepare(next(counter) % cached.buffers),), {}

    def target(arg):
        calls.call(arg)
        synchronize(DEVICE)  # host timer: the work must be finished when the call returns

    _ENV = _ENV or environment(DEVICE)
    benchmark.extra_info.update({**_ENV, **case.fields(), "pass": pass_, "impl": impl_name, "preset": PRESET.name})
    benchmark.pedantic(target, setup=prepare, rounds=PRESET.reps, warmup_rounds=PRESET.warmup, iterations=1)
