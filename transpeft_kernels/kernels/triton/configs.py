"""Launch configurations: per-architecture autotune sets, fixed defaults, and the tuner.

Every kernel family has a ConfigSet:
  * a fixed DEFAULT config per architecture: what runs when autotuning is off (whatever the shape),
    the tuner's first candidate, and the one config ``compile-check`` compiles,
  * a list of CANDIDATES per architecture that the tuner times once per key,
  * one small config for the CPU interpreter (timing there is meaningless and slow).
Architectures: "sm_90" (H100/H200, and newer GPUs with as much shared memory per block), "sm_80" (A100,
and every other CUDA device of compute capability 8.0 or newer: the RTX 30/40 series, A10, L4 and L40S,
and GPUs of compute capability 9.0+ with less shared memory, such as the RTX 50 series; every sm_80
default config fits their 99 KB per block), "interp". Older GPUs run no kernel of ours (ops/coverage.py).

Autotuning runs on CUDA unless TRANSPEFT_TRITON_AUTOTUNE=0; the key is (kernel, arch, the shape
key each launcher gives — token counts bucketed to powers of two — the dtype codes, and the operands'
layouts, ``layout_key``: which stride is the unit one and whether addresses and strides are 16-byte
aligned, since both change the code Triton generates and so the best config). A new batch size in
the same bucket does not re-tune. Candidates whose estimated shared memory exceeds the device limit
are dropped before timing; ``compile-check`` verifies the real figure.

Reproducibility: the reduction order of a kernel depends on its config (the split of token_reduce,
the K tiling of a GEMM), so tuned runs can differ in the last bits from one process to the next. With
TRANSPEFT_TRITON_AUTOTUNE=0 every launch uses its family's fixed DEFAULT for the architecture (one
config whatever the shape; per-bucket fixed configs are not built): the same bits on every run on the
same GPU model and versions.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.testing

from ..env import device_index, dry_run
from ._common import cdiv, interpreting, next_pow2

SHARED_LIMIT = {"sm_90": 232448, "sm_80": 166912}


@dataclass(frozen=True)
class KernelConfig:
    meta: tuple  # ((name, value), ...) block-size constexprs
    num_warps: int = 4
    num_stages: int = 2

    def kwargs(self) -> dict:
        return dict(self.meta)

    def __getitem__(self, name):
        return dict(self.meta)[name]

    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.meta) + f",w={self.num_warps},s={self.num_stages}"


def cfg(num_warps=4, num_stages=2, **meta) -> KernelConfig:
    return KernelConfig(tuple(sorted(meta.items())), num_warps, num_stages)


@dataclass(frozen=True)
class ConfigSet:
    """Configs of one kernel family. ``smem(config, elem_bytes)`` estimates its shared memory."""

    name: str
    default: dict  # arch -> KernelConfig
    candidates: dict  # arch -> list[KernelConfig]
    smem: object = field(default=None)
    # arch -> the default for 4-byte operands, where the 16-bit default spills with them (an IEEE fp32 GEMM
    # holds more of each K step in registers)
    fp32_default: dict = field(default_factory=dict)

    def default_for(self, arch: str, elem_bytes: int | None) -> KernelConfig:
        """The fixed config for operands of ``elem_bytes`` bytes (None: whatever the dtype)."""
        if elem_bytes == 4 and arch in self.fp32_default:
            return self.fp32_default[arch]
        return self.default[arch]

    def configs(self, arch: str, elem_bytes: int | None = None) -> list[KernelConfig]:
        """The default for the dtype first (the tuner's first candidate), then the other candidates."""
        ordered = [self.default_for(arch, elem_bytes), self.default[arch], *self.candidates.get(arch, [])]
        return list(dict.fromkeys(ordered))


def _gemm_smem(c: KernelConfig, elem: int) -> int:
    return c.num_stages * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * elem


def _tn_smem(c: KernelConfig, elem: int) -> int:
    return c.num_stages * (c["BLOCK_A"] + c["BLOCK_B"]) * c["BLOCK_T"] * elem


def _gate_up_smem(c: KernelConfig, elem: int) -> int:
    return c.num_stages * (c["BLOCK_M"] + 2 * c["BLOCK_N"]) * c["BLOCK_K"] * elem


def _shrink_smem(c: KernelConfig, elem: int) -> int:
    return c.num_stages * (c["BLOCK_M"] + 64) * c["BLOCK_K"] * elem


# Y = X W^T (+ fused epilogues): the big GEMMs (forward, dX).
GEMM = ConfigSet(
    "gemm",
    default={
        "sm_90": cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        "sm_80": cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        "interp": cfg(4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4),
    },
    candidates={
        "sm_90": [
            cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
            cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
            cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
        # sm_80 candidates 128 x 256 (8 warps) and 128 x 128 (4 warps) spilled 88 / 64 B with fp32 adapters:
        # dropped (compile-check --sass; the default is 128 x 128 on 8 warps)
        "sm_80": [
            cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
            cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
    },
    smem=_gemm_smem,
    # sm_80, fp32 operands: 128 x 128 spilled (8 B at BLOCK_K 32, 24 B at 16); 128 x 64 none, 192 registers
    fp32_default={"sm_80": cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)},
)

# g = x Wg^T, u = x Wu^T with the masked activation epilogue: two weight tiles and two fp32
# accumulators per program, so BLOCK_N is half the plain GEMM's for the same registers. The defaults
# fit float32 operands too (3 * (128 + 2 * 64) * 64 * 4 B = 192 KiB on sm_90), since the tuner never
# drops a default.
GATE_UP = ConfigSet(
    "gate_up",
    default={
        "sm_90": cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        "sm_80": cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        "interp": cfg(4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4),
    },
    # Candidates that spilled with fp32 adapters (two fp32 accumulators plus the tf32x3 expand) are
    # dropped: on sm_90 128 x 128, 256 x 64, 64 x 128 and 128 x 64 on 4 warps (8-40 B); on sm_80 128 x 128
    # and 128 x 64 on 4 warps (136 / 32 B). compile-check --sass; the default spills in none. These
    # GEMMs only run with TRANSPEFT_TRITON_BASE_GEMM=triton.
    candidates={
        "sm_90": [
            cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
        "sm_80": [
            cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
    },
    smem=_gate_up_smem,
    # sm_80, fp32 x and weights: BLOCK_K 32 spilled 464-488 B per thread (compile-check --sass), 16 none
    fp32_default={"sm_80": cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, GROUP_M=8)},
)

# S = dropout(X) A^T and t = dY B: rank-sized outputs, K-long reductions.
SHRINK = ConfigSet(
    "shrink",
    default={
        "sm_90": cfg(4, 4, BLOCK_M=64, BLOCK_K=128),
        "sm_80": cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
        "interp": cfg(4, 1, BLOCK_M=32, BLOCK_K=64),
    },
    candidates={
        "sm_90": [cfg(4, 4, BLOCK_M=32, BLOCK_K=128), cfg(8, 3, BLOCK_M=128, BLOCK_K=64), cfg(4, 4, BLOCK_M=64, BLOCK_K=64)],
        "sm_80": [cfg(4, 4, BLOCK_M=32, BLOCK_K=128), cfg(4, 3, BLOCK_M=128, BLOCK_K=32), cfg(4, 4, BLOCK_M=64, BLOCK_K=128)],
    },
    smem=_shrink_smem,
    # fp32 adapters (tf32x3 holds both operand tiles' splits): the 16-bit default spilled 288-464 B at
    # rank 64 on sm_80; 32-column K steps in 2 stages fit every rank (88-230 registers)
    fp32_default={"sm_80": cfg(4, 2, BLOCK_M=64, BLOCK_K=32)},
)

# out = P^T Q over the token dimension: dW, dA, dB (and db).
TOKEN_REDUCE = ConfigSet(
    "token_reduce",
    default={
        "sm_90": cfg(8, 3, BLOCK_A=128, BLOCK_B=128, BLOCK_T=64),
        "sm_80": cfg(8, 3, BLOCK_A=128, BLOCK_B=128, BLOCK_T=32),
        "interp": cfg(4, 1, BLOCK_A=64, BLOCK_B=64, BLOCK_T=32),
    },
    candidates={
        "sm_90": [cfg(4, 4, BLOCK_A=64, BLOCK_B=128, BLOCK_T=64), cfg(4, 4, BLOCK_A=128, BLOCK_B=64, BLOCK_T=64),
                  cfg(8, 4, BLOCK_A=128, BLOCK_B=256, BLOCK_T=64)],
        "sm_80": [cfg(4, 4, BLOCK_A=64, BLOCK_B=128, BLOCK_T=32), cfg(4, 4, BLOCK_A=128, BLOCK_B=64, BLOCK_T=32),
                  cfg(4, 3, BLOCK_A=64, BLOCK_B=64, BLOCK_T=64)],
    },
    smem=_tn_smem,
)

# Elementwise masked activation forward/backward.
ELEMENTWISE = ConfigSet(
    "elementwise",
    default={
        "sm_90": cfg(4, 1, BLOCK_M=4, BLOCK_N=512),
        "sm_80": cfg(4, 1, BLOCK_M=4, BLOCK_N=512),
        "interp": cfg(4, 1, BLOCK_M=16, BLOCK_N=256),
    },
    candidates={
        "sm_90": [cfg(8, 1, BLOCK_M=8, BLOCK_N=1024), cfg(4, 1, BLOCK_M=2, BLOCK_N=1024)],
        "sm_80": [cfg(8, 1, BLOCK_M=8, BLOCK_N=1024), cfg(4, 1, BLOCK_M=2, BLOCK_N=1024)],
    },
)

# The activation backward with the LoRA gradients (act_bwd_lora): an elementwise tile walk over rows
# that also feeds rank-sized dots, so BLOCK_M >= 16 (tl.dot) and fp32 dB/dA accumulators of
# rank x BLOCK_N live across the walk. The launcher halves BLOCK_N for ranks above 32. 16 x 128 tiles
# on 4 warps (16 elements per thread): no spills in any variant on sm_80 or sm_90 (compile-check
# --sass); 8 warps (8 elements per thread) cost 20-40% more instructions per element, since every
# warp loads the whole rank-sized operand of each dot, and 32-row tiles spilled 40-384 B.
ACT_BWD_LORA = ConfigSet(
    "act_bwd_lora",
    default={
        "sm_90": cfg(4, 2, BLOCK_M=16, BLOCK_N=128),
        "sm_80": cfg(4, 2, BLOCK_M=16, BLOCK_N=128),
        "interp": cfg(4, 1, BLOCK_M=16, BLOCK_N=64),
    },
    candidates={
        "sm_90": [cfg(8, 2, BLOCK_M=16, BLOCK_N=128), cfg(4, 2, BLOCK_M=32, BLOCK_N=64), cfg(4, 3, BLOCK_M=16, BLOCK_N=128)],
        "sm_80": [cfg(4, 1, BLOCK_M=16, BLOCK_N=128), cfg(8, 2, BLOCK_M=16, BLOCK_N=128)],
    },
)

# LoRA expand (and masked activation) passes over a cuBLAS GEMM's output (lora_epilogue): an
# elementwise read-modify-write of (M, N) tiles with a rank-r dot into an fp32 tile.
EPILOGUE = ConfigSet(
    "epilogue",
    default={
        "sm_90": cfg(4, 2, BLOCK_M=32, BLOCK_N=128),
        "sm_80": cfg(4, 2, BLOCK_M=32, BLOCK_N=128),
        "interp": cfg(4, 1, BLOCK_M=16, BLOCK_N=64),
    },
    candidates={
        "sm_90": [cfg(8, 2, BLOCK_M=64, BLOCK_N=128), cfg(4, 2, BLOCK_M=16, BLOCK_N=256), cfg(4, 2, BLOCK_M=64, BLOCK_N=64)],
        "sm_80": [cfg(8, 2, BLOCK_M=64, BLOCK_N=128), cfg(4, 2, BLOCK_M=16, BLOCK_N=256), cfg(4, 2, BLOCK_M=64, BLOCK_N=64)],
    },
)

# The fixed-order sum of split partials (split_sum): a few thousand to a million fp32 elements, a handful
# of splits; memory-bound and small, so not tuned.
SPLIT_SUM = ConfigSet(
    "split_sum",
    default={"sm_90": cfg(4, 1, BLOCK=1024), "sm_80": cfg(4, 1, BLOCK=1024), "interp": cfg(4, 1, BLOCK=1024)},
    candidates={},
)

CONFIG_SETS = {c.name: c for c in (GEMM, GATE_UP, SHRINK, TOKEN_REDUCE, ELEMENTWISE, ACT_BWD_LORA, EPILOGUE,
                                   SPLIT_SUM)}


def arch_of(device: torch.device) -> str:
    """The config tables for ``device``: the dry run's target on the meta device, "interp" in the
    interpreter and for CPU tensors, else by the GPU (``_cuda_arch``)."""
    target = dry_run()
    if target is not None and device.type == "meta":
        return target.arch
    if interpreting() or device.type != "cuda":
        return "interp"
    return _cuda_arch(device_index(device))


@functools.cache
def _cuda_arch(index: int) -> str:
    """"sm_90" for a GPU of compute capability 9.0 or newer whose blocks may use as much shared memory as
    an H100's (SHARED_LIMIT: the sm_90 configs need up to 192 KB), else "sm_80". Asked once per device."""
    major, _ = torch.cuda.get_device_capability(index)
    if major < 9:
        return "sm_80"
    return "sm_90" if max_shared_per_block(index) >= SHARED_LIMIT["sm_90"] else "sm_80"


def max_shared_per_block(index: int) -> int:
    """The shared memory a block of GPU ``index`` may use, opt-in included, in bytes (Triton's own figure)."""
    from triton.runtime.driver import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


def token_splits(tiles: int, T: int, block_t: int, device: torch.device) -> int:
    """Splits of a T-long token reduction so that tiles x splits roughly fills the GPU twice (each
    split keeps at least 4 blocks of ``block_t`` tokens); 1 in the interpreter."""
    target = dry_run()
    if target is not None and device.type == "meta":
        sms = target.sms
    elif device.type != "cuda" or arch_of(device) == "interp":
        return 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = cdiv(2 * sms, max(tiles, 1))
    most = max(1, T // (4 * block_t))
    return max(1, min(want, most, 64))


def autotune_enabled() -> bool:
    return os.environ.get("TRANSPEFT_TRITON_AUTOTUNE", "1") not in ("0", "", "false", "False")


def bucket(n: int) -> int:
    """Token counts are tuned per power-of-two bucket (any new batch size would re-tune otherwise)."""
    return next_pow2(max(int(n), 1))


_CACHE: dict = {}


def layout_key(*tensors) -> tuple:
    """What of the operands' layouts changes the generated code, and so the best config: per tensor
    (None allowed), whether its last stride is the unit one, and whether its address and its other
    strides are 16-byte aligned (Triton specialises both)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        elem = t.element_size()
        unit_last = t.dim() == 0 or t.stride(-1) == 1
        aligned = t.device.type == "meta" or (
            t.data_ptr() % 16 == 0 and all(s * elem % 16 == 0 for s in t.stride() if s != 1))
        out.append((unit_last, aligned))
    return tuple(out)


def choose(family: ConfigSet, device: torch.device, key: tuple, elem_bytes: int, launch, fits=None) -> KernelConfig:
    """The config to launch with. ``launch(config)`` runs the kernel once and is what the tuner times,
    so it must only overwrite outputs; a launcher whose kernel updates a tensor in place passes a
    ``launch`` that works on scratch copies (lora_epilogue). ``fits(config)``: False for the candidates
    the tuner must not try for this launch (they spill there; every default fits, as the tests check)."""
    arch = arch_of(device)
    default = family.default_for(arch, elem_bytes)
    if arch == "interp" or not autotune_enabled() or device.type == "meta":
        return default
    full_key = (family.name, arch, key)
    hit = _CACHE.get(full_key)
    if hit is not None:
        return hit
    # the table's limit, or less on a GPU that shares sm_80's tables (99 KB per block on the RTX 30/40 series)
    limit = SHARED_LIMIT[arch]
    if device.type == "cuda":
        limit = min(limit, max_shared_per_block(device_index(device)))
    cands = [c for c in family.configs(arch, elem_bytes) if (family.smem is None or family.smem(c, elem_bytes) <= limit)
             and (fits is None or fits(c))]
    best, best_ms = default, float("inf")
    for c in cands:
        try:
            ms = triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20)
        except Exception:  # a candidate that does not fit (registers/shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    _CACHE[full_key] = best
    return best
