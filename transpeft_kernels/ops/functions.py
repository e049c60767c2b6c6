"""Autograd functions over a backend: ``lora_linear``, ``masked_gated_act`` and ``masked_gated_mlp``.

Each takes the random seed as an int64 scalar tensor (drawn by the caller from torch's default
generator) and saves only what its backward needs:
    lora_linear       x, S = dropout(x) A^T                       (no dropout mask)
    masked_gated_act  g, u                                        (no mask, no activation output)
    masked_gated_mlp  x, the gate/up outputs, the rank-sized S    (no mask, no h, no act(g))
Backward regenerates masks from the seed and recomputes h'. Nothing is written into saved tensors
or incoming gradients, so a second backward (retain_graph=True) gives the same gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference.activations import Activation
from ..reference.mlp import INPUT_STREAMS
from ..specs import GatedMLPWeights, Layout, LinearWeights, MaskSpec, Stream, stream_seed
from .torch_backend import LinearNeeds, TorchBackend


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _needs(flags) -> LinearNeeds:
    return LinearNeeds(*flags)


# ---- lora_linear ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LinearStatic:
    backend: TorchBackend
    template: LinearWeights  # scaling and dropout; its tensors are replaced by the autograd inputs


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, static: _LinearStatic, weight, bias, A, B):
        lin = static.template.with_tensors(weight, bias, A, B)
        x2d = _flatten(x)
        y, s = static.backend.lora_linear_fwd(x2d, lin, seed)
        ctx.static, ctx.seed, ctx.x_shape = static, seed, x.shape
        ctx.save_for_backward(x2d, s, weight, bias, A, B)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, s, weight, bias, A, B = ctx.saved_tensors
        lin = ctx.static.template.with_tensors(weight, bias, A, B)
        n = ctx.needs_input_grad
        grads = ctx.static.backend.lora_linear_bwd(
            _flatten(dy), x2d, s, lin, ctx.seed, _needs((n[0], n[3], n[4], n[5], n[6]))
        )
        dx = None if grads.x is None else grads.x.reshape(ctx.x_shape)
        return dx, None, None, grads.weight, grads.bias, grads.A, grads.B


def lora_linear(x: torch.Tensor, lin: LinearWeights, seed: torch.Tensor | None, backend: TorchBackend) -> torch.Tensor:
    """x (..., d_in) -> (..., d_out): ``x W^T + b + s * (dropout_q(x) A^T) B^T`` (reference.lora_linear)."""
    if lin.lora is not None and lin.lora.dropout > 0 and seed is None:
        raise ValueError("seed: required when lora dropout > 0")
    return _LoraLinearFn.apply(x, seed, _LinearStatic(backend, lin), *lin.tensors())


# ---- masked gated activation -----------------------------------------------------------------------
@dataclass(frozen=True)
class _ActStatic:
    backend: TorchBackend
    activation: Activation
    mask: MaskSpec | None


class _MaskedGatedActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, seed, static: _ActStatic):
        g2, u2 = _flatten(g), _flatten(u)
        h = static.backend.masked_act_fwd(g2, u2, static.activation, static.mask, seed)
        ctx.static, ctx.seed, ctx.shape = static, seed, g.shape
        ctx.save_for_backward(g2, u2)
        return h.reshape(g.shape)

    @staticmethod
    def backward(ctx, dh):
        g2, u2 = ctx.saved_tensors
        st = ctx.static
        dg, du = st.backend.masked_act_bwd(_flatten(dh), g2, u2, st.activation, st.mask, ctx.seed)
        return dg.reshape(ctx.shape), du.reshape(ctx.shape), None, None


def masked_gated_act(g, u, activation: Activation, mask: MaskSpec | None, seed, backend: TorchBackend):
    """g, u (..., I) -> act(g) * u * keep * c (reference.gated_mlp's middle step)."""
    return _MaskedGatedActFn.apply(g, u, seed, _ActStatic(backend, activation, mask))


# ---- masked gated MLP ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _MLPStatic:
    backend: TorchBackend
    template: GatedMLPWeights
    activation: Activation
    mask: MaskSpec | None


def _split_gate_up(outs: list[torch.Tensor], layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    return outs[0].chunk(2, dim=-1) if layout is Layout.FUSED_GATE_UP else (outs[0], outs[1])


def _seed(seed, stream):
    return None if seed is None else stream_seed(seed, stream)


class _MaskedGatedMLPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, static: _MLPStatic, *flat):
        be, w = static.backend, static.template
        lins = [p.with_tensors(*flat[4 * i : 4 * i + 4]) for i, p in enumerate(w.projections)]
        streams = INPUT_STREAMS[w.layout]
        x2d = _flatten(x)
        outs, shrinks = [], []
        for lin, stream in zip(lins[:-1], streams):
            y, s = be.lora_linear_fwd(x2d, lin, _seed(seed, stream))
            outs.append(y)
            shrinks.append(s)
        g, u = _split_gate_up(outs, w.layout)
        h = be.masked_act_fwd(g, u, static.activation, static.mask, seed)
        y, s_down = be.lora_linear_fwd(h, lins[-1], _seed(seed, Stream.DOWN))
        ctx.static, ctx.seed, ctx.x_shape, ctx.n_in = static, seed, x.shape, len(outs)
        ctx.save_for_backward(x2d, *outs, *shrinks, s_down, *flat)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        st, seed, n_in = ctx.static, ctx.seed, ctx.n_in
        be, w = st.backend, st.template
        saved = ctx.saved_tensors
        x2d, outs, shrinks, s_down = saved[0], saved[1 : 1 + n_in], saved[1 + n_in : 1 + 2 * n_in], saved[1 + 2 * n_in]
        flat = saved[2 + 2 * n_in :]
        lins = [p.with_tensors(*flat[4 * i : 4 * i + 4]) for i, p in enumerate(w.projections)]
        needs = ctx.needs_input_grad
        flat_needs = needs[3:]

        g, u = _split_gate_up(list(outs), w.layout)
        h = be.masked_act_fwd(g, u, st.activation, st.mask, seed)  # recomputed, never saved
        k = len(lins) - 1
        down = be.lora_linear_bwd(
            _flatten(dy), h, s_down, lins[-1], _seed(seed, Stream.DOWN),
            _needs((True, *flat_needs[4 * k : 4 * k + 4])),
        )
        del h
        dg, du = be.masked_act_bwd(down.x, g, u, st.activation, st.mask, seed)
        d_outs = [torch.cat([dg, du], dim=-1)] if w.layout is Layout.FUSED_GATE_UP else [dg, du]

        dx = None
        grads: list[torch.Tensor | None] = []
        for i, (lin, stream) in enumerate(zip(lins[:-1], INPUT_STREAMS[w.layout])):
            gi = be.lora_linear_bwd(
                d_outs[i], x2d, shrinks[i], lin, _seed(seed, stream),
                _needs((needs[0], *flat_needs[4 * i : 4 * i + 4])),
            )
            if gi.x is not None:
                dx = gi.x if dx is None else dx + gi.x
            grads += [gi.weight, gi.bias, gi.A, gi.B]
        grads += [down.weight, down.bias, down.A, down.B]
        dx = None if dx is None else dx.reshape(ctx.x_shape)
        return (dx, None, None, *grads)


def masked_gated_mlp(
    x: torch.Tensor,
    weights: GatedMLPWeights,
    activation: Activation,
    mask: MaskSpec | None,
    seed: torch.Tensor | None,
    backend: TorchBackend,
) -> torch.Tensor:
    """x (..., d) -> (..., d_out): ``down(act(g) * u * keep * c)`` with LoRA on any projection
    (reference.gated_mlp). ``seed``: int64 scalar tensor; required when masking or LoRA dropout is on."""
    random = (mask is not None and mask.p > 0) or any(p.lora is not None and p.lora.dropout > 0 for p in weights.projections)
    if random and seed is None:
        raise ValueError("seed: required when masking or lora dropout is on")
    flat = [t for p in weights.projections for t in p.tensors()]
    return _MaskedGatedMLPFn.apply(x, seed, _MLPStatic(backend, weights, activation, mask), *flat)
