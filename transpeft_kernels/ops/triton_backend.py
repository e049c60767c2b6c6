"""The "triton" backend: the primitives of TorchBackend on the Triton kernels (kernels/triton).

lora_linear forward (x (M, K), W (N, K), A (r, K), B (N, r), s = scaling, q = lora dropout):
    S = dropout_q(cast_A(x)) A^T                 lora_shrink       (mask regenerated, never stored)
    y = x W^T + b + s S B^T                      gemm_lora_expand  (expand fused in the epilogue)
lora_linear backward (t = cast_A(dy) B, rank-sized):
    t  = dy B                                    lora_shrink on B^T
    dx = dy W + s * keep/(1-q) * (t A)           gemm_lora_expand  (mask applied in the epilogue)
    dA = s t^T dropout_q(x)                      token_reduce      (mask regenerated)
    dB = s dy^T S                                token_reduce
    dW = dy^T x,  db = sum_rows dy               token_reduce      (db fused as a column sum)
masked gated activation (mask seed = the MASK stream of the forward's base seed):
    h' = act(g) * u * keep * c;  dg = dh' keep c u act'(g),  du = dh' keep c act(g)
masked gated MLP forward, gate/up part (gate_up_act_fwd; mlp_fwd/mlp_bwd are TorchBackend's
composition of these primitives):
    S_g, S_u = dropout(x) A^T                    lora_shrink, one per projection with LoRA
                                                 (the fused gate_up layout has one S, GATE stream)
    g, u = x Wg^T + bg + s S_g B_g^T, ...        gate_up_act: one GEMM over x with two accumulators;
    h' = act(g) * u * keep * c                   LoRA expands, bias, rounding of g and u to x's
                                                 dtype and the masked activation in its epilogue
    g and u are stored (autograd saves them), h' is computed from their rounded values, so the
    h' that backward recomputes (masked_gated_act) is bit-identical to the forward's.
All gradients are deterministic (token reductions use fixed-order split partials, no atomics), and
nothing is written into saved tensors or incoming gradients: every output is a fresh tensor.

Falls back to TorchBackend (same results, unfused) for cases the kernels do not cover yet:
  * tensors on a device the kernels cannot run on: CPU tensors unless TRITON_INTERPRET=1;
  * dtypes other than float32/float16/bfloat16 (e.g. float64, used by gradcheck);
  * a Linear whose weight or bias dtype differs from x's, LoRA factors A and B of different dtypes,
    an incoming gradient whose dtype differs from x's, or tensors on different devices;
  * a gated activation whose g and u dtypes differ;
  * gate_up_act_fwd when a gate or up projection is not covered as above (the whole step falls back);
  * only db requested without dW (computed as ``dy.sum(0)``, a single torch reduction).
"""
from __future__ import annotations

import torch

from ..reference.activations import Activation
from ..reference.mlp import INPUT_SUB_SEEDS
from ..specs import GatedMLPWeights, Layout, LinearWeights, MaskSpec, sub_seed
from ..kernels.env import interpreting
from .coverage import covered, linear_covered, knowledge_mask_args
from .torch_backend import LinearGrads, LinearNeeds, TorchBackend

def _runnable(*tensors: torch.Tensor | None) -> bool:
    return covered(*tensors, cpu_ok=interpreting())


def _linear_ok(x2d: torch.Tensor, lin: LinearWeights) -> bool:
    return linear_covered(x2d, lin, cpu_ok=interpreting())


