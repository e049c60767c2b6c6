"""The model beside the measurement: for every op-level fwd+bwd record of a benchmark run on a GPU,
the roofline model's prediction for the same case, implementation and GPU, and the model error
(measured / predicted). The first GPU run validates or corrects the model with this.

Benchmark records carry PEFT's default adapters (fp32 on a bf16 base), as bench/impls.py builds them, and
the fp32 matmul precision they ran under ("fp32_matmul": "ieee", or "tf32" for the TF32 cases), which the
prediction takes too.
Records without a model (vanilla_compiled, train_step, skipped or failed cells, CPU runs) are left out.
"""
from __future__ import annotations

from ..kernels.env import cuda_fp32_matmul
from .cases import IMPLS, ModelCase
from .devices import DEVICES, DeviceSpec


def device_for_gpu_name(name: str | None) -> DeviceSpec | None:
    """The modelled device of a ``torch.cuda.get_device_name`` string, or None."""
    if not name:
        return None
    for key in ("h200", "h100", "a100"):
        if key.upper() in name.upper():
            return DEVICES[key]
    return None


def _case_of(rec: dict) -> ModelCase:
    return ModelCase(rec["op"], rec["M"], rec["d"], rec.get("n"), rec.get("I"), rec["r"], rec.get("masking") or 0.0,
                     rec.get("lora_dropout") or 0.0, dtype=rec.get("dtype") or "bfloat16", adapter_dtype="float32")


def model_beside_measured(bench_records: list[dict], predict_case) -> list[dict]:
    """``predict_case(case, impls, device) -> {impl: predicted_ms}``; returns one joined record per
    measured cell that has a model."""
    cells = [r for r in bench_records if r.get("status") == "ok" and r.get("pass") == "fwd+bwd"
             and r.get("op") in ("lora_linear", "gated_mlp") and r.get("impl") in IMPLS and r.get("median_ms")]
    out, cache = [], {}
    for r in cells:
        dev = device_for_gpu_name(r.get("gpu"))
        if dev is None:
            continue
        case = _case_of(r)
        fp32_matmul = r.get("fp32_matmul", "ieee")  # the benchmark's TF32 cases are modelled under TF32
        key = (case, fp32_matmul, dev.name)
        if key not in cache:
            impls = sorted({c["impl"] for c in cells if _case_of(c) == case and c.get("fp32_matmul", "ieee") == fp32_matmul})
            with cuda_fp32_matmul(fp32_matmul):
                cache[key] = predict_case(case, impls, dev)
        predicted = cache[key].get(r["impl"])
        if predicted is None:
            continue
        out.append({**case.fields(), "fp32_matmul": fp32_matmul, "impl": r["impl"], "gpu": r["gpu"], "device_model": dev.name,
                    "measured_ms": r["median_ms"], "predicted_ms": round(predicted, 4),
                    "model_error": round(r["median_ms"] / predicted, 4), "commit": r.get("commit")})
    return out
