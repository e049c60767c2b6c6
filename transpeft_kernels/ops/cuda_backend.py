"""The "cuda" backend: the primitives of TorchBackend on the CUDA C++ kernels (kernels/cuda), with
the large GEMMs through ATen (cuBLAS). Same contract, saved state and results as "torch".

lora_linear (x (M, K), W (N, K), A (r, K), B (N, r), s = scaling, q = LoRA dropout, t = cast_A(dy) B):
    forward   y = x W^T + b (ATen);  S = dropout_q(cast_A(x)) A^T (lora_shrink);  y += s S B^T (lora_expand_)
    backward  dx = dy W (ATen) += cast(s D(t A)) (lora_expand_, mask in the epilogue); t (lora_shrink)
              S and t through ATen instead when there is nothing to fuse: no dropout mask and a
              16-bit adapter in x's dtype (``_shrink``)
              dW = dy^T x, db = sum_rows dy (ATen)
              dB = s cast_A(dy)^T S, dA = s t^T dropout_q(cast_A(x)): lora_token_reduce (tensor cores, the
              cast and the mask applied while staging) for fp32 adapters on 16-bit activations (rank
              <= 64) and for a 16-bit adapter's dA under dropout (rank <= 32); otherwise one ATen GEMM with s
              as its alpha (``_alpha_mm``) on cast copies, lora_dropout_cast for the mask (``_reducible``)
masked gated MLP (mlp_fwd / mlp_bwd), down projection with LoRA (A_d, B_d, s_d, q_d):
    forward   g, u = gate/up lora_linear;  h', S_d = masked_gated_act_fwd (shrink fused, h' in registers,
              S_d's products on the tensor cores when I % 8 == 0 and rows are 16-byte aligned)
              with LoRA on every projection in one adapter dtype and ranks <= 32 (64 for 16-bit adapters):
              g, u = the base GEMMs and the shrinks only, their expands added in place by the same
              activation pass (``_fuses_gate_up_expands``)
              y = h' W_d^T + b_d (ATen) += s_d S_d B_d^T (lora_expand_)
    backward  dh_base = dY W_d (ATen), t_d = cast_A(dY) B_d (lora_shrink, or ATen as t above)
              dg, du, dA_d = act_bwd_lora: one pass, dh' = dh_base + s_d D(t_d A_d) and
                             dA_d = s_d t_d^T dropout_qd(h') on the tensor cores, h' never written;
                             with fp32 adapters, 16-bit activations and ranks <= 32 also the gate/up
                             dB = s cast_A(dg)^T S_g (and du, S_u) from the same tiles, instead of token
                             reductions that read dg, du again (``_gate_up_db``)
              (the down base trained, TRANSPEFT_CUDA_ONE_PASS_BWD=0, I % 8 != 0 or unaligned rows:
               dg, du [, h', dropout_qd(h')] = masked_gated_act_bwd, dW_d = dY^T h',
               dA_d = s_d t_d^T dropout_qd(h') (ATen))
              dB_d = s_d cast_A(dY)^T S_d (lora_token_reduce or ATen, as dB above)
The kernels multiply fp32 adapters as tf32x3 whatever torch's fp32 matmul precision (the triton backend
follows it: single tf32 products where torch allows TF32); the ATen products here follow it as torch does.
              gate/up backward as lora_linear above (the fused layout's dg, du land in one (M, 2I) buffer;
              the split layout's two dX products accumulate into one output, addmm_)
    saved     what MLPSaved holds: x, the gate/up outputs, the rank-sized shrinks; h' is recomputed.
Every output is a fresh tensor; nothing is written into saved tensors or incoming gradients.

Falls back to TorchBackend (same results, unfused) where the kernels do not apply:
  * tensors not on a CUDA device (CPU tensors run the kernels only in the host emulation,
    TRANSPEFT_CUDA_EMULATE=1, a test tool), or on different devices;
  * dtypes other than float32 / float16 / bfloat16 (e.g. float64, used by gradcheck);
  * a Linear whose weight or bias dtype differs from x's, A and B of different dtypes, an incoming
    gradient whose dtype differs from x's, g and u of different dtypes;
  * the fused MLP path only: a down-projection rank above 64 or an adapter dtype other than float32
    or the activation dtype (the MLP then runs as lora_linear + masked activation, still on the kernels).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..kernels.cuda.library import emulating
from ..reference.activations import Activation
from ..specs import GatedMLPWeights, Layout, LinearWeights, MaskSpec, SubSeed, split_gate_up, sub_seed
from .coverage import covered, linear_covered, knowledge_mask_args
from .torch_backend import LinearGrads, LinearNeeds, MLPSaved, TorchBackend


def _alpha_mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * (a @ b), a (m, k) and b (k, n) of one dtype, as one GEMM with alpha as cuBLAS's: one rounding
    of the fp32 sum where ``(a @ b) * alpha`` rounds the product, then the scaled product (a 16-bit dA /
    dB), and launches an elementwise mul. beta = 0: the uninitialised output is never read (NaN in it
    does not propagate); k = 0 gives zeros."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, beta=0, alpha=alpha)


def _runnable(*tensors: torch.Tensor | None) -> bool:
    return covered(*tensors, cpu_ok=emulating())


def _linear_ok(x2d: torch.Tensor, lin: LinearWeights) -> bool:
    return linear_covered(x2d, lin, cpu_ok=emulating())


def _linear_bwd_ok(dy, x2d, s, lin: LinearWeights) -> bool:
    """Whether lora_linear's backward runs on the kernels (else TorchBackend's)."""
    return dy.dtype == x2d.dtype and _linear_ok(x2d, lin) and _runnable(dy, x2d, s)


def _rows_contiguous(bt: torch.Tensor) -> torch.Tensor:
    """B^T (r, N) as a contiguous copy (r x N, small): lora_shrink's threads read along a row of its
    ``a``, so the strided view (strides (1, r)) would put consecutive lanes r elements apart."""
    return bt.contiguous()


# lora_token_reduce takes ranks up to 64; the model prefers it up to 64 for fp32 adapters (the cast copy
# is 6 bytes per element) and up to 32 for a 16-bit adapter's masked dA (a 4-byte copy)
REDUCE_MAX_RANK = {torch.float32: 64, torch.float16: 32, torch.bfloat16: 32}
ONE_PASS_ENV = "TRANSPEFT_CUDA_ONE_PASS_BWD"


def one_pass_bwd_enabled() -> bool:
    """The MLP backward's activation pass with dA_d on the tensor cores (act_bwd_lora), unless
    TRANSPEFT_CUDA_ONE_PASS_BWD=0 (the earlier path: xd written, dA_d an ATen GEMM; for A/B timing)."""
    value = os.environ.get(ONE_PASS_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ONE_PASS_ENV}: expected 0 or 1, got {value!r}")
    return value == "1"


class CudaBackend(TorchBackend):
    """Same primitives and signatures as TorchBackend; see the module docstring."""

    name = "cuda"

    def __init__(self):
        from ..kernels import cuda as K

        self._k = K

    def _shrink(self, x2d: torch.Tensor, a: torch.Tensor, drop=None) -> torch.Tensor:
        """dropout(cast_A(x2d)) a^T, (M, r) in a's dtype; ``a`` (r, K): A, or B^T for t = cast_A(dy) B.
        ATen (cuBLAS) when a is a 16-bit dtype, x2d's, and there is no mask: the kernel then fuses
        nothing, and cuBLAS reads x at memory speed while lora_shrink is issue-bound (the model, from its
        SASS: at rank 64 0.16 ms against 0.02 ms for 8192 x 4096 tokens x features). Operands in a's
        dtype and fp32 accumulation either way (cuBLAS may sum split-K partials in reduced precision
        under torch's defaults, as the torch backend's own product does). fp32 stays on the kernel:
        cuBLAS would make it a TF32 product wherever a script allows TF32, not tf32x3."""
        if drop is None and a.dtype == x2d.dtype and a.element_size() == 2:
            return x2d @ a.t()
        return self._k.lora_shrink(x2d, _rows_contiguous(a), drop)

    def _dropout(self, lin: LinearWeights, seed):
        q = lin.lora.dropout
        if q > 0 and seed is None:
            raise ValueError("seed: required when lora dropout > 0")
        return self._k.Dropout(q, seed) if q > 0 else None

    # ---- lora_linear -------------------------------------------------------------------------
    def lora_linear_fwd(self, x2d: torch.Tensor, lin: LinearWeights, seed: torch.Tensor | None):
        """x2d (M, d_in) -> (y (M, d_out) in x dtype, S (M, r) in adapter dtype or None)."""
        if not _linear_ok(x2d, lin):
            return super().lora_linear_fwd(x2d, lin, seed)
        y, s = self._base_and_shrink(x2d, lin, seed)
        if s is not None:
            self._k.lora_expand_(y, s, lin.lora.B, lin.lora.scaling)
        return y, s

    def _base_and_shrink(self, x2d: torch.Tensor, lin: LinearWeights, seed):
        """lora_linear_fwd without its expand: (x W^T + b, S or None); covered operands."""
        y = F.linear(x2d, lin.weight, lin.bias)
        lora = lin.lora
        return y, None if lora is None else self._shrink(x2d, lora.A, self._dropout(lin, seed))

    def lora_linear_bwd(self, dy, x2d, s, lin: LinearWeights, seed, needs: LinearNeeds) -> LinearGrads:
        if not _linear_bwd_ok(dy, x2d, s, lin):
            return super().lora_linear_bwd(dy, x2d, s, lin, seed, needs)
        return self._linear_bwd(dy, x2d, s, lin, seed, needs)

    def _input_bwd(self, dy, x2d, s, lin: LinearWeights, seed, needs: LinearNeeds, dx_sum, dB) -> LinearGrads:
        """TorchBackend's, with the projections' dX summed in one output (``dx_sum``, a fresh tensor of ours:
        addmm_, no extra add pass)."""
        if not _linear_bwd_ok(dy, x2d, s, lin):
            return super()._input_bwd(dy, x2d, s, lin, seed, needs, dx_sum, dB)
        return self._linear_bwd(dy, x2d, s, lin, seed, needs, dx_into=dx_sum, dB=dB)

    def _linear_bwd(self, dy, x2d, s, lin: LinearWeights, seed, needs: LinearNeeds,
                    dx_into: torch.Tensor | None = None, dB: torch.Tensor | None = None) -> LinearGrads:
        """lora_linear_bwd on covered operands; dx accumulated into ``dx_into`` in place when given (and
        returned as the gradient's x); ``dB`` when already computed, else computed here."""
        K, lora = self._k, lin.lora
        dx = dW = db = dA = None
        t = self._shrink(dy, lora.B.t()) if lora is not None and (needs.A or needs.x) else None
        if needs.x:
            dx = torch.mm(dy, lin.weight) if dx_into is None else dx_into.addmm_(dy, lin.weight)
            if lora is not None:
                K.lora_expand_(dx, t, lora.A.t(), lora.scaling, grad=True, drop=self._dropout(lin, seed))
        if needs.weight:
            dW = (dy.t() @ x2d).to(lin.weight.dtype)
        if needs.bias:
            db = dy.sum(0).to(lin.bias.dtype)
        if lora is not None:
            adt = lora.A.dtype
            if needs.B and dB is None:
                dB = K.lora_token_reduce(s, dy, lora.scaling).t().contiguous() if self._reducible(lora, x2d.dtype) \
                    else _alpha_mm(dy.to(adt).t(), s, lora.scaling)
            if needs.A:
                drop = self._dropout(lin, seed)
                if self._reducible(lora, x2d.dtype, drop):
                    dA = K.lora_token_reduce(t, x2d, lora.scaling, drop)
                else:
                    xd = x2d.to(adt) if drop is None else K.lora_dropout_cast(x2d, adt, drop)
                    dA = _alpha_mm(t.t(), xd, lora.scaling)
        return LinearGrads(dx, dW, db, dA, dB)

    def _reducible(self, lora, dtype: torch.dtype, drop=None) -> bool:
        """Whether a LoRA token sum (dB = s cast_A(dy)^T S, or dA = s t^T dropout(cast_A(x)) with
        ``drop`` its dropout) takes lora_token_reduce (the tensor-core token sums that cast and mask while
        staging) instead of ATen on a cast or masked copy: for fp32 adapters on 16-bit activations (rank
        <= 64), and for a 16-bit adapter's dA under dropout (rank <= 32). Chosen by the model (perf/ledger.py,
        the kernels' SASS): there the copy (6 bytes per element for the fp32 cast, 4 for a masked 16-bit
        one, read again) costs more than the kernel's instructions; a masked 16-bit copy at rank 64 costs
        less than its steps, and a 16-bit adapter on its own dtype without a mask needs no copy (cuBLAS is
        better)."""
        if lora.A.shape[0] > REDUCE_MAX_RANK.get(lora.A.dtype, 0) or dtype not in (torch.float16, torch.bfloat16):
            return False
        return lora.A.dtype == torch.float32 or (drop is not None and lora.A.dtype == dtype)

    # ---- masked gated activation ---------------------------------------------------------------
    def masked_act_fwd(self, g, u, activation: Activation, mask: MaskSpec | None, seed) -> torch.Tensor:
        """g, u (M, I) -> h' (M, I) = act(g) * u * keep * c, in g's dtype."""
        if g.dtype != u.dtype or not _runnable(g, u):
            return super().masked_act_fwd(g, u, activation, mask, seed)
        return self._k.masked_gated_act_fwd(g, u, Activation(activation).value, *knowledge_mask_args(mask, seed))

    def masked_act_bwd(self, dh, g, u, activation: Activation, mask: MaskSpec | None, seed):
        """dh' (M, I) -> (dg, du) in g's and u's dtypes, computed in float32."""
        if g.dtype != u.dtype or dh.dtype != g.dtype or not _runnable(dh, g, u):
            return super().masked_act_bwd(dh, g, u, activation, mask, seed)
        dg, du, _, _ = self._k.masked_gated_act_bwd(dh, g, u, Activation(activation).value,
                                                    *knowledge_mask_args(mask, seed))
        return dg, du

    # ---- masked gated MLP ----------------------------------------------------------------------
    def _fusable(self, x2d: torch.Tensor, w: GatedMLPWeights) -> bool:
        if not _runnable(x2d) or not all(_linear_ok(x2d, lin) for lin in w.projections):
            return False
        lora = w.down.lora
        return lora is None or (lora.A.shape[0] <= self._k.MAX_FUSED_RANK
                                and lora.A.dtype in (torch.float32, x2d.dtype))

    def mlp_fwd(self, x2d, w: GatedMLPWeights, activation: Activation, mask: MaskSpec | None, seed):
        """x2d (M, d) -> (y (M, d_out) in x dtype, MLPSaved)."""
        if not self._fusable(x2d, w):
            return super().mlp_fwd(x2d, w, activation, mask, seed)
        K, down = self._k, w.down
        margs = knowledge_mask_args(mask, seed)
        act = Activation(activation).value
        gate_up = None
        if self._fuses_gate_up_expands(w):
            outs, shrinks = self.inputs_fwd(x2d, w, seed, self._base_and_shrink)
            gate_up = self._gate_up_lora(w, shrinks)
            if not K.gate_up_supported(*split_gate_up(outs, w.layout), gate_up):  # unaligned: on their own
                for y, s, lin in zip(outs, shrinks, w.inputs):
                    K.lora_expand_(y, s, lin.lora.B, lin.lora.scaling)
                gate_up = None
        else:
            outs, shrinks = self.inputs_fwd(x2d, w, seed)
        g, u = split_gate_up(outs, w.layout)
        if down.lora is None:
            h, s_down = K.masked_gated_act_fwd(g, u, act, *margs), None
        else:
            drop = self._dropout(down, sub_seed(seed, SubSeed.DOWN))
            h, s_down = K.masked_gated_act_fwd(g, u, act, *margs, down_a=down.lora.A, down_drop=drop, gate_up=gate_up)
        y = F.linear(h, down.weight, down.bias)
        del h
        if down.lora is not None:
            K.lora_expand_(y, s_down, down.lora.B, down.lora.scaling)
        return y, MLPSaved(outs, shrinks, s_down)

    def mlp_bwd(self, dy, x2d, saved: MLPSaved, w: GatedMLPWeights, activation: Activation,
                mask: MaskSpec | None, seed, needs: tuple[LinearNeeds, ...]):
        """dy (M, d_out) -> (dx (M, d) or None, LinearGrads per projection in w.projections order)."""
        down, lora = w.down, w.down.lora
        if (not self._fusable(x2d, w) or dy.dtype != x2d.dtype or not _runnable(dy, *saved.outs)
                or (lora is not None and saved.s_down is None)):
            return super().mlp_bwd(dy, x2d, saved, w, activation, mask, seed, needs)
        K = self._k
        margs = knowledge_mask_args(mask, seed)
        g, u = split_gate_up(saved.outs, w.layout)
        M, inter = g.shape
        nd = needs[-1]
        dh_base = dy @ down.weight
        fused_buf = None
        if w.layout is Layout.FUSED_GATE_UP:
            fused_buf = torch.empty((M, 2 * inter), dtype=g.dtype, device=g.device)
            out = (fused_buf[:, :inter], fused_buf[:, inter:])
        else:
            out = None
        act = Activation(activation).value
        t = dA = dB = None
        dBs = (None,) * len(w.inputs)
        if lora is None:
            dg, du, h, xd = K.masked_gated_act_bwd(dh_base, g, u, act, *margs, want_h=nd.weight, out=out)
        else:
            t = self._shrink(dy, lora.B.t())
            drop = self._dropout(down, sub_seed(seed, SubSeed.DOWN))
            if nd.A and not nd.weight and one_pass_bwd_enabled() and \
                    K.act_bwd_lora_supported(dh_base, g, u, *(out if out is not None else ())):
                gate_up = self._gate_up_db(w, saved, needs)
                r = K.act_bwd_lora(dh_base, g, u, act, *margs, t, lora.A, lora.scaling, drop, out=out, gate_up=gate_up)
                dg, du, dA = r.dg, r.du, r.dA_d
                if gate_up is not None:  # the gate/up dB came from the same pass
                    dBs = (r.dB_g, r.dB_u) if w.layout is Layout.SPLIT else (torch.cat([r.dB_g, r.dB_u]),)
                h = xd = None
            else:
                dg, du, h, xd = K.masked_gated_act_bwd(
                    dh_base, g, u, act, *margs, down_t=t, down_a=lora.A, down_scaling=lora.scaling,
                    down_drop=drop, want_h=nd.weight, want_xd=nd.A, out=out)
        del dh_base
        dW = (dy.t() @ h).to(down.weight.dtype) if nd.weight else None
        db = dy.sum(0).to(down.bias.dtype) if nd.bias else None
        if lora is not None:
            if nd.A and dA is None:
                dA = _alpha_mm(t.t(), xd, lora.scaling)
            if nd.B:
                dB = K.lora_token_reduce(saved.s_down, dy, lora.scaling).t().contiguous() \
                    if self._reducible(lora, dy.dtype) else _alpha_mm(dy.to(lora.A.dtype).t(), saved.s_down, lora.scaling)
        del h, xd
        d_outs = [fused_buf] if fused_buf is not None else [dg, du]
        dx, grads = self.inputs_bwd(d_outs, x2d, saved, w, seed, needs, dBs=dBs)
        grads.append(LinearGrads(None, dW, db, dA, dB))
        return dx, tuple(grads)

    def _fuses_gate_up_expands(self, w: GatedMLPWeights) -> bool:
        """Whether the forward adds the gate/up LoRA expands inside the activation pass (masked_gated_act_fwd's
        ``gate_up``) instead of two lora_expand_ passes over g and u: the down projection with LoRA (the
        pass is its tensor-core forward), every input projection with LoRA in the down adapter's dtype, one
        rank for them, a multiple of 8 (GATE_UP_RANK_STEP), it and the down rank <= MAX_GATE_UP_RANK (32 for
        fp32 adapters, 64 for 16-bit ones).
        Chosen by the model (perf/ledger.py): the separate expands read and write g and u once more each."""
        down = w.down.lora
        if down is None:
            return False
        max_r = self._k.MAX_GATE_UP_RANK.get(down.A.dtype, 0)
        loras = [lin.lora for lin in w.inputs]
        return down.A.shape[0] <= max_r and all(
            lora is not None and lora.A.dtype == down.A.dtype and lora.A.shape[0] == loras[0].A.shape[0]
            and lora.A.shape[0] <= max_r and lora.A.shape[0] % self._k.GATE_UP_RANK_STEP == 0 for lora in loras)

    def _gate_up_lora(self, w: GatedMLPWeights, shrinks):
        """The GateUpLora of the input projections; the fused layout's one B (2I, r) gives both halves. The
        kernel reads B's rows with unit stride, so a B with other strides (a transposed view) is copied
        (I x r, small); lora_expand_ took any strides."""
        if w.layout is Layout.SPLIT:
            (lg, lu), (sg, su) = (lin.lora for lin in w.inputs), shrinks
            return self._k.GateUpLora(sg, lg.B.contiguous(), lg.scaling, su, lu.B.contiguous(), lu.scaling)
        lora, s = w.inputs[0].lora, shrinks[0]
        b_g, b_u = lora.B.contiguous().chunk(2, dim=0)
        return self._k.GateUpLora(s, b_g, lora.scaling, s, b_u, lora.scaling)

    def _gate_up_db(self, w: GatedMLPWeights, saved: MLPSaved, needs: tuple[LinearNeeds, ...]):
        """act_bwd_lora's ``gate_up`` (S_g, s_g, S_u, s_u) when the gate/up projections' dB come from the
        one-pass backward: fp32 adapters on 16-bit activations, every input projection with LoRA whose dB
        is wanted, one rank <= MAX_DB_RANK for all (the down rank too), S saved. The fused layout's one
        projection gives both sides (its dB is [dg^T S; du^T S]). None otherwise: the token sums then run
        as lora_linear's. Chosen by the model (perf/ledger.py): with fp32 adapters the two token reductions
        it replaces read dg and du again (0.09 ms less per Llama-3-8B MLP step at rank 16); a 16-bit
        adapter's dB is a cuBLAS GEMM on dg with nothing to cast, which the model prices below the
        pass's added instructions (+0.04 ms)."""
        down = w.down.lora
        loras = [lin.lora for lin in w.inputs]
        if down is None or down.A.dtype != torch.float32 or down.A.shape[0] > self._k.MAX_DB_RANK \
                or saved.outs[0].dtype == torch.float32 or any(
                lora is None or not n.B or s is None or lora.A.dtype != down.A.dtype
                or lora.A.shape[0] != loras[0].A.shape[0] or lora.A.shape[0] > self._k.MAX_DB_RANK
                for lora, n, s in zip(loras, needs, saved.shrinks)):
            return None
        if w.layout is Layout.SPLIT:
            return saved.shrinks[0], loras[0].scaling, saved.shrinks[1], loras[1].scaling
        return saved.shrinks[0], loras[0].scaling, saved.shrinks[0], loras[0].scaling
