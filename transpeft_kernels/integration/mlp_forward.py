"""The forward installed on a patched MLP.

Eval mode: the MLP's original forward, untouched. Training mode, per call:
1. dropping > 0: one draw ``torch.rand(())`` from torch's default CPU generator.
2. masking > 0, or LoRA dropout on a fused projection: one seed ``torch.randint(2**62)`` drawn on
   the input's device, from that device's default generator (also when the FFN is then skipped);
   Philox streams of it give the mask and the dropout masks (specs.SubSeed). Drawn where the kernels
   read it, the seed costs no host-to-device copy and no sync, so the call is CUDA-graph capturable.
   If the draw of 1. is below ``dropping`` the FFN is skipped: it returns zeros, no FFN compute.
   Under torch.compile the decision is a ``torch.cond``, so it causes no graph break; on models
   whose forwards carry the ``kernels`` package's wrappers (``MLPPatch.skip_by_cond`` False) it is
   a ``torch.where`` over the computed FFN instead: no graph break, but no compute saved.
3. All projections readable as LinearWeights: one ``masked_gated_mlp``; otherwise each projection
   runs fused (``lora_linear``) or through its own forward, around ``masked_gated_act``.
Draws come from the default generators inside the forward, so activation checkpointing (which saves
and restores the CPU generator and those of the inputs' devices) recomputes identical decisions and
masks, and the draws depend on neither the backend nor which projections fell back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from ..reference.activations import Activation
from ..reference.mlp import INPUT_SUB_SEEDS
from ..specs import SEED_BOUND, GatedMLPWeights, MaskSpec, SubSeed, split_gate_up, sub_seed
from .families import Family
from .projections import cast_for_autocast, read_projection

@dataclass(frozen=True)
class Settings:
    masking: float
    dropping: float
    mask_scale: bool
    backend: str


@dataclass
class MLPPatch:
    """What ``patch`` leaves on one MLP (as ``mlp._transpeft``): settings and how to undo it."""

    settings: Settings
    family: Family
    activation: Activation
    layer_index: int
    saved_forward: object  # the instance-level forward found at patch time, or None
    # Under torch.compile, skip the FFN with torch.cond (saves its compute) rather than torch.where.
    # False where a torch.cond would break the graph at later wrapped forwards (patch.py says why).
    skip_by_cond: bool = True
    backends: dict = field(default_factory=dict)  # device type -> the backend resolved on first use

    def backend_for(self, device: torch.device):
        """The backend for tensors on ``device``, resolved once per patch and device type."""
        backend = self.backends.get(device.type)
        if backend is None:
            backend = self.backends[device.type] = ops.resolve(self.settings.backend, device)
        return backend

    def original_forward(self, mlp: nn.Module):
        return self.saved_forward if self.saved_forward is not None else type(mlp).forward.__get__(mlp)

    @property
    def mask(self) -> MaskSpec | None:
        s = self.settings
        return MaskSpec(s.masking, s.mask_scale) if s.masking > 0 else None


class _SkippedFFN(torch.autograd.Function):
    """Zeros shaped like x, whose backward hands zero gradients to ``params``.

    Used only under an initialised process group with several ranks: DDP's reducer (with the default
    find_unused_parameters=False) waits for a gradient for every parameter, so a skipped FFN must
    still "use" its trainable parameters. Every rank makes the same decision for the same seed."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, _grad):
        return (None, *(torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.param_meta))


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _skipped_output(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        params = [p for p in mlp.parameters() if p.requires_grad]
        # DeepSpeed ZeRO-3 shards parameters in place and reduces only the gradients that arrive: an
        # unused one is fine there, and a zero-sized stand-in would not match the full-size reduction
        if params and not any(hasattr(p, "ds_id") for p in params):
            return _SkippedFFN.apply(x, *params)
    return torch.zeros_like(x)


def patched_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    state: MLPPatch = mlp._transpeft
    if not mlp.training:
        return state.original_forward(mlp)(x)
    settings = state.settings
    skip = torch.rand(()) < settings.dropping if settings.dropping > 0 else None
    projections = [read_projection(getattr(mlp, n)) for n in state.family.projection_names]
    random_dropout = any(p.weights is not None and p.weights.lora is not None and p.weights.lora.dropout > 0 for p in projections)
    # Drawn even when the FFN is then skipped, so eager and compiled runs consume the same draws.
    seed = (torch.randint(SEED_BOUND, (), dtype=torch.int64, device=x.device)
            if settings.masking > 0 or random_dropout else None)

    backend = state.backend_for(x.device)  # outside torch.cond: its branches must not mutate state

    def run(x):
        return _run_ffn(mlp, x, state, projections, seed, backend)

    if skip is None:
        return run(x)
    if torch.compiler.is_compiling():  # no graph break on the decision
        if state.skip_by_cond:
            return torch.cond(skip, lambda x: _skipped_output(mlp, x), run, (x,))
        return torch.where(skip, _skipped_output(mlp, x), run(x))
    return _skipped_output(mlp, x) if bool(skip) else run(x)


def _run_ffn(mlp: nn.Module, x: torch.Tensor, state: MLPPatch, projections, seed, backend) -> torch.Tensor:
    # meta tensors (a dry run of perf/ledger.py) have no autocast state to ask about
    on = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    autocast_dtype = torch.get_autocast_dtype(x.device.type) if on else None
    if autocast_dtype is not None:
        x = x.to(autocast_dtype)
        weights = [None if p.weights is None else cast_for_autocast(p.weights, autocast_dtype) for p in projections]
    else:
        weights = [p.weights for p in projections]

    # The ops get operands already cast as autocast would cast them, and run with autocast off
    # (their backward runs without it); projections that fall back keep the ambient autocast.
    def outside_autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, enabled=False)

    if all(w is not None for w in weights):
        with outside_autocast():
            mlp_weights = GatedMLPWeights(tuple(weights[:-1]), weights[-1])
            return ops.masked_gated_mlp(x, mlp_weights, state.activation, state.mask, seed, backend)

    def run(i, inp, stream):
        if weights[i] is None:
            return projections[i].module(inp)
        with outside_autocast():
            return ops.lora_linear(inp, weights[i], sub_seed(seed, stream), backend)

    layout = state.family.layout
    outs = [run(i, x, stream) for i, stream in enumerate(INPUT_SUB_SEEDS[layout])]
    g, u = split_gate_up(outs, layout)
    with outside_autocast():
        h = ops.masked_gated_act(g, u, state.activation, state.mask, seed, backend)
    return run(len(projections) - 1, h, SubSeed.DOWN)
