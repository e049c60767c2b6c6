"""What ``patch`` did, printable: MLPs patched, per projection how many run fused and why others fell back."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ProjectionCount:
    fused: int = 0
    fallback: Counter = field(default_factory=Counter)  # reason -> count


@dataclass
class PatchReport:
    model_class: str
    model_type: str
    backend: str
    masking: float
    dropping: float
    mask_scale: bool
    patched_layers: list[int] = field(default_factory=list)
    projections: dict[str, ProjectionCount] = field(default_factory=dict)
    left_alone: list[tuple[int, str, str]] = field(default_factory=list)  # (layer, MLP class, reason)

    @property
    def mlps_patched(self) -> int:
        return len(self.patched_layers)

    def count(self, projection: str, reason: str | None) -> None:
        entry = self.projections.setdefault(projection, ProjectionCount())
        if reason:
            entry.fallback[reason] += 1
        else:
            entry.fused += 1

    def __str__(self) -> str:
        lines = [
            f"transpeft_kernels: patched {self.mlps_patched} MLPs of {self.model_class} ({self.model_type}), "
            f"backend={self.backend}, masking={self.masking}, dropping={self.dropping}, mask_scale={self.mask_scale}",
            f"  layers: {_ranges(self.patched_layers)}",
        ]
        for name, c in self.projections.items():
            fb = sum(c.fallback.values())
            detail = "; ".join(f"{n} x {r}" for r, n in c.fallback.most_common())
            lines.append(f"  {name:<13} fused {c.fused:>3}, own forward {fb:>3}" + (f" ({detail})" if detail else ""))
        for layer, cls, reason in self.left_alone:
            lines.append(f"  left alone: layer {layer} {cls}: {reason}")
        return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(out) or "none"
