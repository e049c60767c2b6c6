"""``compile-check``: compile every Triton kernel variant for real GPU architectures, without a GPU.

For each architecture a child process without TRITON_INTERPRET compiles each variant listed in
kernels/triton/variants.py (each dtype and layout with the default config, and every autotune
config) with triton.compile(..., target=GPUTarget("cuda", arch, 32)), and checks the kernel's shared
memory against the device limit (sm_90: 232448 B, sm_80: 166912 B). Prints a table; exit status 1
if any variant fails.

Options:
  --sass        also read each variant's cubin with the cuobjdump of the triton wheel and record its
                static SASS metrics (kernels/sass.py): registers, spill bytes, instructions, tensor-core
                instructions, FFMA, and instructions per element for the elementwise kernels
                (masked_gated_act fwd/bwd; None for the others). Definitions: kernels/sass.py.
  --cuda        also compile the CUDA C++ kernels (csrc/kernels/*.cu) with ``nvcc -cubin`` for each
                architecture (sm_80, and sm_90a for 90, as the library is built) and record the same
                metrics for every kernel function (each template instantiation). The activation
                kernels take about a minute per architecture on 2 cores. instructions_per_element is
                None for them: they loop over columns, so a static count is not per element.
  --no-triton   skip the Triton variants (with --cuda: the CUDA kernels only)
  --only TEXT   only the Triton variants whose "kernel label" contains TEXT, and the CUDA functions
                whose "kernel variant" name contains it (repeatable; any one matches)
  --json OUT    write the records to OUT: {"header": {triton version, nvcc version, git commit,
                uncommitted changes to the kernels, date, archs, command}, "records": [...]}, one
                record per variant and architecture (kernel, variant, arch, registers, spill_bytes,
                instructions, tensor_core_instructions, ffma, instructions_per_element, ...)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

NAME = "compile-check"
HELP = "compile every Triton kernel variant for the given GPU architectures (no GPU needed) and check shared memory"

# The SASS fields every record carries first (the rest of kernels/sass.py's counts follow).
SASS_KEYS = ("registers", "spill_bytes", "instructions", "tensor_core_instructions", "ffma", "instructions_per_element")
# --arch value -> the nvcc SASS target the CUDA library is built for (kernels/cuda/build.py ARCHS)
CUDA_ARCH = {80: "80", 90: "90a"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities: 80, 90 (default 80,90)")
    p.add_argument("--sass", action="store_true",
                   help="also record SASS metrics of each cubin (registers, spills, instructions, tensor-core ops, FFMA)")
    p.add_argument("--cuda", action="store_true",
                   help="also compile csrc/kernels/*.cu with nvcc -cubin and record their SASS metrics (minutes)")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton variants")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help='only variants whose "kernel label" contains TEXT (repeatable)')
    p.add_argument("--json", metavar="OUT", help="write one JSON record per variant and architecture to OUT")


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


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- Triton ---------------------------------------------------------------------------------------

def _start_triton(archs, sass: bool, only) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _root() + os.pathsep + env.get("PYTHONPATH", "")
    extra = (["--sass"] if sass else []) + [a for o in only for a in ("--only", o)]
    # one child per architecture, run side by side
    return {a: subprocess.Popen([sys.executable, "-m", "transpeft_kernels.kernels.triton.variants", "--arch", str(a), *extra],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in archs}


def _triton_record(row: dict) -> dict:
    rec = dict(source="triton", kernel=row["kernel"], variant=row["label"], arch=f"sm_{row['arch']}",
               config=row["config"], phase=row.get("phase"), unit_strides=row.get("unit_strides"),
               ok=row["ok"], error=row["error"], shared=row["shared"], shared_limit=row["limit"],
               seconds=row["seconds"])
    m = row.get("sass")
    if m is not None:
        rec.update({k: m.get(k) for k in SASS_KEYS})
        rec.update({k: v for k, v in m.items() if k not in SASS_KEYS})
    return rec


# ---- CUDA C++ -------------------------------------------------------------------------------------

def _demangle(names: list[str]) -> dict[str, str]:
    """{mangled: demangled} through c++filt when it is installed, else the names unchanged."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = proc.stdout.splitlines()
    if proc.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


def _short_name(demangled: str) -> tuple[str, str]:
    """(kernel, variant) from a demangled name: the function name, and the name with its template
    arguments, without the return type, parameters and the project's namespaces."""
    s = re.sub(r"^void\s+", "", demangled)
    s = s.replace("(anonymous namespace)::", "")
    s = re.sub(r"\btranspeft::(cuda::)?", "", s)
    if s.endswith(")"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):  # the parameter list: the last balanced (...)
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    return s.split("<", 1)[0], s


def _nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else None


