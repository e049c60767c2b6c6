"""The perf model's weights for the CUDA tensor-core passes (perf/ledger.py: CUDA_ACT_LORA_ELEMENT_WEIGHT's forward
"fwd" / "fwd_gu" and one-pass backward "bwd" / "bwd_db", CUDA_LORA_TILE_ELEMENT_WEIGHT's shrink and expand,
CUDA_TOKEN_REDUCE_ELEMENT_WEIGHT) against the static SASS of csrc/kernels as nvcc builds them now (sm_90a,
bf16 activations, silu; no GPU needed): a kernel change that moves an instruction count past the tolerance
fails here until the weight is re-derived. Skipped without nvcc or cuobjdump.

The rule, fixed here and applied to each kernel's SASS (the per-kernel facts it needs, ``Pass``, are written
by hand from the kernel source): the passes' step loops hold what runs (their 16-byte staging takes a
compile-time number of trips and the element-by-element fallbacks are calls out of line, or, in the
forward, refused by the launcher), so per step a thread issues the step loop's static count plus each
inner loop's further trips: the element loop (the longest loop without tensor-core instructions, where the
pass has one) 2 trips (kGroupsPerThread); a staging loop the bytes a thread stages per step over the bytes
its body loads; a k loop its tensor-core instructions per step over those in its body; the expand's b
staging, element by element once per 128 rows, its main loop's trips (elements over the loads in its
body) over 4. Over the elements a thread owns per step, less the mask streams the model charges as Philox
work, over the roofline's 24 per elementwise element. Assumed, not counted: threads that skip a trip
(half of them at rank 16 in the rank-row staging) and warps without a tile (the forward's S_d at rank 16:
2 of 4) are charged as if they ran it, a small overcharge; the work once per block outside the step loop
is left out (a few percent where a block runs many steps). The ledger's values came from this rule, so the
test holds them to the kernels as they change; it cannot tell whether the rule is right, which a GPU
profile would."""
import subprocess
from dataclasses import dataclass

import pytest

from transpeft_kernels.kernels import sass
from transpeft_kernels.kernels.cuda import build
from transpeft_kernels.perf import ledger as L
from transpeft_kernels.perf import roofline as R

TOLERANCE = 0.12  # as test_ledger_weights.py
MASK_CHARGE = R.PHILOX_INSTR / 8 + R.MASK_LANE_INSTR


@dataclass(frozen=True)
class Pass:
    """One kernel's step as the derivation sees it. ``staged``: bytes a thread stages per step in each
    staging loop; ``k_before`` / ``k_after``: HMMA per step of a k loop before / after the element loop;
    ``nested``: the step loop is the longest loop inside the kernel's longest one (the shrink walks row
    blocks, then K); ``prologue``: (elements a thread stages before the step loop, steps that serve)."""

    source: str
    function: str
    elements: int
    masks: int
    staged: int
    k_before: int = 0
    k_after: int = 0
    element_loop: bool = True
    nested: bool = False
    prologue: tuple[int, int] | None = None


