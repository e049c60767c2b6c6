"""The argument structs of csrc/include/transpeft/capi.h as ctypes mirrors. Standard library only.

Each entry point takes one struct by pointer (plus the stream), so a value reaches the field it is
named for or the call fails: the mirrors are built with keywords only, every field without a
default must be given, and a library whose structs differ from these (another ABI version, or a
size or field offset that does not match) is refused when it is loaded (``check_library``).

Changing a struct: edit capi.h, capi_layout.h (its offset table) and the mirror here, and bump
TRANSPEFT_CUDA_ABI_VERSION and ABI_VERSION together.
"""
from __future__ import annotations

import ctypes

ABI_VERSION = 6  # TRANSPEFT_CUDA_ABI_VERSION in capi.h

_P, _I64, _I32, _U32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_float


class _Args(ctypes.Structure):
    """A capi.h struct; ``_c_name_`` is its typedef name there, ``_defaults_`` the fields that may be
    left out (the optional parts of an operation: NULL pointers, zero sizes, an off mask)."""

    _c_name_ = ""
    _defaults_: dict = {}

    def __init__(self, **fields):
        checked = _CHECKED.get((type(self), *fields))
        defaults, nested = checked if checked is not None else _check(type(self), fields)
        for name, ftype in nested:  # ctypes would also take a tuple for a nested struct, filled positionally
            if not isinstance(fields[name], ftype):
                raise TypeError(f"{type(self).__name__}.{name}: expected a {ftype.__name__}, "
                                f"got {type(fields[name]).__name__}")
        super().__init__(**defaults, **fields)


# (mirror class, the field names given, in order) -> (the defaults to add, the nested-struct fields
# given). A wrapper fills the same fields on every call, so the name checks run once per call site
# instead of on each of the dozen structs an op call fills.
_CHECKED: dict[tuple, tuple[dict, tuple]] = {}


def _check(cls: type, fields: dict) -> tuple[dict, tuple]:
    """Check a keyword set against ``cls``'s fields (TypeError naming unknown and missing fields); cache
    and return the defaults it leaves to add and the nested-struct fields it gives."""
    names = frozenset(f[0] for f in cls._fields_)
    required = names - frozenset(cls._defaults_)
    if not (fields.keys() <= names and required <= fields.keys()):
        unknown = sorted(set(fields) - names)
        missing = [f[0] for f in cls._fields_ if f[0] in required and f[0] not in fields]
        problems = ([f"unknown fields {unknown}"] if unknown else []) + ([f"missing fields {missing}"] if missing else [])
        raise TypeError(f"{cls.__name__}: " + "; ".join(problems))
    nested = tuple((n, t) for n, t in cls._fields_ if issubclass(t, _Args) and n in fields)
    # a nested struct's default is a factory (RandomMask.off, which returns one shared instance)
    defaults = {k: (v() if callable(v) else v) for k, v in cls._defaults_.items() if k not in fields}
    _CHECKED[(cls, *fields)] = defaults, nested
    return defaults, nested


class RandomMask(_Args):
    """Keep element (i, j) of a (rows, cols) tensor iff 16-bit lane j % 8 of the Philox call at
    i * ceil(cols / 8) + j // 8 is >= ``threshold`` (reference.philox.keep_threshold(p), in [0, 65536]),
    then scale it by ``kept``; ``seed`` is the address of the int64 key in device memory; on = 0: no mask."""

    _c_name_ = "TranspeftRandomMask"
    _fields_ = [("threshold", _U32), ("kept", _F32), ("seed", _P), ("on", _I32)]

    @classmethod
    def off(cls) -> "RandomMask":
        """The off mask. One shared instance: a struct given it as a field copies its bytes, so no struct
        ever refers to it afterwards (nobody may modify it; it is made once because wrappers fill a
        dozen structs per op call)."""
        return _OFF


_OFF = RandomMask(threshold=0, kept=1.0, seed=None, on=0)


