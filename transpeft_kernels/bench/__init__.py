"""The benchmark suite: op-level (lora_linear, gated MLP) and training-step measurements of every
implementation against vanilla PEFT, torch.compile and the GEMM floor.

    cases.py     what is measured (shapes, presets: smoke / gpu / full)
    impls.py     the implementations over one set of weights
    numerics.py  the check every implementation passes before it is timed
    timing.py    medians of warm runs (CUDA events with rotating inputs on GPU)
    op_runner.py, train.py   measuring one op case / one training case
    records.py   JSON-lines records with the environment; table.py, chart.py   the outputs
    suite.py     running a preset into an output folder

Entry points: ``python -m transpeft_kernels bench`` and ``benchmarks/test_bench_ops.py`` (pytest-benchmark).
"""
from .cases import PRESETS, preset
from .suite import run_suite

__all__ = ["PRESETS", "preset", "run_suite"]
