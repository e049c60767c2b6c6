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
masked gated MLP forward, gate/up part (gate_up_act_fwd; mlp_fwd is TorchBackend's composition of
these primitives, and so is mlp_bwd with TRANSPEFT_TRITON_ONE_PASS_BWD=0 or for the cases below):
    S_g, S_u = dropout(x) A^T                    lora_shrink, one per projection with LoRA
                                                 (the fused gate_up layout has one S, GATE stream)
    g, u = x Wg^T + bg + s S_g B_g^T, ...        gate_up_act: one GEMM over x with two accumulators;
    h' = act(g) * u * keep * c                   LoRA expands, bias, rounding of g and u to x's
                                                 dtype and the masked activation in its epilogue
    g and u are stored (autograd saves them), h' is computed from their rounded values, so the
    h' that backward rebuilds is bit-identical to the forward's.
masked gated MLP backward in one pass over (M, I) (mlp_bwd; one_pass_bwd_enabled), t_d = cast_A(dY) B_d:
    t_d, dh' = dY W_d + s_d D(t_d A_d), dB_d     lora_shrink, the dX product (below), token_reduce; with
                                                 16-bit adapters of ranks <= 64 (32 on sm_80; fold_dh_enabled) only dY W_d,
                                                 and the pass adds s_d D(t_d A_d) (act_bwd_lora's fold)
    dg, du, dB_g, dB_u, dA_d                     act_bwd_lora: one pass over (M, I); h' rebuilt in
                                                 registers for dA_d, never written; dg and du not
                                                 read back for dB
    t_g = cast_A(dg) B_g, t_u                    lora_shrink (cheaper than t in the pass: act_bwd_lora.py)
    dx = sum_p dg_p W_p + s D(t_p A_p), dA_p     the dX products, token_reduce (as lora_linear)
Base products (``base_gemm``): "cublas" (default) runs x W^T, dY W on ATen's GEMM. The LoRA terms of y,
dh' and dX (and y's bias) are written first by lora_expand_into as the C operand of an ``addmm_`` that
accumulates the base product into it (dX of gate and up: both terms in one launch, then one addmm_ per
projection), so no pass reads a GEMM output back; the gate/up expands ride in gate_up_lora_act with the
masked activation (that pass reads g and u anyway). "triton" runs gemm_lora_expand and gate_up_act as above.
All gradients are deterministic (token reductions use fixed-order split partials, no atomics), and
nothing is written into saved tensors or incoming gradients: every output is a fresh tensor.

Falls back to TorchBackend (same results, unfused) for cases the kernels do not cover yet:
  * tensors on a device the kernels cannot run on: CPU tensors unless TRITON_INTERPRET=1;
  * dtypes other than float32/float16/bfloat16 (e.g. float64, used by gradcheck);
  * a Linear whose weight or bias dtype differs from x's, LoRA factors A and B of different dtypes,
    an incoming gradient whose dtype differs from x's, or tensors on different devices;
  * a gated activation whose g and u dtypes differ;
  * gate_up_act_fwd when a gate or up projection is not covered as above (the whole step falls back);
  * only db requested without dW (computed as ``dy.sum(0)``, a single torch reduction);
  * mlp_bwd's one pass: a LoRA rank above 64, or a trained down-projection base (dW_d needs h' in
    memory): TorchBackend's composition of the primitives above instead.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from ..reference.activations import Activation
from ..reference.mlp import INPUT_SUB_SEEDS
from ..specs import GatedMLPWeights, Layout, LinearWeights, MaskSpec, SubSeed, split_gate_up, sub_seed
from ..kernels.env import interpreting
from .coverage import covered, linear_covered, knowledge_mask_args
from .torch_backend import LinearGrads, LinearNeeds, MLPSaved, TorchBackend

ONE_PASS_ENV = "TRANSPEFT_TRITON_ONE_PASS_BWD"


def one_pass_bwd_enabled() -> bool:
    """Whether mlp_bwd runs the one-pass activation backward (act_bwd_lora); on unless
    TRANSPEFT_TRITON_ONE_PASS_BWD=0. Chosen by the roofline model with the kernel's instructions taken
    from its SASS (perf/ledger.py): at the Llama-3-8B shape it moves 1.4 GB less than the multi-pass
    backward (TorchBackend's composition: h' recomputed and written, dg and du read again for dB) and
    is predicted 0.15-0.36 ms faster per MLP; no GPU has measured either yet
    (benchmarks/gpu_triton_check.py times both side by side)."""
    return os.environ.get(ONE_PASS_ENV, "1") not in ("0", "", "false", "False")


