"""The public ops: ``lora_linear``, ``masked_gated_act`` and ``masked_gated_mlp``.

Each flattens its dataclass arguments into its autograd Function over the ``transpeft::*`` custom
ops (custom_ops.py: the ops through the dispatcher under torch.compile, their implementations
directly in eager mode) and restores the leading dims. The random seed is an int64 scalar tensor
drawn by the caller (the patched MLP draws it on the input's device: no host copy). What each saves for backward:
    lora_linear       x, S = dropout(x) A^T                       (no dropout mask)
    masked_gated_act  g, u                                        (no mask, no activation output)
    masked_gated_mlp  x, the gate/up outputs, the rank-sized S    (no mask, no h, no act(g))
Backward regenerates masks from the seed and recomputes h'. Nothing is written into saved tensors
or incoming gradients, so a second backward (retain_graph=True) gives the same gradients.
"""
from __future__ import annotations

import torch

from ..reference.activations import Activation
from ..specs import GatedMLPWeights, LinearWeights, MaskSpec
from .backends import Backend
from .custom_ops import lora_linear_apply, masked_gated_act_apply, masked_gated_mlp_apply


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _lora_scalars(lin: LinearWeights) -> tuple[float, float]:
    return (0.0, 0.0) if lin.lora is None else (float(lin.lora.scaling), float(lin.lora.dropout))


def _mask_scalars(mask: MaskSpec | None) -> tuple[float, bool]:
    return (0.0, False) if mask is None else (float(mask.p), bool(mask.rescale))


def lora_linear(x: torch.Tensor, lin: LinearWeights, seed: torch.Tensor | None, backend: Backend) -> torch.Tensor:
    """x (..., d_in) -> (..., d_out): ``x W^T + b + s * (dropout_q(x) A^T) B^T`` (reference.lora_linear)."""
    if lin.lora is not None and lin.lora.dropout > 0 and seed is None:
        raise ValueError("seed: required when lora dropout > 0")
    y, _ = lora_linear_apply(_flatten(x), *lin.tensors(), seed, *_lora_scalars(lin), backend.name)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def masked_gated_act(g, u, activation: Activation, mask: MaskSpec | None, seed, backend: Backend):
    """g, u (..., I) -> act(g) * u * keep * c (reference.gated_mlp's middle step)."""
    if mask is not None and mask.p > 0 and seed is None:
        raise ValueError("seed: required when masking is on")
    h = masked_gated_act_apply(_flatten(g), _flatten(u), seed, Activation(activation).value,
                               *_mask_scalars(mask), backend.name)
    return h.reshape(g.shape)


def masked_gated_mlp(
    x: torch.Tensor,
    weights: GatedMLPWeights,
    activation: Activation,
    mask: MaskSpec | None,
    seed: torch.Tensor | None,
    backend: Backend,
) -> torch.Tensor:
    """x (..., d) -> (..., d_out): ``down(act(g) * u * keep * c)`` with LoRA on any projection
    (reference.gated_mlp). ``seed``: int64 scalar tensor; required when masking or LoRA dropout is on."""
    random = (mask is not None and mask.p > 0) or any(p.lora is not None and p.lora.dropout > 0 for p in weights.projections)
    if random and seed is None:
        raise ValueError("seed: required when masking or lora dropout is on")
    projs = weights.projections
    flat = [t for p in projs for t in p.tensors()]
    scalars = [_lora_scalars(p) for p in projs]
    y = masked_gated_mlp_apply(
        _flatten(x), seed, [t is not None for t in flat], [s for s, _ in scalars], [q for _, q in scalars],
        Activation(activation).value, *_mask_scalars(mask), backend.name, *(t for t in flat if t is not None),
    )
    return y.reshape(*x.shape[:-1], y.shape[-1])
