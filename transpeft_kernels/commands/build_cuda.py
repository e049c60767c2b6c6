"""``build-cuda``: the just-in-time route to the CUDA backend's library.

Writes a build.ninja for csrc/kernels and runs ninja (the `ninja` package or one on PATH) with nvcc,
producing libtranspeft_cuda.so in the cache directory where backend="cuda" finds it
(``$TRANSPEFT_CACHE_DIR``, default ~/.cache/transpeft_kernels/cuda), or in --out. ninja is driven
directly because torch.utils.cpp_extension cannot compile .cu files against a CPU-only torch, and
the library does not link against torch anyway (see kernels/cuda/build.py).
"""
from __future__ import annotations

import argparse

NAME = "build-cuda"
HELP = "compile the CUDA backend's kernels (csrc/) with nvcc and ninja into the cache directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default: the cache directory backend='cuda' searches)")
    p.add_argument("--arch", default="80,90a", help="comma-separated GPU architectures (default 80,90a)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: ninja's choice)")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands and output")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..kernels.cuda import build

    archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    if not archs or any(not a.rstrip("a").isdigit() for a in archs):
        raise UserError(f"--arch: expected architectures such as 80,90a, got {args.arch!r}")
    path = build.build(args.out, archs=archs, verbose=args.verbose, jobs=args.jobs)
    print(f"built {path}")
    if args.out is not None:
        print(f"point backend='cuda' at it with: export TRANSPEFT_CUDA_LIB={path}")
    return 0
