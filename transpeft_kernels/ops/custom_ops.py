"""The ops as ``torch.library`` custom ops (namespace ``transpeft``), with fake (meta) implementations
and registered autograd, so torch.compile traces a patched MLP as three opaque nodes (forward,
backward) without graph breaks, whatever the backend does inside (Triton launches with a Python-side
autotuner, ctypes calls into the CUDA library).

Schema rules that shape the signatures:
  * only tensors, scalars, strings and lists of them cross the boundary, so the weight dataclasses
    are flattened (``LinearWeights.tensors()`` order: weight, bias, A, B; None when absent) and the
    backend travels by name (``backends.by_name``);
  * no output may be None or alias an input: absent results are empty tensors (``_none``), which the
    wrappers in functions.py turn back into None;
  * the forward ops also return what backward needs (rank-sized shrinks, gate/up outputs); the public
    wrappers hide those outputs, and their incoming gradients are ignored.

Ops (all inputs 2-D (tokens, features); the wrappers flatten and restore leading dims):
    lora_linear(x, weight, bias, A, B, seed, scaling, dropout, backend) -> (y, S)
    lora_linear_backward(dy, x, S, weight, bias, A, B, seed, scaling, dropout, needs, backend)
        -> (dx, dW, db, dA, dB)
    masked_gated_act(g, u, seed, activation, mask_p, mask_rescale, backend) -> h'
    masked_gated_act_backward(dh, g, u, seed, activation, mask_p, mask_rescale, backend) -> (dg, du)
    masked_gated_mlp(x, weights, present, seed, scalings, dropouts, activation, mask_p, mask_rescale,
        backend) -> (y, saved)
    masked_gated_mlp_backward(dy, x, saved, weights, present, seed, scalings, dropouts, activation,
        mask_p, mask_rescale, needs, backend) -> (dx, grads)
  The MLP's weights travel as a list of the tensors that exist plus ``present``, 4 flags per
  projection (weight, bias, A, B; projections gate, up, down or gate_up, down): a list with None
  entries would not be seen by autograd. ``grads`` has one entry per tensor in ``weights``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference.activations import Activation
from ..specs import GatedMLPWeights, LinearWeights, LoraWeights, MaskSpec
from . import backends
from .torch_backend import LinearNeeds, MLPSaved

Tensors = list[Optional[Tensor]]


def _none(like: Tensor) -> Tensor:
    """The stand-in for an absent result: custom ops cannot return None."""
    return like.new_empty(0)


def _or_none(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _linear(weight, bias, A, B, scaling: float, dropout: float) -> LinearWeights:
    return LinearWeights(weight, bias, None if A is None else LoraWeights(A, B, scaling, dropout))


def _with_absent(weights: list[Tensor], present: list[bool]) -> Tensors:
    it = iter(weights)
    return [next(it) if p else None for p in present]


def _mlp_weights(weights: Tensors, scalings: list[float], dropouts: list[float]) -> GatedMLPWeights:
    lins = [_linear(*weights[4 * i : 4 * i + 4], scalings[i], dropouts[i]) for i in range(len(weights) // 4)]
    return GatedMLPWeights(tuple(lins[:-1]), lins[-1])


def _mask(p: float, rescale: bool) -> MaskSpec | None:
    return MaskSpec(p, rescale) if p > 0 else None


def _grad_like(g: Tensor | None, like: Tensor | None) -> Tensor:
    """A gradient in its input's dtype, or the empty stand-in when not computed."""
    if g is None or like is None:
        return _none(like if like is not None else g)
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _grads_like(grads, weights: Tensors, fallback: Tensor) -> list[Tensor]:
    out = []
    for g, w in zip(grads, weights):
        out.append(_none(fallback) if g is None or w is None else _grad_like(g, w))
    return out


# ---- lora_linear ---------------------------------------------------------------------------------
@torch.library.custom_op("transpeft::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Optional[Tensor], B: Optional[Tensor],
    seed: Optional[Tensor], scaling: float, dropout: float, backend: str,
) -> tuple[Tensor, Tensor]:
    y, s = backends.by_name(backend).lora_linear_fwd(x, _linear(weight, bias, A, B, scaling, dropout), seed)
    return y, _none(x) if s is None else s


