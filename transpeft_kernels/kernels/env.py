"""Facts about how kernels will run, importable without triton."""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass


def cuda_fp32_matmul_is_tf32() -> bool:
    """Whether torch lets its fp32 matmuls on CUDA run in TF32 (one tensor-core product of operands with
    10 mantissa bits) rather than full fp32 (its default). Set by ``torch.set_float32_matmul_precision``
    ("high" or "medium"), ``torch.backends.cuda.matmul.allow_tf32 = True`` and, since torch 2.9,
    ``torch.backends.fp32_precision = "tf32"`` (what transformers' ``tf32=True`` sets there) or
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``. Read through the newer attribute where it
    exists (or the function behind it, ``_fp32_precision_getter``): it reflects all of these, where the
    older getter raises once the two APIs' values disagree."""
    import torch

    global _FP32_PRECISION_GETTER
    if _FP32_PRECISION_GETTER is _UNSET:
        _FP32_PRECISION_GETTER = _fp32_precision_getter()
    if _FP32_PRECISION_GETTER is not None:
        return _FP32_PRECISION_GETTER("cuda", "matmul") == "tf32"
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9: "ieee", "tf32", "none"
    if matmul is None:
        return torch.get_float32_matmul_precision() != "highest"
    return matmul == "tf32"


def _fp32_precision_getter():
    """What ``torch.backends.cuda.matmul.fp32_precision`` calls, where it answers as that attribute does
    (checked once): 0.07 us a call against 0.5 us through the attribute, and every launch plan's key
    reads it. None elsewhere (the attribute or the older getter then)."""
    try:
        import torch

        getter = torch._C._get_fp32_precision_getter
        if getter("cuda", "matmul") == torch.backends.cuda.matmul.fp32_precision:
            return getter
    except (ImportError, AttributeError, RuntimeError, TypeError):
        pass
    return None


_UNSET = object()
_FP32_PRECISION_GETTER = _UNSET  # found on the first call


def save_fp32_precision() -> tuple:
    """Everything of torch's fp32 matmul precision that its setters write: the older API's flag and,
    since torch 2.9, the newer API's generic, CUDA-matmul and oneDNN-matmul values (the older setter
    writes those too). ``restore_fp32_precision`` puts it back."""
    import torch

    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the older and newer values disagree already
        legacy = "highest"
    return legacy, tuple(node.fp32_precision for node in _precision_nodes(torch))


def restore_fp32_precision(saved: tuple = ("highest", ("none", "none", "none"))) -> None:
    """Back to ``saved`` (``save_fp32_precision``; the default: torch's defaults), the older flag first,
    which only its own setter resets, then the newer values, generic first."""
    import torch

    legacy, new = saved
    torch.set_float32_matmul_precision(legacy)
    # the newer getters answer a parent's value for a node without its own: a child that read what the
    # generic value is goes back to "none" (inheriting), not to an explicit copy a later generic setting
    # would no longer reach
    for i, (node, value) in enumerate(zip(_precision_nodes(torch), new)):
        node.fp32_precision = "none" if i and new[0] != "none" and value == new[0] else value


def _precision_nodes(torch) -> tuple:
    if not hasattr(torch.backends, "fp32_precision"):  # torch < 2.9: the older API only
        return ()
    return torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul


FP32_MATMUL_MODES = ("ieee", "tf32")


@contextlib.contextmanager
def cuda_fp32_matmul(mode: str):
    """Within the block torch's fp32 matmuls run in ``mode``: "ieee" (full fp32, torch's default) or
    "tf32" (TF32 allowed), set as ``torch.set_float32_matmul_precision("highest" / "high")`` sets it (which
    sets CUDA's and, on CPUs whose oneDNN has it, oneDNN's matmuls), so the older and newer APIs agree;
    everything is restored afterwards. The benchmark's TF32 cases and the model's use it."""
    import torch

    if mode not in FP32_MATMUL_MODES:
        raise ValueError(f"fp32_matmul: expected one of {FP32_MATMUL_MODES}, got {mode!r}")
    saved = save_fp32_precision()
    restore_fp32_precision()  # a clean start: the newer API's explicit values would override the setter's
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    try:
        yield
    finally:
        restore_fp32_precision(saved)


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


# The kernels' bf16 and tf32 tensor-core products (mma), 16-bit shared-memory staging and bf16 arithmetic
# need compute capability 8.0 (Ampere) or newer; the Triton kernels' PTX (inline ex2 / rcp) and the CUDA
# C++ ones need an NVIDIA GPU.
MIN_CAPABILITY = (8, 0)


@functools.cache
def cuda_device_supported(index: int) -> bool:
    """Whether our kernels run on "cuda" device ``index``: an NVIDIA GPU (not a ROCm build's AMD GPU) of
    MIN_CAPABILITY or newer. Elsewhere the ops run on the torch backend (the same results, unfused), with
    one warning per device."""
    import torch

    name = torch.cuda.get_device_name(index)
    if getattr(torch.version, "hip", None):
        why = "is a ROCm device; the kernels are NVIDIA-only (PTX, CUDA C++)"
    else:
        capability = torch.cuda.get_device_capability(index)
        if capability >= MIN_CAPABILITY:
            return True
        why = (f"has compute capability {capability[0]}.{capability[1]}; the kernels need "
               f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    warnings.warn(f"transpeft_kernels: cuda:{index} ({name}) {why}, so its ops run on the torch backend "
                  "(unfused, the same results)", RuntimeWarning, stacklevel=2)
    return False


def device_index(device) -> int:
    """The CUDA device ``device`` names ("cuda" alone: the current one)."""
    import torch

    return torch.cuda.current_device() if device.index is None else device.index


def kernel_device_ok(device, cpu_ok: bool) -> bool:
    """Whether kernels launch for tensors on ``device``: a CUDA GPU our kernels support
    (``cuda_device_supported``); the CPU in a backend's test mode; the meta device during a dry run."""
    if device.type == "cuda":
        return cuda_device_supported(device_index(device))
    return (device.type == "cpu" and cpu_ok) or (device.type == "meta" and _DRY_RUN is not None)
