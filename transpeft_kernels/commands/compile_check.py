"""``compile-check``: compile every Triton kernel variant for real GPU architectures, without a GPU.

For each architecture a child process without TRITON_INTERPRET compiles each variant listed in
kernels/triton/variants.py (each dtype and layout with the default config, and every autotune
config) with triton.compile(..., target=GPUTarget("cuda", arch, 32)), and checks the kernel's shared
memory against the device limit (sm_90: 232448 B, sm_80: 166912 B). Prints a table; exit status 1
if any variant fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

NAME = "compile-check"
HELP = "compile every Triton kernel variant for the given GPU architectures (no GPU needed) and check shared memory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities: 80, 90 (default 80,90)")


def _archs(text: str) -> list[int]:
    from ..errors import UserError

    try:
        archs = [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--arch: expected comma-separated integers such as 80,90, got {text!r}") from None
    bad = [a for a in archs if a not in (80, 90)]
    if bad or not archs:
        raise UserError(f"--arch: supported architectures are 80 and 90, got {text!r}")
    return archs


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    archs = _archs(args.arch)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UserError("compile-check needs the triton package: pip install triton") from None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # one child per architecture, run side by side
    procs = {a: subprocess.Popen([sys.executable, "-m", "transpeft_kernels.kernels.triton.variants", "--arch", str(a)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in archs}
    rows, failures = [], 0
    for a, proc in procs.items():
        out, err = proc.communicate()
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if not got:
            print(f"sm_{a}: the compile process produced no results:\n{err[-3000:]}", file=sys.stderr)
            failures += 1
        rows += got
    header = ("arch", "kernel", "variant", "config", "shared B", "limit B", "s", "result")
    table = [header] + [
        (f"sm_{r['arch']}", r["kernel"], r["label"], r["config"], "-" if r["shared"] is None else str(r["shared"]),
         str(r["limit"]), f"{r['seconds']:.1f}", "ok" if r["ok"] else f"FAIL {r['error']}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    failures += sum(not r["ok"] for r in rows)
    print(f"\n{len(rows)} variants compiled for {', '.join(f'sm_{a}' for a in archs)}: "
          f"{len(rows) - sum(not r['ok'] for r in rows)} ok, {sum(not r['ok'] for r in rows)} failed")
    return 1 if failures else 0
