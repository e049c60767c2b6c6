// The fused masked gated activation + down-projection shrink of transpeft/capi.h, the CUDA kernels run
// on the CPU (csrc/emulation/kernels_on_host.cpp: one fiber per CUDA thread), against the Python
// reference's vectors (csrc/tests/fused_vectors.h); then its backward against finite differences of
// the same forward. Exit status 0 iff all pass.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <vector>

#include "fused_vectors.h"
#include "transpeft/capi.h"
#include "transpeft/dtypes.h"

namespace {

int g_failures = 0;

void fail(const char* what, int64_t i, double got, double want) {
  if (++g_failures <= 20) std::printf("FAIL %s[%" PRId64 "]: got %.9g want %.9g\n", what, i, got, want);
}

}  // namespace

int main() {
  using namespace transpeft;
  using namespace transpeft_test;
  constexpr int64_t M = kFusedM, I = kFusedI, R = kFusedR;
  const float kept = to_float(bf16_t{kFusedMaskKeptBf16});
  const float drop_kept = 1.0f / (1.0f - kFusedQ);  // fp32 adapter: the scale rounded to float32
  std::vector<bf16_t> h(M * I);
  std::vector<float> s(M * R, NAN);
  const int64_t seed_mask = kFusedSeedMask, seed_drop = kFusedSeedDrop;

  TranspeftActFwdArgs fwd{};
  fwd.g = kFusedG;
  fwd.ldg = I;
  fwd.u = kFusedU;
  fwd.ldu = I;
  fwd.h = h.data();
  fwd.ldh = I;
  fwd.M = M;
  fwd.I = I;
  fwd.dtype = 2;       // bf16
  fwd.activation = 0;  // silu
  fwd.mask = TranspeftRandomMask{kFusedMaskThreshold, kept, &seed_mask, 1};
  fwd.a = kFusedA;
  fwd.lda = I;
  fwd.rank = R;
  fwd.a_dtype = 0;  // fp32
  fwd.drop = TranspeftRandomMask{kFusedDropThreshold, drop_kept, &seed_drop, 1};
  fwd.s = s.data();
  fwd.lds = R;
  int rc = transpeft_masked_gated_act_fwd(&fwd, 0);
  if (rc != 0) {
    std::printf("FAIL transpeft_masked_gated_act_fwd returned %d\n", rc);
    return 1;
  }
  for (int64_t i = 0; i < M * I; ++i) {
    const float got = to_float(h[i]);
    const float want = to_float(bf16_t{kFusedH[i]});
    // the mask exactly; the value to one bf16 ulp (expf here, ATen's vectorised exp in the reference)
    if ((got == 0.0f) != (want == 0.0f) || std::fabs(got - want) > std::fabs(want) * 0.0079f) fail("h'", i, got, want);
  }
  for (int64_t i = 0; i < M * R; ++i) {
    if (!(std::fabs(s[i] - kFusedS[i]) <= 1e-4 * (1.0 + std::fabs(kFusedS[i])))) fail("S_d", i, s[i], kFusedS[i]);
  }

  // Backward without the LoRA term against central differences of sum(dh * h') in float32 data.
  std::vector<float> g(M * I), u(M * I), dh(M * I), dg(M * I), du(M * I);
  for (int64_t i = 0; i < M * I; ++i) {
    g[i] = to_float(bf16_t{kFusedG[i]});
    u[i] = to_float(bf16_t{kFusedU[i]});
    dh[i] = 0.25f + 0.01f * static_cast<float>(i % 7);
  }
  TranspeftActBwdArgs bwd{};  // no LoRA term, no optional outputs
  bwd.dh = dh.data();
  bwd.lddh = I;
  bwd.g = g.data();
  bwd.ldg = I;
  bwd.u = u.data();
  bwd.ldu = I;
  bwd.dg = dg.data();
  bwd.lddg = I;
  bwd.du = du.data();
  bwd.lddu = I;
  bwd.M = M;
  bwd.I = I;
  bwd.dtype = 0;       // fp32
  bwd.activation = 0;  // silu
  bwd.mask = TranspeftRandomMask{kFusedMaskThreshold, 1.0f, &seed_mask, 1};
  rc = transpeft_masked_gated_act_bwd(&bwd, 0);
  if (rc != 0) {
    std::printf("FAIL transpeft_masked_gated_act_bwd returned %d\n", rc);
    return 1;
  }
  // The mask of the (M, I) tensor, then h' of one element with that mask applied.
  std::vector<float> ones(M * I, 1.0f), keep(M * I);
  TranspeftActFwdArgs keep_args{};
  keep_args.g = ones.data();
  keep_args.ldg = I;
  keep_args.u = ones.data();
  keep_args.ldu = I;
  keep_args.h = keep.data();
  keep_args.ldh = I;
  keep_args.M = M;
  keep_args.I = I;
  keep_args.mask = TranspeftRandomMask{kFusedMaskThreshold, 1.0f, &seed_mask, 1};
  transpeft_masked_gated_act_fwd(&keep_args, 0);  // fp32, silu
  auto h_at = [&](int64_t i, float gv, float uv) {
    float out = 0.0f;
    TranspeftActFwdArgs one{};  // one fp32 element, silu, unmasked
    one.g = &gv;
    one.ldg = 1;
    one.u = &uv;
    one.ldu = 1;
    one.h = &out;
    one.ldh = 1;
    one.M = 1;
    one.I = 1;
    transpeft_masked_gated_act_fwd(&one, 0);
    return keep[i] == 0.0f ? 0.0f : out;
  };
  for (int64_t i = 0; i < M * I; i += 5) {
    const float e = 1e-3f;
    const float ng = (h_at(i, g[i] + e, u[i]) - h_at(i, g[i] - e, u[i])) / (2 * e) * dh[i];
    const float nu = (h_at(i, g[i], u[i] + e) - h_at(i, g[i], u[i] - e)) / (2 * e) * dh[i];
    if (std::fabs(dg[i] - ng) > 2e-2f * (1.0f + std::fabs(ng))) fail("dg", i, dg[i], ng);
    if (std::fabs(du[i] - nu) > 2e-2f * (1.0f + std::fabs(nu))) fail("du", i, du[i], nu);
  }

  if (g_failures != 0) {
    std::printf("test_fused_host: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("test_fused_host: OK (h' and S_d of %" PRId64 " x %" PRId64 " against the reference, dg/du)\n", M, I);
  return 0;
}
