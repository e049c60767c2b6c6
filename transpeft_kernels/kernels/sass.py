"""Static SASS metrics of compiled kernels, read from ``cuobjdump -sass`` and ``cuobjdump -res-usage``.

The parsing functions work on text only (no torch, no triton import), so they can be tested on a
stored listing; ``find_cuobjdump`` and ``dump`` run the ``cuobjdump`` that the triton wheel bundles
(``triton/backends/nvidia/bin``) on a cubin.

What is counted, per kernel function (``function_metrics``):

    registers                 REG from -res-usage: registers per thread
    stack_bytes, local_bytes  STACK and LOCAL from -res-usage: per-thread local memory (stack frame,
                              and local memory outside it)
    spill_bytes               stack_bytes + local_bytes. For Triton kernels this is the register
                              spill area (they have no local arrays); for CUDA C++ kernels a local
                              array also lives there, so read it with local_loads/local_stores
    local_loads, local_stores LDL / STL instructions (static count), and local_load_bytes /
                              local_store_bytes: the bytes those instructions move per thread, each
                              counted once (LDL = 4 B, LDL.64 = 8 B, LDL.128 = 16 B, LDL.U8 = 1 B, ...)
    instructions              every SASS instruction of the function except NOP and the trailing
                              branch-to-self that ends the code (alignment padding, never executed)
    tensor_core_instructions  HMMA, HGMMA, IMMA, IGMMA, QGMMA, BGMMA, BMMA, DMMA, OMMA, QMMA (and the
                              UTC*MMA forms). HFMA2.MMA is *not* one: it is a half-precision FMA
                              (compilers use it as a move) issued to another pipe
    ffma                      FFMA (fp32 fused multiply-add, any modifier: .FTZ, .SAT, .RZ, ...)
    global_loads/stores       LDG / STG;  shared_loads: LDS, LDSM;  shared_stores: STS, STSM
    async_copies              LDGSTS (cp.async) and UTMALDG (TMA loads)
    mufu                      MUFU (special-function unit: exp2, rcp, rsqrt, ...)
    branches                  BRA / BRX / JMP / JMX (the trailing branch-to-self excluded)
    loops                     backward branches (target address below the branch): 0 means the code
                              is straight-line apart from forward branches and early exits
    loop_body_instructions    the instructions of the longest loop body (a backward branch's target up
                              to the branch): what a thread issues per iteration of a kernel's main
                              loop, e.g. per row step of act_bwd_lora; 0 without loops

All counts are static: an instruction in a loop body counts once, whatever the trip count, and an
instruction on a path that is skipped at run time counts too. ``instructions_per_element`` below is
the one derived figure; it is only defined for code without loops.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

TENSOR_CORE_OPCODES = frozenset({
    "HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "BMMA", "DMMA", "OMMA", "QMMA",
    "UTCHMMA", "UTCIMMA", "UTCQMMA", "UTCOMMA", "UTCBMMA",
})
FFMA_OPCODES = frozenset({"FFMA", "FFMA32I"})
_BRANCH_OPCODES = frozenset({"BRA", "BRX", "JMP", "JMX"})
_WIDTH_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}

# "        /*01a0*/   @!P0 LOP3.LUT R50, R50, UR9, RZ, 0xfc, !PT ;   /* 0x0000000932327c12 */"
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;\s*/\*\s*0x[0-9a-fA-F]+\s*\*/")
_PREDICATE = re.compile(r"^@!?U?P(?:T|\d+)\s+")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RES_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")
_HEX = re.compile(r"0x([0-9a-fA-F]+)")


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """The instructions of each function in a ``cuobjdump -sass`` listing:
    {function name (as printed, i.e. mangled): [(address, opcode with modifiers, operands), ...]}.
    Predicates (``@P0``, ``@!UPT``) are dropped; the opcode keeps its modifiers (``LDG.E.128``)."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            body = _PREDICATE.sub("", m.group(2).strip())
            opcode, _, operands = body.partition(" ")
            current.append((int(m.group(1), 16), opcode, operands.strip()))
    return out


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """{function name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., "CONSTANT[0]": .., ...}}
    from a ``cuobjdump -res-usage`` listing (the ``Function name:`` line, then its fields)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _RES_FUNCTION.match(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is not None and "REG:" in line:
            current.update({k: int(v) for k, v in _RES_FIELD.findall(line)})
            current = None
    return out


def _base(opcode: str) -> str:
    return opcode.split(".", 1)[0]


def _local_bytes(opcode: str) -> int:
    """Bytes per thread moved by one LDL/STL: the width modifier, 4 B without one."""
    for mod in opcode.split(".")[1:]:
        if mod in _WIDTH_BYTES:
            return _WIDTH_BYTES[mod]
    return 4


def _branch_target(operands: str) -> int | None:
    m = _HEX.search(operands)
    return int(m.group(1), 16) if m else None


def executable(instructions: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions that count: without NOPs and without branches to their own address (the
    trap that ends every function, followed by padding)."""
    return [ins for ins in instructions
            if _base(ins[1]) != "NOP"
            and not (_base(ins[1]) == "BRA" and _branch_target(ins[2]) == ins[0])]


@dataclass(frozen=True)
class Loop:
    """One loop of a function's static SASS: from a backward branch's ``target`` up to the ``branch``
    itself; ``instructions`` in that range (nested loops' included), ``tensor_core`` of them HMMA and the like."""

    target: int
    branch: int
    instructions: int
    tensor_core: int


