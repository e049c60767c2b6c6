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

import torch

from .torch_backend import TORCH, TorchBackend

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")

# How to get each compiled backend; shown when one is asked for and cannot run.
_NOT_AVAILABLE = {
    "triton": (
        "backend='triton' is not available in this version of transpeft_kernels: the Triton kernels "
        "have not landed yet. Use backend='torch' (or 'auto', which picks the fastest available)."
    ),
    "cuda": (
        "backend='cuda' is not available in this version of transpeft_kernels: the CUDA C++ extension "
        "has not landed yet. Use backend='torch' (or 'auto', which picks the fastest available)."
    ),
}


def validate_backend_name(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKEND_NAMES}, got {type(backend).__name__} {backend!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def check_available(backend: str) -> None:
    """Raise RuntimeError (saying how to get it) when an explicitly named backend cannot run here."""
    validate_backend_name(backend)
    if backend in _NOT_AVAILABLE:
        raise RuntimeError(_NOT_AVAILABLE[backend])


def resolve(backend: str, device: torch.device) -> TorchBackend:
    """The backend object that runs tensors on ``device`` for the requested name."""
    check_available(backend)
    return TORCH
