"""The ops as ``torch.library`` custom ops (namespace ``transpeft``), with fake (meta) implementations
and registered autograd, so torch.compile traces a patched MLP as three opaque nodes (forward,
backward) without graph breaks, whatever the backend does inside (Triton launches with a Python-side
autotuner, ctypes calls into the CUDA library).

``call(name, *args)`` is the entry point: the dispatched op under torch.compile, and in eager mode the
op's own implementation, setup_context and backward through ``_EagerOp`` (a plain autograd.Function,
without the dispatcher's Python layers: about 100-200 us per call on CPU).

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

from dataclasses import dataclass
from typing import Callable, Optional

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


def _backward_op(ctx, name: str):
    """The backward op through the dispatcher (traceable), or its implementation itself when the
    forward ran on the eager path (``call``)."""
    return _IMPLS[name] if getattr(ctx, "eager", False) else getattr(torch.ops.transpeft, name)


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
    dx, dW, db, dA, dB = _backward_op(ctx, "lora_linear_backward")(
        dy, x, s, weight, bias, A, B, seed, *ctx.scalars, needs, ctx.backend
    )
    return (*(_or_none(g) if need else None for g, need in zip((dx, dW, db, dA, dB), needs)),
            None, None, None, None)


lora_linear.register_autograd(_lora_linear_bwd, setup_context=_lora_linear_setup)


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


def _act_setup(ctx, inputs, output):
    g, u, seed, *rest = inputs
    ctx.save_for_backward(g, u, seed)
    ctx.rest = rest


def _act_bwd(ctx, dh):
    g, u, seed = ctx.saved_tensors
    dg, du = _backward_op(ctx, "masked_gated_act_backward")(dh, g, u, seed, *ctx.rest)
    return dg, du, None, None, None, None, None


masked_gated_act.register_autograd(_act_bwd, setup_context=_act_setup)


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
    dx, grads = _backward_op(ctx, "masked_gated_mlp_backward")(
        dy, x, saved, weights, ctx.present, seed, *ctx.rest[:5], needs, ctx.rest[5]
    )
    dx = _or_none(dx) if needs[0] else None
    wneeds = [n for n, p in zip(needs[1:], ctx.present) if p]
    grads = [_or_none(g) if n else None for g, n in zip(grads, wneeds)]
    return dx, grads, None, None, None, None, None, None, None, None


masked_gated_mlp.register_autograd(_mlp_bwd, setup_context=_mlp_setup)


# ---- eager path ----------------------------------------------------------------------------------
_IMPLS = {
    "lora_linear_backward": _lora_linear_backward_impl,
    "masked_gated_act_backward": _masked_gated_act_backward_impl,
    "masked_gated_mlp_backward": _masked_gated_mlp_backward_impl,
}


@dataclass(frozen=True)
class _Parts:
    """One op's forward implementation, autograd setup and backward, and which argument (if any) is
    a list of tensors (flattened for autograd.Function, which only tracks top-level tensors)."""

    impl: Callable
    setup: Callable
    backward: Callable
    list_arg: int | None = None
    list_output: bool = False  # outputs (tensor, list of tensors)


_PARTS = {
    "lora_linear": _Parts(_lora_linear_impl, _lora_linear_setup, _lora_linear_bwd),
    "masked_gated_act": _Parts(_masked_gated_act_impl, _act_setup, _act_bwd),
    "masked_gated_mlp": _Parts(_masked_gated_mlp_impl, _mlp_setup, _mlp_bwd, list_arg=1, list_output=True),
}


def _nest(flat, list_arg: int | None, n: int) -> list:
    flat = list(flat)
    if list_arg is None:
        return flat
    return [*flat[:list_arg], flat[list_arg : list_arg + n], *flat[list_arg + n :]]


def _flat(items, list_arg: int | None) -> list:
    if list_arg is None:
        return list(items)
    items = list(items)
    return [*items[:list_arg], *items[list_arg], *items[list_arg + 1 :]]


class _EagerOp(torch.autograd.Function):
    """The registered op's implementation, setup_context and backward as a plain autograd.Function:
    the same computation without the dispatcher's Python round trips (a few hundred microseconds per
    MLP call, which small-batch training on a GPU would feel)."""

    @staticmethod
    def forward(ctx, parts: _Parts, n_list: int, *flat):
        args = _nest(flat, parts.list_arg, n_list)
        out = parts.impl(*args)
        parts.setup(ctx, args, out)
        ctx.eager, ctx.parts, ctx.n_list = True, parts, n_list
        if isinstance(out, Tensor):
            ctx.out_lens = None
            return out
        ctx.out_lens = [len(o) if isinstance(o, list) else None for o in out]
        return tuple(t for o in out for t in (o if isinstance(o, list) else [o]))

    @staticmethod
    def backward(ctx, *grads):
        parts = ctx.parts
        if ctx.out_lens is not None:  # regroup the gradients of list outputs
            it = iter(grads)
            grads = [next(it) if n is None else [next(it) for _ in range(n)] for n in ctx.out_lens]
        # The op's backward reads needs_input_grad in the op's argument order; restored afterwards,
        # so that a second backward (retain_graph) sees the original.
        flat_needs = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(_nest(flat_needs[2:], parts.list_arg, ctx.n_list))
        try:
            result = parts.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = flat_needs
        result = result if isinstance(result, tuple) else (result,)
        return (None, None, *_flat(result, parts.list_arg))


def call(name: str, *args):
    """Run op ``transpeft::<name>``. Under torch.compile, through the dispatcher (one traced node);
    in eager mode, the same implementation, setup and backward through ``_EagerOp``; without grad,
    the implementation alone."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.transpeft, name)(*args)
    parts = _PARTS[name]
    if not torch.is_grad_enabled():
        return parts.impl(*args)
    n_list = 0 if parts.list_arg is None else len(args[parts.list_arg])
    out = _EagerOp.apply(parts, n_list, *_flat(args, parts.list_arg))
    return (out[0], list(out[1:])) if parts.list_output else out
