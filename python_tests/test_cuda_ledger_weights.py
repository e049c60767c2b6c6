"""The perf model's weights for the CUDA tensor-core activation passes (perf/ledger.py CUDA_ACT_LORA_ELEMENT_WEIGHT:
the forward "fwd" / "fwd_gu", the one-pass backward "bwd" / "bwd_db") against the static SASS of
act_lora.cu as nvcc builds it now (sm_90a, bf16 base, silu; no GPU needed): a kernel change that moves an
instruction count past the tolerance fails here until the weight is re-derived. Skipped without nvcc or
cuobjdump.

The passes' step loops hold what runs (the forward's launcher checks the alignment its 16-byte staging
needs; the backward's element-by-element fallback is a call out of the loop), so per step (32 rows x 64
columns) a thread issues the loop's static count plus each inner loop's further trips: the element loop
(the longest loop without tensor-core instructions) 2 trips (kGroupsPerThread); a staging loop the bytes
a thread stages per step over the bytes its body loads; a k loop its tensor-core instructions per step
over those in its body. Over the 16 elements a thread owns per step, less the two mask streams the model
charges as Philox work, over the roofline's 24 per elementwise element."""
import subprocess

import pytest

from transpeft_kernels.kernels import sass
from transpeft_kernels.kernels.cuda import build
from transpeft_kernels.perf import ledger as L
from transpeft_kernels.perf import roofline as R

TOLERANCE = 0.12  # as test_ledger_weights.py
ELEMENTS = 32 * 64 // 128  # a step's (kBM, kBN) tile over kLoraThreads
MASK_CHARGE = R.PHILOX_INSTR / 8 + R.MASK_LANE_INSTR


