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


# Compiled in a child process (no TRITON_INTERPRET): the default-config variant of every compile-check
# case with an fp32 LoRA dot and no fp32 base dot, with its SASS metrics.
_FP32_LORA_SASS = r"""
import json, sys
from transpeft_kernels.kernels.triton import configs, variants as V
from transpeft_kernels.kernels.triton._common import FP32, TF32

def fp32(*codes):  # fp32 adapters, as tf32x3 or as single tf32 products
    return any(c in (FP32, TF32) for c in codes)

def fp32_lora_only(c):
    if isinstance(c, V.Shrink):
        return fp32(c.adapter)
    if isinstance(c, V.Expand):
        return fp32(c.lora) and c.x != FP32
    if isinstance(c, V.GateUp):
        return fp32(c.gate_lora, c.up_lora) and c.x != FP32
    if isinstance(c, V.TokenReduce):
        return fp32(c.dot) and c.what != "dW"
    if isinstance(c, V.ActBwdLora):
        return fp32(c.gate_lora, c.up_lora, c.down_lora) and c.x != FP32
    if isinstance(c, V.ExpandAdd):
        return fp32(c.lora) and c.x != FP32
    if isinstance(c, V.GateUpLoraAct):
        return fp32(c.gate_lora, c.up_lora) and c.x != FP32
    return False

for arch in (80, 90):
    for case in filter(fp32_lora_only, V.CASES):
        (v,) = case.variants(configs.CONFIG_SETS[case.family].default_for(f"sm_{arch}", case.elem_bytes), [])
        row = V.compile_variant(v, arch, sass=True)
        k = v.constexprs
        if v.kernel.endswith("lora_shrink_kernel"):
            products = k["BLOCK_M"] * k["BLOCK_K"] * k["BLOCK_R"]
        elif v.kernel.endswith("token_reduce_kernel"):
            products = k["BLOCK_A"] * k["BLOCK_B"] * k["BLOCK_T"]
        else:
            products = k["BLOCK_M"] * k["BLOCK_N"] * k["BLOCK_R"]
        row["lora_ffma_if_on_cuda_cores"] = products // (32 * v.num_warps)
        print(json.dumps(row), flush=True)
"""


