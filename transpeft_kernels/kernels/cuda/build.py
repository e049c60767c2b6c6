"""Building libtranspeft_cuda.so (and its CPU emulation) from csrc/. Standard library only: setup.py
loads this file by path before the package is importable.

The library is plain nvcc output: .cu files that include only CUDA and csrc/include headers, linked
with the static CUDA runtime, exporting the C functions of csrc/include/transpeft/capi.h. It does
not link against torch, so it builds the same way next to a CPU-only torch wheel (where
torch.utils.cpp_extension refuses CUDA sources) and next to a CUDA torch.

    build(out_dir)            nvcc through a generated build.ninja, run by ninja -> out_dir/libtranspeft_cuda.so
    build_emulation(out_dir)  g++ -> out_dir/libtranspeft_cuda_emulation.so: the same .cu files compiled
                              as C++ against csrc/emulation/simt/cuda_runtime.h, which runs each kernel on
                              the CPU with one fiber per CUDA thread (barriers and shuffles real)
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

LIB_NAME = "libtranspeft_cuda.so"
EMULATION_LIB_NAME = "libtranspeft_cuda_emulation.so"
ARCHS = ("80", "90a")  # A100; H100/H200 (sm_90a SASS)
KERNEL_SOURCES = ("kernels/masked_gated_act.cu", "kernels/act_lora.cu", "kernels/lora.cu", "kernels/lora_expand.cu",
                  "kernels/lora_reduce.cu", "kernels/lora_shrink.cu", "kernels/runtime.cu")
EMULATION_SOURCE = "emulation/kernels_on_host.cpp"  # includes KERNEL_SOURCES
EMULATION_SHIM = "emulation/simt"  # its cuda_runtime.h stands in for CUDA's in the emulation build

_HERE = Path(__file__).resolve().parent


def find_csrc() -> Path | None:
    """csrc/ of a source checkout (editable install), else the copy setup.py puts in the package."""
    for candidate in (_HERE.parents[2] / "csrc", _HERE / "csrc"):
        if (candidate / "kernels").is_dir() and (candidate / "include" / "transpeft" / "capi.h").is_file():
            return candidate
    return None


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_ninja() -> str | None:
    try:
        import ninja  # the PyPI package ships the binary

        path = Path(ninja.BIN_DIR) / "ninja"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which("ninja")


def default_cache_dir() -> Path:
    """$TRANSPEFT_CACHE_DIR, else $XDG_CACHE_HOME/transpeft_kernels, else ~/.cache/transpeft_kernels."""
    explicit = os.environ.get("TRANSPEFT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "transpeft_kernels"


def gencode_flags(archs=ARCHS) -> list[str]:
    """SASS for each arch; plus compute_80 PTX so that a newer GPU can JIT the sm_80 code."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if "80" in archs:
        flags += ["-gencode", "arch=compute_80,code=compute_80"]
    return flags


def nvcc_compile_flags(csrc: Path, archs=ARCHS) -> list[str]:
    # --threads 0: compile the architectures of one file in parallel (the act kernels take ~1 min each)
    return ["-std=c++17", "-O3", "--threads", "0", "-Xcompiler", "-fPIC", f"-I{csrc / 'include'}",
            *gencode_flags(archs)]


def sources_digest(csrc: Path, archs=ARCHS) -> str:
    """Hash of every source and header and the arch list: the JIT build is redone when it changes."""
    h = hashlib.sha256(",".join(archs).encode())
    for path in sorted([*(csrc / "include").rglob("*"), *(csrc / "kernels").rglob("*")]):
        if path.is_file():
            h.update(str(path.relative_to(csrc)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def write_build_ninja(build_dir: Path, csrc: Path, nvcc: str, archs=ARCHS) -> Path:
    """build_dir/build.ninja: one nvcc compile per .cu (run in parallel by ninja), one nvcc link."""
    q = shlex.quote
    flags = " ".join(q(f) for f in nvcc_compile_flags(csrc, archs))
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {q(nvcc)}",
        f"flags = {flags}",
        "rule nvcc_compile",
        "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule nvcc_link",
        "  command = $nvcc -shared -cudart static $in -o $out",
        "  description = link $out",
    ]
    objects = []
    for src in KERNEL_SOURCES:
        obj = f"obj/{Path(src).stem}.o"
        objects.append(obj)
        lines.append(f"build {obj}: nvcc_compile {q(str(csrc / src))}")
    lines.append(f"build {LIB_NAME}: nvcc_link {' '.join(objects)}")
    lines.append(f"default {LIB_NAME}")
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(out_dir: Path | str | None = None, archs=ARCHS, verbose: bool = False, jobs: int | None = None) -> Path:
    """Compile csrc/kernels into out_dir/libtranspeft_cuda.so (default: the JIT cache directory,
    ``default_cache_dir()/cuda``) and return its path. Raises RuntimeError when nvcc, ninja or the
    sources are missing or the compile fails (with the compiler's output)."""
    csrc = find_csrc()
    if csrc is None:
        raise RuntimeError("the CUDA sources (csrc/) are not in this installation: build from a source checkout")
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin)")
    ninja = find_ninja()
    if ninja is None:
        raise RuntimeError("ninja not found: pip install ninja")
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "cuda"
    write_build_ninja(out, csrc, nvcc, archs)
    cmd = [ninja, "-C", str(out)] + (["-v"] if verbose else []) + ([f"-j{jobs}"] if jobs else [])
    proc = subprocess.run(cmd, capture_output=not verbose, text=True)
    if proc.returncode != 0:
        log = "" if verbose else (proc.stdout or "")[-6000:] + (proc.stderr or "")[-2000:]
        raise RuntimeError(f"building {LIB_NAME} failed ({' '.join(cmd)}):\n{log}")
    (out / "SOURCES_DIGEST").write_text(sources_digest(csrc, archs) + "\n")
    return out / LIB_NAME


def build_emulation(out_dir: Path | str | None = None) -> Path:
    """g++ the kernels with the host stand-in for the CUDA runtime into out_dir (default: cache dir/emulation)."""
    csrc = find_csrc()
    if csrc is None:
        raise RuntimeError("the C++ sources (csrc/) are not in this installation: use a source checkout")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++ or $CXX)")
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "emulation"
    out.mkdir(parents=True, exist_ok=True)
    lib = out / EMULATION_LIB_NAME
    shim = csrc / EMULATION_SHIM / "cuda_runtime.h"
    digest = sources_digest(csrc, ("host",)) + hashlib.sha256(
        shim.read_bytes() + (csrc / EMULATION_SOURCE).read_bytes()).hexdigest()[:8]
    stamp = out / "SOURCES_DIGEST"
    if lib.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return lib
    tmp = out / f".{EMULATION_LIB_NAME}.{os.getpid()}"
    cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{shim.parent}", f"-I{csrc / 'include'}", str(csrc / EMULATION_SOURCE),
           "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the emulation library failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    os.replace(tmp, lib)  # atomic: concurrent test processes never load a half-written file
    stamp.write_text(digest + "\n")
    return lib


if __name__ == "__main__":  # python transpeft_kernels/kernels/cuda/build.py [OUT_DIR]
    import sys

    print(build(sys.argv[1] if len(sys.argv) > 1 else None, verbose=True))
