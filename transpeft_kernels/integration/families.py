"""Model families with a gated FFN, as data: where the MLP sits, how its projections are stored, and
which config string names its activation. Adding a family is one line here (or ``register_family``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..specs import Layout

PROJECTION_NAMES = {
    Layout.SPLIT: ("gate_proj", "up_proj", "down_proj"),
    Layout.FUSED_GATE_UP: ("gate_up_proj", "down_proj"),
}


@dataclass(frozen=True)
class Family:
    """mlp_attr: the FFN's attribute on a decoder layer. act_keys: config attributes naming the
    activation, first one set wins. The MLP must compute ``down(act(gate(x)) * up(x))`` and skipping
    it must equal returning zeros (true when post-FFN norms are RMSNorm, or there are none)."""

    layout: Layout = Layout.SPLIT
    mlp_attr: str = "mlp"
    act_keys: tuple[str, ...] = ("hidden_act",)

    @property
    def projection_names(self) -> tuple[str, ...]:
        return PROJECTION_NAMES[self.layout]


_SPLIT = Family()
_GEMMA2 = Family(act_keys=("hidden_activation", "hidden_act"))
_FUSED = Family(layout=Layout.FUSED_GATE_UP)

# transformers ``config.model_type`` -> family. MoE families are listed for their dense layers; their
# sparse blocks have no gate/up/down projections and are reported as left alone.
FAMILIES: dict[str, Family] = {
    "llama": _SPLIT,
    "mistral": _SPLIT,
    "ministral": _SPLIT,
    "qwen2": _SPLIT,
    "qwen3": _SPLIT,
    "qwen3_moe": _SPLIT,
    "gemma": _SPLIT,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "olmo2": _SPLIT,
    "olmo3": _SPLIT,
    "granite": _SPLIT,
    "smollm3": _SPLIT,
    "cohere": _SPLIT,
    "cohere2": _SPLIT,
    "helium": _SPLIT,
    "exaone4": _SPLIT,
    "phi3": _FUSED,
    "glm": _FUSED,
    "glm4": _FUSED,
}


def register_family(model_type: str, family: Family) -> None:
    """Teach ``patch`` a new transformers ``model_type`` whose MLP has the standard gated form."""
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"model_type: expected a non-empty str, got {model_type!r}")
    if not isinstance(family, Family):
        raise TypeError(f"family: expected transpeft_kernels.Family, got {type(family).__name__}")
    FAMILIES[model_type] = family
