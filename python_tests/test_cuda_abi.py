"""The typed C ABI of the CUDA backend's library (csrc/include/transpeft/capi.h, kernels/cuda/abi.py).

Entry points take one argument struct each; the Python mirrors are built with keywords only and
every required field named, and a library whose ABI version, struct sizes or field offsets differ
from the mirrors is refused at load with an error that names the struct and both values and says
how to rebuild. The stale libraries here are the host emulation built (g++) from an edited copy of
csrc/: the same layout table and load check as the nvcc library, without nvcc.
"""
import contextlib
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from transpeft_kernels.kernels.cuda import abi, build, library

ROOT = Path(__file__).resolve().parent.parent
CAPI = Path("include") / "transpeft" / "capi.h"
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found: cannot build the emulation")


def _mask():
    return abi.RandomMask(threshold=16384, kept=1.5, seed=None, on=0)


def test_mirrors_take_keywords_only_and_every_required_field():
    with pytest.raises(TypeError):
        abi.RandomMask(16384, 1.5, None, 0)  # positional values are refused
    with pytest.raises(TypeError, match=r"missing fields \['on'\]"):
        abi.RandomMask(threshold=16384, kept=1.5, seed=None)
    with pytest.raises(TypeError, match=r"unknown fields \['ldx'\]"):
        abi.LoraDropoutCastArgs(x=None, sxm=1, sxk=1, out=None, ldo=1, M=0, K=0, x_dtype=0, out_dtype=0, ldx=3)
    with pytest.raises(TypeError, match=r"ActFwdArgs.mask: expected a RandomMask, got tuple"):
        abi.ActFwdArgs(g=None, ldg=1, u=None, ldu=1, h=None, ldh=1, M=0, I=0, dtype=0, activation=0,
                       mask=(16384, 1.5, None, 0))
    # the checks of a keyword set are cached per call site; the nested type is still checked every time
    for bad in (False, False, True):
        mask = (16384, 1.5, None, 0) if bad else _mask()
        with pytest.raises(TypeError, match="LoraShrinkArgs.drop") if bad else contextlib.nullcontext():
            abi.LoraShrinkArgs(x=None, sxm=1, sxk=1, a=None, sar=1, sak=1, s=None, lds=1, M=0, K=0, R=0, x_dtype=0,
                               a_dtype=0, drop=mask)
    with pytest.raises(TypeError, match=r"missing fields \['on'\]"):  # a failed check is not cached
        abi.RandomMask(threshold=16384, kept=1.5, seed=None)
    # the optional parts default to absent: NULL pointers and an off mask, fresh per instance
    a = abi.ActFwdArgs(g=None, ldg=1, u=None, ldu=1, h=None, ldh=1, M=0, I=0, dtype=0, activation=0, mask=_mask())
    b = abi.ActFwdArgs(g=None, ldg=1, u=None, ldu=1, h=None, ldh=1, M=0, I=0, dtype=0, activation=0, mask=_mask())
    assert a.a is None and a.s is None and a.drop.on == 0 and a.drop.kept == 1.0 and a.mask.kept == 1.5
    a.drop.kept = 3.0
    assert b.drop.kept == 1.0


def test_capi_h_compiles_as_c_with_the_mirrors_layout(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "transpeft/capi.h"', "int main(void) {"]
    for s in abi.STRUCTS:
        lines.append(f'  printf("{s._c_name_} %zu\\n", sizeof({s._c_name_}));')
        lines += [f'  printf("{s._c_name_}.{f} %zu\\n", offsetof({s._c_name_}, {f}));' for f, _ in s._fields_]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines + ["  return 0;", "}"]) + "\n")
    exe = tmp_path / "layout"
    proc = subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{ROOT / 'csrc' / 'include'}",
                           str(src), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.rsplit(" ", 1) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                              check=True).stdout.splitlines())
    for s in abi.STRUCTS:
        assert int(got[s._c_name_]) == ctypes.sizeof(s), s._c_name_
        for f, _ in s._fields_:
            assert int(got[f"{s._c_name_}.{f}"]) == getattr(s, f).offset, f"{s._c_name_}.{f}"


