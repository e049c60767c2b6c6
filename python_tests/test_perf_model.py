"""The performance model's ledger against hand counts, and the ``model`` command end to end.

Hand counts: bytes are each operand once per launch (numel x element size), FLOPs 2 per multiply-add
on the unit of the operand dtype (bf16 -> tensor cores, fp32 -> CUDA cores)."""
import json
import subprocess
import sys

import pytest
import torch

from transpeft_kernels.kernels.env import DryRunTarget, dry_running
from transpeft_kernels.perf import cases as C
from transpeft_kernels.perf.devices import device
from transpeft_kernels.perf import ledger as L
from transpeft_kernels.perf.ledger import recording
from transpeft_kernels.perf.roofline import launch_ms

H200 = DryRunTarget("sm_90", 132)
BF16, FP32 = 2, 4


def test_single_gemm():
    M, K, N = 64, 48, 80
    a = torch.empty(M, K, dtype=torch.bfloat16, device="meta")
    b = torch.empty(K, N, dtype=torch.bfloat16, device="meta")
    with recording(H200) as led:
        a @ b
    (x,) = led.launches
    assert (x.name, x.kind) == ("mm", "aten")
    assert x.bytes_read == (M * K + K * N) * BF16 and x.bytes_written == M * N * BF16
    assert x.flops == {"tc_bf16": 2 * M * K * N}
    assert led.host_syncs == 0 and led.h2d_copies == 0


@pytest.mark.parametrize("beta", [0, 1])
def test_in_place_gemm_reads_its_output_unless_beta_is_0(beta):
    """addmm_ into an output: cuBLAS reads C only with a non-zero beta (the cuda backend's scaled dA / dB
    pass beta = 0 into a fresh buffer)."""
    M, K, N = 16, 40, 24
    a = torch.empty(M, K, dtype=torch.bfloat16, device="meta")
    b = torch.empty(K, N, dtype=torch.bfloat16, device="meta")
    out = torch.empty(M, N, dtype=torch.bfloat16, device="meta")
    with recording(H200) as led:
        out.addmm_(a, b, beta=beta, alpha=0.5)
    (x,) = led.launches
    assert x.bytes_read == (M * K + K * N + beta * M * N) * BF16 and x.bytes_written == M * N * BF16


def test_views_and_allocations_launch_nothing_and_host_work_is_counted():
    t = torch.empty(8, 6, device="meta")
    with recording(H200) as led:
        t.t().reshape(6, 8)[:, :2].unsqueeze(0)
        torch.empty(3, device="meta")
        torch.tensor(7).to("meta")   # a host-to-device copy
        t.sum().item()                # a host sync (after one reduction launch)
    assert [x.name for x in led.launches] == ["sum"]
    assert led.h2d_copies == 1 and led.host_syncs == 1


def test_elementwise_triton_kernel_is_recorded_not_run():
    pytest.importorskip("triton")
    from transpeft_kernels.kernels import triton as K

    M, I = 64, 96
    g = torch.empty(M, I, dtype=torch.bfloat16, device="meta")
    with recording(H200) as led:
        h = K.masked_gated_act_fwd(g, g, "silu", 0.1, False, torch.tensor(5))
    assert h.device.type == "meta"
    (x,) = led.launches
    assert (x.name, x.kind) == ("masked_gated_act_fwd_kernel", "triton")
    assert x.bytes_read == 2 * M * I * BF16 and x.bytes_written == M * I * BF16
    weight = L.MASKED_ACT_ELEMENT_WEIGHT[("masked_gated_act_fwd_kernel", True)]
    assert x.flops == {} and x.elements == round(M * I * weight) and x.philox == M * I
    assert x.grid is not None and x.grid[0] >= 1
    assert led.h2d_copies == 1  # the seed, copied to the device for every launch today


def test_peft_lora_linear_forward_hand_count():
    """PEFT's LoRA Linear, fp32 adapters on a bf16 base, no dropout, no bias: forward ops in order."""
    M, d, n, r = 8, 16, 32, 4
    case = C.ModelCase("lora_linear", M, d, n, None, r, 0.0, 0.0)
    setup = C._op_setup(case)
    x = torch.empty(M, d, dtype=torch.bfloat16, device="meta")
    with recording(H200) as led:
        setup.module(x)
    want = [
        ("mm", (M * d + n * d) * BF16, M * n * BF16, {"tc_bf16": 2 * M * n * d}),   # x W^T
        ("_to_copy", M * d * BF16, M * d * FP32, {}),                               # x to the adapter dtype
        ("mm", (M * d + r * d) * FP32, M * r * FP32, {"fp32": 2 * M * r * d}),      # x A^T
        ("mm", (M * r + n * r) * FP32, M * n * FP32, {"fp32": 2 * M * n * r}),      # (x A^T) B^T
        ("mul", M * n * FP32, M * n * FP32, {}),                                    # * scaling
        ("add", M * n * (BF16 + FP32), M * n * FP32, {}),                           # base + lora (promoted)
        ("_to_copy", M * n * FP32, M * n * BF16, {}),                               # back to the base dtype
    ]
    got = [(x.name, x.bytes_read, x.bytes_written, x.flops) for x in led.launches]
    assert got == want


