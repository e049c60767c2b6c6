"""The roofline model: a predicted GPU time for each launch of a ledger, and the totals.

Per launch, on a device (perf/devices.py):

    memory  = (bytes read + bytes written) / achievable copy bandwidth
    compute = sum over units of FLOPs / (dense peak of the unit x efficiency)
    issue   = instructions / (SMs x clock x 128 thread instructions per clock)
    time    = max(memory, compute) + issue (fused GEMM epilogues: one CTA per SM does not
              overlap its epilogue with another tile's main loop)   | GEMM launches
            = max(memory, compute, issue)                           | everything else
            + the launch cost

Efficiency: cuBLAS GEMMs run at ``cublas_efficiency`` of the peak; a Triton GEMM that replaces one at
0.85 of that (until a GPU run measures better); FlashAttention at 0.6 of the peak; other launches at
``cublas_efficiency`` (their FLOPs are small).

Instructions: elementwise work at ``ELEMENTWISE_INSTR`` per element; each mask element adds
``MASK_LANE_INSTR`` (take its lane of the call's outputs, compare with the threshold, select) and
its share of one Philox4x32-10 call, ``PHILOX_INSTR`` / ``reference.philox.MASK_ELEMENTS_PER_CALL``.
The constants are read off the sm_90 SASS of the bf16 masked activation forward kernel
(``compile-check --sass``, static counts): about 24 thread instructions per element unmasked; with one
call per element the mask added about 70 (59 + 11); with 8 elements per call it adds about 19
(59 / 8 + 11 = 18.4 charged). The backward's mask costs a little more (about 22), which the model
does not separate. Those two figures are now accounting units: every kernel of ours is charged its own
static SASS as a weight per element in these units, less 18.4 per mask stream
(ledger.py: MASKED_ACT_ELEMENT_WEIGHT and the others). Since the activations became one MUFU sigmoid
(kernels/triton/activations.py) the masked activation forward is 24.8 instructions per element with
the mask and 13.4 without (bf16, silu), so the mask's real increment is about 11.5.

What the model cannot see: caches (every operand is charged once, as if re-reads hit L2; a tile
that misses L2 costs more), overlap between launches, tile-quantisation and wave effects, register
spills, and the host (Python and launch submission beyond the fixed launch cost). Every figure it
prints is a model, not a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

from .devices import DeviceSpec
from .ledger import Launch, Ledger

TRITON_GEMM_VS_CUBLAS = 0.85
FLASH_ATTENTION_EFFICIENCY = 0.6
ELEMENTWISE_INSTR = 24.0
PHILOX_INSTR = 59.0
MASK_LANE_INSTR = 11.0


def _mask_elements_per_call() -> int:
    from ..reference import philox

    return getattr(philox, "MASK_ELEMENTS_PER_CALL", 1)


def launch_ms(x: Launch, dev: DeviceSpec) -> float:
    memory = (x.bytes_read + x.bytes_written) / (dev.copy_tb_s * 1e12)
    if x.kind == "attention":
        eff = FLASH_ATTENTION_EFFICIENCY
    elif x.kind == "triton" and x.gemm:
        eff = dev.cublas_efficiency * TRITON_GEMM_VS_CUBLAS
    else:
        eff = dev.cublas_efficiency
    compute = sum(f / (dev.peak_tflops[u] * 1e12 * eff) for u, f in x.flops.items())
    instructions = (x.elements * ELEMENTWISE_INSTR
                    + x.philox * (PHILOX_INSTR / _mask_elements_per_call() + MASK_LANE_INSTR))
    issue = instructions / dev.issue_per_s()
    body = max(memory, compute) + issue if x.gemm else max(memory, compute, issue)
    return (body + dev.launch_us * 1e-6) * 1e3


@dataclass(frozen=True)
class Prediction:
    ms: float
    launches: int
    bytes_read: int
    bytes_written: int
    flops: dict
    host_syncs: int
    h2d_copies: int

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def predict(ledger: Ledger, dev: DeviceSpec) -> Prediction:
    return Prediction(sum(launch_ms(x, dev) for x in ledger.launches), len(ledger.launches),
                      ledger.total("bytes_read"), ledger.total("bytes_written"), ledger.flops_by_unit(),
                      ledger.host_syncs, ledger.h2d_copies)