@lora_linear.register_fake
def _(x, weight, bias, A, B, seed, scaling, dropout, backend):
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, _none(x) if A is None else A.new_empty(x.shape[0], A.shape[0])


@torch.library.custom_op("transpeft::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    dy: Tensor, x: Tensor, s: Tensor, weight: Tensor, bias: Optional[Tensor], A: Optional[Tensor],
    B: Optional[Tensor], seed: Optional[Tensor], scaling: float, dropout: float, needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    lin = _linear(weight, bias, A, B, scaling, dropout)
    g = backends.by_name(backend).lora_linear_bwd(dy, x, _or_none(s), lin, seed, LinearNeeds(*needs))
    return (_grad_like(g.x, x), *_grads_like((g.weight, g.bias, g.A, g.B), [weight, bias, A, B], x))


@lora_linear_backward.register_fake
def _(dy, x, s, weight, bias, A, B, seed, scaling, dropout, needs, backend):
    like = [x, weight, bias, A, B]
    return tuple(torch.empty_like(t) if n and t is not None else _none(x) for n, t in zip(needs, like))


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, A, B, seed, scaling, dropout, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1], weight, bias, A, B, seed)
    ctx.scalars = (scaling, dropout)
    ctx.backend = backend


def _lora_linear_bwd(ctx, dy, _ds):
    if dy is None:  # gradients were materialised lazily: nothing flows back
        return (None,) * 9
    x, s, weight, bias, A, B, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3], n[4]]
    dx, dW, db, dA, dB = torch.ops.transpeft.lora_linear_backward(
        dy, x, s, weight, bias, A, B, seed, *ctx.scalars, needs, ctx.backend
    )
    return (*(_or_none(g) if need else None for g, need in zip((dx, dW, db, dA, dB), needs)),
            None, None, None, None)


lora_linear.register_autograd(_lora_linear_bwd, setup_context=_lora_linear_setup)


# ---- masked gated activation -----------------------------------------------------------------------
@torch.library.custom_op("transpeft::masked_gated_act", mutates_args=())
def masked_gated_act(
    g: Tensor, u: Tensor, seed: Optional[Tensor], activation: str, mask_p: float, mask_rescale: bool, backend: str,
) -> Tensor:
    return backends.by_name(backend).masked_act_fwd(g, u, Activation(activation), _mask(mask_p, mask_rescale), seed)


@masked_gated_act.register_fake
def _(g, u, seed, activation, mask_p, mask_rescale, backend):
    return torch.empty_like(g)


