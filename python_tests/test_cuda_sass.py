"""The CUDA tensor-core activation passes (csrc/kernels/act_lora.cu) in their static SASS, compiled with
nvcc as the library builds them (no GPU needed): every variant runs its LoRA products on the tensor
cores (HMMA) and spills nothing, on sm_80 and sm_90a. Skipped without nvcc or cuobjdump."""
import subprocess

import pytest

from transpeft_kernels.kernels import sass
from transpeft_kernels.kernels.cuda import build


@pytest.mark.parametrize("arch", ["80", "90a"])
def test_tensor_core_activation_passes_use_mma_and_do_not_spill(tmp_path, arch):
    csrc, nvcc = build.find_csrc(), build.find_nvcc()
    if csrc is None or nvcc is None or sass.find_cuobjdump() is None:
        pytest.skip("nvcc, cuobjdump or the C++ sources not found")
    cubin = tmp_path / f"act_lora.sm_{arch}.cubin"
    cmd = [nvcc, *build.nvcc_compile_flags(csrc, archs=()), "-cubin", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           str(csrc / "kernels" / "act_lora.cu"), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = sass.cubin_metrics(str(cubin))
    names = subprocess.run(["c++filt"], input="\n".join(metrics), capture_output=True, text=True).stdout.splitlines()
    kernels = {n: m for n, m in zip(names, metrics.values()) if "act_fwd_lora_kernel" in n or "act_bwd_lora_kernel" in n}
    # 5 (base, adapter) dtype pairs x 3 activations x 3 rank tiles, forward and backward
    assert len(kernels) == 2 * 5 * 3 * 3, sorted(kernels)
    for name, m in kernels.items():
        assert m["tensor_core_instructions"] > 0, name
        assert m["spill_bytes"] == 0 and m["local_loads"] == 0 and m["local_stores"] == 0, (name, m)
