// The sizes and field offsets of the argument structs of capi.h, as the including translation unit
// compiles them: the bodies of transpeft_cuda_struct_size / transpeft_cuda_field_offset for the CUDA
// library (runtime.cu) and the host emulation. The binding compares them with its ctypes mirrors at
// load, so a library built from other sources is refused instead of reading fields at wrong offsets.
// Every field of every struct is listed; a field added to capi.h must be added here (the binding
// reports a mirror field that this table lacks).
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "capi.h"

namespace transpeft {
namespace abi {

struct LayoutEntry {
  const char* type;
  const char* field;  // nullptr: the entry is the struct's size
  int64_t value;
};

#define TRANSPEFT_SIZE(S) LayoutEntry{#S, nullptr, static_cast<int64_t>(sizeof(S))}
#define TRANSPEFT_FIELD(S, f) LayoutEntry{#S, #f, static_cast<int64_t>(offsetof(S, f))}

// static, not inline: an inline variable or function is one object per process (a unique symbol for
// the dynamic linker), so a second library loaded next to this one would answer with the first
// one's table.
static constexpr LayoutEntry kLayout[] = {
    TRANSPEFT_SIZE(TranspeftRandomMask),
    TRANSPEFT_FIELD(TranspeftRandomMask, threshold),
    TRANSPEFT_FIELD(TranspeftRandomMask, kept),
    TRANSPEFT_FIELD(TranspeftRandomMask, seed),
    TRANSPEFT_FIELD(TranspeftRandomMask, on),

    TRANSPEFT_SIZE(TranspeftActFwdArgs),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, g),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, ldg),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, u),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, ldu),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, h),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, ldh),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, M),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, I),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, activation),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, dtype),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, mask),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, a),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, lda),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, rank),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, drop),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, s),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, lds),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, a_dtype),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, s_part),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, col_splits),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, cols_per_split),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, sg),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, ldsg),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, bg),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, ldbg),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, su),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, ldsu),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, bu),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, ldbu),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, rank_gu),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, scaling_g),
    TRANSPEFT_FIELD(TranspeftActFwdArgs, scaling_u),

    TRANSPEFT_SIZE(TranspeftActBwdArgs),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, dh),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, lddh),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, g),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, ldg),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, u),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, ldu),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, dg),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, lddg),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, du),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, lddu),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, M),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, I),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, activation),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, dtype),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, mask),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, t),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, ldt),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, a),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, lda),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, rank),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, scaling),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, a_dtype),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, drop),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, h_out),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, ldh_out),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, xd_out),
    TRANSPEFT_FIELD(TranspeftActBwdArgs, ldxd),

    TRANSPEFT_SIZE(TranspeftActBwdLoraArgs),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, act),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, da_part),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, splits),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, rows_per_split),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, sg),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, ldsg),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, su),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, ldsu),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, rank_gu),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, scaling_g),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, scaling_u),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, dbg_part),
    TRANSPEFT_FIELD(TranspeftActBwdLoraArgs, dbu_part),

    TRANSPEFT_SIZE(TranspeftLoraShrinkArgs),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, x),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, sxm),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, sxk),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, a),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, sar),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, sak),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, s),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, lds),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, M),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, K),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, R),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, x_dtype),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, a_dtype),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, drop),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, s_part),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, k_splits),
    TRANSPEFT_FIELD(TranspeftLoraShrinkArgs, cols_per_split),

    TRANSPEFT_SIZE(TranspeftLoraExpandArgs),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, y),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, ldy),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, s),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, ssm),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, ssr),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, b),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, sbn),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, sbr),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, M),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, N),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, R),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, y_dtype),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, lora_dtype),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, scaling),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, grad_mode),
    TRANSPEFT_FIELD(TranspeftLoraExpandArgs, drop),

    TRANSPEFT_SIZE(TranspeftLoraDropoutCastArgs),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, x),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, sxm),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, sxk),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, out),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, ldo),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, M),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, K),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, x_dtype),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, out_dtype),
    TRANSPEFT_FIELD(TranspeftLoraDropoutCastArgs, drop),

    TRANSPEFT_SIZE(TranspeftLoraTokenReduceArgs),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, l),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, ldl),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, x),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, ldx),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, part),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, M),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, N),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, R),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, x_dtype),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, l_dtype),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, scaling),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, drop),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, splits),
    TRANSPEFT_FIELD(TranspeftLoraTokenReduceArgs, rows_per_split),
};

#undef TRANSPEFT_SIZE
#undef TRANSPEFT_FIELD

// The entry for (type, field), field == nullptr for the size; -1 when there is none.
static inline int64_t layout_value(const char* type, const char* field) {
  if (type == nullptr) return -1;
  for (const LayoutEntry& e : kLayout) {
    if (strcmp(e.type, type) != 0) continue;
    if (field == nullptr ? e.field == nullptr : (e.field != nullptr && strcmp(e.field, field) == 0)) return e.value;
  }
  return -1;
}

}  // namespace abi
}  // namespace transpeft
