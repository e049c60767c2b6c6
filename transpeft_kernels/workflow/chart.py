"""The demo's PNG chart: accuracy (and loss) of each adapter on the old and the new base (a bar only where the
results have that row), and Trans-PEFT's retention difference with its interval in the title."""
from __future__ import annotations

from pathlib import Path


def save_chart(results: dict, path: Path) -> Path:
    """Grouped bars per adapter (old base, new base): exact-match accuracy on the left, target loss on the
    right, retention written over each adapter's accuracy pair. Written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(dict.fromkeys(r["adapter"] for r in rows))
    value = {(r["adapter"], r["base"]): r for r in rows}
    x = range(len(names))
    width = 0.38
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((ax_acc, "accuracy", "exact-match accuracy"), (ax_loss, "loss", "answer loss (nats/token)")):
        for offset, base, color in ((-width / 2, "old", "#4C72B0"), (width / 2, "new", "#DD8452")):
            have = [i for i, n in enumerate(names) if (n, base) in value]  # e.g. no old-base row for a re-tuned adapter
            vals = [value[(names[i], base)][key] or 0.0 for i in have]
            ax.bar([i + offset for i in have], vals, width, label=f"{base} base", color=color)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=15)
        ax.set_ylabel(label)
        ax.legend(frameon=False)
    for i, n in enumerate(names):
        ret = results.get("retention", {}).get(n)
        top = max((value[(n, b)]["accuracy"] or 0.0) for b in ("old", "new") if (n, b) in value)
        if ret is not None:
            ax_acc.text(i, top + 0.01, f"retention {ret:.2f}", ha="center", va="bottom", fontsize=8)
    ax_acc.set_ylim(0, min(1.0, max([(r["accuracy"] or 0.0) for r in rows] + [0.05]) * 1.25 + 0.02))
    title = (f"Adapters on the old base and on the updated base ({results.get('old_base', '')}, "
             f"{results.get('mode', '')})")
    diff = (results.get("point") or {}).get("retention_minus_vanilla")
    if diff and diff.get("low") is not None:
        title += (f"\nTrans-PEFT retention minus vanilla's: {100 * diff['mean']:+.1f} points, 95% interval "
                  f"[{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]")
    fig.suptitle(title, fontsize=9)
    return write_png(fig, path)


def write_png(fig, path: Path) -> Path:
    """Lay out ``fig``, write it atomically as a PNG at ``path`` and close it."""
    import matplotlib.pyplot as plt

    from ..atomic_io import atomic_path

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
