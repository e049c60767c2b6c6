"""What the kernel backends (triton, cuda) cover, and the knowledge mask as their kernels take it.
Everything not covered falls back to the torch backend.

Covered: tensors all on one device the kernels run on (a CUDA GPU of compute capability 8.0 or newer;
CPU only in a backend's test mode, the Triton interpreter or the CUDA host emulation; meta during a dry
run), in float32, float16 or bfloat16; a Linear whose weight and bias share x's dtype and whose LoRA
factors A and B share one dtype.
"""
from __future__ import annotations

import torch

from ..kernels.env import kernel_device_ok
from ..specs import LinearWeights, MaskSpec, SubSeed, sub_seed

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def covered(*tensors: torch.Tensor | None, cpu_ok: bool) -> bool:
    """All given tensors (None ignored) on one CUDA device (or the CPU when ``cpu_ok``), in a kernel dtype."""
    ts = [t for t in tensors if t is not None]
    device = ts[0].device
    if any(t.device != device for t in ts):
        return False
    if not kernel_device_ok(device, cpu_ok):
        return False
    return all(t.dtype in KERNEL_DTYPES for t in ts)


def linear_covered(x2d: torch.Tensor, lin: LinearWeights, cpu_ok: bool) -> bool:
    w, b, lora = lin.weight, lin.bias, lin.lora
    if w.dtype != x2d.dtype or (b is not None and b.dtype != x2d.dtype):
        return False
    if lora is not None and lora.A.dtype != lora.B.dtype:
        return False
    return covered(x2d, w, b, None if lora is None else lora.A, None if lora is None else lora.B, cpu_ok=cpu_ok)


def knowledge_mask_args(mask: MaskSpec | None, seed: torch.Tensor | None) -> tuple[float, bool, torch.Tensor | None]:
    """(p, rescale, Philox key of the MASK stream) for the masked-activation kernels; (0, False, None)
    when masking is off."""
    if mask is None or mask.p == 0.0:
        return 0.0, False, None
    if seed is None:
        raise ValueError("seed: required when masking is on")
    return mask.p, mask.rescale, sub_seed(seed, SubSeed.MASK)
