"""The CUDA tensor-core passes (csrc/kernels/act_lora.cu, lora_reduce.cu, lora_shrink.cu, lora_expand.cu) in
their static SASS, compiled
with nvcc as the library builds them (no GPU needed): every variant runs its LoRA products on the tensor
cores (HMMA) and spills nothing, on sm_80 and sm_90a. Skipped without nvcc or cuobjdump."""
import subprocess

import pytest

from transpeft_kernels.kernels import sass
from transpeft_kernels.kernels.cuda import build

# source -> (its tensor-core kernels, variant count): 5 (operand, adapter) dtype pairs x 3 rank tiles x
# 3 activations forward and backward (the forward also with the gate/up expands at rank tiles 16 and 32
# for all 5 pairs and 64 for the 2 with 16-bit adapters, the backward with the gate/up dB for the 4 pairs with 16-bit activations), or x 2 load
# paths (packed, unpacked); the shrink and expand: any (x or y, adapter) dtype pair of 3 x 3, the shrink
# x 2 load paths (a 16-bit x under fp32 adapters in its EXACT form only), the expand forward and dX
SOURCES = {
    "act_lora.cu": (("act_fwd_lora_kernel", "act_bwd_lora_kernel"), 2 * 5 * 3 * 3 + (5 * 2 + 2) * 3 + 4 * 2 * 3),
    "lora_reduce.cu": (("token_reduce_kernel",), 5 * 3 * 2),
    "lora_shrink.cu": (("shrink_tile_kernel",), 9 * 3 * 2),
    "lora_expand.cu": (("expand_tile_kernel",), 9 * 3 * 2),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_tensor_core_passes_use_mma_and_do_not_spill(tmp_path, arch, source):
    csrc, nvcc = build.find_csrc(), build.find_nvcc()
    if csrc is None or nvcc is None or sass.find_cuobjdump() is None:
        pytest.skip("nvcc, cuobjdump or the C++ sources not found")
    cubin = tmp_path / f"{source}.sm_{arch}.cubin"
    cmd = [nvcc, *build.nvcc_compile_flags(csrc, archs=()), "-cubin", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           str(csrc / "kernels" / source), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = sass.cubin_metrics(str(cubin))
    names = subprocess.run(["c++filt"], input="\n".join(metrics), capture_output=True, text=True).stdout.splitlines()
    wanted, count = SOURCES[source]
    kernels = {n: m for n, m in zip(names, metrics.values()) if any(k in n for k in wanted)}
    assert len(kernels) == count, sorted(kernels)
    for name, m in kernels.items():
        assert m["tensor_core_instructions"] > 0, name
        assert m["spill_bytes"] == 0 and m["local_loads"] == 0 and m["local_stores"] == 0, (name, m)
    # fp32 adapters over a 16-bit x: x exact in tf32, two mmas per k step where an fp32 x takes three
    # (tile_mma's A_EXACT / B_EXACT; the error budgets cannot tell them apart)
    exact_pairs = {"lora_reduce.cu": ("token_reduce_kernel<{x}, float, {rt}, true>", "bf16_t", "float"),
                   "lora_shrink.cu": ("shrink_tile_kernel<{x}, float, {rt}, true, {e}>", "bf16_t", "float")}
    if source in exact_pairs:
        pattern, x16, x32 = exact_pairs[source]
        # "void transpeft::cuda::(anonymous namespace)::token_reduce_kernel<transpeft::bf16_t, float, 16, true>(...)"
        by_signature = {n.split("(anonymous namespace)::")[-1].split("(")[0].replace("transpeft::", ""): m
                        for n, m in kernels.items()}
        for rt in (16, 32, 64):
            exact = by_signature[pattern.format(x=x16, rt=rt, e="true")]["tensor_core_instructions"]
            full = by_signature[pattern.format(x=x32, rt=rt, e="false")]["tensor_core_instructions"]
            assert 3 * exact == 2 * full, (source, rt, exact, full)
