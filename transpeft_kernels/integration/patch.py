"""``patch`` / ``unpatch`` / ``is_patched`` for transformers models, with or without PEFT.

Patching is in place and reversible: each supported MLP gets an instance-level ``forward`` and a
``_transpeft`` record; no parameter, buffer or state-dict key is added or renamed. Every check runs
before anything is modified, so a failed call leaves the model as it was.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

from torch import nn

from ..ops import check_available, validate_backend_name
from ..reference.activations import CONFIG_NAMES, activation_from_config_name
from .families import FAMILIES, Family
from .mlp_forward import MLPPatch, Settings, patched_forward
from .projections import read_projection
from ..specs import check_probability, type_name
from .report import PatchReport

_ATTR = "_transpeft"


@dataclass(frozen=True)
class _Target:
    layer_index: int
    mlp: nn.Module


def _settings(masking, dropping, mask_scale, backend) -> Settings:
    masking = check_probability("masking", masking, upper_inclusive=False)
    dropping = check_probability("dropping", dropping, upper_inclusive=True)
    if not isinstance(mask_scale, bool):
        raise TypeError(f"mask_scale: expected bool (True or False), got {type_name(mask_scale)} {mask_scale!r}")
    backend = validate_backend_name(backend)
    if backend != "auto":
        check_available(backend)
    return Settings(masking, dropping, mask_scale, backend)


def _hf_model(model):
    """The transformers PreTrainedModel inside ``model`` (itself, or the one a PeftModel wraps)."""
    from transformers import PreTrainedModel

    inner = model
    if not isinstance(inner, PreTrainedModel) and hasattr(inner, "get_base_model") and hasattr(inner, "peft_config"):
        inner = inner.get_base_model()
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(
            f"model: expected a transformers PreTrainedModel or a PEFT PeftModel around one, got "
            f"{type(model).__name__}; supported FFN families: {sorted(FAMILIES)}"
        )
    return inner


def _cond_breaks_graphs(hf) -> bool:
    """Whether a torch.cond in this model's FFNs would break torch.compile's graph.

    transformers (5.25 and later, with the ``kernels`` package installed) wraps attention forwards in
    a context-variable scope that is compile-safe only while dynamo tracks its state; after a
    torch.cond, dynamo reads a stale state and breaks the graph at every later wrapped forward (seen
    with torch 2.13 and kernels 0.19.1: 5 breaks in a 2-layer Llama). The wrapper leaves
    ``_kernel_funcs`` on each wrapped module."""
    return any("_kernel_funcs" in m.__dict__ for m in hf.modules())


def _family(hf) -> Family:
    model_type = getattr(hf.config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise TypeError(
            f"model: {type(hf).__name__} (model_type {model_type!r}) has no supported gated FFN; supported "
            f"model types: {sorted(FAMILIES)} (a new one can be added with transpeft_kernels.register_family)"
        )
    return family


def _decoder_layers(hf) -> nn.ModuleList:
    core = getattr(hf, hf.base_model_prefix, hf)
    for owner in (core, hf):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"model: {type(hf).__name__} has no decoder-layer list (expected .layers on the base model)")


def _activation_name(hf, family: Family) -> str | None:
    for key in family.act_keys:
        value = getattr(hf.config, key, None)
        if value is not None:
            return value
    return None


def _select_layers(layers, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers: expected an iterable of decoder-layer indices in [0, {n}) or None, "
                        f"got {type_name(layers)}")
    chosen = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers: expected int indices in [0, {n}), got {type_name(i)} {i!r}")
        if not 0 <= i < n:
            raise ValueError(f"layers: index {i} is outside [0, {n}) for this model's {n} decoder layers")
        chosen.append(i)
    if not chosen:
        raise ValueError(f"layers: selects no decoder layer (give indices in [0, {n}), or None for all)")
    return sorted(set(chosen))


def _mlp_problem(mlp, family: Family) -> str | None:
    if mlp is None:
        return f"no .{family.mlp_attr}"
    missing = [n for n in family.projection_names if not isinstance(getattr(mlp, n, None), nn.Module)]
    if missing:
        return f"no {'/'.join(family.projection_names)} modules (MoE or another FFN form): left alone"
    return None


def patch(model, masking: float = 0.1, dropping: float = 0.1, mask_scale: bool = False,
          backend: str = "auto", layers=None) -> PatchReport:
    """Add Trans-PEFT knowledge masking and cross-layer knowledge dropping to ``model``'s gated FFNs.

    model: a transformers model (CausalLM or bare), a PEFT PeftModel around one, or a model with
        adapters added through transformers' PEFT integration. Patched in place.
    masking: p in [0, 1): each intermediate activation h[token, j] is zeroed with probability p.
    dropping: p_c in [0, 1]: each decoder layer's FFN is skipped with probability p_c per forward.
    mask_scale: rescale kept activations by 1 / (1 - p) (the paper's code does not).
    backend: "auto", "torch", "triton" or "cuda"; how the math runs, never what it draws.
    layers: decoder-layer indices to patch (default all).
    Only training mode changes; eval mode runs the original forward. Calling again replaces the
    settings and the set of patched layers. Returns a PatchReport; patching nothing raises.
    """
    settings = _settings(masking, dropping, mask_scale, backend)
    hf = _hf_model(model)
    family = _family(hf)
    decoder_layers = _decoder_layers(hf)
    selected = _select_layers(layers, len(decoder_layers))

    act_name = _activation_name(hf, family)
    report = PatchReport(type(hf).__name__, hf.config.model_type, settings.backend, settings.masking,
                         settings.dropping, settings.mask_scale)
    targets: list[_Target] = []
    activation = None
    for i in selected:
        mlp = getattr(decoder_layers[i], family.mlp_attr, None)
        problem = _mlp_problem(mlp, family)
        if problem is None and act_name not in CONFIG_NAMES:
            problem = f"activation {act_name!r} not supported (supported: {sorted(CONFIG_NAMES)})"
        if problem is not None:
            report.left_alone.append((i, type(mlp).__name__, problem))
            continue
        activation = activation_from_config_name(act_name)
        targets.append(_Target(i, mlp))
        for name in family.projection_names:
            report.count(name, read_projection(getattr(mlp, name)).reason)
    if not targets:
        reasons = "; ".join(f"layer {i} {cls}: {why}" for i, cls, why in report.left_alone)
        raise TypeError(f"model: {type(hf).__name__} has no FFN that can be patched in the selected layers ({reasons})")

    # Nothing below can fail: the model changes only from here on.
    _unpatch_all(model)
    skip_by_cond = not _cond_breaks_graphs(hf)
    for t in targets:
        t.mlp.__dict__[_ATTR] = MLPPatch(settings, family, activation, t.layer_index, t.mlp.__dict__.get("forward"),
                                         skip_by_cond)
        t.mlp.__dict__["forward"] = types.MethodType(patched_forward, t.mlp)
        report.patched_layers.append(t.layer_index)
    return report


def _unpatch_all(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        state = module.__dict__.pop(_ATTR, None)
        if state is None:
            continue
        if state.saved_forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = state.saved_forward
        count += 1
    return count


def unpatch(model: nn.Module) -> int:
    """Restore every patched MLP's original forward; returns how many were restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return _unpatch_all(model)


def is_patched(model: nn.Module) -> bool:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return any(_ATTR in m.__dict__ for m in model.modules())


def patch_settings(model: nn.Module) -> dict[int, MLPPatch]:
    """layer index -> the patch record of each patched MLP (for inspection and tests)."""
    return {m.__dict__[_ATTR].layer_index: m.__dict__[_ATTR] for m in model.modules() if _ATTR in m.__dict__}
