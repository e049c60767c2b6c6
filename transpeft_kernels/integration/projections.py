"""Reading one FFN projection (a plain nn.Linear or a PEFT LoRA Linear) as ``LinearWeights``, or
saying why it must run through its own forward instead. Checked at every call: PEFT state
(merge, disable, set_adapter, hooks) can change after patching."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..specs import LinearWeights, LoraWeights


@dataclass(frozen=True)
class Projection:
    """weights is None when the module must run its own forward; reason then says why."""

    module: nn.Module
    weights: LinearWeights | None
    reason: str = ""


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(m, attr, None)
        for m in module.modules()
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    )


def _lora_layer_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # PEFT is optional
        return None
    return Linear


def _dropout_p(module: nn.Module) -> float | None:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    return None


def _from_lora(module: nn.Module) -> Projection:
    def fallback(reason: str) -> Projection:
        return Projection(module, None, reason)

    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        return fallback(f"base layer is {type(base).__name__}, not nn.Linear")
    if module.disable_adapters:
        return fallback("adapters disabled")
    if module.merged:
        return fallback("adapter merged into the base weights")
    if getattr(module, "fan_in_fan_out", False):
        return fallback("fan_in_fan_out")
    if not getattr(module, "cast_input_dtype_enabled", True):
        return fallback("input dtype casting disabled")
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) > 1:
        return fallback(f"{len(active)} active adapters")
    if not active:
        return Projection(module, LinearWeights(base.weight, base.bias))
    name = active[0]
    if module.use_dora.get(name, False):
        return fallback("DoRA")
    variant = getattr(module, "lora_variant", {}).get(name)
    if variant is not None:
        return fallback(f"LoRA variant {type(variant).__name__}")
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return fallback("LoRA factors are not nn.Linear")
    if lora_a.bias is not None or lora_b.bias is not None:
        return fallback("lora_bias")
    if lora_a.weight.dtype != lora_b.weight.dtype:
        return fallback("lora_A and lora_B dtypes differ")
    q = _dropout_p(module.lora_dropout[name])
    if q is None:
        return fallback(f"lora_dropout is {type(module.lora_dropout[name]).__name__}")
    lora = LoraWeights(lora_a.weight, lora_b.weight, float(module.scaling[name]), q)
    return Projection(module, LinearWeights(base.weight, base.bias, lora))


def read_projection(module: nn.Module) -> Projection:
    """The fused-path view of one projection module, or the reason it falls back."""
    if _has_hooks(module):
        return Projection(module, None, "module hooks (e.g. PEFT mixed-batch adapter selection)")
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        # ZeRO-3 keeps each rank's shard only and gathers the full weight inside the module's own call
        return Projection(module, None, "DeepSpeed ZeRO-3 partitioned weights (gathered by its own forward)")
    if type(module) is nn.Linear:
        return Projection(module, LinearWeights(module.weight, module.bias))
    lora_cls = _lora_layer_class()
    if lora_cls is not None and type(module) is lora_cls:
        return _from_lora(module)
    return Projection(module, None, f"{type(module).__name__} is not nn.Linear or a PEFT LoRA Linear")


def cast_for_autocast(lin: LinearWeights, dtype: torch.dtype) -> LinearWeights:
    """What autocast would do to every matmul operand of this projection, done explicitly so that the
    autograd functions run outside autocast with consistent dtypes (gradients flow through the casts)."""
    def cast(t):
        return None if t is None or not t.is_floating_point() else t.to(dtype)

    return lin.with_tensors(*(cast(t) for t in lin.tensors()))
