"""Reference masked gated MLP: the definition every backend is tested against.

    g, u = gate(x), up(x)                      (or gate_up(x).chunk(2), gate first)
    h    = act(g) * u                          in x's dtype, as transformers computes it
    h'   = h * keep * c                        keep ~ Bernoulli(1 - p) from Philox, c = 1 or 1/(1-p)
    y    = down(h')

Each projection is a ``lora_linear``. Random uses draw from ``sub_seed(seed, SubSeed.*)``.
The mask is materialised here; the fast paths regenerate it instead.
"""
from __future__ import annotations

import torch

from ..specs import GatedMLPWeights, Layout, MaskSpec, SubSeed, split_gate_up, sub_seed
from .activations import Activation, act
from .lora import lora_linear
from .philox import keep_mask

INPUT_SUB_SEEDS = {Layout.SPLIT: (SubSeed.GATE, SubSeed.UP), Layout.FUSED_GATE_UP: (SubSeed.GATE,)}


def knowledge_mask(h: torch.Tensor, mask: MaskSpec, seed: torch.Tensor) -> torch.Tensor:
    """h (..., I) * keep * multiplier, keep from the MASK stream over the flattened (M, I) view."""
    h2d = h.reshape(-1, h.shape[-1])
    keep = keep_mask(sub_seed(seed, SubSeed.MASK), h2d.shape[0], h2d.shape[1], mask.p, device=h.device)
    kept = keep.to(h.dtype)
    if mask.rescale:
        kept = kept * mask.multiplier
    return (h2d * kept).reshape(h.shape)


def gate_and_up(x: torch.Tensor, weights: GatedMLPWeights, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [lora_linear(x, lin, sub_seed(seed, s)) for lin, s in zip(weights.inputs, INPUT_SUB_SEEDS[weights.layout])]
    return split_gate_up(outs, weights.layout)


def gated_mlp(
    x: torch.Tensor,
    weights: GatedMLPWeights,
    activation: Activation,
    mask: MaskSpec | None = None,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., d) -> (..., d_out). ``seed`` (int64 scalar tensor) is needed when masking or LoRA dropout is on."""
    g, u = gate_and_up(x, weights, seed)
    h = act(g, activation) * u
    if mask is not None and mask.p > 0:
        if seed is None:
            raise ValueError("seed: required when masking > 0")
        h = knowledge_mask(h, mask, seed)
    return lora_linear(h, weights.down, sub_seed(seed, SubSeed.DOWN))