def _tensor_core_per_step(kernel: str, before_element_loop: bool, fp32: bool, rt: int) -> int:
    """HMMA instructions per step of a pass's k loop. A 16 x 16 mma is two HMMA; tf32 k steps are 8 deep,
    16-bit ones 16; tf32x3 takes 3 mmas per k step, 2 where one operand holds 16-bit values (h', dg, du).
    forward: z_g, z_u = S B^T (before the element loop; two tiles per warp, K = rank, both operands in the
    adapter dtype) and S_d = xd A_d^T (after; the (32, RT) tiles over 4 warps, K = 64 columns, xd exact);
    backward: z = t_d A_d (before; two tiles per warp, K = rank) and the reductions t^T xd, S^T dg
    (after; RT / 16 tiles per warp, K = 32 rows, the 16-bit operand exact)."""
    k_tile = 8 if fp32 else 16
    if before_element_loop:
        return 2 * (rt // k_tile) * (3 if fp32 else 1) * 2
    if kernel == "fwd":
        return -(-(2 * rt // 16) // 4) * (64 // k_tile) * (2 if fp32 else 1) * 2
    return (rt // 16) * (32 // k_tile) * (2 if fp32 else 1) * 2


def _load_bytes(opcode: str) -> int:
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in opcode:
            return size
    return 4


def step_instructions(instructions, kernel: str, fp32: bool, rt: int) -> int:
    """What a thread issues per step of the forward (``kernel`` "fwd") or the backward ("bwd") (module
    docstring). The staging loops move (64, RT) tiles per step in the forward (A_d's columns, B's rows)
    and (32, RT) tiles in the backward (t_d's rows; the dB variant's S_g and S_u), in the adapter dtype."""
    executable = sass.executable(instructions)
    loops = sass.loops(instructions)
    outer = max(loops, key=lambda lp: lp.instructions)
    inner = [lp for lp in loops if lp is not outer and outer.target <= lp.target and lp.branch <= outer.branch]
    element = max((lp for lp in inner if lp.tensor_core == 0), key=lambda lp: lp.instructions)
    staged = (64 if kernel == "fwd" else 32) * rt * (4 if fp32 else 2) // 128  # bytes per thread per tile
    total = outer.instructions
    for lp in inner:
        if lp is element:
            trips = 2
        elif lp.tensor_core == 0:
            loaded = sum(_load_bytes(op) for a, op, _ in executable
                         if lp.target <= a <= lp.branch and op.startswith("LDG"))
            assert loaded and staged % loaded == 0, (lp, loaded, staged)
            trips = staged // loaded
        else:
            per_step = _tensor_core_per_step(kernel, lp.target < element.target, fp32, rt)
            assert per_step % lp.tensor_core == 0, (lp, per_step)
            trips = per_step // lp.tensor_core
        total += (trips - 1) * lp.instructions
    return total


# (weight key, the kernel and its template arguments after the base dtype)
ROWS = [
    (("fwd", False, False), "act_fwd_lora_kernel", "bf16_t, (Activation)0, 16, false"),
    (("fwd", True, False), "act_fwd_lora_kernel", "float, (Activation)0, 16, false"),
    (("fwd", False, True), "act_fwd_lora_kernel", "bf16_t, (Activation)0, 64, false"),
    (("fwd", True, True), "act_fwd_lora_kernel", "float, (Activation)0, 64, false"),
    (("fwd_gu", False, False), "act_fwd_lora_kernel", "bf16_t, (Activation)0, 16, true"),
    (("fwd_gu", True, False), "act_fwd_lora_kernel", "float, (Activation)0, 16, true"),
    (("fwd_gu", False, True), "act_fwd_lora_kernel", "bf16_t, (Activation)0, 64, true"),
    (("bwd", False, False), "act_bwd_lora_kernel", "bf16_t, (Activation)0, 16, false"),
    (("bwd", True, False), "act_bwd_lora_kernel", "float, (Activation)0, 16, false"),
    (("bwd", False, True), "act_bwd_lora_kernel", "bf16_t, (Activation)0, 64, false"),
    (("bwd", True, True), "act_bwd_lora_kernel", "float, (Activation)0, 64, false"),
    (("bwd_db", False, False), "act_bwd_lora_kernel", "bf16_t, (Activation)0, 16, true"),
    (("bwd_db", True, False), "act_bwd_lora_kernel", "float, (Activation)0, 16, true"),
]


@pytest.fixture(scope="module")
def act_lora_sass(tmp_path_factory):
    csrc, nvcc = build.find_csrc(), build.find_nvcc()
    if csrc is None or nvcc is None or sass.find_cuobjdump() is None:
        pytest.skip("nvcc, cuobjdump or the C++ sources not found")
    cubin = tmp_path_factory.mktemp("cuda_weights") / "act_lora.sm_90a.cubin"
    cmd = [nvcc, *build.nvcc_compile_flags(csrc, archs=()), "-cubin", "-gencode", "arch=compute_90a,code=sm_90a",
           str(csrc / "kernels" / "act_lora.cu"), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    functions = sass.parse_sass(sass.dump(str(cubin))[0])
    names = subprocess.run(["c++filt"], input="\n".join(functions), capture_output=True, text=True).stdout.splitlines()
    # "void transpeft::cuda::(anonymous namespace)::act_fwd_lora_kernel<transpeft::bf16_t, float, ...>(...)"
    return {name.split("(anonymous namespace)::")[-1].replace("transpeft::", ""): ins
            for name, ins in zip(names, functions.values())}


@pytest.mark.parametrize("key,kernel,args", ROWS, ids=[f"{k[0]} fp32={k[1]} r64={k[2]}" for k, _, _ in ROWS])
def test_cuda_pass_weight_matches_its_sass(act_lora_sass, key, kernel, args):
    kernel = f"{kernel}<bf16_t, {args}>"
    found = [ins for name, ins in act_lora_sass.items() if name.startswith(kernel + "(")]
    assert len(found) == 1, f"{kernel}: {len(found)} matches"
    kind, fp32, big = key
    count = step_instructions(found[0], "fwd" if kind.startswith("fwd") else "bwd", fp32, 64 if big else 16)
    derived = (count / ELEMENTS - 2 * MASK_CHARGE) / R.ELEMENTWISE_INSTR
    weight = L.CUDA_ACT_LORA_ELEMENT_WEIGHT[key] + L.CUDA_EXACT_OPERAND_DELTA[(kind, big)]
    assert abs(derived - weight) <= TOLERANCE * weight, (
        f"{kernel}: the ledger charges {weight:.2f} elementwise units per element; its sm_90a SASS now gives "
        f"{derived:.2f} ({count} instructions per step): re-derive the weight in perf/ledger.py")
