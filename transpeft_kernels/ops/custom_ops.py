"""The ops' kernel boundary as ``torch.library`` custom ops (namespace ``transpeft``), and the one
autograd path over them.

Each op is a forward and a backward custom op with a fake (meta) implementation and no autograd of
its own; one ``torch.autograd.Function`` per op composes them. The Function calls the ops through the
dispatcher while torch.compile traces (each becomes one opaque node: no graph break, whatever the
backend does inside: Triton launches with a Python-side autotuner, ctypes calls into the CUDA library)
and the very same implementations directly in eager mode (no dispatcher round trips).

To add an op: its forward and backward implementations and fakes here (``_register``), a Function,
a wrapper in functions.py, and the backend primitive(s) it calls.

Schema rules that shape the signatures:
  * only tensors, scalars, strings and lists of them cross the boundary, so the weight dataclasses
    are flattened (``LinearWeights.tensors()`` order: weight, bias, A, B; None when absent) and the
    backend travels by name (``backends.by_name``);
  * no output may be None or alias an input: absent results are empty tensors (``_none``), which the
    Functions turn back into None;
  * the forward ops also return what backward needs (rank-sized shrinks, gate/up outputs), marked
    non-differentiable; the public wrappers (functions.py) drop them.

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
  projection (weight, bias, A, B; projections gate, up, down or gate_up, down). ``grads`` has one
  entry per tensor in ``weights``.
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


def _dispatch(op, impl, *args):
    """The op through the dispatcher while torch.compile traces, its implementation otherwise."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


# ---- lora_linear ---------------------------------------------------------------------------------
def _lora_linear_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Optional[Tensor], B: Optional[Tensor],
    seed: Optional[Tensor], scaling: float, dropout: float, backend: str,
) -> tuple[Tensor, Tensor]:
    y, s = backends.by_name(backend).lora_linear_fwd(x, _linear(weight, bias, A, B, scaling, dropout), seed)
    return y, _none(x) if s is None else s


lora_linear = torch.library.custom_op("transpeft::lora_linear", mutates_args=())(_lora_linear_impl)


@lora_linear.register_fake
def _(x, weight, bias, A, B, seed, scaling, dropout, backend):
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, _none(x) if A is None else A.new_empty(x.shape[0], A.shape[0])


def _lora_linear_backward_impl(
    dy: Tensor, x: Tensor, s: Tensor, weight: Tensor, bias: Optional[Tensor], A: Optional[Tensor],
    B: Optional[Tensor], seed: Optional[Tensor], scaling: float, dropout: float, needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    lin = _linear(weight, bias, A, B, scaling, dropout)
    g = backends.by_name(backend).lora_linear_bwd(dy, x, _or_none(s), lin, seed, LinearNeeds(*needs))
    return (_grad_like(g.x, x), *_grads_like((g.weight, g.bias, g.A, g.B), [weight, bias, A, B], x))


lora_linear_backward = torch.library.custom_op("transpeft::lora_linear_backward", mutates_args=())(
    _lora_linear_backward_impl
)


@lora_linear_backward.register_fake
def _(dy, x, s, weight, bias, A, B, seed, scaling, dropout, needs, backend):
    like = [x, weight, bias, A, B]
    return tuple(torch.empty_like(t) if n and t is not None else _none(x) for n, t in zip(needs, like))


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * dropout_q(x) A^T B^T; backward through lora_linear_backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, seed, scaling, dropout, backend):
        y, s = _dispatch(lora_linear, _lora_linear_impl, x, weight, bias, A, B, seed, scaling, dropout, backend)
        ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, s, weight, bias, A, B, seed)
        ctx.scalars = (scaling, dropout)
        ctx.backend = backend
        return y, s

    @staticmethod
    def backward(ctx, dy, _ds):
        if dy is None:  # gradients were materialised lazily: nothing flows back
            return (None,) * 9
        x, s, weight, bias, A, B, seed = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        grads = _dispatch(lora_linear_backward, _lora_linear_backward_impl,
                          dy, x, s, weight, bias, A, B, seed, *ctx.scalars, needs, ctx.backend)
        return (*(_or_none(g) if need else None for g, need in zip(grads, needs)), None, None, None, None)


