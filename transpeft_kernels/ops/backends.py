"""Backends: one registry of names, how to load each and why it cannot run; the choice made once.

A backend is an object with the primitives of the ``Backend`` protocol below (TorchBackend in
torch_backend.py is the complete one; the kernel backends override what their kernels cover and
inherit the rest), which the autograd functions (custom_ops.py) compose. The backend changes how the
math runs, never the draws: a backend must reproduce the reference's masks bit for bit and its math
within floating-point tolerance.

To add a backend: a module with a TorchBackend subclass, and one ``BackendSpec`` entry in BACKENDS.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..kernels.env import dry_run, interpreting
from .torch_backend import TORCH, LinearGrads, LinearNeeds, MLPSaved


class Backend(Protocol):
    """The primitives every backend provides. All tensors 2-D (tokens, features); seeds are int64
    scalar tensors (None when nothing is random)."""

    name: str

    def lora_linear_fwd(self, x2d, lin, seed) -> tuple: ...                       # -> (y, S or None)
    def lora_linear_bwd(self, dy, x2d, s, lin, seed, needs: LinearNeeds) -> LinearGrads: ...
    def masked_act_fwd(self, g, u, activation, mask, seed) -> torch.Tensor: ...    # h' = act(g) u keep c
    def masked_act_bwd(self, dh, g, u, activation, mask, seed) -> tuple: ...      # -> (dg, du)
    def mlp_fwd(self, x2d, w, activation, mask, seed) -> tuple: ...               # -> (y, MLPSaved)
    def mlp_bwd(self, dy, x2d, saved: MLPSaved, w, activation, mask, seed, needs) -> tuple: ...


def _triton_unavailable() -> str | None:
    """None when backend='triton' can run here: triton imports, and CUDA is available, Triton's CPU
    interpreter is on (TRITON_INTERPRET=1, for CPU tensors) or a dry run records launches."""
    if not _triton_installed():
        return ("backend='triton' needs the triton package: `pip install triton` (Linux, with a CUDA GPU), "
                "or use backend='torch' (or 'auto', which picks the fastest available).")
    if torch.cuda.is_available() or interpreting() or dry_run() is not None:
        return None
    return ("backend='triton' needs a CUDA GPU (none is visible to torch); for CPU tensors it runs in "
            "Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported (slow, for "
            "tests). Otherwise use backend='torch' (or 'auto').")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # ~77 us: asked once per process


def _cuda_unavailable() -> str | None:
    """None when backend='cuda' can run here: libtranspeft_cuda.so is found and a CUDA GPU is visible
    (or TRANSPEFT_CUDA_EMULATE=1, the host emulation for CPU tensors; or a dry run). Otherwise what to do."""
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


def _load_triton() -> Backend:
    from .triton_backend import TritonBackend

    return TritonBackend()


def _load_cuda() -> Backend:
    from .cuda_backend import CudaBackend

    return CudaBackend()


@dataclass(frozen=True)
class BackendSpec:
    load: Callable[[], Backend]              # called once per process
    unavailable: Callable[[], str | None]    # None when it can run here, else how to get it


BACKENDS: dict[str, BackendSpec] = {
    "torch": BackendSpec(lambda: TORCH, lambda: None),
    "triton": BackendSpec(_load_triton, _triton_unavailable),
    "cuda": BackendSpec(_load_cuda, _cuda_unavailable),
}
BACKEND_NAMES = ("auto", *BACKENDS)


def validate_backend_name(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKEND_NAMES}, got {type(backend).__name__} {backend!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    return backend


@functools.cache
def by_name(name: str) -> Backend:
    """The backend object behind a concrete name ("torch", "triton", "cuda"), loaded once; the custom
    ops receive the backend as a string. Availability is checked by ``resolve``, not here."""
    spec = BACKENDS.get(name)
    if spec is None:
        raise ValueError(f"backend: expected one of {tuple(BACKENDS)}, got {name!r}")
    return spec.load()


def check_available(backend: str) -> None:
    """Raise RuntimeError (saying how to get it) when an explicitly named backend cannot run here."""
    validate_backend_name(backend)
    if backend != "auto":
        reason = BACKENDS[backend].unavailable()
        if reason is not None:
            raise RuntimeError(reason)


def runnable_backends() -> list[str]:
    """The concrete backend names that can run here, "torch" first (then "triton", "cuda")."""
    return [name for name, spec in BACKENDS.items() if spec.unavailable() is None]


def _conditions() -> tuple:
    """What availability depends on besides installed files: a resolution is reused while these hold."""
    from ..kernels.cuda.library import emulating

    return interpreting(), emulating(), dry_run() is not None


_RESOLVED: dict[tuple, Backend] = {}


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend object that runs tensors on ``device`` for the requested name. Successful
    resolutions are cached per (name, device type, test modes), so the per-call cost is a dict lookup;
    a failure is re-checked on the next call (a library built meanwhile is found).

    "auto": triton for CUDA tensors when triton imports; torch otherwise (CPU tensors run the torch
    backend even when the interpreter is on: it is a test tool, not a fast path).
    "triton"/"cuda": that backend, which itself falls back to torch for inputs its kernels do not
    cover (listed in ops/coverage.py and the backends' docstrings)."""
    key = (backend, device.type, _conditions())
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    check_available(backend)
    if backend == "auto":
        chosen = by_name("triton") if device.type == "cuda" and _triton_unavailable() is None else TORCH
    else:
        chosen = by_name(backend)
    _RESOLVED[key] = chosen
    return chosen