FOLD_DH_ENV = "TRANSPEFT_TRITON_FOLD_DH"


def fold_dh_enabled() -> bool:
    """Whether the one-pass backward adds the down LoRA's term of dh' itself (act_bwd_lora's dh' fold:
    16-bit adapters, every LoRA rank of the MLP <= 64 on sm_90, 32 on sm_80: act_bwd_lora.fold_supported;
    cuBLAS base GEMMs)
    instead of lora_expand_into writing it for the
    dY W_d ``addmm_``; on unless TRANSPEFT_TRITON_FOLD_DH=0. Chosen by the roofline model with the
    pass's SASS (perf/ledger.py): one (M, I) write, one launch and one regeneration of the down LoRA's
    dropout mask fewer for about 29 more instructions per element in the pass, -0.06 to -0.09 ms per
    Llama-3-8B MLP step at r 16 and r 64; not measured on a GPU yet."""
    return os.environ.get(FOLD_DH_ENV, "1") not in ("0", "", "false", "False")


BASE_GEMM_ENV = "TRANSPEFT_TRITON_BASE_GEMM"
BASE_GEMMS = ("cublas", "triton")


def base_gemm() -> str:
    """Who runs the base products x W^T, dY W: "cublas" (the default: ATen's GEMM, the LoRA expands and
    the masked activation as passes over its output, lora_epilogue.py) or "triton" (our GEMMs with
    the expands as extra rank steps of the accumulator and the activation in the epilogue).
    TRANSPEFT_TRITON_BASE_GEMM picks. Chosen by the roofline model: a Triton GEMM is charged 0.85 of
    cuBLAS until a GPU measures it, about 1.4 ms over the six GEMMs of a Llama-3-8B MLP step at 8192
    tokens, against about 0.3 ms for the passes' extra traffic (docs/PERFORMANCE.md, "Base GEMMs on cuBLAS")."""
    value = os.environ.get(BASE_GEMM_ENV, "cublas")
    if value not in BASE_GEMMS:
        raise ValueError(f"{BASE_GEMM_ENV}: expected one of {', '.join(BASE_GEMMS)}, got {value!r}")
    return value