@torch.library.custom_op("transpeft::masked_gated_act_backward", mutates_args=())
def masked_gated_act_backward(
    dh: Tensor, g: Tensor, u: Tensor, seed: Optional[Tensor], activation: str, mask_p: float,
    mask_rescale: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    dg, du = backends.by_name(backend).masked_act_bwd(dh, g, u, Activation(activation), _mask(mask_p, mask_rescale), seed)
    return _grad_like(dg, g), _grad_like(du, u)


@masked_gated_act_backward.register_fake
def _(dh, g, u, seed, activation, mask_p, mask_rescale, backend):
    return torch.empty_like(g), torch.empty_like(u)


def _act_setup(ctx, inputs, output):
    g, u, seed, *rest = inputs
    ctx.save_for_backward(g, u, seed)
    ctx.rest = rest


def _act_bwd(ctx, dh):
    g, u, seed = ctx.saved_tensors
    dg, du = torch.ops.transpeft.masked_gated_act_backward(dh, g, u, seed, *ctx.rest)
    return dg, du, None, None, None, None, None


masked_gated_act.register_autograd(_act_bwd, setup_context=_act_setup)


# ---- masked gated MLP ------------------------------------------------------------------------------
def _saved_list(saved: MLPSaved, like: Tensor) -> list[Tensor]:
    return [*saved.outs, *(_none(like) if s is None else s for s in saved.shrinks),
            _none(like) if saved.s_down is None else saved.s_down]


def _saved_from_list(items: list[Tensor], n_inputs: int) -> MLPSaved:
    return MLPSaved(tuple(items[:n_inputs]), tuple(_or_none(t) for t in items[n_inputs : 2 * n_inputs]),
                    _or_none(items[2 * n_inputs]))


@torch.library.custom_op("transpeft::masked_gated_mlp", mutates_args=())
def masked_gated_mlp(
    x: Tensor, weights: list[Tensor], present: list[bool], seed: Optional[Tensor], scalings: list[float],
    dropouts: list[float], activation: str, mask_p: float, mask_rescale: bool, backend: str,
) -> tuple[Tensor, list[Tensor]]:
    w = _mlp_weights(_with_absent(weights, present), scalings, dropouts)
    y, saved = backends.by_name(backend).mlp_fwd(x, w, Activation(activation), _mask(mask_p, mask_rescale), seed)
    return y, _saved_list(saved, x)


@masked_gated_mlp.register_fake
def _(x, weights, present, seed, scalings, dropouts, activation, mask_p, mask_rescale, backend):
    weights = _with_absent(weights, present)
    n_in = len(weights) // 4 - 1
    m = x.shape[0]
    outs = [x.new_empty(m, weights[4 * i].shape[0]) for i in range(n_in)]
    shrinks = [_none(x) if weights[4 * i + 2] is None else weights[4 * i + 2].new_empty(m, weights[4 * i + 2].shape[0])
               for i in range(n_in + 1)]
    return x.new_empty(m, weights[-4].shape[0]), [*outs, *shrinks]


@torch.library.custom_op("transpeft::masked_gated_mlp_backward", mutates_args=())
def masked_gated_mlp_backward(
    dy: Tensor, x: Tensor, saved: list[Tensor], weights: list[Tensor], present: list[bool],
    seed: Optional[Tensor], scalings: list[float], dropouts: list[float], activation: str, mask_p: float,
    mask_rescale: bool, needs: list[bool], backend: str,
) -> tuple[Tensor, list[Tensor]]:
    """needs: [x, then one flag per entry of present]; grads: one per tensor in weights."""
    full = _with_absent(weights, present)
    w = _mlp_weights(full, scalings, dropouts)
    n_proj = len(w.projections)
    lin_needs = tuple(LinearNeeds(needs[0], *needs[1 + 4 * i : 5 + 4 * i]) for i in range(n_proj))
    dx, grads = backends.by_name(backend).mlp_bwd(
        dy, x, _saved_from_list(saved, n_proj - 1), w, Activation(activation), _mask(mask_p, mask_rescale),
        seed, lin_needs,
    )
    flat = [t for g in grads for t in (g.weight, g.bias, g.A, g.B)]
    return _grad_like(dx, x), [g for g, p in zip(_grads_like(flat, full, x), present) if p]


@masked_gated_mlp_backward.register_fake
def _(dy, x, saved, weights, present, seed, scalings, dropouts, activation, mask_p, mask_rescale, needs, backend):
    dx = torch.empty_like(x) if needs[0] else _none(x)
    wneeds = [n for n, p in zip(needs[1:], present) if p]
    return dx, [torch.empty_like(w) if n else _none(x) for n, w in zip(wneeds, weights)]


def _mlp_setup(ctx, inputs, output):
    x, weights, present, seed, *rest = inputs
    saved = output[1]
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs
    ctx.n_saved, ctx.present = len(saved), present
    it = iter(weights)
    ctx.weight_needs = [p and next(it).requires_grad for p in present]
    ctx.save_for_backward(x, seed, *saved, *weights)
    ctx.rest = rest


def _mlp_bwd(ctx, dy, _dsaved):
    if dy is None:
        return (None, [None] * len(ctx.saved_tensors[2 + ctx.n_saved :])) + (None,) * 8
    x, seed, *tail = ctx.saved_tensors
    saved, weights = list(tail[: ctx.n_saved]), list(tail[ctx.n_saved :])
    needs = [bool(ctx.needs_input_grad[0]), *ctx.weight_needs]
    dx, grads = torch.ops.transpeft.masked_gated_mlp_backward(
        dy, x, saved, weights, ctx.present, seed, *ctx.rest[:5], needs, ctx.rest[5]
    )
    dx = _or_none(dx) if needs[0] else None
    wneeds = [n for n, p in zip(needs[1:], ctx.present) if p]
    grads = [_or_none(g) if n else None for g, n in zip(grads, wneeds)]
    return dx, grads, None, None, None, None, None, None, None, None


masked_gated_mlp.register_autograd(_mlp_bwd, setup_context=_mlp_setup)
