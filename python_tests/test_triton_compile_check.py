"""``compile-check`` for sm_80 and sm_90 in its own process (no GPU needed, no TRITON_INTERPRET).

Catches what the interpreter cannot: code the real compiler rejects (e.g. non-constexpr globals),
and kernels whose shared memory exceeds the device limit. A cold Triton cache makes the first run
take a few minutes on 2 cores; later runs reuse the cache (~/.triton/cache)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_check_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "transpeft_kernels", "compile-check", "--arch", "80,90"],
                         env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "0 failed" in out.stdout
    for arch in ("sm_80", "sm_90"):
        for kernel in ("masked_gated_act_fwd_kernel", "masked_gated_act_bwd_kernel", "lora_shrink_kernel",
                       "gemm_lora_expand_kernel", "token_reduce_kernel", "gate_up_act_kernel"):
            assert any(line.startswith(arch) and kernel in line for line in out.stdout.splitlines()), (arch, kernel)


def test_compile_check_rejects_unknown_arch():
    out = subprocess.run([sys.executable, "-m", "transpeft_kernels", "compile-check", "--arch", "75"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "--arch" in out.stderr