def cuda_records(archs, only=(), jobs: int | None = None) -> tuple[list[dict], list[str]]:
    """Compile each csrc/kernels/*.cu with ``nvcc -cubin`` for each arch (the library's flags, one
    SASS target per cubin) and return (records, errors): one record per kernel function and arch."""
    from ..kernels import sass
    from ..kernels.cuda import build

    csrc, nvcc = build.find_csrc(), build.find_nvcc()
    if csrc is None or nvcc is None:
        return [], ["--cuda: " + ("the CUDA sources (csrc/) are not in this installation" if csrc is None else "nvcc not found")]
    if sass.find_cuobjdump() is None:
        return [], ["--cuda: cuobjdump not found (it ships with the triton wheel)"]
    # the library's compile flags without its -gencode list (nvcc -cubin takes one target)
    flags = build.nvcc_compile_flags(csrc, archs=())
    tasks = [(src, a) for src in build.KERNEL_SOURCES for a in archs]
    records, errors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        def compile_one(task):
            src, a = task
            target = CUDA_ARCH[a]
            out = os.path.join(tmp, f"{os.path.basename(src)}.sm_{target}.cubin")
            cmd = [nvcc, *flags, "-cubin", "-gencode", f"arch=compute_{target},code=sm_{target}", str(csrc / src), "-o", out]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                return task, None, f"{' '.join(cmd)}:\n{proc.stderr[-3000:]}"
            return task, sass.cubin_metrics(out), None

        with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
            results = list(pool.map(compile_one, tasks))
    names = _demangle(sorted({n for _, m, _ in results if m for n in m}))
    for (src, a), metrics, err in results:
        if err:
            errors.append(err)
            continue
        for mangled, m in sorted(metrics.items()):
            kernel, variant = _short_name(names.get(mangled, mangled))
            text = f"{kernel} {variant}"
            if only and not any(o in text for o in only):
                continue
            rec = dict(source="cuda", file=f"csrc/{src}", kernel=kernel, variant=variant, mangled=mangled,
                       arch=f"sm_{CUDA_ARCH[a]}", ok=True, error="")
            rec.update({k: m.get(k) for k in SASS_KEYS if k != "instructions_per_element"})
            rec["instructions_per_element"] = None
            rec.update({k: v for k, v in m.items() if k not in SASS_KEYS})
            records.append(rec)
    return records, errors


# ---- output -----------------------------------------------------------------------------------------

def _git(*args) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=_root())
    except OSError:
        return None
    return proc.stdout.rstrip() if proc.returncode == 0 else None


def header(archs, args) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    changed = _git("status", "--porcelain", "--", "transpeft_kernels/kernels", "csrc")
    h = dict(triton=triton_version, commit=_git("rev-parse", "HEAD"),
             uncommitted_kernel_changes=sorted(line[3:] for line in changed.splitlines() if line.strip()) if changed else [],
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             archs=[] if args.no_triton else [f"sm_{a}" for a in archs],  # the Triton variants' targets
             command=" ".join(["python -m transpeft_kernels", *sys.argv[1:]]),
             definitions="transpeft_kernels/kernels/sass.py (static counts per thread; instructions_per_element = "
                         "instructions / elements per thread per program, elementwise kernels without loops only)")
    if args.cuda:
        from ..kernels.cuda import build

        nvcc = build.find_nvcc()
        h["nvcc"] = _nvcc_version(nvcc) if nvcc else None
        h["cuda_archs"] = [f"sm_{CUDA_ARCH[a]}" for a in archs]
    return h


def write_json(path: str, head: dict, records: list[dict]) -> None:
    """{"header": head, "records": [...]}, one record per line (diffs stay readable)."""
    with open(path, "w") as f:
        f.write('{"header": ' + json.dumps(head, indent=1) + ',\n "records": [\n')
        f.write(",\n".join("  " + json.dumps(r) for r in records))
        f.write("\n ]}\n")


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def _print_table(records, sass: bool) -> None:
    header_row = ("arch", "kernel", "variant", "config", "shared B", "limit B", "s")
    if sass:
        header_row += ("regs", "spill B", "instr", "TC", "FFMA", "ipe")
    header_row += ("result",)
    table = [header_row]
    for r in records:
        row = (r["arch"], r["kernel"], r["variant"], r.get("config") or "-", _fmt(r.get("shared")),
               _fmt(r.get("shared_limit")), f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-")
        if sass:
            row += tuple(_fmt(r.get(k)) for k in SASS_KEYS)
        table.append(row + ("ok" if r["ok"] else f"FAIL {r['error']}",))
    widths = [max(len(row[i]) for row in table) for i in range(len(header_row) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    archs = _archs(args.arch)
    sass = args.sass or args.cuda
    if not args.no_triton:
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserError("compile-check needs the triton package: pip install triton") from None
    if sass:
        from ..kernels.sass import find_cuobjdump

        if find_cuobjdump() is None:
            raise UserError("--sass/--cuda need cuobjdump (bundled in the triton wheel's backends/nvidia/bin)")
    procs = {} if args.no_triton else _start_triton(archs, args.sass, args.only)
    records, failures = [], 0
    cuda, cuda_errors = cuda_records(archs, args.only) if args.cuda else ([], [])
    for a, proc in procs.items():
        out, err = proc.communicate()
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if not got:
            why = f"no variant matches --only {args.only}" if args.only and proc.returncode == 0 else err[-3000:]
            print(f"sm_{a}: the compile process produced no results:\n{why}", file=sys.stderr)
            failures += 1
        records += [_triton_record(r) for r in got]
    _print_table(records, args.sass)
    bad = sum(not r["ok"] for r in records)
    failures += bad
    if procs:
        print(f"\n{len(records)} variants compiled for {', '.join(f'sm_{a}' for a in archs)}: "
              f"{len(records) - bad} ok, {bad} failed")
    if args.cuda:
        print()
        _print_table(cuda, True)
        for e in cuda_errors:
            print(f"CUDA compile failed: {e}", file=sys.stderr)
        failures += len(cuda_errors)
        print(f"\n{len(cuda)} CUDA kernel functions read for {', '.join(f'sm_{CUDA_ARCH[a]}' for a in archs)}, "
              f"{len(cuda_errors)} compile failures")
    if args.json:
        write_json(args.json, header(archs, args), records + cuda)
        print(f"wrote {len(records) + len(cuda)} records to {args.json}")
    return 1 if failures else 0