class TritonBackend(TorchBackend):
    """Same primitives and signatures as TorchBackend; see the module docstring for the math and
    the fallbacks."""

    name = "triton"

    def __init__(self):
        from ..kernels import triton as K  # imports triton; deferred so that ops imports without it

        self._k = K

    # ---- lora_linear -------------------------------------------------------------------------
    def lora_linear_fwd(self, x2d: torch.Tensor, lin: LinearWeights, seed: torch.Tensor | None):
        """x2d (M, d_in) -> (y (M, d_out) in x dtype, S (M, r) in adapter dtype or None)."""
        if not _linear_ok(x2d, lin):
            return super().lora_linear_fwd(x2d, lin, seed)
        K = self._k
        lora = lin.lora
        if lora is None:
            return K.gemm_lora_expand(x2d, lin.weight, lin.bias), None
        s = K.lora_shrink(x2d, lora.A, lora.dropout, seed)
        y = K.gemm_lora_expand(x2d, lin.weight, lin.bias, s, lora.B, lora.scaling)
        return y, s

    def lora_linear_bwd(self, dy, x2d, s, lin: LinearWeights, seed, needs: LinearNeeds) -> LinearGrads:
        if dy.dtype != x2d.dtype or not _linear_ok(x2d, lin) or not _runnable(dy, x2d, s):
            return super().lora_linear_bwd(dy, x2d, s, lin, seed, needs)
        K = self._k
        lora = lin.lora
        dx = dW = db = dA = dB = None
        t = None
        if lora is not None and (needs.A or needs.x):
            t = K.lora_shrink(dy, lora.B.t())  # t = cast_A(dy) B, (M, r) in the adapter dtype
        if needs.x:
            if lora is None:
                dx = K.gemm_lora_expand(dy, lin.weight.t())
            else:
                dx = K.gemm_lora_expand(dy, lin.weight.t(), None, t, lora.A.t(), lora.scaling,
                                        lora.dropout, seed)
        if needs.weight:
            dW, db = K.token_reduce(dy, x2d, lin.weight.dtype, x2d.dtype,
                                    colsum_dtype=lin.bias.dtype if needs.bias else None, lora=False)
        elif needs.bias:
            db = dy.sum(0).to(lin.bias.dtype)
        if lora is not None:
            adt = lora.A.dtype
            if needs.B:
                dB, _ = K.token_reduce(dy, s, lora.B.dtype, adt, scale=lora.scaling)
            if needs.A:
                dA, _ = K.token_reduce(t, x2d, adt, adt, scale=lora.scaling, dropout=lora.dropout, seed=seed)
        return LinearGrads(dx, dW, db, dA, dB)

    # ---- masked gated activation ---------------------------------------------------------------
    def masked_act_fwd(self, g, u, activation: Activation, mask: MaskSpec | None, seed) -> torch.Tensor:
        """g, u (M, I) -> h' (M, I) = act(g) * u * keep * c, in g's dtype."""
        if g.dtype != u.dtype or not _runnable(g, u):
            return super().masked_act_fwd(g, u, activation, mask, seed)
        p, rescale, mseed = knowledge_mask_args(mask, seed)
        return self._k.masked_gated_act_fwd(g, u, Activation(activation).value, p, rescale, mseed)

    def masked_act_bwd(self, dh, g, u, activation: Activation, mask: MaskSpec | None, seed):
        """dh' (M, I) -> (dg, du) in g's and u's dtypes, computed in float32."""
        if g.dtype != u.dtype or not _runnable(dh, g, u):
            return super().masked_act_bwd(dh, g, u, activation, mask, seed)
        p, rescale, mseed = knowledge_mask_args(mask, seed)
        return self._k.masked_gated_act_bwd(dh, g, u, Activation(activation).value, p, rescale, mseed)

    # ---- masked gated MLP ----------------------------------------------------------------------
    def gate_up_act_fwd(self, x2d, w: GatedMLPWeights, activation: Activation, mask: MaskSpec | None, seed):
        """x2d (M, d) -> (outs, shrinks, h'): gate/up outputs ((M, I) each, or one (M, 2I) for the
        fused layout), their LoRA shrinks S (M, r) or None, and h' (M, I) = act(g) * u * keep * c,
        from one gate/up GEMM with the LoRA expands and the masked activation in its epilogue."""
        if not all(_linear_ok(x2d, lin) for lin in w.inputs):
            return super().gate_up_act_fwd(x2d, w, activation, mask, seed)
        K = self._k
        projs, shrinks = [], []
        for lin, stream in zip(w.inputs, INPUT_SUB_SEEDS[w.layout]):
            lora = lin.lora
            if lora is None:
                projs.append(K.GateUpOperand(lin.weight, lin.bias))
                shrinks.append(None)
                continue
            s = K.lora_shrink(x2d, lora.A, lora.dropout, sub_seed(seed, stream))
            projs.append(K.GateUpOperand(lin.weight, lin.bias, s, lora.B, lora.scaling))
            shrinks.append(s)
        gate, up = (projs[0], None) if w.layout is Layout.FUSED_GATE_UP else projs
        p, rescale, mseed = knowledge_mask_args(mask, seed)
        outs, h = K.gate_up_act(x2d, gate, up, Activation(activation).value, p, rescale, mseed)
        return outs, tuple(shrinks), h
