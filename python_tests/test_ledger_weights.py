"""The roofline model's issue weights of our Triton kernels (perf/ledger.py) against the static SASS they
were read off, recompiled now: a kernel edit that changes its instruction count by more than the
tolerance fails here until its weight is re-derived (the model judges the kernel work by these weights).

Each weight is (static instructions per element of its defining variant - 18.4 per mask stream) / 24,
with the defining variant compiled for sm_90 in its family's default config (the first variant with the
label), "per element" = per element a thread handles per program (or per loop iteration, for the
kernel whose weight is read off its loop body). The tolerance (12 %) leaves room for a Triton release
that moves a few instructions; a weight derived from other code is usually off by far more.
"""
import json
import os
import subprocess
import sys

import pytest

from transpeft_kernels.kernels import sass
from transpeft_kernels.perf import ledger as L
from transpeft_kernels.perf.roofline import ELEMENTWISE_INSTR, MASK_LANE_INSTR, PHILOX_INSTR
from transpeft_kernels.reference.philox import MASK_ELEMENTS_PER_CALL


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_CHARGE = PHILOX_INSTR / MASK_ELEMENTS_PER_CALL + MASK_LANE_INSTR  # 18.4: what the model charges a mask stream per element
TOLERANCE = 0.12

#       weight in the ledger, the defining variant's label, the SASS count it was read off, mask streams
ROWS = [
    (L.MASKED_ACT_ELEMENT_WEIGHT[("masked_gated_act_fwd_kernel", True)], "act_fwd bf16 act=0 mask=True",
     "instructions", 1),
    (L.MASKED_ACT_ELEMENT_WEIGHT[("masked_gated_act_fwd_kernel", False)], "act_fwd bf16 act=0 mask=False",
     "instructions", 0),
    (L.MASKED_ACT_ELEMENT_WEIGHT[("masked_gated_act_bwd_kernel", True)], "act_bwd bf16 act=0 mask=True",
     "instructions", 1),
    (L.MASKED_ACT_ELEMENT_WEIGHT[("masked_gated_act_bwd_kernel", False)], "act_bwd bf16 act=0 mask=False",
     "instructions", 0),
    (L.EPILOGUE_ELEMENT_WEIGHT[("lora_expand_add_kernel", False, True, 16)], "expand_add x=bf16 lora=fp32 mask=False",
     "instructions", 0),
    *((L.EPILOGUE_ELEMENT_WEIGHT[("lora_expand_add_kernel", False, False, r)], "expand_add x=bf16 lora=bf16 mask=False" + sfx,
       "instructions", 0) for r, sfx in ((16, ""), (32, " r=32"), (64, " r=64"))),
    (L.EPILOGUE_ELEMENT_WEIGHT[("lora_expand_add_kernel", True, True, 16)], "expand_into x=bf16 lora=fp32 mask=True terms=2",
     "instructions", 2),
    *((L.EPILOGUE_ELEMENT_WEIGHT[("lora_expand_add_kernel", True, False, r)], "expand_into x=bf16 lora=bf16 mask=True terms=2" + sfx,
       "instructions", 2) for r, sfx in ((16, ""), (32, " r=32"), (64, " r=64"))),
    (L.EPILOGUE_ELEMENT_WEIGHT[("gate_up_lora_act_kernel", True, True, 16)], "gate_up_lora_act x=bf16 act=0 lora=(fp32,fp32) mask=True",
     "instructions", 1),
    *((L.EPILOGUE_ELEMENT_WEIGHT[("gate_up_lora_act_kernel", True, False, r)], "gate_up_lora_act x=bf16 act=0 lora=(bf16,bf16) mask=True" + sfx,
       "instructions", 1) for r, sfx in ((16, ""), (32, " r=32"), (64, " r=64"))),
    (L.GATE_UP_NO_LORA_WEIGHT, "gate_up_lora_act x=bf16 act=0 lora=(-,-) mask=True", "instructions", 1),
    # one further trip of a rank loop: its body
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("lora_expand_add_kernel", False, True)], "expand_add x=bf16 lora=fp32 mask=False", "loop_body_instructions", 0),
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("lora_expand_add_kernel", True, True)], "expand_into x=bf16 lora=fp32 mask=True terms=2",
     "loop_body_instructions", 0),
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("gate_up_lora_act_kernel", True, True)], "gate_up_lora_act x=bf16 act=0 lora=(fp32,fp32) mask=True",
     "loop_body_instructions", 0),
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("lora_expand_add_kernel", False, False)], "expand_add x=bf16 lora=bf16 mask=False r=64",
     "loop_body_instructions", 0),
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("lora_expand_add_kernel", True, False)], "expand_into x=bf16 lora=bf16 mask=True terms=2 r=64",
     "loop_body_instructions", 0),
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("gate_up_lora_act_kernel", True, False)], "gate_up_lora_act x=bf16 act=0 lora=(bf16,bf16) mask=True r=64",
     "loop_body_instructions", 0),
    (L.ACT_BWD_LORA_ELEMENT_WEIGHT[(True, 16)], "act_bwd_lora x=bf16 act=0 lora=(fp32,fp32,fp32) r=16 mask=True",
     "loop_body_instructions", 2),
    (L.ACT_BWD_LORA_ELEMENT_WEIGHT[(False, 16)], "act_bwd_lora x=bf16 act=0 lora=(bf16,bf16,bf16) r=16 mask=True",
     "loop_body_instructions", 2),
    (L.ACT_BWD_LORA_ELEMENT_WEIGHT[(True, 32)], "act_bwd_lora x=bf16 act=0 lora=(fp32,fp32,fp32) r=32 mask=True",
     "loop_body_instructions", 2),
    (L.ACT_BWD_LORA_ELEMENT_WEIGHT[(False, 32)], "act_bwd_lora x=bf16 act=0 lora=(bf16,bf16,bf16) r=32 mask=True",
     "loop_body_instructions", 2),
    (L.ACT_BWD_LORA_ELEMENT_WEIGHT[(True, 64)], "act_bwd_lora x=bf16 act=0 lora=(fp32,fp32,fp32) r=64 mask=True",
     "loop_body_instructions", 2),
    (L.ACT_BWD_LORA_ELEMENT_WEIGHT[(False, 64)], "act_bwd_lora x=bf16 act=0 lora=(bf16,bf16,bf16) r=64 mask=True",
     "loop_body_instructions", 2),
    # the dh' fold (16-bit adapters, 64 columns; rank 64 on sm_90 only)
    *((L.ACT_BWD_LORA_FOLD_WEIGHT[r], f"act_bwd_lora x=bf16 act=0 lora=(bf16,bf16,bf16) r={r} mask=True fold",
       "loop_body_instructions", 2) for r in (16, 32, 64)),
    # fp32 adapters as single tf32 products (torch's "high" fp32 matmul precision)
    (L.EPILOGUE_ELEMENT_WEIGHT[("lora_expand_add_kernel", False, "tf32", 16)], "expand_add x=bf16 lora=tf32 mask=False",
     "instructions", 0),
    (L.EPILOGUE_ELEMENT_WEIGHT[("lora_expand_add_kernel", True, "tf32", 16)], "expand_into x=bf16 lora=tf32 mask=True terms=2",
     "instructions", 2),
    (L.EPILOGUE_ELEMENT_WEIGHT[("gate_up_lora_act_kernel", True, "tf32", 16)], "gate_up_lora_act x=bf16 act=0 lora=(tf32,tf32) mask=True",
     "instructions", 1),
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("lora_expand_add_kernel", False, "tf32")], "expand_add x=bf16 lora=tf32 mask=False",
     "loop_body_instructions", 0),
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("lora_expand_add_kernel", True, "tf32")], "expand_into x=bf16 lora=tf32 mask=True terms=2",
     "loop_body_instructions", 0),
    (L.EPILOGUE_RANK_TRIP_WEIGHT[("gate_up_lora_act_kernel", True, "tf32")], "gate_up_lora_act x=bf16 act=0 lora=(tf32,tf32) mask=True",
     "loop_body_instructions", 0),
    *((L.ACT_BWD_LORA_ELEMENT_WEIGHT[("tf32", r)], f"act_bwd_lora x=bf16 act=0 lora=(tf32,tf32,tf32) r={r} mask=True",
       "loop_body_instructions", 2) for r in (16, 32, 64)),
    # the sum of split partials: per element, and per split (its loop body)
    (L.SPLIT_SUM_ELEMENT_WEIGHT + L.SPLIT_SUM_SPLIT_WEIGHT, "split_sum out=bf16", "instructions", 0),
    (L.SPLIT_SUM_SPLIT_WEIGHT, "split_sum out=bf16", "loop_body_instructions", 0),
]


