// Checks transpeft/philox.h on the host against known answers from the Python reference
// (csrc/tests/philox_vectors.h, written by csrc/tests/gen_vectors.py). Exit status 0 iff all pass.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "philox_vectors.h"
#include "transpeft/philox.h"

namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

int g_failures = 0;

void fail(const char* what, const transpeft_test::PhiloxVector& v, uint32_t got, uint32_t want) {
  if (++g_failures <= 20) {
    std::printf("FAIL %s: seed=0x%016" PRIx64 " offset=0x%016" PRIx64 " got=0x%08" PRIx32 " want=0x%08" PRIx32 "\n",
                what, v.seed, v.offset, got, want);
  }
}

}  // namespace

int main() {
  // Random123 known answer for Philox4x32-10 (counter 0, key 0), independent of the generated table.
  const uint32_t kat_want[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  const transpeft::PhiloxWords kat = transpeft::philox_randint4x(0, 0);
  for (int k = 0; k < 4; ++k) {
    if (kat.c[k] != kat_want[k]) {
      std::printf("FAIL Random123 KAT: word %d = 0x%08" PRIx32 ", want 0x%08" PRIx32 "\n", k, kat.c[k], kat_want[k]);
      ++g_failures;
    }
  }

  int checked = 0;
  for (const auto& v : transpeft_test::kPhiloxVectors) {
    const uint32_t r = transpeft::philox_randint(v.seed, v.offset);
    if (r != v.words[0]) fail("randint", v, r, v.words[0]);
    const transpeft::PhiloxWords w = transpeft::philox_randint4x(v.seed, v.offset);
    for (int k = 0; k < 4; ++k) {
      if (w.c[k] != v.words[k]) fail("randint4x word", v, w.c[k], v.words[k]);
    }
    const uint32_t u = float_bits(transpeft::philox_uniform(v.seed, v.offset));
    if (u != v.uniform_bits) fail("uniform bits", v, u, v.uniform_bits);
    // Row 0 of a mask: the call at offset `group` is the group itself, whatever the width.
    const uint32_t b1 = transpeft::philox_keep_bits(v.seed, 0, v.offset, 64, transpeft_test::kKeepThresholdP01);
    if (b1 != v.keep_bits_p01) fail("keep bits p=0.1", v, b1, v.keep_bits_p01);
    const uint32_t b3 = transpeft::philox_keep_bits(v.seed, 0, v.offset, 64, transpeft_test::kKeepThresholdP03);
    if (b3 != v.keep_bits_p03) fail("keep bits p=0.3", v, b3, v.keep_bits_p03);
    // The one-element path selects the same lane: group offset = row * ceil(cols / 8) + col / 8.
    // With cols = 16 (2 groups per row), an even offset 2k is (row k, cols 0..7), an odd one (row k, cols 8..15).
    if (v.offset < (uint64_t{1} << 62)) {
      for (int lane = 0; lane < 8; ++lane) {
        const uint64_t row = v.offset / 2, col = (v.offset % 2) * 8 + lane;
        const bool k3 = transpeft::philox_keep(v.seed, row, col, 16, transpeft_test::kKeepThresholdP03);
        if (k3 != (((v.keep_bits_p03 >> lane) & 1u) != 0)) fail("keep p=0.3 (one element)", v, k3, lane);
      }
    }
    ++checked;
  }

  if (g_failures != 0) {
    std::printf("test_philox: %d failure(s) over %d vectors\n", g_failures, checked);
    return 1;
  }
  std::printf("test_philox: OK (%d vectors, 7 checks each plus 8 one-element keeps, and the Random123 KAT)\n", checked);
  return 0;
}