def _compiled_rows(script: str) -> list[dict]:
    """The JSON lines ``script`` prints, run in a child process without TRITON_INTERPRET (compiling for
    sm_80 / sm_90 needs no GPU)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_fp32_lora_dots_run_on_tensor_cores_without_spills():
    """Every fp32-adapter variant (default config, sm_80 and sm_90) runs its LoRA dots on the tensor
    cores (tf32x3, or single tf32 products under torch's "high" precision: HMMA / HGMMA) and does not
    spill. On the CUDA cores one tile's LoRA dot alone would take a thread (tile products / threads) FFMA
    per rank or K step; the variants chosen here have no fp32 base product, so their FFMA count must stay
    below that (the epilogue's activation may use a few)."""
    rows = _compiled_rows(_FP32_LORA_SASS)
    assert {r["arch"] for r in rows} == {80, 90} and len(rows) >= 20
    for r in rows:
        m = r["sass"]
        what = f'sm_{r["arch"]} {r["label"]} {r["config"]}: {m}'
        assert r["ok"], what
        assert m["tensor_core_instructions"] > 0, what
        assert m["ffma"] < r["lora_ffma_if_on_cuda_cores"], what
        assert m["spill_bytes"] == 0, what


# Compiled in a child process: pairs of variants in one config (the exact one's default), the one with an
# operand stored in a 16-bit dtype and the same one with that operand in fp32, with their SASS metrics.
_EXACT_PAIRS_SASS = r"""
import json
from transpeft_kernels.kernels.triton import configs, variants as V
from transpeft_kernels.kernels.triton._common import BF16, FP16, FP32

PAIRS = [
    ("shrink, x bf16", V.Shrink(x=BF16, adapter=FP32, dropout=True), V.Shrink(x=FP32, adapter=FP32, dropout=True)),
    ("shrink, x fp16", V.Shrink(x=FP16, adapter=FP32, dropout=False), V.Shrink(x=FP32, adapter=FP32, dropout=False)),
    ("dA, x bf16", V.TokenReduce(what="dA", p=FP32, q=BF16, dot=FP32, q_dropout=True, colsum=False, block_a=16),
     V.TokenReduce(what="dA", p=FP32, q=FP32, dot=FP32, q_dropout=True, colsum=False, block_a=16)),
    ("dB, dY bf16", V.TokenReduce(what="dB", p=BF16, q=FP32, dot=FP32, q_dropout=False, colsum=False, block_b=16),
     V.TokenReduce(what="dB", p=FP32, q=FP32, dot=FP32, q_dropout=False, colsum=False, block_b=16)),
]
for arch in (80, 90):
    for what, exact, full in PAIRS:
        config = configs.CONFIG_SETS[exact.family].default_for(f"sm_{arch}", exact.elem_bytes)
        rows = [V.compile_variant(c.variants(config, [])[0], arch, sass=True) for c in (exact, full)]
        print(json.dumps(dict(arch=arch, what=what, rows=rows)), flush=True)
"""


def test_fp32_dots_with_a_16_bit_operand_issue_two_tf32_products_of_three():
    """fp32 adapters over an operand stored in bf16 or fp16 (exact in tf32): the shrink and the dA / dB
    reductions issue two tf32 MMAs where the same kernel with that operand in fp32 issues three
    (_common.lora_dot_split). The error budgets cannot tell the two apart (both are within tf32x3's), so
    this is the test that the exact path is taken."""
    pairs = _compiled_rows(_EXACT_PAIRS_SASS)
    assert len(pairs) == 8
    for p in pairs:
        exact, full = (r["sass"]["tensor_core_instructions"] for r in p["rows"])
        assert all(r["ok"] for r in p["rows"]), p
        assert full > 0 and 3 * exact == 2 * full, (p["arch"], p["what"], exact, full)


# Compiled in a child process: each fp32-adapter kernel as single tf32 products (TF32) and as tf32x3
# (FP32) in one config, with their SASS metrics, and the ratio of their tensor-core instructions.
_TF32_PAIRS_SASS = r"""
import dataclasses, json
from transpeft_kernels.kernels.triton import configs, variants as V
from transpeft_kernels.kernels.triton._common import BF16, FP32, TF32

def fp32(case):  # the same case with tf32x3 dots
    fields = {f.name: (FP32 if getattr(case, f.name) == TF32 else getattr(case, f.name)) for f in dataclasses.fields(case)}
    return type(case)(**fields)

PAIRS = [  # (what, the TF32 case, tf32x3 MMAs per single one: 2 with a 16-bit operand, 3 without)
    ("shrink, x bf16", V.Shrink(x=BF16, adapter=TF32, dropout=True), 2),
    ("t = dY B", V.Shrink(x=BF16, adapter=TF32, dropout=False), 2),
    ("dA, x bf16", V.TokenReduce(what="dA", p=TF32, q=BF16, dot=TF32, q_dropout=True, colsum=False, block_a=16), 2),
    ("dB, dY bf16", V.TokenReduce(what="dB", p=BF16, q=TF32, dot=TF32, q_dropout=False, colsum=False, block_b=16), 2),
    ("expand (C operand)", V.ExpandAdd(x=BF16, lora=TF32, dropout=False, accumulate=False), 3),
    ("gate/up pass", V.GateUpLoraAct(x=BF16, act=0, gate_lora=TF32, up_lora=TF32, mask=True), 3),
    ("one-pass backward r 16", V.ActBwdLora(x=BF16, act=0, gate_lora=TF32, up_lora=TF32, down_lora=TF32), 2),
]
for arch in (80, 90):
    for what, single, ratio in PAIRS:
        config = configs.CONFIG_SETS[single.family].default_for(f"sm_{arch}", single.elem_bytes)
        rows = [V.compile_variant(c.variants(config, [])[0], arch, sass=True) for c in (single, fp32(single))]
        print(json.dumps(dict(arch=arch, what=what, ratio=ratio, rows=rows)), flush=True)
"""


def test_single_tf32_dots_issue_one_mma_per_product():
    """Under torch's "high" fp32 matmul precision (code TF32) each fp32-adapter LoRA product is one tf32
    MMA: the same kernel in one config issues half the tensor-core instructions of its tf32x3 form where
    one operand is 16-bit (two MMAs there) and a third where both are fp32 (three). The interpreted tests
    (test_triton_tf32.py) see the precision; this sees the instructions."""
    pairs = _compiled_rows(_TF32_PAIRS_SASS)
    assert len(pairs) == 14
    for p in pairs:
        single, full = (r["sass"]["tensor_core_instructions"] for r in p["rows"])
        assert all(r["ok"] and r["sass"]["spill_bytes"] == 0 for r in p["rows"]), p
        assert single > 0 and p["ratio"] * single == full, (p["arch"], p["what"], single, full)
