"""Gated-FFN activations and their derivatives: the spec for every backend.

    silu(g)      = g * sigmoid(g)
    silu'(g)     = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    gelu(g)      = g * Phi(g) = 0.5 * g * (1 + erf(g / sqrt(2)))
    gelu'(g)     = Phi(g) + g * phi(g),            phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
    gelu_tanh(g) = 0.5 * g * (1 + t),               t = tanh(c * (g + 0.044715 g^3)), c = sqrt(2 / pi)
    gelu_tanh'(g)= 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * c * (1 + 3 * 0.044715 g^2)

Forward values use torch's own functions so that an unmasked patched MLP reproduces the stock
transformers activation to the bit; derivatives are evaluated in float32 (or float64 for float64 input).
"""
from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F


class Activation(str, enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"


# transformers' config strings (``hidden_act`` / ``hidden_activation``) -> activation.
# gelu_new and gelu_fast are the tanh approximation written out by hand; equal up to rounding.
CONFIG_NAMES: dict[str, Activation] = {
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "gelu": Activation.GELU,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu_new": Activation.GELU_TANH,
    "gelu_fast": Activation.GELU_TANH,
}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_CUBIC = 0.044715


def activation_from_config_name(name: str) -> Activation:
    try:
        return CONFIG_NAMES[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(CONFIG_NAMES)}") from None


def act(g: torch.Tensor, activation: Activation) -> torch.Tensor:
    """act(g), same dtype as g."""
    if activation is Activation.SILU:
        return F.silu(g)
    if activation is Activation.GELU:
        return F.gelu(g)
    if activation is Activation.GELU_TANH:
        return F.gelu(g, approximate="tanh")
    raise ValueError(f"activation: expected one of {[a.value for a in Activation]}, got {activation!r}")


def act_grad(g: torch.Tensor, activation: Activation) -> torch.Tensor:
    """act'(g) in float32 (float64 for float64 g); formulas in the module docstring."""
    gf = g if g.dtype == torch.float64 else g.float()
    if activation is Activation.SILU:
        s = torch.sigmoid(gf)
        return s * (1 + gf * (1 - s))
    if activation is Activation.GELU:
        return 0.5 * (1 + torch.erf(gf * _INV_SQRT_2)) + gf * torch.exp(-0.5 * gf * gf) * _INV_SQRT_2PI
    if activation is Activation.GELU_TANH:
        g2 = gf * gf
        t = torch.tanh(_SQRT_2_OVER_PI * gf * (1 + _TANH_CUBIC * g2))
        return 0.5 * (1 + t) + 0.5 * gf * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _TANH_CUBIC * g2)
    raise ValueError(f"activation: expected one of {[a.value for a in Activation]}, got {activation!r}")
