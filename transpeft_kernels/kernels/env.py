"""Facts about how kernels will run, importable without triton."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class DryRunTarget:
    """The GPU a dry run describes: tensors live on the meta device, every launch is recorded
    instead of run (perf/ledger.py), and the launchers choose configs and splits as on this GPU."""

    arch: str  # "sm_90" or "sm_80": the launch-config tables to use
    sms: int   # streaming multiprocessors: what the token-split heuristics fill


_DRY_RUN: DryRunTarget | None = None


def dry_run() -> DryRunTarget | None:
    """The target of the dry run in progress, or None (the normal case)."""
    return _DRY_RUN


@contextlib.contextmanager
def dry_running(target: DryRunTarget):
    global _DRY_RUN
    previous, _DRY_RUN = _DRY_RUN, target
    try:
        yield target
    finally:
        _DRY_RUN = previous


def kernel_device_ok(device_type: str, cpu_ok: bool) -> bool:
    """Whether kernels launch for tensors of this device type: CUDA; the CPU in a backend's test mode;
    the meta device during a dry run."""
    return device_type == "cuda" or (device_type == "cpu" and cpu_ok) or (device_type == "meta" and _DRY_RUN is not None)
