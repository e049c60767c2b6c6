"""Benchmark records: one JSON object per line, each carrying the environment it was measured in.

Fields of every record (None where not applicable):
    op ("lora_linear" | "gated_mlp" | "train_step"), pass ("fwd" | "bwd" | "fwd+bwd"), impl, status
    ("ok" | "skipped" | "error" | "numerics_mismatch"), reason, dtype, model, label, M, d, n, I, r,
    masking, lora_dropout, median_ms, iqr_ms, reps, timer, buffers, peak_mem_bytes (max_memory_allocated
    during one call), peak_extra_bytes (that minus what was allocated before the call), saved_bytes
    (what autograd keeps for backward, parameters excluded), speedup_vs_vanilla (vanilla median / this
    median, same case and pass), numerics_rel_err, numerics_mode, preset, device, gpu, torch, triton,
    cuda, transformers, peft, commit, time.
train_step records add dropping, checkpointing, layers, tokens_per_s.
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..provenance import commit, environment  # noqa: F401  (part of this module's API)

REQUIRED_FIELDS = (
    "op", "pass", "impl", "status", "dtype", "M", "d", "n", "I", "r", "masking", "lora_dropout", "median_ms",
    "peak_mem_bytes", "saved_bytes", "speedup_vs_vanilla", "gpu", "torch", "triton", "cuda", "commit",
)


def make_record(env: dict, preset: str, **fields) -> dict:
    rec = {k: None for k in REQUIRED_FIELDS}
    rec.update(fields)
    rec.update(env)
    rec["preset"] = preset
    rec["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return rec


def add_speedups(records: list[dict]) -> None:
    """Set speedup_vs_vanilla on records of one case and pass (in place): vanilla median / own median."""
    vanilla = [r for r in records if r["impl"] == "vanilla" and r.get("median_ms")]
    base = vanilla[0]["median_ms"] if vanilla else None
    for r in records:
        r["speedup_vs_vanilla"] = round(base / r["median_ms"], 4) if base and r.get("median_ms") else None


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Append whole lines in one write and fsync, so a run cut short keeps everything measured so far.
    A run killed inside the write leaves at most a torn last line (no newline): ``read_jsonl`` ignores
    it, and the next append cuts it off first rather than gluing a record onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    with path.open("ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(max(0, end - 65536))
            tail = f.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut < 0 and end > len(tail):
                    raise ValueError(f"{path}: its last line is longer than 64 KiB and unterminated; "
                                     "not a records file to append to")
                f.truncate(end - len(tail) + cut + 1)
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file. A last line without its newline that does not parse is a record torn
    by a killed run and is ignored; any other line that does not parse is an error naming it."""
    text = Path(path).read_text()
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: the write was cut short
                continue
            raise ValueError(f"{path}:{n}: not a JSON record ({e.msg}); the file was edited or is not "
                             "a results JSONL") from None
    return out
