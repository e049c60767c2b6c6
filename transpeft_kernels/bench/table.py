"""The stdout summary: one row per case and pass, one column per implementation.

Each cell is the median in ms and, for everything but vanilla, the speedup over vanilla in the same
row ("-" skipped, "ERR" failed, "MISMATCH" failed the numerics check: never timed). train_step rows also
give tokens/s per implementation.
"""
from __future__ import annotations

from .impls import IMPL_NAMES

_STATUS = {"skipped": "-", "error": "ERR", "numerics_mismatch": "MISMATCH"}


def _case_key(r: dict) -> tuple:
    shape = (r.get("label") or "") + (" tf32" if r.get("fp32_matmul") == "tf32" else "")  # TF32 allowed
    return (r["op"], r.get("model") or "", shape, r.get("M"), r.get("r"), r.get("lora_dropout"),
            r.get("checkpointing"), r["pass"])


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r.get("status") != "ok":
        return _STATUS.get(r.get("status"), "?")
    ms = r["median_ms"]
    text = f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"
    if r["impl"] != "vanilla" and r.get("speedup_vs_vanilla"):
        text += f" ({r['speedup_vs_vanilla']:.2f}x)"
    if r["op"] == "train_step" and r.get("tokens_per_s"):
        text += f" {r['tokens_per_s'] / 1e3:.1f}k tok/s"
    return text


def records_table(records: list[dict]) -> str:
    """The table of ``records`` (any mix of ops and presets), rows in first-seen order."""
    if not records:
        return "(no records)"
    impls = [n for n in IMPL_NAMES if any(r["impl"] == n for r in records)]
    rows: dict[tuple, dict[str, dict]] = {}
    for r in records:
        rows.setdefault(_case_key(r), {})[r["impl"]] = r
    head = ["op", "pass", "model", "shape", "M", "r", "q", "ckpt"] + [f"{n} ms" for n in impls]
    body = []
    for key, cells in rows.items():
        op, model, shape, M, rank, q, ckpt, pass_ = key
        ckpt_text = "" if ckpt is None else ("yes" if ckpt else "no")
        body.append([op, pass_, model, shape, str(M), str(rank), str(q), ckpt_text] + [_cell(cells.get(n)) for n in impls])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_lines(records: list[dict]) -> list[str]:
    """Environment and status counts: what the table was measured on and what did not run."""
    if not records:
        return ["no records"]
    env = records[0]
    where = env.get("gpu") or f"CPU ({env.get('cpu')})"
    lines = [f"measured on {where}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"transformers {env.get('transformers')}, peft {env.get('peft')}; commit {env.get('commit')}; "
             f"preset {env.get('preset')}"]
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append("records: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if env.get("preset") == "smoke" or not env.get("gpu"):
        lines.append("not performance figures: measured without a GPU (a harness check); GPU figures need a GPU")
    reasons = sorted({(r["impl"], r.get("reason")) for r in records if r["status"] == "skipped"}, key=str)
    for impl, reason in reasons:
        lines.append(f"skipped {impl}: {reason}")
    for r in records:
        if r["status"] in ("error", "numerics_mismatch"):
            lines.append(f"{r['status'].upper()} {r['impl']} {r['op']} {r['pass']}: {r.get('reason')}")
    return lines