def _hmma(tiles_per_warp: int, depth: int, fp32: bool, mmas_fp32: int) -> int:
    """HMMA per step of a k loop: tiles x k steps (8 deep in tf32, 16 in 16-bit) x mmas (tf32x3: 3, 2 with
    a 16-bit operand) x 2 (a 16 x 16 mma is two HMMA)."""
    return tiles_per_warp * (depth // (8 if fp32 else 16)) * (mmas_fp32 if fp32 else 1) * 2


def act_fwd(fp32: bool, rt: int, gu: bool) -> Pass:
    ta = "float" if fp32 else "bf16_t"
    return Pass("act_lora.cu", f"act_fwd_lora_kernel<bf16_t, {ta}, (Activation)0, {rt}, {str(gu).lower()}>", 16, 2,
                64 * rt * (4 if fp32 else 2) // 128, k_before=_hmma(2, rt, fp32, 3),
                k_after=_hmma(-(-(2 * rt // 16) // 4), 64, fp32, 2))


def act_bwd(fp32: bool, rt: int, db: bool) -> Pass:
    ta = "float" if fp32 else "bf16_t"
    return Pass("act_lora.cu", f"act_bwd_lora_kernel<bf16_t, {ta}, (Activation)0, {rt}, {str(db).lower()}>", 16, 2,
                32 * rt * (4 if fp32 else 2) // 128, k_before=_hmma(2, rt, fp32, 3), k_after=_hmma(rt // 16, 32, fp32, 2))


def expand(fp32: bool, rt: int, grad: bool) -> Pass:
    ta = "float" if fp32 else "bf16_t"
    return Pass("lora_expand.cu", f"expand_tile_kernel<bf16_t, {ta}, {rt}, {str(grad).lower()}>", 16, int(grad),
                32 * rt * (4 if fp32 else 2) // 128, k_before=_hmma(2, rt, fp32, 3), prologue=(64 * rt // 128, 4))


def shrink(fp32: bool, rt: int, x16: bool = True) -> Pass:
    """Packed x; fp32 adapters over a 16-bit x take the exact form (two mmas per k step), over an fp32 x three."""
    ta, tx = ("float" if fp32 else "bf16_t"), ("bf16_t" if x16 else "float")
    exact = fp32 and x16
    return Pass("lora_shrink.cu", f"shrink_tile_kernel<{tx}, {ta}, {rt}, true, {str(exact).lower()}>", 32, 1,
                64 * rt * (4 if fp32 else 2) // 128, k_after=_hmma(rt // 16, 64, fp32, 2 if exact else 3),
                element_loop=False, nested=True)


def token_reduce(fp32: bool, rt: int) -> Pass:  # packed x; fp32 adapters over it: the exact form
    ta = "float" if fp32 else "bf16_t"
    return Pass("lora_reduce.cu", f"token_reduce_kernel<bf16_t, {ta}, {rt}, true>", 16, 1,
                32 * rt * (4 if fp32 else 2) // 128, k_after=_hmma(rt // 16, 32, fp32, 2))


def _load_bytes(opcode: str) -> int:
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in opcode:
            return size
    return 4


def step_instructions(instructions, p: Pass) -> float:
    """What a thread issues per step of pass ``p`` (module docstring)."""
    executable = sass.executable(instructions)
    loops = sass.loops(instructions)

    def inside(lp, of):
        return lp is not of and of.target <= lp.target and lp.branch <= of.branch

    def loads(lp):
        return [op for a, op, _ in executable if lp.target <= a <= lp.branch and op.startswith("LDG")]

    step = max(loops, key=lambda lp: lp.instructions)
    if p.nested:
        step = max((lp for lp in loops if inside(lp, step)), key=lambda lp: lp.instructions)
    inner = [lp for lp in loops if inside(lp, step)]
    # the rule counts each inner loop's trips on their own: a loop inside another would be counted twice
    assert not any(inside(a, b) for a in inner for b in inner), (p.function, inner)
    element = max((lp for lp in inner if lp.tensor_core == 0), key=lambda lp: lp.instructions) \
        if p.element_loop else None
    total = float(step.instructions)
    for lp in inner:
        if lp is element:
            trips = 2
        elif lp.tensor_core == 0:
            loaded = sum(_load_bytes(op) for op in loads(lp))
            assert loaded and p.staged % loaded == 0, (p.function, lp, loaded, p.staged)
            trips = p.staged // loaded
        else:
            per_step = p.k_before if element is not None and lp.target < element.target else p.k_after
            assert per_step and per_step % lp.tensor_core == 0, (p.function, lp, per_step)
            trips = per_step // lp.tensor_core
        total += (trips - 1) * lp.instructions
    if p.prologue is not None:
        items, steps = p.prologue
        main = max((lp for lp in loops if lp.branch < step.target), key=lambda lp: lp.instructions)
        total += main.instructions * (items // len(loads(main))) / steps
    return total


A, T, E = L.CUDA_ACT_LORA_ELEMENT_WEIGHT, L.CUDA_LORA_TILE_ELEMENT_WEIGHT, L.CUDA_TOKEN_REDUCE_ELEMENT_WEIGHT
# (the ledger's weight, the pass): fp32 adapters over the bf16 activations (the exact forms the model's
# cases run), and the shrink's fp32-x form
ROWS = [
    *((A[("fwd", f, b)], act_fwd(f, 64 if b else 16, False)) for f in (False, True) for b in (False, True)),
    *((A[("fwd_gu", f, b)], act_fwd(f, 64 if b else 16, True)) for f, b in ((False, False), (True, False), (False, True))),
    *((A[("bwd", f, b)], act_bwd(f, 64 if b else 16, False)) for f in (False, True) for b in (False, True)),
    *((A[("bwd_db", f, False)], act_bwd(f, 16, True)) for f in (False, True)),
    *((T[("expand_grad" if g else "expand", f, b)], expand(f, 64 if b else 16, g))
      for f in (False, True) for b in (False, True) for g in (False, True)),
    *((T[("shrink_exact" if f else "shrink", f, b)], shrink(f, 64 if b else 16)) for f in (False, True) for b in (False, True)),
    *((T[("shrink", True, b)], shrink(True, 64 if b else 16, x16=False)) for b in (False, True)),  # an fp32 base
    *((E[(f, b)], token_reduce(f, 64 if b else 16)) for f in (False, True) for b in (False, True)),
]


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """{source: {demangled function name without namespaces: parsed SASS}} for the sources in ROWS (sm_90a)."""
    csrc, nvcc = build.find_csrc(), build.find_nvcc()
    if csrc is None or nvcc is None or sass.find_cuobjdump() is None:
        pytest.skip("nvcc, cuobjdump or the C++ sources not found")
    out = tmp_path_factory.mktemp("cuda_weights")
    procs = {}
    for source in sorted({p.source for _, p in ROWS}):
        cmd = [nvcc, *build.nvcc_compile_flags(csrc, archs=()), "-cubin", "-gencode", "arch=compute_90a,code=sm_90a",
               str(csrc / "kernels" / source), "-o", str(out / f"{source}.cubin")]
        procs[source] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found = {}
    for source, proc in procs.items():
        _, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-3000:]
        functions = sass.parse_sass(sass.dump(str(out / f"{source}.cubin"))[0])
        names = subprocess.run(["c++filt"], input="\n".join(functions), capture_output=True, text=True).stdout.splitlines()
        # "void transpeft::cuda::(anonymous namespace)::act_fwd_lora_kernel<transpeft::bf16_t, float, ...>(...)"
        found[source] = {name.split("(anonymous namespace)::")[-1].replace("transpeft::", ""): ins
                         for name, ins in zip(names, functions.values())}
    return found


@pytest.mark.parametrize("weight,p", ROWS, ids=[p.function for _, p in ROWS])
def test_cuda_pass_weight_matches_its_sass(cubins, weight, p):
    found = [ins for name, ins in cubins[p.source].items() if name.startswith(p.function + "(")]
    assert len(found) == 1, f"{p.function}: {len(found)} matches"
    count = step_instructions(found[0], p)
    derived = (count / p.elements - p.masks * MASK_CHARGE) / R.ELEMENTWISE_INSTR
    assert abs(derived - weight) <= TOLERANCE * weight, (
        f"{p.function}: the ledger charges {weight:.2f} elementwise units per element; its sm_90a SASS now gives "
        f"{derived:.2f} ({count:.0f} instructions per step of {p.elements} elements): re-derive the weight in "
        f"perf/ledger.py")
