"""The "torch" backend: forward and hand-written backward of each op in plain PyTorch.

Forward pieces call the reference; backward formulas are written out here (and tested against
autograd through the reference). Random masks are regenerated from the seed, never stored.

lora_linear, with xd = dropout_q(cast_A(x)), S = xd A^T (saved, rank-sized), t = cast_A(dy) B:
    dB = s * cast_A(dy)^T S            dA = s * t^T xd
    dx = dy W + cast_x(s * dropout_q'(t A))        (dropout_q' applies the same keep * 1/(1-q))
    dW = dy^T x                         db = sum_rows(dy)
masked gated activation, h' = act(g) * u * keep * c:
    dg = dh' * keep * c * u * act'(g)   du = dh' * keep * c * act(g)
masked gated MLP (mlp_fwd / mlp_bwd), composed from the two above:
    forward   g, u = gate/up(x) -> h' (gate_up_act_fwd) -> y = down(h')
    saved     x, the gate/up outputs, the rank-sized shrinks S of every projection
    backward  h' recomputed from g, u and the seed; dh' = down backward; dg, du; gate/up backward
A fused backend overrides gate_up_act_fwd (GEMM + activation epilogue) or the whole mlp_fwd/mlp_bwd.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..reference.activations import Activation, act, act_grad
from ..reference.lora import dropout_multiplier
from ..reference.mlp import INPUT_SUB_SEEDS
from ..reference.philox import keep_mask
from ..specs import GatedMLPWeights, Layout, LinearWeights, MaskSpec, SubSeed, split_gate_up, sub_seed


@dataclass(frozen=True)
class LinearGrads:
    """Gradients of one lora_linear; None where not requested."""

    x: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    A: torch.Tensor | None
    B: torch.Tensor | None


@dataclass(frozen=True)
class LinearNeeds:
    """Which gradients of one lora_linear autograd asked for."""

    x: bool
    weight: bool
    bias: bool
    A: bool
    B: bool


@dataclass(frozen=True)
class MLPSaved:
    """What the masked gated MLP keeps for backward besides x and the weights.

    outs: the gate/up projection outputs, (M, I) each for SPLIT, one (M, 2I) for FUSED_GATE_UP.
    shrinks: S = dropout(x) A^T (M, r) of each input projection, None without LoRA.
    s_down: the down projection's S (M, r_down), or None.
    """

    outs: tuple[torch.Tensor, ...]
    shrinks: tuple[torch.Tensor | None, ...]
    s_down: torch.Tensor | None


def _dropped_input(x2d: torch.Tensor, lin: LinearWeights, seed: torch.Tensor | None):
    """(cast_A(x) with dropout applied, the dropout multiplier or None)."""
    lora = lin.lora
    xa = x2d.to(lora.A.dtype)
    if lora.dropout == 0.0:
        return xa, None
    mult = dropout_multiplier(seed, xa, lora.dropout)
    return xa * mult, mult


class TorchBackend:
    """Composes the MLP from lora_linear and the masked activation; fused backends override more."""

    name = "torch"

    # ---- lora_linear -------------------------------------------------------------------------
    def lora_linear_fwd(self, x2d: torch.Tensor, lin: LinearWeights, seed: torch.Tensor | None):
        """x2d (M, d_in) -> (y (M, d_out) in x dtype, S (M, r) in adapter dtype or None)."""
        y = F.linear(x2d, lin.weight, lin.bias)
        if lin.lora is None:
            return y, None
        xd, _ = _dropped_input(x2d, lin, seed)
        s = F.linear(xd, lin.lora.A)
        return (y + F.linear(s, lin.lora.B) * lin.lora.scaling).to(x2d.dtype), s

    def lora_linear_bwd(self, dy, x2d, s, lin: LinearWeights, seed, needs: LinearNeeds) -> LinearGrads:
        dx = dy @ lin.weight if needs.x else None
        dW = (dy.t() @ x2d).to(lin.weight.dtype) if needs.weight else None
        db = dy.sum(0).to(lin.bias.dtype) if needs.bias else None
        dA = dB = None
        lora = lin.lora
        if lora is not None:
            dy_a = dy.to(lora.A.dtype)
            if needs.B:
                dB = (dy_a.t() @ s) * lora.scaling
            if needs.A or needs.x:
                t = dy_a @ lora.B
                xd, mult = _dropped_input(x2d, lin, seed) if needs.A or lora.dropout else (None, None)
                if needs.A:
                    dA = (t.t() @ xd) * lora.scaling
                if needs.x:
                    dx_lora = (t @ lora.A) * lora.scaling
                    if mult is not None:
                        dx_lora = dx_lora * mult
                    dx = dx + dx_lora.to(dx.dtype)
        return LinearGrads(dx, dW, db, dA, dB)

    # ---- masked gated activation ---------------------------------------------------------------
    def _mask_multiplier(self, g: torch.Tensor, mask: MaskSpec | None, seed):
        if mask is None or mask.p == 0.0:
            return None
        keep = keep_mask(sub_seed(seed, SubSeed.MASK), g.shape[0], g.shape[1], mask.p, device=g.device)
        return keep.to(g.dtype) * mask.multiplier if mask.rescale else keep.to(g.dtype)

    def masked_act_fwd(self, g, u, activation: Activation, mask: MaskSpec | None, seed) -> torch.Tensor:
        """g, u (M, I) -> h' (M, I) = act(g) * u * keep * c, in g's dtype."""
        h = act(g, activation) * u
        m = self._mask_multiplier(g, mask, seed)
        return h if m is None else h * m

    def masked_act_bwd(self, dh, g, u, activation: Activation, mask: MaskSpec | None, seed):
        """dh' (M, I) -> (dg, du), computed in float32 (float64 for float64 inputs)."""
        m = self._mask_multiplier(g, mask, seed)
        work = torch.float64 if g.dtype == torch.float64 else torch.float32
        dhm = dh.to(work) if m is None else dh.to(work) * m.to(work)
        dg = dhm * u.to(work) * act_grad(g, activation)
        du = dhm * act(g.to(work), activation)
        return dg.to(g.dtype), du.to(u.dtype)

    # ---- masked gated MLP ----------------------------------------------------------------------
    def inputs_fwd(self, x2d, w: GatedMLPWeights, seed, linear_fwd=None):
        """The gate/up projections one lora_linear each: x2d (M, d) -> (outs, shrinks) as MLPSaved holds them.
        ``linear_fwd``: what runs each projection, (x2d, lin, seed) -> (y, S); lora_linear_fwd by default."""
        linear_fwd = self.lora_linear_fwd if linear_fwd is None else linear_fwd
        pairs = [linear_fwd(x2d, lin, sub_seed(seed, stream)) for lin, stream in zip(w.inputs, INPUT_SUB_SEEDS[w.layout])]
        return tuple(y for y, _ in pairs), tuple(s for _, s in pairs)

    def inputs_bwd(self, d_outs, x2d, saved: MLPSaved, w: GatedMLPWeights, seed, needs: tuple[LinearNeeds, ...],
                   dBs: tuple | None = None):
        """Backward of the gate/up projections: d_outs like saved.outs -> (dx (M, d) or None, their LinearGrads).
        ``dBs``: the projections' dB where a backend already computed them (its one-pass activation backward)."""
        dx, grads = None, []
        for i, (lin, stream) in enumerate(zip(w.inputs, INPUT_SUB_SEEDS[w.layout])):
            gi = self._input_bwd(d_outs[i], x2d, saved.shrinks[i], lin, sub_seed(seed, stream), needs[i], dx,
                                 None if dBs is None else dBs[i])
            if gi.x is not None:
                dx = gi.x
            grads.append(gi)
        return dx, grads

    def _input_bwd(self, dy, x2d, s, lin: LinearWeights, seed, needs: LinearNeeds, dx_sum, dB) -> LinearGrads:
        """One gate/up projection's lora_linear backward, its dx plus ``dx_sum`` (the projections' before it,
        or None) and its dB replaced by ``dB`` when given. A backend with fused kernels overrides this."""
        gi = self.lora_linear_bwd(dy, x2d, s, lin, seed, needs)
        if dx_sum is not None and gi.x is not None:
            gi = dataclasses.replace(gi, x=dx_sum + gi.x)
        return gi if dB is None else dataclasses.replace(gi, B=dB)

    def gate_up_act_fwd(self, x2d, w: GatedMLPWeights, activation: Activation, mask: MaskSpec | None, seed):
        """x2d (M, d) -> (outs, shrinks, h'): the gate/up outputs and shrinks as MLPSaved holds them,
        and h' (M, I) = act(g) * u * keep * c."""
        outs, shrinks = self.inputs_fwd(x2d, w, seed)
        g, u = split_gate_up(outs, w.layout)
        return outs, shrinks, self.masked_act_fwd(g, u, activation, mask, seed)

    def mlp_fwd(self, x2d, w: GatedMLPWeights, activation: Activation, mask: MaskSpec | None, seed):
        """x2d (M, d) -> (y (M, d_out) in x dtype, MLPSaved)."""
        outs, shrinks, h = self.gate_up_act_fwd(x2d, w, activation, mask, seed)
        y, s_down = self.lora_linear_fwd(h, w.down, sub_seed(seed, SubSeed.DOWN))
        return y, MLPSaved(outs, shrinks, s_down)

    def mlp_bwd(self, dy, x2d, saved: MLPSaved, w: GatedMLPWeights, activation: Activation,
                mask: MaskSpec | None, seed, needs: tuple[LinearNeeds, ...]):
        """dy (M, d_out) -> (dx (M, d) or None, LinearGrads per projection in w.projections order).
        ``needs[i].x`` is ignored for the down projection (dh' is always needed)."""
        g, u = split_gate_up(saved.outs, w.layout)
        h = self.masked_act_fwd(g, u, activation, mask, seed)  # recomputed, never saved
        nd = needs[-1]
        down = self.lora_linear_bwd(dy, h, saved.s_down, w.down, sub_seed(seed, SubSeed.DOWN),
                                    LinearNeeds(True, nd.weight, nd.bias, nd.A, nd.B))
        del h
        dg, du = self.masked_act_bwd(down.x, g, u, activation, mask, seed)
        d_outs = [torch.cat([dg, du], dim=-1)] if w.layout is Layout.FUSED_GATE_UP else [dg, du]
        dx, grads = self.inputs_bwd(d_outs, x2d, saved, w, seed, needs)
        grads.append(LinearGrads(None, down.weight, down.bias, down.A, down.B))
        return dx, tuple(grads)


TORCH = TorchBackend()