class TritonBackend(TorchBackend):
    """Same primitives and signatures as TorchBackend; see the module docstring for the math and
    the fallbacks."""

    name = "triton"

    def __init__(self):
        from ..kernels import triton as K  # imports triton; deferred so that ops imports without it

        self._k = K
        # CPU tensors run only in Triton's interpreter, which Triton chose when it was imported (now)
        self._cpu_ok = interpreting()

    def _runnable(self, *tensors: torch.Tensor | None) -> bool:
        return covered(*tensors, cpu_ok=self._cpu_ok)

    def _linear_ok(self, x2d: torch.Tensor, lin: LinearWeights) -> bool:
        return linear_covered(x2d, lin, cpu_ok=self._cpu_ok)

    # ---- lora_linear -------------------------------------------------------------------------
    def lora_linear_fwd(self, x2d: torch.Tensor, lin: LinearWeights, seed: torch.Tensor | None):
        """x2d (M, d_in) -> (y (M, d_out) in x dtype, S (M, r) in adapter dtype or None)."""
        if not self._linear_ok(x2d, lin):
            return super().lora_linear_fwd(x2d, lin, seed)
        K = self._k
        lora = lin.lora
        s = None if lora is None else K.lora_shrink(x2d, lora.A, lora.dropout, seed)
        if base_gemm() == "cublas":
            if lora is None:
                return F.linear(x2d, lin.weight, lin.bias), None
            # the LoRA term and the bias as the C operand of cuBLAS's product (lora_expand_into)
            y = x2d.new_empty((x2d.shape[0], lin.weight.shape[0]))
            K.lora_expand_into(y, (K.LoraTerm(s, lora.B, lora.scaling),), lin.bias)
            return y.addmm_(x2d, lin.weight.t()), s
        if lora is None:
            return K.gemm_lora_expand(x2d, lin.weight, lin.bias), None
        return K.gemm_lora_expand(x2d, lin.weight, lin.bias, s, lora.B, lora.scaling), s

    def _dx_term(self, lin: LinearWeights, t, seed):
        """The LoRA term s D(t A) of a projection's dx, as the expand takes it."""
        lora = lin.lora
        return self._k.LoraTerm(t, lora.A.t(), lora.scaling, lora.dropout, seed if lora.dropout > 0 else None)

    def _dx_sum(self, dys, lins, ts, seeds):
        """dx = sum over the projections of dy_p W_p + s_p D_p(t_p A_p) (M, d_in), in cuBLAS mode: the
        LoRA terms (two at most, one adapter dtype) written by one expand as the C operand, then one
        addmm_ per projection accumulating into it. Otherwise projection by projection (``_dx``)."""
        terms = [self._dx_term(lin, t, seed) for lin, t, seed in zip(lins, ts, seeds) if lin.lora is not None]
        if base_gemm() != "cublas" or not terms or len(terms) > 2 or len({t.s.dtype for t in terms}) > 1:
            dx = None
            for dy, lin, t, seed in zip(dys, lins, ts, seeds):
                dx = self._dx(dy, lin, t, seed, dx)
            return dx
        dx = dys[0].new_empty((dys[0].shape[0], lins[0].weight.shape[1]))
        self._k.lora_expand_into(dx, tuple(terms))
        for dy, lin in zip(dys, lins):
            dx.addmm_(dy, lin.weight)
        return dx

    def _dx(self, dy, lin: LinearWeights, t, seed, into=None):
        """dx = dy W + s D(t A) (M, d_in), or ``into`` + that, accumulated into ``into`` (the sum over
        the projections of one input)."""
        K = self._k
        lora = lin.lora
        if base_gemm() == "cublas":
            if lora is not None and into is None:  # the LoRA term as the C operand of cuBLAS's product
                return self._dx_sum((dy,), (lin,), (t,), (seed,))
            dx = torch.mm(dy, lin.weight) if into is None else into.addmm_(dy, lin.weight)
            if lora is not None:
                K.lora_expand_add(dx, t, lora.A.t(), lora.scaling, lora.dropout, seed)
            return dx
        if lora is None:
            dx = K.gemm_lora_expand(dy, lin.weight.t())
        else:
            dx = K.gemm_lora_expand(dy, lin.weight.t(), None, t, lora.A.t(), lora.scaling, lora.dropout, seed)
        return dx if into is None else into.add_(dx)

    def lora_linear_bwd(self, dy, x2d, s, lin: LinearWeights, seed, needs: LinearNeeds) -> LinearGrads:
        if dy.dtype != x2d.dtype or not self._linear_ok(x2d, lin) or not self._runnable(dy, x2d, s):
            return super().lora_linear_bwd(dy, x2d, s, lin, seed, needs)
        return self._linear_bwd(dy, x2d, s, lin, seed, needs)

    def _linear_bwd(self, dy, x2d, s, lin: LinearWeights, seed, needs: LinearNeeds, dB=None,
                    t=None) -> LinearGrads:
        """lora_linear_bwd on covered operands; ``dB`` and ``t`` when already computed (dB by the one-pass
        activation backward, t by the caller of ``_dx_sum``), else computed here."""
        K = self._k
        lora = lin.lora
        dx = dW = db = dA = None
        if lora is not None and (needs.A or needs.x) and t is None:
            t = K.lora_shrink(dy, lora.B.t())  # t = cast_A(dy) B, (M, r) in the adapter dtype
        if needs.x:
            dx = self._dx(dy, lin, t, seed)
        if needs.weight:
            dW, db = K.token_reduce(dy, x2d, lin.weight.dtype, x2d.dtype,
                                    colsum_dtype=lin.bias.dtype if needs.bias else None, lora=False)
        elif needs.bias:
            db = dy.sum(0).to(lin.bias.dtype)
        if lora is not None:
            adt = lora.A.dtype
            if not needs.B:
                dB = None
            elif dB is None:
                dB, _ = K.token_reduce(dy, s, lora.B.dtype, adt, scale=lora.scaling)
            if needs.A:
                dA, _ = K.token_reduce(t, x2d, adt, adt, scale=lora.scaling, dropout=lora.dropout, seed=seed)
        return LinearGrads(dx, dW, db, dA, dB)

    def inputs_bwd(self, d_outs, x2d, saved: MLPSaved, w: GatedMLPWeights, seed, needs: tuple[LinearNeeds, ...],
                   dBs: tuple | None = None):
        """The gate/up projections' backward (TorchBackend.inputs_bwd): their t = cast_A(dout) B first, then
        dx of all of them at once (``_dx_sum``: one expand writes both LoRA terms, cuBLAS adds the
        products into it), then each projection's weight gradients."""
        n = len(w.inputs)
        dBs = (None,) * n if dBs is None else dBs
        if not all(d.dtype == x2d.dtype and self._linear_ok(x2d, lin) and self._runnable(d, x2d, sh)
                   for d, lin, sh in zip(d_outs, w.inputs, saved.shrinks)):
            return super().inputs_bwd(d_outs, x2d, saved, w, seed, needs, dBs)
        K = self._k
        seeds = [sub_seed(seed, stream) for stream in INPUT_SUB_SEEDS[w.layout]]
        ts = [K.lora_shrink(d, lin.lora.B.t()) if lin.lora is not None and (nd.A or nd.x) else None
              for d, lin, nd in zip(d_outs, w.inputs, needs)]
        dx = self._dx_sum(d_outs, w.inputs, ts, seeds) if needs[0].x else None
        grads = [self._linear_bwd(d, x2d, sh, lin, sd, dataclasses.replace(nd, x=False), dB=dB, t=t)
                 for d, sh, lin, sd, nd, dB, t in zip(d_outs, saved.shrinks, w.inputs, seeds, needs, dBs, ts)]
        return dx, grads

    # ---- masked gated activation ---------------------------------------------------------------
    def masked_act_fwd(self, g, u, activation: Activation, mask: MaskSpec | None, seed) -> torch.Tensor:
        """g, u (M, I) -> h' (M, I) = act(g) * u * keep * c, in g's dtype."""
        if g.dtype != u.dtype or not self._runnable(g, u):
            return super().masked_act_fwd(g, u, activation, mask, seed)
        p, rescale, mseed = knowledge_mask_args(mask, seed)
        return self._k.masked_gated_act_fwd(g, u, Activation(activation).value, p, rescale, mseed)

    def masked_act_bwd(self, dh, g, u, activation: Activation, mask: MaskSpec | None, seed):
        """dh' (M, I) -> (dg, du) in g's and u's dtypes, computed in float32."""
        if g.dtype != u.dtype or not self._runnable(dh, g, u):
            return super().masked_act_bwd(dh, g, u, activation, mask, seed)
        p, rescale, mseed = knowledge_mask_args(mask, seed)
        return self._k.masked_gated_act_bwd(dh, g, u, Activation(activation).value, p, rescale, mseed)

    # ---- masked gated MLP ----------------------------------------------------------------------
    def gate_up_act_fwd(self, x2d, w: GatedMLPWeights, activation: Activation, mask: MaskSpec | None, seed):
        """x2d (M, d) -> (outs, shrinks, h'): gate/up outputs ((M, I) each, or one (M, 2I) for the
        fused layout), their LoRA shrinks S (M, r) or None, and h' (M, I) = act(g) * u * keep * c,
        from one gate/up GEMM with the LoRA expands and the masked activation in its epilogue."""
        if not all(self._linear_ok(x2d, lin) for lin in w.inputs):
            return super().gate_up_act_fwd(x2d, w, activation, mask, seed)
        K = self._k
        p, rescale, mseed = knowledge_mask_args(mask, seed)
        if base_gemm() == "cublas":
            outs = tuple(F.linear(x2d, lin.weight, lin.bias) for lin in w.inputs)
            shrinks = tuple(None if lin.lora is None else K.lora_shrink(x2d, lin.lora.A, lin.lora.dropout, sub_seed(seed, stream))
                            for lin, stream in zip(w.inputs, INPUT_SUB_SEEDS[w.layout]))
            g, u = split_gate_up(outs, w.layout)
            if w.layout is Layout.FUSED_GATE_UP:
                lora = w.inputs[0].lora
                sides = (None, None) if lora is None else (
                    K.ExpandSide(shrinks[0], lora.B[: g.shape[1]], lora.scaling),
                    K.ExpandSide(shrinks[0], lora.B[g.shape[1]:], lora.scaling))
            else:
                sides = tuple(None if lin.lora is None else K.ExpandSide(sh, lin.lora.B, lin.lora.scaling)
                              for lin, sh in zip(w.inputs, shrinks))
            h = K.gate_up_lora_act(g, u, sides[0], sides[1], Activation(activation).value, p, rescale, mseed)
            return outs, shrinks, h
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
        outs, h = K.gate_up_act(x2d, gate, up, Activation(activation).value, p, rescale, mseed)
        return outs, tuple(shrinks), h

    def mlp_bwd(self, dy, x2d, saved: MLPSaved, w: GatedMLPWeights, activation: Activation,
                mask: MaskSpec | None, seed, needs: tuple[LinearNeeds, ...]):
        """The masked gated MLP's backward with the activation backward in one pass (act_bwd_lora):
            down:     t_d = cast_A(dY) B_d;  dh' = dY W_d + s_d D(t_d A_d);  dB_d = s_d dY^T S_d
            one pass: dg, du;  dB of the gate/up LoRA;  dA_d = s_d t_d^T D(h')   (h' never written)
            gate/up:  dx = sum of dg W + s D(t A) over the projections;  dA = s t^T D(x);  dW, db
        With TRANSPEFT_TRITON_ONE_PASS_BWD=0 (``one_pass_bwd_enabled``), and as a fallback,
        TorchBackend's composition (h' recomputed and written, dg and du read again): when a
        projection is not covered, g and u differ in dtype, a LoRA rank exceeds ACT_BWD_LORA_MAX_RANK,
        or the down projection's base weight or bias is trained (dW_d needs h')."""
        g, u = split_gate_up(saved.outs, w.layout)
        down, nd = w.down, needs[-1]
        ranks = [lin.lora.A.shape[0] for lin in w.projections if lin.lora is not None]
        if (not one_pass_bwd_enabled() or dy.dtype != x2d.dtype or g.dtype != u.dtype or nd.weight or nd.bias
                or any(r > self._k.ACT_BWD_LORA_MAX_RANK for r in ranks)
                or not all(self._linear_ok(x2d, lin) for lin in w.inputs) or not self._linear_ok(g, down)
                or not self._runnable(dy, x2d, g, u, *saved.shrinks, saved.s_down)):
            return super().mlp_bwd(dy, x2d, saved, w, activation, mask, seed, needs)
        K = self._k
        # down projection: everything that needs only dY
        dl = down.lora
        dseed = sub_seed(seed, SubSeed.DOWN)
        t_d = K.lora_shrink(dy, dl.B.t()) if dl is not None else None
        fold = (dl is not None and nd.A and K.act_bwd_fold_supported(dl.A.dtype, max(ranks), dy.device)
                and base_gemm() == "cublas" and fold_dh_enabled())
        dh = torch.mm(dy, down.weight) if fold else self._dx(dy, down, t_d, dseed)
        dB_d = K.token_reduce(dy, saved.s_down, dl.B.dtype, dl.A.dtype, scale=dl.scaling)[0] \
            if dl is not None and nd.B else None
        # the one pass over (M, I)
        fused = w.layout is Layout.FUSED_GATE_UP
        inter = g.shape[1]
        if fused:
            lin = w.inputs[0]
            buf = torch.empty_like(saved.outs[0])
            out = (buf[:, :inter], buf[:, inter:])
            sides = (None, None) if lin.lora is None else (K.LoraSide(saved.shrinks[0], lin.lora.scaling),) * 2
        else:
            out = None
            sides = tuple(None if lin.lora is None else K.LoraSide(s, lin.lora.scaling)
                          for lin, s in zip(w.inputs, saved.shrinks))
        down_lora = None if dl is None or not nd.A else K.DownLora(
            t_d, dl.scaling, dl.dropout, dseed if dl.dropout > 0 else None, dl.A.contiguous() if fold else None)
        p, rescale, mseed = knowledge_mask_args(mask, seed)
        r = K.act_bwd_lora(dh, g, u, Activation(activation).value, p, rescale, mseed, gate=sides[0], up=sides[1],
                           down=down_lora, out=out)
        del dh
        if fused:
            d_outs = [buf]
            dBs = [None if r.dB_g is None else torch.cat([r.dB_g, r.dB_u])]
        else:
            d_outs, dBs = [r.dg, r.du], [r.dB_g, r.dB_u]
        dx, grads = self.inputs_bwd(d_outs, x2d, saved, w, seed, needs, dBs)
        grads.append(LinearGrads(None, None, None, r.dA_d, dB_d))
        return dx, tuple(grads)