# ---- masked gated activation -----------------------------------------------------------------------
def _masked_gated_act_impl(
    g: Tensor, u: Tensor, seed: Optional[Tensor], activation: str, mask_p: float, mask_rescale: bool, backend: str,
) -> Tensor:
    return backends.by_name(backend).masked_act_fwd(g, u, Activation(activation), _mask(mask_p, mask_rescale), seed)


masked_gated_act = torch.library.custom_op("transpeft::masked_gated_act", mutates_args=())(
    _masked_gated_act_impl
)


@masked_gated_act.register_fake
def _(g, u, seed, activation, mask_p, mask_rescale, backend):
    return torch.empty_like(g)


def _masked_gated_act_backward_impl(
    dh: Tensor, g: Tensor, u: Tensor, seed: Optional[Tensor], activation: str, mask_p: float,
    mask_rescale: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    dg, du = backends.by_name(backend).masked_act_bwd(dh, g, u, Activation(activation), _mask(mask_p, mask_rescale), seed)
    return _grad_like(dg, g), _grad_like(du, u)


masked_gated_act_backward = torch.library.custom_op("transpeft::masked_gated_act_backward", mutates_args=())(
    _masked_gated_act_backward_impl
)


@masked_gated_act_backward.register_fake
def _(dh, g, u, seed, activation, mask_p, mask_rescale, backend):
    return torch.empty_like(g), torch.empty_like(u)


class MaskedGatedActFunction(torch.autograd.Function):
    """h' = act(g) * u * keep * c; backward through masked_gated_act_backward (mask regenerated)."""

    @staticmethod
    def forward(ctx, g, u, seed, activation, mask_p, mask_rescale, backend):
        h = _dispatch(masked_gated_act, _masked_gated_act_impl, g, u, seed, activation, mask_p, mask_rescale, backend)
        ctx.save_for_backward(g, u, seed)
        ctx.rest = (activation, mask_p, mask_rescale, backend)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u, seed = ctx.saved_tensors
        dg, du = _dispatch(masked_gated_act_backward, _masked_gated_act_backward_impl, dh, g, u, seed, *ctx.rest)
        return dg, du, None, None, None, None, None


# ---- masked gated MLP ------------------------------------------------------------------------------
def _saved_list(saved: MLPSaved, like: Tensor) -> list[Tensor]:
    return [*saved.outs, *(_none(like) if s is None else s for s in saved.shrinks),
            _none(like) if saved.s_down is None else saved.s_down]


def _saved_from_list(items: list[Tensor], n_inputs: int) -> MLPSaved:
    return MLPSaved(tuple(items[:n_inputs]), tuple(_or_none(t) for t in items[n_inputs : 2 * n_inputs]),
                    _or_none(items[2 * n_inputs]))


def _masked_gated_mlp_impl(
    x: Tensor, weights: list[Tensor], present: list[bool], seed: Optional[Tensor], scalings: list[float],
    dropouts: list[float], activation: str, mask_p: float, mask_rescale: bool, backend: str,
) -> tuple[Tensor, list[Tensor]]:
    w = _mlp_weights(_with_absent(weights, present), scalings, dropouts)
    y, saved = backends.by_name(backend).mlp_fwd(x, w, Activation(activation), _mask(mask_p, mask_rescale), seed)
    return y, _saved_list(saved, x)


masked_gated_mlp = torch.library.custom_op("transpeft::masked_gated_mlp", mutates_args=())(
    _masked_gated_mlp_impl
)


@masked_gated_mlp.register_fake
def _(x, weights, present, seed, scalings, dropouts, activation, mask_p, mask_rescale, backend):
    weights = _with_absent(weights, present)
    n_in = len(weights) // 4 - 1
    m = x.shape[0]
    outs = [x.new_empty(m, weights[4 * i].shape[0]) for i in range(n_in)]
    shrinks = [_none(x) if weights[4 * i + 2] is None else weights[4 * i + 2].new_empty(m, weights[4 * i + 2].shape[0])
               for i in range(n_in + 1)]
    return x.new_empty(m, weights[-4].shape[0]), [*outs, *shrinks]


def _masked_gated_mlp_backward_impl(
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


masked_gated_mlp_backward = torch.library.custom_op("transpeft::masked_gated_mlp_backward", mutates_args=())(
    _masked_gated_mlp_backward_impl
)


@masked_gated_mlp_backward.register_fake
def _(dy, x, saved, weights, present, seed, scalings, dropouts, activation, mask_p, mask_rescale, needs, backend):
    dx = torch.empty_like(x) if needs[0] else _none(x)
    wneeds = [n for n, p in zip(needs[1:], present) if p]
    return dx, [torch.empty_like(w) if n else _none(x) for n, w in zip(wneeds, weights)]


class MaskedGatedMLPFunction(torch.autograd.Function):
    """y = down(act(g) * u * keep * c) with g, u = gate/up(x); backward through
    masked_gated_mlp_backward. The weights come last, as separate arguments, so autograd sees each."""

    @staticmethod
    def forward(ctx, x, seed, present, scalings, dropouts, activation, mask_p, mask_rescale, backend, *weights):
        weights = list(weights)
        y, saved = _dispatch(masked_gated_mlp, _masked_gated_mlp_impl, x, weights, present, seed, scalings, dropouts,
                             activation, mask_p, mask_rescale, backend)
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs
        ctx.n_saved, ctx.present, ctx.present_weights = len(saved), present, [None] * len(weights)
        ctx.save_for_backward(x, seed, *saved, *weights)
        ctx.rest = (scalings, dropouts, activation, mask_p, mask_rescale, backend)
        return (y, *saved)

    @staticmethod
    def backward(ctx, dy, *_dsaved):
        if dy is None:
            return (None,) * (9 + len(ctx.present_weights))
        x, seed, *tail = ctx.saved_tensors  # read once: non-reentrant checkpointing unpacks each only once
        saved, weights = list(tail[: ctx.n_saved]), list(tail[ctx.n_saved :])
        weight_needs = list(ctx.needs_input_grad[9:])
        it = iter(weight_needs)
        needs = [bool(ctx.needs_input_grad[0]), *(p and next(it) for p in ctx.present)]
        scalings, dropouts, activation, mask_p, mask_rescale, backend = ctx.rest
        dx, grads = _dispatch(masked_gated_mlp_backward, _masked_gated_mlp_backward_impl, dy, x, saved, weights,
                              ctx.present, seed, scalings, dropouts, activation, mask_p, mask_rescale, needs, backend)
        dx = _or_none(dx) if needs[0] else None
        grads = [_or_none(g) if n else None for g, n in zip(grads, weight_needs)]
        return (dx, *(None,) * 8, *grads)


# ---- entry points: without grad mode, the forward op alone (no autograd bookkeeping) -------------
def lora_linear_apply(x, weight, bias, A, B, seed, scaling, dropout, backend):
    if torch.is_grad_enabled():
        return LoraLinearFunction.apply(x, weight, bias, A, B, seed, scaling, dropout, backend)
    return _dispatch(lora_linear, _lora_linear_impl, x, weight, bias, A, B, seed, scaling, dropout, backend)


def masked_gated_act_apply(g, u, seed, activation, mask_p, mask_rescale, backend):
    if torch.is_grad_enabled():
        return MaskedGatedActFunction.apply(g, u, seed, activation, mask_p, mask_rescale, backend)
    return _dispatch(masked_gated_act, _masked_gated_act_impl, g, u, seed, activation, mask_p, mask_rescale, backend)


def masked_gated_mlp_apply(x, seed, present, scalings, dropouts, activation, mask_p, mask_rescale, backend, *weights):
    """-> y (the saved outputs stay inside autograd)."""
    if torch.is_grad_enabled():
        return MaskedGatedMLPFunction.apply(x, seed, present, scalings, dropouts, activation, mask_p, mask_rescale,
                                            backend, *weights)[0]
    return _dispatch(masked_gated_mlp, _masked_gated_mlp_impl, x, list(weights), present, seed, scalings, dropouts,
                     activation, mask_p, mask_rescale, backend)[0]
