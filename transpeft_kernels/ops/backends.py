"""Backend names, availability and choice. The backend changes how the math runs, never the draws.

A backend is an object with the primitives of ``TorchBackend`` (torch_backend.py), which the autograd
functions in functions.py compose:

    lora_linear_fwd(x2d, lin, seed) -> (y, S)            S = dropout(x) A^T, rank-sized, or None
    lora_linear_bwd(dy, x2d, S, lin, seed, needs) -> LinearGrads
    masked_act_fwd(g, u, activation, mask, seed) -> h'    h' = act(g) * u * keep * c
    masked_act_bwd(dh, g, u, activation, mask, seed) -> (dg, du)

All 2-D (tokens, features); seeds are int64 scalar tensors (None when nothing is random). A backend
must reproduce the reference's masks bit for bit and its math within floating-point tolerance.
"""
from __future__ import annotations

import importlib.util

import torch

from ..kernels.env import dry_run, interpreting
from .torch_backend import TORCH, TorchBackend

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")

# How to get each compiled backend; shown when one is asked for and cannot run.
_NOT_AVAILABLE: dict[str, str] = {}


def validate_backend_name(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKEND_NAMES}, got {type(backend).__name__} {backend!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def triton_unavailable_reason() -> str | None:
    """None when backend='triton' can run here: triton imports, and CUDA is available or Triton's
    CPU interpreter is on (TRITON_INTERPRET=1, for CPU tensors). Otherwise how to get it."""
    if importlib.util.find_spec("triton") is None:
        return ("backend='triton' needs the triton package: `pip install triton` (Linux, with a CUDA GPU), "
                "or use backend='torch' (or 'auto', which picks the fastest available).")
    if torch.cuda.is_available() or interpreting() or dry_run() is not None:
        return None
    return ("backend='triton' needs a CUDA GPU (none is visible to torch); for CPU tensors it runs in "
            "Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported (slow, for "
            "tests). Otherwise use backend='torch' (or 'auto').")


def cuda_unavailable_reason() -> str | None:
    """None when backend='cuda' can run here: libtranspeft_cuda.so is found and a CUDA GPU is visible
    (or TRANSPEFT_CUDA_EMULATE=1, the host emulation for CPU tensors). Otherwise what to do."""
    from ..kernels.cuda.library import BUILD_ROUTES, candidate_paths, emulating, find_library, load

    if emulating() or dry_run() is not None:  # a dry run records the library's calls instead of making them
        return None
    problems = []
    if find_library() is None:
        where = ", ".join(str(p) for p in candidate_paths())
        problems.append(f"the CUDA extension libtranspeft_cuda.so is not built (looked in {where}); {BUILD_ROUTES}")
    if not torch.cuda.is_available():
        problems.append("it needs a CUDA GPU (none is visible to torch; torch.version.cuda="
                        f"{torch.version.cuda})")
    if not problems:
        try:
            load()  # a stale or foreign library fails here, not in the middle of a forward
        except (OSError, RuntimeError, AttributeError) as e:
            return f"backend='cuda' cannot load its library: {e}; rebuild it: {BUILD_ROUTES}."
        return None
    return ("backend='cuda' cannot run here: " + "; and ".join(problems)
            + ". Otherwise use backend='torch' (or 'auto', which picks the fastest available).")


_TRITON: TorchBackend | None = None
_CUDA: TorchBackend | None = None


def _cuda_backend() -> TorchBackend:
    global _CUDA
    if _CUDA is None:
        from .cuda_backend import CudaBackend

        _CUDA = CudaBackend()
    return _CUDA


def _triton_backend() -> TorchBackend:
    global _TRITON
    if _TRITON is None:
        from .triton_backend import TritonBackend

        _TRITON = TritonBackend()
    return _TRITON


def by_name(name: str) -> TorchBackend:
    """The backend object behind a concrete name ("torch", "triton", "cuda"); used by the custom ops,
    which receive the backend as a string. Availability is checked by ``resolve``, not here."""
    if name == "torch":
        return TORCH
    if name == "triton":
        return _triton_backend()
    if name == "cuda":
        return _cuda_backend()
    raise ValueError(f"backend: expected one of ('torch', 'triton', 'cuda'), got {name!r}")


def check_available(backend: str) -> None:
    """Raise RuntimeError (saying how to get it) when an explicitly named backend cannot run here."""
    validate_backend_name(backend)
    if backend == "triton":
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
    if backend == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
    if backend in _NOT_AVAILABLE:
        raise RuntimeError(_NOT_AVAILABLE[backend])


def runnable_backends() -> list[str]:
    """The concrete backend names that can run here, "torch" first (then "triton", "cuda")."""
    names = ["torch"]
    for name in ("triton", "cuda"):
        try:
            check_available(name)
        except RuntimeError:
            continue
        names.append(name)
    return names


def resolve(backend: str, device: torch.device) -> TorchBackend:
    """The backend object that runs tensors on ``device`` for the requested name.

    "auto": triton for CUDA tensors when triton imports; torch otherwise (CPU tensors run the torch
    backend even when the interpreter is on: it is a test tool, not a fast path).
    "triton": the Triton backend, which itself falls back to torch for inputs its kernels do not
    cover (listed in ops/triton_backend.py)."""
    check_available(backend)
    if backend == "auto":
        if device.type == "cuda" and triton_unavailable_reason() is None:
            return _triton_backend()
        return TORCH
    return by_name(backend)