@needs_gxx
def test_the_current_library_passes_the_check_and_knows_no_other_struct(monkeypatch):
    monkeypatch.setenv("TRANSPEFT_CUDA_EMULATE", "1")
    lib = library.load()
    assert lib.emulated
    raw = lib._lib
    assert raw.transpeft_cuda_struct_size(b"TranspeftNoSuchArgs") == -1
    assert raw.transpeft_cuda_field_offset(b"TranspeftActFwdArgs", b"no_such_field") == -1
    assert raw.transpeft_cuda_struct_size(b"TranspeftActBwdArgs") == ctypes.sizeof(abi.ActBwdArgs)
    with pytest.raises(TypeError, match="transpeft_lora_shrink: expected a LoraShrinkArgs, got LoraExpandArgs"):
        lib.call("transpeft_lora_shrink", abi.LoraExpandArgs(y=None, ldy=1, s=None, ssm=1, ssr=1, b=None, sbn=1, sbr=1,
                                                             M=0, N=0, R=0, y_dtype=0, lora_dtype=0, scaling=1.0,
                                                             grad_mode=0))


def _stale_emulation(tmp_path, monkeypatch, old: str, new: str) -> Path:
    """The emulation library built from a copy of csrc/ with ``old`` replaced by ``new`` in capi.h."""
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc, ignore=shutil.ignore_patterns("tests"))
    text = (csrc / CAPI).read_text()
    assert text.count(old) == 1, old
    (csrc / CAPI).write_text(text.replace(old, new))
    monkeypatch.setattr(build, "find_csrc", lambda: csrc)
    return build.build_emulation(tmp_path / "stale")


FWD_HEAD = "  int64_t M;\n  int64_t I;\n  int32_t activation;\n  int32_t dtype;\n  TranspeftRandomMask mask;\n  const void* a;"
STALE = {
    # a library from before the struct interface, or from a later one
    "version": (f"#define TRANSPEFT_CUDA_ABI_VERSION {abi.ABI_VERSION}", "#define TRANSPEFT_CUDA_ABI_VERSION 1",
                rf"C interface version 1, this package needs {abi.ABI_VERSION}"),
    # a field added without bumping the version
    "size": ("  int64_t cols_per_split;\n} TranspeftLoraShrinkArgs;",
             "  int64_t cols_per_split;\n  int64_t extra;\n} TranspeftLoraShrinkArgs;",
             r"struct TranspeftLoraShrinkArgs: the library has 152 bytes, this package's mirror has 144 bytes"),
    # two fields of one type swapped: same size, every value in the other's place
    "order": (FWD_HEAD, FWD_HEAD.replace("int64_t M;\n  int64_t I;", "int64_t I;\n  int64_t M;"),
              r"field TranspeftActFwdArgs.M: the library has it at offset 56, this package's mirror at offset 48"),
}


@needs_gxx
@pytest.mark.parametrize("case", sorted(STALE))
def test_a_stale_emulation_build_is_refused_naming_the_difference(tmp_path, monkeypatch, case):
    old, new, message = STALE[case]
    lib_path = _stale_emulation(tmp_path, monkeypatch, old, new)
    with pytest.raises(abi.AbiMismatch, match=message) as err:
        library.Library(lib_path, emulated=True)
    assert str(lib_path) in str(err.value) and f"delete {lib_path.parent} and rerun" in str(err.value)


@needs_gxx
def test_a_stale_library_named_by_transpeft_cuda_lib_is_refused_with_the_build_routes(tmp_path, monkeypatch):
    old, new, message = STALE["size"]
    lib_path = _stale_emulation(tmp_path, monkeypatch, old, new)
    monkeypatch.delenv("TRANSPEFT_CUDA_EMULATE", raising=False)
    monkeypatch.setenv("TRANSPEFT_CUDA_LIB", str(lib_path))
    monkeypatch.setattr(library, "_LOADED", None)
    with pytest.raises(RuntimeError, match=message) as err:
        library.load()
    assert "python -m transpeft_kernels build-cuda" in str(err.value)
    assert library._LOADED is None  # nothing half-loaded stays behind