@pytest.mark.parametrize("impl", ["vanilla", "torch"])
def test_gated_mlp_gemm_work_hand_count(impl):
    """Gated MLP, LoRA r on gate/up/down (fp32 adapters), frozen bf16 base, fwd+bwd:
    base GEMMs 3 forward + 3 for dx = 12 M d I FLOPs on tensor cores; LoRA per projection 2 products
    forward (shrink, expand) and 4 backward (dB, t = dy B, dA, t A), 9 (2 M d r + 2 M I r) in all, in fp32;
    24 GEMM launches either way."""
    M, d, I, r = 16, 32, 48, 4
    case = C.ModelCase("gated_mlp", M, d, None, I, r, 0.25, 0.1)
    with dry_running(H200):
        step = C.prepare(case, impl)
    with recording(H200) as led:
        step()
    assert led.flops_by_unit() == {"tc_bf16": 12 * M * d * I, "tc_fp16": 0, "tc_tf32": 0,
                                   "fp32": 9 * (2 * M * d * r + 2 * M * I * r)}
    assert sum(x.name in ("mm", "addmm") for x in led.launches) == 24
    # the seed is drawn on the device the op runs on: nothing crosses from the host, nothing waits
    assert led.h2d_copies == 0 and led.host_syncs == 0
    if impl == "vanilla":
        # the reference code's float mask: rand_like(h) (bf16), > p (bool), .float() (fp32), h * mask
        names = [x.name for x in led.launches]
        i = names.index("rand_like")
        assert names[i:i + 4] == ["rand_like", "gt", "_to_copy", "mul"]
        assert [x.bytes_written for x in led.launches[i:i + 3]] == [M * I * BF16, M * I, M * I * FP32]
    else:
        # the torch backend regenerates masks with elementwise ATen ops: masking on (M, I) in forward
        # and in backward, and LoRA dropout on each projection's input (M, d) or (M, I), twice each
        assert len(led.launches) > 200


@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("adapter_dtype,lora_unit,factor", [("float32", "tc_tf32", 7), ("bfloat16", "tc_bf16", 3)])
def test_lora_dots_are_charged_to_the_tensor_cores(adapter_dtype, lora_unit, factor, impl):
    """Both kernel backends run every LoRA dot on the tensor cores in the precision their kernels compile
    (kernels/triton/_common.lora_dot_split; CUDA: transpeft/tile_mma.cuh): bf16 adapters as bf16; fp32
    adapters as tf32x3, three tf32 products per multiply-add, two where one operand is stored in the
    16-bit base dtype. Per
    projection (K in, N out) the six products of test_gated_mlp_gemm_work_hand_count, 3 (2 M K r + 2 M N r):
    only the expands S B^T (forward, N) and t A (dx, K) have two fp32 operands; the shrink of x and dA
    (K), t = dy B and dB (N) each read a 16-bit one (x, dy, or dg, du, h' in the one-pass backward),
    so each side weighs 3 + 2 + 2 = 7 tf32 products; over gate, up and down 7 (2 M d r + 2 M I r).
    Nothing is charged to the CUDA cores."""
    if impl == "triton":
        pytest.importorskip("triton")
    M, d, I, r = 16, 32, 48, 4
    case = C.ModelCase("gated_mlp", M, d, None, I, r, 0.25, 0.1, adapter_dtype=adapter_dtype)
    with dry_running(H200):
        step = C.prepare(case, impl)
    with recording(H200) as led:
        step()
    want = {"tc_bf16": 12 * M * d * I, "tc_fp16": 0, "tc_tf32": 0, "fp32": 0}
    want[lora_unit] += factor * 3 * (2 * M * d * r + 2 * M * I * r)
    assert led.flops_by_unit() == want