class ActFwdArgs(_Args):
    _c_name_ = "TranspeftActFwdArgs"
    _fields_ = [
        ("g", _P), ("ldg", _I64), ("u", _P), ("ldu", _I64), ("h", _P), ("ldh", _I64),
        ("M", _I64), ("I", _I64), ("activation", _I32), ("dtype", _I32), ("mask", RandomMask),
        # the fused down-projection shrink, absent when a is NULL
        ("a", _P), ("lda", _I64), ("rank", _I64), ("drop", RandomMask), ("s", _P), ("lds", _I64), ("a_dtype", _I32),
        # the tensor-core forward's column split of S_d (fp32 partials), absent when s_part is NULL
        ("s_part", _P), ("col_splits", _I64), ("cols_per_split", _I64),
        # the gate/up LoRA expands, added to g and u in place (tensor-core forward), absent when sg is NULL
        ("sg", _P), ("ldsg", _I64), ("bg", _P), ("ldbg", _I64), ("su", _P), ("ldsu", _I64), ("bu", _P), ("ldbu", _I64),
        ("rank_gu", _I64), ("scaling_g", _F32), ("scaling_u", _F32),
    ]
    _defaults_ = dict(a=None, lda=0, rank=0, a_dtype=0, drop=RandomMask.off, s=None, lds=0, s_part=None, col_splits=1,
                      cols_per_split=0, sg=None, ldsg=0, bg=None, ldbg=0, su=None, ldsu=0, bu=None, ldbu=0, rank_gu=0,
                      scaling_g=0.0, scaling_u=0.0)


class ActBwdArgs(_Args):
    _c_name_ = "TranspeftActBwdArgs"
    _fields_ = [
        ("dh", _P), ("lddh", _I64), ("g", _P), ("ldg", _I64), ("u", _P), ("ldu", _I64),
        ("dg", _P), ("lddg", _I64), ("du", _P), ("lddu", _I64),
        ("M", _I64), ("I", _I64), ("activation", _I32), ("dtype", _I32), ("mask", RandomMask),
        # the down projection's LoRA term (absent when t is NULL) and the optional outputs
        ("t", _P), ("ldt", _I64), ("a", _P), ("lda", _I64), ("rank", _I64), ("scaling", _F32), ("a_dtype", _I32),
        ("drop", RandomMask), ("h_out", _P), ("ldh_out", _I64), ("xd_out", _P), ("ldxd", _I64),
    ]
    _defaults_ = dict(t=None, ldt=0, a=None, lda=0, rank=0, a_dtype=0, scaling=0.0, drop=RandomMask.off,
                      h_out=None, ldh_out=0, xd_out=None, ldxd=0)


class ActBwdLoraArgs(_Args):
    _c_name_ = "TranspeftActBwdLoraArgs"
    _fields_ = [("act", ActBwdArgs), ("da_part", _P), ("splits", _I64), ("rows_per_split", _I64),
                ("sg", _P), ("ldsg", _I64), ("su", _P), ("ldsu", _I64), ("rank_gu", _I64), ("scaling_g", _F32),
                ("scaling_u", _F32), ("dbg_part", _P), ("dbu_part", _P)]
    _defaults_ = dict(sg=None, ldsg=0, su=None, ldsu=0, rank_gu=0, scaling_g=1.0, scaling_u=1.0, dbg_part=None,
                      dbu_part=None)


class LoraShrinkArgs(_Args):
    _c_name_ = "TranspeftLoraShrinkArgs"
    _fields_ = [
        ("x", _P), ("sxm", _I64), ("sxk", _I64), ("a", _P), ("sar", _I64), ("sak", _I64), ("s", _P), ("lds", _I64),
        ("M", _I64), ("K", _I64), ("R", _I64), ("x_dtype", _I32), ("a_dtype", _I32), ("drop", RandomMask),
        # the tensor-core shrink's split of K (fp32 partials of s), absent when s_part is NULL
        ("s_part", _P), ("k_splits", _I64), ("cols_per_split", _I64),
    ]
    _defaults_ = dict(drop=RandomMask.off, s_part=None, k_splits=1, cols_per_split=0)


class LoraExpandArgs(_Args):
    _c_name_ = "TranspeftLoraExpandArgs"
    _fields_ = [
        ("y", _P), ("ldy", _I64), ("s", _P), ("ssm", _I64), ("ssr", _I64), ("b", _P), ("sbn", _I64), ("sbr", _I64),
        ("M", _I64), ("N", _I64), ("R", _I64), ("y_dtype", _I32), ("lora_dtype", _I32), ("scaling", _F32),
        ("grad_mode", _I32), ("drop", RandomMask),
    ]
    _defaults_ = dict(drop=RandomMask.off)