def loops(instructions: list[tuple[int, str, str]]) -> list[Loop]:
    """Every loop of one function (``parse_sass``'s list), by address. A static count times each loop's
    trip count is what a thread issues where no branch inside skips code; the perf model's CUDA weights
    are derived that way (python_tests/test_cuda_ledger_weights.py)."""
    ins = executable(instructions)
    out = []
    for addr, op, operands in ins:
        target = _branch_target(operands) if _base(op) in _BRANCH_OPCODES else None
        if target is not None and target < addr:
            body = [o for a, o, _ in ins if target <= a <= addr]
            out.append(Loop(target, addr, len(body), sum(_base(o) in TENSOR_CORE_OPCODES for o in body)))
    return sorted(out, key=lambda lp: (lp.target, lp.branch))


def count(instructions: list[tuple[int, str, str]]) -> dict[str, int]:
    """The static counts of one function's instructions (see the module docstring)."""
    ins = executable(instructions)
    bases = Counter(_base(op) for _, op, _ in ins)
    branches = [(addr, operands) for addr, op, operands in ins if _base(op) in _BRANCH_OPCODES]
    back = [(t, addr) for addr, operands in branches if (t := _branch_target(operands)) is not None and t < addr]
    loops = len(back)
    # the longest loop body: instructions from a backward branch's target to the branch itself
    loop_body = max((sum(1 for a, _, _ in ins if t <= a <= end) for t, end in back), default=0)
    return dict(
        instructions=len(ins),
        tensor_core_instructions=sum(n for b, n in bases.items() if b in TENSOR_CORE_OPCODES),
        ffma=sum(n for b, n in bases.items() if b in FFMA_OPCODES),
        local_loads=bases["LDL"],
        local_stores=bases["STL"],
        local_load_bytes=sum(_local_bytes(op) for _, op, _ in ins if _base(op) == "LDL"),
        local_store_bytes=sum(_local_bytes(op) for _, op, _ in ins if _base(op) == "STL"),
        global_loads=bases["LDG"],
        global_stores=bases["STG"],
        shared_loads=bases["LDS"] + bases["LDSM"],
        shared_stores=bases["STS"] + bases["STSM"],
        async_copies=bases["LDGSTS"] + bases["UTMALDG"],
        mufu=bases["MUFU"],
        branches=len(branches),
        loops=loops,
        loop_body_instructions=loop_body,
    )


def instructions_per_element(metrics: dict, elements_per_thread: int | None) -> float | None:
    """Static instructions per element of an elementwise kernel, per thread:
    ``instructions / elements_per_thread``, where elements_per_thread is the number of elements one
    thread handles in one program (tile elements / threads per program).

    Meaning: for a kernel with no loops (``loops == 0``) every thread issues each instruction at most
    once per program, so this is what one thread issues per element of a full tile, the
    per-program set-up (index math, seed load) spread over the tile, when no branch skips code.
    A warp issues the same count per 32 elements. It is NOT a measured count: branches that skip
    code (early exits, a slow path for large arguments) make the executed count lower, and partial
    tiles at the edges are not modelled. None when ``elements_per_thread`` is None (not an
    elementwise kernel) or the code has loops (a static count then says nothing per element)."""
    if not elements_per_thread or metrics.get("loops", 1):
        return None
    return round(metrics["instructions"] / elements_per_thread, 2)


def function_metrics(sass_text: str, res_text: str) -> dict[str, dict]:
    """{function name: metrics} for every function of one cubin's listings (``cuobjdump -sass`` and
    ``cuobjdump -res-usage`` of the same file). A function missing from -res-usage gets None for
    the resource fields."""
    res = parse_res_usage(res_text)
    out = {}
    for name, instructions in parse_sass(sass_text).items():
        r = res.get(name)
        stack = None if r is None else r.get("STACK", 0)
        local = None if r is None else r.get("LOCAL", 0)
        out[name] = dict(
            registers=None if r is None else r.get("REG"),
            stack_bytes=stack,
            local_bytes=local,
            spill_bytes=None if r is None else stack + local,
            shared_static_bytes=None if r is None else r.get("SHARED"),
            **count(instructions),
        )
    return out


# ---- running cuobjdump -------------------------------------------------------------------------

def find_cuobjdump() -> str | None:
    """The cuobjdump bundled with the triton wheel (found without importing triton), else $PATH's."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    from shutil import which

    return which("cuobjdump")


def dump(cubin: bytes | str, cuobjdump: str | None = None) -> tuple[str, str]:
    """(``cuobjdump -sass`` text, ``cuobjdump -res-usage`` text) of a cubin given as bytes or a path.
    Raises RuntimeError when cuobjdump is missing or fails."""
    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships in triton/backends/nvidia/bin of the triton wheel)")
    tmp = None
    if isinstance(cubin, (bytes, bytearray)):
        fd, tmp = tempfile.mkstemp(suffix=".cubin")
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        path = tmp
    else:
        path = cubin
    try:
        texts = []
        for flag in ("-sass", "-res-usage"):
            proc = subprocess.run([tool, flag, path], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{tool} {flag} {path} failed: {proc.stderr.strip()[-2000:]}")
            texts.append(proc.stdout)
        return texts[0], texts[1]
    finally:
        if tmp is not None:
            os.unlink(tmp)


def cubin_metrics(cubin: bytes | str, cuobjdump: str | None = None) -> dict[str, dict]:
    """``function_metrics`` of a cubin (bytes or path)."""
    return function_metrics(*dump(cubin, cuobjdump))
