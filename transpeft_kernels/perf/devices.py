"""The GPUs the roofline model describes, each figure with where it comes from.

Peaks are dense (no 2:4 sparsity) at boost clock, from NVIDIA's published specifications:
  H100 SXM5   "NVIDIA H100 Tensor Core GPU" datasheet: 3.35 TB/s HBM3; 989.4 TFLOPS bf16/fp16,
              494.7 TFLOPS tf32, 66.9 TFLOPS fp32 (non-tensor); 132 SMs, 1.98 GHz boost.
  H200 SXM    "NVIDIA H200 Tensor Core GPU" product brief: 4.8 TB/s HBM3e; the same GH100 compute
              as H100 SXM (989.4 / 494.7 / 66.9 TFLOPS, 132 SMs).
  A100 SXM4   "NVIDIA A100 Tensor Core GPU" datasheet (80 GB): 2.039 TB/s HBM2e; 312 TFLOPS bf16/fp16,
              156 TFLOPS tf32, 19.5 TFLOPS fp32; 108 SMs, 1.41 GHz boost.
Achievable figures are assumptions of this model, to be replaced by measurements from a GPU run:
  copy bandwidth   what a device-to-device copy reaches: about 90% of HBM on H100 (3.0 TB/s), 90% on
                   H200 (4.3 TB/s) and 88% on A100 (1.8 TB/s), as commonly measured by stream copies.
  cuBLAS efficiency  the share of the dense peak a large bf16 GEMM reaches: 0.75 (8192 x 14336 x 4096
                   GEMMs run at about 700-750 TFLOPS on H100 SXM).
  launch cost      3 us per kernel launch on the stream (driver submission and the gap between
                   dependent kernels without CUDA graphs).
  issue rate       4 warp instructions per clock per SM (four schedulers), i.e. 128 thread
                   instructions per clock per SM, for kernels bound by instruction issue.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.env import DryRunTarget


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    arch: str                 # launch-config tables: "sm_90" or "sm_80"
    sms: int
    clock_ghz: float          # boost clock
    hbm_tb_s: float           # peak HBM bandwidth
    copy_tb_s: float          # achievable copy bandwidth (model assumption)
    peak_tflops: dict         # unit -> dense peak TFLOPS
    cublas_efficiency: float = 0.75
    launch_us: float = 3.0

    @property
    def target(self) -> DryRunTarget:
        return DryRunTarget(self.arch, self.sms)

    def issue_per_s(self) -> float:
        """Thread instructions per second over the whole GPU (128 per SM per clock)."""
        return self.sms * self.clock_ghz * 1e9 * 128


_GH100 = {"tc_bf16": 989.4, "tc_fp16": 989.4, "tc_tf32": 494.7, "fp32": 66.9}

DEVICES = {
    "h100": DeviceSpec("H100 SXM", "sm_90", 132, 1.98, 3.35, 3.0, _GH100),
    "h200": DeviceSpec("H200 SXM", "sm_90", 132, 1.98, 4.8, 4.3, _GH100),
    "a100": DeviceSpec("A100 SXM 80GB", "sm_80", 108, 1.41, 2.039, 1.8,
                       {"tc_bf16": 312.0, "tc_fp16": 312.0, "tc_tf32": 156.0, "fp32": 19.5}),
}


def device(name: str) -> DeviceSpec:
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"device: expected one of {sorted(DEVICES)}, got {name!r}") from None
