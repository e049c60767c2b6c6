// Checks the host conversions of transpeft/dtypes.h: float32 -> float16 / bfloat16 against torch's
// rounding (csrc/tests/fused_vectors.h), and every 16-bit pattern's round trip. Exit status 0 iff all pass.
#include <cinttypes>
#include <cmath>
#include <cstdio>

#include "fused_vectors.h"
#include "transpeft/dtypes.h"

namespace {

int g_failures = 0;

void expect(bool ok, const char* what, uint32_t in, uint32_t got, uint32_t want) {
  if (!ok && ++g_failures <= 20) {
    std::printf("FAIL %s: input 0x%08" PRIx32 " got 0x%04" PRIx32 " want 0x%04" PRIx32 "\n", what, in, got, want);
  }
}

}  // namespace

int main() {
  using namespace transpeft;
  int checked = 0;
  for (const auto& v : transpeft_test::kConversionVectors) {
    const float f = detail::bits_f32(v.f32_bits);
    expect(from_float<half_t>(f).bits == v.f16_bits, "float->float16", v.f32_bits, from_float<half_t>(f).bits, v.f16_bits);
    expect(from_float<bf16_t>(f).bits == v.bf16_bits, "float->bfloat16", v.f32_bits, from_float<bf16_t>(f).bits,
           v.bf16_bits);
    ++checked;
  }
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const half_t h{static_cast<uint16_t>(b)};
    const float fh = to_float(h);
    if (!std::isnan(fh)) expect(from_float<half_t>(fh).bits == b, "float16 round trip", b, from_float<half_t>(fh).bits, b);
    const bf16_t bf{static_cast<uint16_t>(b)};
    const float fb = to_float(bf);
    if (!std::isnan(fb)) expect(from_float<bf16_t>(fb).bits == b, "bfloat16 round trip", b, from_float<bf16_t>(fb).bits, b);
    if (std::isnan(fh) != (((b >> 10) & 0x1Fu) == 0x1Fu && (b & 0x3FFu) != 0)) expect(false, "float16 NaN", b, 0, 0);
  }
  if (g_failures != 0) {
    std::printf("test_dtypes: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("test_dtypes: OK (%d conversion vectors, 2 x 65536 round trips)\n", checked);
  return 0;
}