@pytest.mark.parametrize("impl,factor", [("triton", 3), ("cuda", 7), ("vanilla", None)])
def test_lora_dots_where_torch_allows_tf32(impl, factor, fp32_matmul):
    """With TF32 allowed for torch's fp32 matmuls ("high"): the Triton backend's fp32-adapter dots are
    single tf32 products (one per multiply-add, the 3 of the hand count above); the CUDA kernels stay
    tf32x3 (7); vanilla PEFT's fp32 LoRA matmuls (ATen) move from the CUDA cores to the tf32 tensor
    cores. At the default precision vanilla's are on the CUDA cores."""
    if impl == "triton":
        pytest.importorskip("triton")
    M, d, I, r = 16, 32, 48, 4
    case = C.ModelCase("gated_mlp", M, d, None, I, r, 0.25, 0.1, adapter_dtype="float32")

    def units():
        with dry_running(H200):
            step = C.prepare(case, impl)
        with recording(H200) as led:
            step()
        return led.flops_by_unit()

    default = units()
    fp32_matmul("high")
    got = units()
    if impl == "vanilla":
        assert default["fp32"] > 0 and default["tc_tf32"] == 0
        assert got["fp32"] == 0 and got["tc_tf32"] == default["fp32"]
    else:
        assert got == {"tc_bf16": 12 * M * d * I, "tc_fp16": 0, "fp32": 0,
                       "tc_tf32": factor * 3 * (2 * M * d * r + 2 * M * I * r)}


def test_triton_gemm_is_charged_the_efficiency_factor():
    """A Triton GEMM that replaces a cuBLAS one runs at TRITON_GEMM_VS_CUBLAS (0.85) of cuBLAS."""
    from transpeft_kernels.perf.ledger import Launch
    from transpeft_kernels.perf.roofline import TRITON_GEMM_VS_CUBLAS

    dev = device("h200")
    flops = {"tc_bf16": 2 * 4096**3, "tc_tf32": 3 * 2 * 4096**2 * 16}
    x = Launch("gemm_lora_expand_kernel", "triton", 2 * 4096**2 * BF16, 4096**2 * BF16, flops)
    assert x.gemm and TRITON_GEMM_VS_CUBLAS == 0.85
    compute_ms = sum(f / (dev.peak_tflops[u] * 1e12 * dev.cublas_efficiency * 0.85) for u, f in flops.items()) * 1e3
    assert launch_ms(x, dev) == pytest.approx(compute_ms + dev.launch_us * 1e-3)


def test_roofline_of_one_launch():
    """max(bytes / copy bandwidth, FLOPs / (peak x efficiency)) + the launch cost."""
    dev = device("h200")
    a = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    with recording(dev.target) as led:
        a @ a
    (x,) = led.launches
    compute_ms = 2 * 4096**3 / (989.4e12 * dev.cublas_efficiency) * 1e3
    assert launch_ms(x, dev) == pytest.approx(compute_ms + dev.launch_us * 1e-3)


