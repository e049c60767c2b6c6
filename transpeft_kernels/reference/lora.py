"""Reference LoRA Linear with PEFT's dtype behaviour.

    y = cast_x( (x W^T + b)  +  s * (dropout_q(cast_A(x)) A^T) B^T )

The base product runs in x's dtype; the LoRA branch in the adapter's dtype (float32 adapters on a
bf16 base, as PEFT creates them); the sum is taken in the promoted dtype and cast back to x's dtype.
dropout_q(x) = x * (keep * 1/(1-q)), keep from ``keep_mask(seed, M, d_in, q)`` on the flattened x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..specs import LinearWeights
from .philox import keep_mask


def dropout_multiplier(seed: torch.Tensor, x2d: torch.Tensor, q: float) -> torch.Tensor:
    """(M, d_in) tensor in x2d's dtype: 1/(1-q) where kept, 0 where dropped."""
    keep = keep_mask(seed, x2d.shape[0], x2d.shape[1], q, device=x2d.device)
    return keep.to(x2d.dtype) * (1.0 / (1.0 - q))


def lora_dropout(x: torch.Tensor, q: float, seed: torch.Tensor | None) -> torch.Tensor:
    """dropout_q over x (..., d_in) with the Philox mask of ``seed``; identity when q == 0."""
    if q == 0.0:
        return x
    if seed is None:
        raise ValueError("seed: required when lora dropout > 0")
    x2d = x.reshape(-1, x.shape[-1])
    return (x2d * dropout_multiplier(seed, x2d, q)).reshape(x.shape)


def lora_linear(x: torch.Tensor, lin: LinearWeights, seed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., d_in) -> (..., d_out) in x's dtype. Differentiable by autograd in every input."""
    y = F.linear(x, lin.weight, lin.bias)
    lora = lin.lora
    if lora is None:
        return y
    xa = lora_dropout(x.to(lora.A.dtype), lora.dropout, seed)
    return (y + F.linear(F.linear(xa, lora.A), lora.B) * lora.scaling).to(x.dtype)
