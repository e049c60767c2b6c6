"""The chart: speedup over vanilla per shape, one panel per op and pass, the floor marked.

Bars: each implementation's speedup (vanilla median / its median) in one row of the table; the dashed
line at 1 is vanilla; the floor (frozen base GEMMs only) is drawn as a black tick, the bound no
implementation that computes the LoRA update can reach. PNG through matplotlib; where matplotlib is not
installed (the offline GPU image has none), a dependency-free SVG of the same chart is written instead
and ``python -m transpeft_kernels bench --chart-from results.jsonl`` makes the PNG later.
"""
from __future__ import annotations

from pathlib import Path

from ..atomic_io import atomic_path, atomic_write_text


COLORS = {"vanilla_compiled": "#8c8c8c", "torch": "#4c72b0", "triton": "#dd8452", "cuda": "#55a868"}
BAR_IMPLS = ("vanilla_compiled", "torch", "triton", "cuda")


def _label(r: dict) -> str:
    parts = [r.get("model") or "", r.get("label") or "", f"M={r.get('M')}", f"r={r.get('r')}", f"q={r.get('lora_dropout')}"]
    if r.get("fp32_matmul") == "tf32":
        parts.append("tf32")
    if r.get("checkpointing") is not None:
        parts.append("ckpt" if r["checkpointing"] else "no ckpt")
    return " ".join(p for p in parts if p)


def panels(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{"op pass": {case label: {impl: speedup}}} for measured records, insertion-ordered."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        if r.get("status") != "ok" or not r.get("speedup_vs_vanilla") or r["impl"] == "vanilla":
            continue
        out.setdefault(f"{r['op']} {r['pass']}", {}).setdefault(_label(r), {})[r["impl"]] = r["speedup_vs_vanilla"]
    return out


def _title(records: list[dict]) -> str:
    env = records[0] if records else {}
    where = env.get("gpu") or "CPU (smoke: not a performance figure)"
    return f"speedup over vanilla PEFT, {where}, torch {env.get('torch')}, commit {env.get('commit')}"


def write_chart(records: list[dict], out_dir: Path) -> Path:
    """Write speedup.png (or speedup.svg without matplotlib) under ``out_dir``; returns its path."""
    data = panels(records)
    if not data:
        raise ValueError("records: no measured speedups to chart (every implementation skipped or failed?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
    except ImportError:
        path = out_dir / "speedup.svg"
        atomic_write_text(path, _svg(data, _title(records)))
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(2.6, 0.35 * len(cases) + 1.2) for cases in data.values()]
    fig, axes = plt.subplots(len(data), 1, figsize=(12.5, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (panel, cases) in zip(axes[:, 0], data.items()):
        impls = [n for n in BAR_IMPLS if any(n in v for v in cases.values())]
        bar_h = 0.8 / max(1, len(impls))
        labels = list(cases)
        for k, impl in enumerate(impls):
            ys = [i + (k - (len(impls) - 1) / 2) * bar_h for i in range(len(labels))]
            vals = [cases[c].get(impl, 0.0) for c in labels]
            ax.barh(ys, vals, height=bar_h, color=COLORS[impl], label=impl)
        floor = [(i, cases[c]["floor"]) for i, c in enumerate(labels) if "floor" in cases[c]]
        if floor:
            ax.scatter([v for _, v in floor], [i for i, _ in floor], marker="|", s=400, color="black", label="floor (base GEMMs)", zorder=3)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(panel, fontsize=9, loc="left")
        ax.set_xlabel("speedup over vanilla (x)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(_title(records), fontsize=9)
    fig.tight_layout()
    path = out_dir / "speedup.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _svg(data: dict, title: str) -> str:
    """The same chart as SVG text (no dependencies): horizontal bars, floor ticks, a line at 1x."""
    width, left, row_h, scale_w = 1000, 330, 16, 600
    vmax = max(max(v.values()) for cases in data.values() for v in cases.values())
    vmax = max(vmax, 1.0) * 1.05
    x = lambda v: left + v / vmax * scale_w  # noqa: E731
    parts, y = [], 30
    parts.append(f'<text x="10" y="18" font-size="12">{_esc(title)}</text>')
    for panel, cases in data.items():
        parts.append(f'<text x="10" y="{y + 14}" font-size="12" font-weight="bold">{_esc(panel)}</text>')
        y += 22
        for label, vals in cases.items():
            impls = [n for n in BAR_IMPLS if n in vals]
            parts.append(f'<text x="10" y="{y + 11}" font-size="9">{_esc(label)}</text>')
            bh = row_h / max(1, len(impls))
            for k, impl in enumerate(impls):
                parts.append(f'<rect x="{left}" y="{y + k * bh:.1f}" width="{x(vals[impl]) - left:.1f}" height="{bh:.1f}" '
                             f'fill="{COLORS[impl]}"><title>{impl} {vals[impl]:.2f}x</title></rect>')
            if "floor" in vals:
                fx = x(vals["floor"])
                parts.append(f'<line x1="{fx:.1f}" y1="{y - 2}" x2="{fx:.1f}" y2="{y + row_h + 2}" stroke="black" stroke-width="2">'
                             f'<title>floor {vals["floor"]:.2f}x</title></line>')
            y += row_h + 6
        parts.append(f'<line x1="{x(1.0):.1f}" y1="{y - (row_h + 6) * len(cases) - 4}" x2="{x(1.0):.1f}" y2="{y}" '
                     'stroke="black" stroke-dasharray="4 3"/>')
        y += 10
    legend = "  ".join(f"{n}: {COLORS[n]}" for n in BAR_IMPLS) + "  floor: black tick  vanilla: dashed line at 1x"
    parts.append(f'<text x="10" y="{y + 12}" font-size="10">{_esc(legend)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 24}" font-family="sans-serif">'
            + "".join(parts) + "</svg>\n")


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