def test_model_command_writes_records(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "model.json"
    done = subprocess.run([sys.executable, "-m", "transpeft_kernels", "model", "--ops", "lora_linear",
                           "--impls", "vanilla,floor,triton,cuda", "--device", "h200,h100", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MODEL" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["kind"] == "model"
    recs = doc["records"]
    assert {r["device"] for r in recs} == {"H200 SXM", "H100 SXM"}
    needed = {"op", "impl", "device", "dtype", "adapter_dtype", "M", "d", "n", "I", "r", "masking", "lora_dropout",
              "launches", "bytes_read", "bytes_written", "flops", "predicted_ms", "ratio_vs_floor",
              "speedup_vs_vanilla", "host_syncs", "h2d_copies"}
    for r in recs:
        assert needed <= r.keys()
        assert r["predicted_ms"] > 0
        if r["impl"] == "floor":
            assert r["ratio_vs_floor"] == 1.0 and r["launches"] == 2
        else:
            assert r["ratio_vs_floor"] > 1.0  # nothing computing the LoRA update beats the frozen GEMMs
    # the faster HBM of the H200 never makes a launch slower
    by = {(r["impl"], r["r"], r["lora_dropout"], r["adapter_dtype"], r["device"]): r["predicted_ms"] for r in recs}
    for (impl, rank, q, adt, dev), ms in by.items():
        if dev == "H200 SXM":
            assert ms <= by[(impl, rank, q, adt, "H100 SXM")]


def test_model_command_tf32(tmp_path):
    """--tf32 records the cases with TF32 allowed: said in the header and the JSON, and the fp32-adapter
    cases of the triton backend and of vanilla come out faster at rank 64 than at torch's default."""
    pytest.importorskip("triton")
    times = {}
    for flag in ([], ["--tf32"]):
        out = tmp_path / f"model{len(flag)}.json"
        done = subprocess.run([sys.executable, "-m", "transpeft_kernels", "model", "--ops", "lora_linear",
                               "--impls", "vanilla,triton", "--json", str(out), *flag],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        fp32_matmul = "tf32" if flag else "ieee"
        assert f"fp32 matmuls {fp32_matmul}" in done.stdout
        doc = json.loads(out.read_text())
        assert doc["settings"]["fp32_matmul"] == fp32_matmul
        times[fp32_matmul] = {(r["impl"], r["adapter_dtype"]): r["predicted_ms"] for r in doc["records"]
                              if r["r"] == 64 and r["lora_dropout"] == 0.05}
    for impl in ("vanilla", "triton"):
        assert times["tf32"][(impl, "float32")] < times["ieee"][(impl, "float32")]
        assert times["tf32"][(impl, "bfloat16")] == times["ieee"][(impl, "bfloat16")]


def test_model_command_rejects_bad_names():
    done = subprocess.run([sys.executable, "-m", "transpeft_kernels", "model", "--device", "b200"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "device" in done.stderr and "b200" in done.stderr and "Traceback" not in done.stderr


def test_model_beside_measured_joins_gpu_records():
    from transpeft_kernels.commands.model import _predict_case
    from transpeft_kernels.perf.compare import model_beside_measured

    base = dict(op="lora_linear", M=64, d=32, n=48, I=None, r=4, masking=0.0, lora_dropout=0.0, dtype="bfloat16",
                status="ok", gpu="NVIDIA H200", commit="abc")
    bench = [dict(base, impl=i, median_ms=ms, **{"pass": p}) for i, ms in (("vanilla", 0.2), ("floor", 0.05), ("triton", 0.1))
             for p in ("fwd", "fwd+bwd")]
    bench.append(dict(base, impl="vanilla_compiled", median_ms=0.1, **{"pass": "fwd+bwd"}))  # no model: left out
    bench.append(dict(base, impl="triton", median_ms=0.1, gpu=None, **{"pass": "fwd+bwd"}))  # a CPU run: left out
    pairs = model_beside_measured(bench, _predict_case)
    assert sorted(p["impl"] for p in pairs) == ["floor", "triton", "vanilla"]
    for p in pairs:
        assert p["device_model"] == "H200 SXM" and p["predicted_ms"] > 0 and p["fp32_matmul"] == "ieee"
        assert p["model_error"] == pytest.approx(p["measured_ms"] / p["predicted_ms"], rel=1e-3)
    # a TF32 case of the benchmark is modelled under TF32: vanilla's fp32 LoRA matmuls on the tensor cores
    big = [dict(r, M=8192, d=4096, n=4096, r=64) for r in bench[:6]]  # where vanilla's LoRA matmuls are not launch-bound
    both = model_beside_measured(big + [dict(r, fp32_matmul="tf32") for r in big], _predict_case)
    by = {(p["impl"], p["fp32_matmul"]): p["predicted_ms"] for p in both}
    assert by[("vanilla", "tf32")] < by[("vanilla", "ieee")] and by[("floor", "tf32")] == by[("floor", "ieee")]


def test_a_cuda_call_outside_the_recorded_wrappers_is_an_error():
    """A CUDA entry point called by a wrapper without a cost rule would vanish from the model; recording
    refuses it instead."""
    from transpeft_kernels.kernels.cuda import launch

    with recording(H200):
        with pytest.raises(KeyError, match="not in _CUDA_WRAPPERS"):
            launch.load().call("transpeft_some_new_kernel", None, 0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_case_records_the_same_launches_first_or_later(monkeypatch, impl):
    """A process's first recorded step must not carry the one-off set-up a steady-state step skips (the
    per-device sub-seed offsets, specs.stream_offsets): the same case, recorded first and then again,
    gives the same launches."""
    if impl == "triton":
        pytest.importorskip("triton")
    from transpeft_kernels import specs

    monkeypatch.setattr(specs, "_OFFSETS", {})  # as in a fresh process
    case = C.ModelCase("gated_mlp", 16, 32, None, 48, 4, 0.25, 0.1)
    names = []
    for _ in range(2):
        with dry_running(H200):
            step = C.prepare(case, impl)
        with recording(H200) as led:
            step()
        names.append([x.name for x in led.launches])
    assert names[0] == names[1]