# Compiled in a child process (no TRITON_INTERPRET): each row's variant in its family's default sm_90 config.
_COMPILE = r"""
import json, sys
from transpeft_kernels.kernels.triton import configs, variants as V

labels = set(json.loads(sys.argv[1]))
for case in V.CASES:
    if case.label in labels:
        (v,) = case.variants(configs.CONFIG_SETS[case.family].default_for("sm_90", case.elem_bytes), [])
        row = V.compile_variant(v, 90, sass=True)
        k = v.constexprs
        row["elements"] = (k["BLOCK"] if "BLOCK" in k else k["BLOCK_M"] * k["BLOCK_N"]) // (32 * v.num_warps)
        print(json.dumps(row), flush=True)
"""


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    if sass.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (the triton wheel bundles it in backends/nvidia/bin)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps([r[1] for r in ROWS])], env=env,
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["label"]: r for r in rows}


@pytest.mark.parametrize("weight,label,metric,masks", ROWS, ids=[f"{r[1]} ({r[2]})" for r in ROWS])
def test_ledger_weight_matches_the_kernels_sass(compiled, weight, label, metric, masks):
    assert label in compiled, f"no compile-check case labelled {label!r} (variants.py changed?)"
    row = compiled[label]
    assert row["ok"], row["error"]
    count, elements = row["sass"][metric], row["elements"]
    derived = (count / elements - masks * MASK_CHARGE) / ELEMENTWISE_INSTR
    assert abs(derived - weight) <= TOLERANCE * weight, (
        f"{label}: the ledger charges {weight} elementwise units per element; its sm_90 SASS now gives "
        f"{derived:.2f} ({count} {metric} over {elements} elements, {masks} mask streams): re-derive the "
        f"weight in perf/ledger.py")