class LoraDropoutCastArgs(_Args):
    _c_name_ = "TranspeftLoraDropoutCastArgs"
    _fields_ = [
        ("x", _P), ("sxm", _I64), ("sxk", _I64), ("out", _P), ("ldo", _I64), ("M", _I64), ("K", _I64),
        ("x_dtype", _I32), ("out_dtype", _I32), ("drop", RandomMask),
    ]
    _defaults_ = dict(drop=RandomMask.off)


class LoraTokenReduceArgs(_Args):
    _c_name_ = "TranspeftLoraTokenReduceArgs"
    _fields_ = [
        ("l", _P), ("ldl", _I64), ("x", _P), ("ldx", _I64), ("part", _P), ("M", _I64), ("N", _I64), ("R", _I64),
        ("x_dtype", _I32), ("l_dtype", _I32), ("scaling", _F32), ("drop", RandomMask), ("splits", _I64),
        ("rows_per_split", _I64),
    ]
    _defaults_ = dict(drop=RandomMask.off)


STRUCTS = (RandomMask, ActFwdArgs, ActBwdArgs, ActBwdLoraArgs, LoraShrinkArgs, LoraExpandArgs, LoraDropoutCastArgs,
           LoraTokenReduceArgs)

# entry point -> the struct it takes (by const pointer, followed by the stream as uint64)
ENTRY_POINTS = {
    "transpeft_masked_gated_act_fwd": ActFwdArgs,
    "transpeft_masked_gated_act_bwd": ActBwdArgs,
    "transpeft_act_bwd_lora": ActBwdLoraArgs,
    "transpeft_lora_shrink": LoraShrinkArgs,
    "transpeft_lora_expand": LoraExpandArgs,
    "transpeft_lora_dropout_cast": LoraDropoutCastArgs,
    "transpeft_lora_token_reduce": LoraTokenReduceArgs,
}


class AbiMismatch(RuntimeError):
    """The library's C interface is not the one these mirrors describe."""


def layout_mismatch(size_of, offset_of) -> str | None:
    """The first difference between the mirrors and a library's layout, described, or None.
    ``size_of(c_name)`` and ``offset_of(c_name, field)`` are the library's answers (-1: unknown)."""
    for struct in STRUCTS:
        name = struct._c_name_
        lib_size, own = size_of(name), ctypes.sizeof(struct)
        if lib_size != own:
            have = "does not have it" if lib_size < 0 else f"has {lib_size} bytes"
            return f"struct {name}: the library {have}, this package's mirror has {own} bytes"
        for field, _ in struct._fields_:
            lib_off, own_off = offset_of(name, field), getattr(struct, field).offset
            if lib_off != own_off:
                have = "has no such field" if lib_off < 0 else f"has it at offset {lib_off}"
                return f"field {name}.{field}: the library {have}, this package's mirror at offset {own_off}"
    return None


def check_library(lib: ctypes.CDLL, path, rebuild: str) -> None:
    """Raise AbiMismatch unless ``lib`` speaks this ABI version with these struct layouts.
    ``rebuild`` says how to rebuild the library; it ends each message."""
    lib.transpeft_cuda_abi_version.restype = ctypes.c_int
    lib.transpeft_cuda_abi_version.argtypes = []
    version = lib.transpeft_cuda_abi_version()
    if version != ABI_VERSION:
        raise AbiMismatch(f"{path}: C interface version {version}, this package needs {ABI_VERSION} "
                          f"(the library was built from older or newer sources); {rebuild}")
    size_fn, offset_fn = lib.transpeft_cuda_struct_size, lib.transpeft_cuda_field_offset
    size_fn.restype, size_fn.argtypes = ctypes.c_int64, [ctypes.c_char_p]
    offset_fn.restype, offset_fn.argtypes = ctypes.c_int64, [ctypes.c_char_p, ctypes.c_char_p]
    problem = layout_mismatch(lambda s: size_fn(s.encode()), lambda s, f: offset_fn(s.encode(), f.encode()))
    if problem is not None:
        raise AbiMismatch(f"{path}: {problem} (both say C interface version {ABI_VERSION}: the library was built "
                          f"from other sources); {rebuild}")
