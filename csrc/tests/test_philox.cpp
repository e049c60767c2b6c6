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
  // Random123 known answer for Philox4x32-10, independent of the generated table.
  const uint32_t kat = transpeft::philox_randint(0, 0);
  if (kat != 0x6627e8d5u) {
    std::printf("FAIL Random123 KAT: philox_randint(0, 0) = 0x%08" PRIx32 ", want 0x6627e8d5\n", kat);
    ++g_failures;
  }

  int checked = 0;
  for (const auto& v : transpeft_test::kPhiloxVectors) {
    const uint32_t r = transpeft::philox_randint(v.seed, v.offset);
    if (r != v.randint) fail("randint", v, r, v.randint);
    const uint32_t u = float_bits(transpeft::philox_uniform(v.seed, v.offset));
    if (u != v.uniform_bits) fail("uniform bits", v, u, v.uniform_bits);
    const bool k1 = transpeft::philox_keep(v.seed, v.offset, transpeft_test::kKeepP01);
    if (k1 != v.keep_p01) fail("keep p=0.1", v, k1, v.keep_p01);
    const bool k3 = transpeft::philox_keep(v.seed, v.offset, transpeft_test::kKeepP03);
    if (k3 != v.keep_p03) fail("keep p=0.3", v, k3, v.keep_p03);
    ++checked;
  }

  if (g_failures != 0) {
    std::printf("test_philox: %d failure(s) over %d vectors\n", g_failures, checked);
    return 1;
  }
  std::printf("test_philox: OK (%d vectors, 4 checks each, plus the Random123 KAT)\n", checked);
  return 0;
}
