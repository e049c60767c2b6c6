"""SASS metrics (kernels/sass.py) on stored cuobjdump listings, and ``compile-check --sass --json``.

The fixtures in data/ are excerpts of real ``cuobjdump -res-usage -sass`` output of Triton cubins
(sm_90a: the act backward and the dropout shrink, whose registers spill; sm_80: the shrink on HMMA):
whole instruction lines, a subset of each function, so the expected counts below are the excerpt's."""
import json
import os
import subprocess
import sys

import pytest

from transpeft_kernels.kernels import sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _read(name):
    with open(os.path.join(DATA, name)) as f:
        return f.read()


def test_sm90_excerpt_counts():
    text = _read("cuobjdump_sm90_excerpt.txt")  # -res-usage and -sass in one listing
    m = sass.function_metrics(text, text)
    assert sorted(m) == ["lora_shrink_kernel", "masked_gated_act_bwd_kernel"]

    act = m["masked_gated_act_bwd_kernel"]
    # 15 lines: the branch-to-self and the 2 NOPs after the last EXIT do not count
    assert act["instructions"] == 12
    assert act["tensor_core_instructions"] == 0  # HFMA2.MMA is an FMA, not a tensor-core op
    assert act["ffma"] == 3
    assert (act["global_loads"], act["global_stores"], act["mufu"]) == (2, 1, 1)
    assert (act["branches"], act["loops"], act["loop_body_instructions"]) == (0, 0, 0)
    assert (act["registers"], act["spill_bytes"], act["local_loads"], act["local_stores"]) == (80, 0, 0, 0)
    assert act["shared_static_bytes"] == 1024

    shrink = m["lora_shrink_kernel"]
    assert shrink["instructions"] == 18
    assert shrink["tensor_core_instructions"] == 2  # HGMMA.64x16x16.F32.BF16
    assert shrink["ffma"] == 0
    assert (shrink["registers"], shrink["stack_bytes"], shrink["spill_bytes"]) == (255, 72, 72)
    # LDL.64 + LDL + LDL.LU; STL.64 x 2 + STL
    assert (shrink["local_loads"], shrink["local_load_bytes"]) == (3, 16)
    assert (shrink["local_stores"], shrink["local_store_bytes"]) == (3, 20)
    assert (shrink["shared_loads"], shrink["async_copies"]) == (1, 1)  # @!PT LDS, LDGSTS
    # @!P1 BRA 0x12370 (forward), @!P1 BRA 0x1350 (back to the loop head), BRA 0x124a0 (forward)
    assert (shrink["branches"], shrink["loops"]) == (3, 1)
    # the loop 0x1350 .. 0x12350 holds 6 of the excerpt's lines: IMAD.WIDE, LDL.64, 2 HGMMA, LDL, the branch
    assert shrink["loop_body_instructions"] == 6


def test_sm80_excerpt_counts():
    text = _read("cuobjdump_sm80_excerpt.txt")
    m = sass.function_metrics(text, text)["lora_shrink_kernel"]
    assert m["instructions"] == 10
    assert m["tensor_core_instructions"] == 2  # HMMA.16816.F32.BF16 (one with a .reuse operand)
    assert (m["registers"], m["spill_bytes"], m["local_loads"]) == (161, 0, 0)
    assert (m["branches"], m["loops"]) == (3, 1)


def test_parse_details():
    text = _read("cuobjdump_sm90_excerpt.txt")
    ins = sass.parse_sass(text)["lora_shrink_kernel"]
    assert ins[0] == (0x0, "LDC", "R1, c[0x0][0x28]")
    assert (0x670, "LDS", "RZ, [RZ]") in ins  # the predicate is dropped
    assert ins[-1] == (0x12770, "NOP", "")
    assert sass.parse_res_usage(text)["lora_shrink_kernel"]["CONSTANT[0]"] == 608


def test_instructions_per_element():
    assert sass.instructions_per_element({"instructions": 1696, "loops": 0}, 16) == 106.0
    assert sass.instructions_per_element({"instructions": 1696, "loops": 0}, None) is None  # not elementwise
    assert sass.instructions_per_element({"instructions": 1696, "loops": 1}, 16) is None  # a loop: undefined


def test_missing_res_usage_gives_none():
    m = sass.function_metrics(_read("cuobjdump_sm80_excerpt.txt").split("code for sm_80")[1], "")
    assert m["lora_shrink_kernel"]["registers"] is None and m["lora_shrink_kernel"]["instructions"] == 10


# ---- compile-check --sass --json on two variants for sm_90 --------------------------------------------
ONLY = ("act_bwd bf16 act=0", "shrink x=bf16 A=bf16 drop=True R=64")


def test_compile_check_sass_json(tmp_path):
    pytest.importorskip("triton")
    if sass.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (the triton wheel bundles it in backends/nvidia/bin)")
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "transpeft_kernels", "compile-check", "--arch", "90", "--sass", "--json", str(out)]
    for o in ONLY:
        cmd += ["--only", o]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["header"]["triton"] and data["header"]["archs"] == ["sm_90"]
    recs = {r["kernel"]: r for r in data["records"]}
    assert sorted(recs) == ["lora_shrink_kernel", "masked_gated_act_bwd_kernel"]
    for r in recs.values():
        assert r["arch"] == "sm_90" and r["ok"]
        for k in ("kernel", "variant", "arch", "registers", "spill_bytes", "instructions", "tensor_core_instructions",
                  "ffma", "instructions_per_element"):
            assert k in r, k
        assert 0 < r["registers"] <= 255 and r["instructions"] > 0 and r["spill_bytes"] >= 0

    act = recs["masked_gated_act_bwd_kernel"]
    assert act["variant"].startswith("act_bwd bf16") and act["unit_strides"] == []
    assert act["loops"] == 0 and act["tensor_core_instructions"] == 0
    assert act["instructions_per_element"] == pytest.approx(act["instructions"] / act["elements_per_thread"], abs=0.01)
    # dg and du written with 16-byte stores: 2 bytes x elements per thread / 16 per output
    assert act["global_stores"] == 2 * (2 * act["elements_per_thread"] // 16)

    shrink = recs["lora_shrink_kernel"]
    assert shrink["instructions_per_element"] is None  # not elementwise
    assert shrink["tensor_core_instructions"] > 0  # bf16 tl.dot on sm_90: HGMMA
    assert shrink["loops"] >= 1  # the K loop
