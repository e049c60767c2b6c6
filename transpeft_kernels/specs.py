"""Small value types shared by the reference, the ops layer and the backends.

They group the weights of one projection and of one gated MLP so that no function takes a long list
of positional tensors. Shapes use: M tokens (all leading dims flattened), d model width, I
intermediate width, r LoRA rank.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA adapter on a Linear: ``s * (dropout_q(x) A^T) B^T``.

    A: (r, d_in), B: (d_out, r), same floating dtype (often float32 on a bf16 base, as PEFT does).
    scaling: s = alpha / r (or alpha / sqrt(r) with rsLoRA). dropout: q in [0, 1).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float = 0.0


@dataclass(frozen=True)
class LinearWeights:
    """A Linear ``x W^T + b`` with an optional LoRA adapter. weight: (d_out, d_in), bias: (d_out,)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora: LoraWeights | None = None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """(weight, bias, A, B): the order in which the ops layer hands them to autograd."""
        lora = self.lora
        return (self.weight, self.bias, None if lora is None else lora.A, None if lora is None else lora.B)

    def with_tensors(self, weight, bias, A, B) -> "LinearWeights":
        lora = None if self.lora is None else LoraWeights(A, B, self.lora.scaling, self.lora.dropout)
        return LinearWeights(weight, bias, lora)


class Layout(str, enum.Enum):
    """How gate and up projections are stored.

    SPLIT: ``gate_proj`` and ``up_proj`` (Llama, Qwen, Gemma, ...).
    FUSED_GATE_UP: one ``gate_up_proj`` of width 2I, gate in the first half (Phi3, GLM, GLM4).
    """

    SPLIT = "split"
    FUSED_GATE_UP = "fused_gate_up"


@dataclass(frozen=True)
class GatedMLPWeights:
    """``y = down(act(gate(x)) * up(x))``. ``inputs`` is (gate, up) for SPLIT, (gate_up,) for FUSED_GATE_UP."""

    inputs: tuple[LinearWeights, ...]
    down: LinearWeights

    @property
    def layout(self) -> Layout:
        return Layout.SPLIT if len(self.inputs) == 2 else Layout.FUSED_GATE_UP

    @property
    def projections(self) -> tuple[LinearWeights, ...]:
        return (*self.inputs, self.down)


@dataclass(frozen=True)
class MaskSpec:
    """Knowledge masking: keep h[i, j] per ``reference.philox.keep_mask(seed, M, I, p)`` (a 16-bit Philox
    lane >= round(p * 65536): kept with probability 1 - p to within 2**-17); scale kept values by
    1 / (1 - p) when ``rescale`` (off by default, as in the paper's code)."""

    p: float
    rescale: bool = False

    @property
    def multiplier(self) -> float:
        return 1.0 / (1.0 - self.p) if self.rescale else 1.0


class SubSeed(enum.IntEnum):
    """Offsets added to a forward's base seed: one Philox key per random use inside a patched MLP.

    The fused gate_up projection draws its LoRA dropout from GATE.
    """

    MASK = 0
    GATE = 1
    UP = 2
    DOWN = 3


# Base seeds are drawn as torch.randint(SEED_BOUND, ()) on the input's device, once per forward
SEED_BOUND = 2**62


def sub_seed(seed: torch.Tensor | None, which: SubSeed) -> torch.Tensor | None:
    """Philox key of one random use, ``seed + which``, a tensor of seed's shape on its device; ``seed``
    is the int64 base seed drawn for the forward (None: none).

    All keys of a base seed are made by one addition on their first use and kept on the seed tensor
    (as long as it is not modified in place): a fused MLP step asks for keys about 8 times, and on a GPU
    each ``seed + k`` was a kernel launch of its own. The keys are views into that one result."""
    if seed is None:
        return None
    if torch.compiler.is_compiling() or seed.is_inference():  # no attributes on traced tensors, no version counter
        return seed + int(which)
    cached = getattr(seed, "_tpk_sub_seeds", None)
    if cached is None or cached[0] != seed._version:
        keys = seed.reshape(1) + stream_offsets(seed.device)
        cached = (seed._version, tuple(keys[i].reshape(seed.shape) for i in range(len(SubSeed))))
        seed._tpk_sub_seeds = cached
    return cached[1][which]


_OFFSETS: dict[torch.device, torch.Tensor] = {}


def stream_offsets(device: torch.device) -> torch.Tensor:
    """[0, 1, ..., len(SubSeed) - 1] as int64 on ``device``, made once per device (by the first step that
    draws sub-seeds there; perf/cases.py makes it before recording, as a steady-state step finds it)."""
    offsets = _OFFSETS.get(device)
    if offsets is None:
        offsets = _OFFSETS[device] = torch.arange(len(SubSeed), dtype=torch.int64, device=device)
    return offsets


def split_gate_up(outs, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, u) from the gate/up projection outputs: the two of SPLIT, or the halves of FUSED_GATE_UP's
    one (..., 2I) output, gate first (views, no copy)."""
    return tuple(outs[0].chunk(2, dim=-1)) if layout is Layout.FUSED_GATE_UP else (outs[0], outs[1])


# ---- argument checks shared by patch() and the commands ------------------------------------------
def type_name(value) -> str:
    """``str``, or ``numpy.float32`` for types outside builtins (numpy calls its bool ``bool`` too)."""
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_probability(name: str, value, upper_inclusive: bool) -> float:
    """``value`` as a float in [0, 1) (or [0, 1]); TypeError or ValueError naming ``name`` and the interval."""
    interval = "[0, 1]" if upper_inclusive else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float in {interval}, got {type_name(value)} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}") from None
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok or math.isnan(value):
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return value
