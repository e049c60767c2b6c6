"""Timing: median of many warm runs, measured the same way for every implementation.

GPU: one pair of CUDA events around each call, all calls queued back to back and synchronised once at
the end, so host overhead between calls is hidden exactly as in training; inputs rotate through enough
buffers that their total size exceeds twice the L2 cache, so no call finds its inputs cached by the
previous one. CPU: ``time.perf_counter`` around each call (no caches worth rotating for: the figure
only checks the harness).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_L2_BYTES = 64 * 2**20  # used when the device does not report its L2 size
MAX_BUFFERS = 8


@dataclass(frozen=True)
class Timing:
    """Per-call times of one measurement, in milliseconds."""

    times_ms: tuple[float, ...]
    method: str  # "cuda_events" or "perf_counter"
    buffers: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr_ms(self) -> float:
        """Spread of the runs (interquartile range); 0 with fewer than 4 runs."""
        if len(self.times_ms) < 4:
            return 0.0
        q = statistics.quantiles(self.times_ms, n=4)
        return q[2] - q[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def buffer_count(bytes_per_call: int, device: torch.device) -> int:
    """How many input sets to rotate through so that together they exceed twice the L2 cache.

    ``bytes_per_call``: bytes of the inputs one call reads (x, and dy for a backward). 1 on CPU."""
    if bytes_per_call <= 0:
        raise ValueError(f"bytes_per_call: expected a positive byte count, got {bytes_per_call!r}")
    l2 = l2_bytes(device)
    if l2 == 0:
        return 1
    return max(1, min(MAX_BUFFERS, math.ceil(2 * l2 / bytes_per_call)))


def time_calls(fn: Callable[[object], object], device: torch.device, *, warmup: int, reps: int, buffers: int = 1,
               prepare: Callable[[int], object] | None = None) -> Timing:
    """Run ``warmup`` untimed then ``reps`` timed calls of ``fn``, buffer index i cycling over ``range(buffers)``.

    Without ``prepare`` each call is ``fn(i)``. With it, ``fn(prepare(i))``: ``prepare`` runs untimed
    just before (e.g. the forward whose backward is timed); on GPU its kernels are queued before the
    start event, so they are not counted. ``fn`` must do the whole unit of work (its result is dropped)."""
    if reps < 1:
        raise ValueError(f"reps: expected at least 1, got {reps!r}")
    if warmup < 0:
        raise ValueError(f"warmup: expected 0 or more, got {warmup!r}")
    if buffers < 1:
        raise ValueError(f"buffers: expected at least 1, got {buffers!r}")
    def arg(i):
        return i % buffers if prepare is None else prepare(i % buffers)

    for i in range(warmup):
        fn(arg(i))
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            a = arg(i)
            start.record()
            fn(a)
            end.record()
            del a
        torch.cuda.synchronize(device)
        times = tuple(start.elapsed_time(end) for start, end in events)
        return Timing(times, "cuda_events", buffers)
    times = []
    for i in range(reps):
        a = arg(i)
        t0 = time.perf_counter()
        fn(a)
        times.append((time.perf_counter() - t0) * 1e3)
        del a
    return Timing(tuple(times), "perf_counter", buffers)


def peak_memory(fn: Callable[[object], object], device: torch.device, prepare: Callable[[int], object]) -> tuple[int | None, int | None]:
    """(peak bytes allocated while ``fn(prepare(0))`` runs, the same minus what was allocated before it).

    ``prepare`` (e.g. the forward of a timed backward) runs first and is not part of the measurement.
    The first figure is ``torch.cuda.max_memory_allocated`` (weights and inputs included); the second
    is what the call itself added at its peak (activations, saved tensors, workspaces). (None, None) on
    CPU, where torch keeps no allocator statistics."""
    if device.type != "cuda":
        return None, None
    state = prepare(0)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(state)
    del state
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak), int(peak - before)
