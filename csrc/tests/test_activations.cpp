// Checks transpeft/activations.h on the host against float64 values from the Python generator
// (csrc/tests/activation_vectors.h, written by csrc/tests/gen_vectors.py). Exit status 0 iff all pass.
#include <cmath>
#include <cstdio>

#include "activation_vectors.h"
#include "transpeft/activations.h"

namespace {

constexpr double kTol = 1e-6;  // |got - want| <= kTol + kTol * |want|
const char* const kNames[] = {"silu", "gelu", "gelu_tanh"};

int g_failures = 0;

void check(const char* what, const transpeft_test::ActivationVector& v, double got, double want) {
  const double err = std::fabs(got - want);
  if (!(err <= kTol + kTol * std::fabs(want))) {  // written so that NaN fails
    if (++g_failures <= 20) {
      std::printf("FAIL %s%s(%.9g): got %.17g want %.17g (err %.3g)\n", kNames[v.activation], what, v.g, got,
                  want, err);
    }
  }
}

}  // namespace

int main() {
  int checked = 0;
  double worst = 0.0;
  for (const auto& v : transpeft_test::kActivationVectors) {
    const auto a = static_cast<transpeft::Activation>(v.activation);
    const double y = transpeft::act(a, v.g);
    const double dy = transpeft::act_grad(a, v.g);
    check("", v, y, v.value);
    check("'", v, dy, v.grad);
    worst = std::fmax(worst, std::fabs(y - v.value) / (1.0 + std::fabs(v.value)));
    worst = std::fmax(worst, std::fabs(dy - v.grad) / (1.0 + std::fabs(v.grad)));
    ++checked;
  }

  // An activation outside the enum gives NaN rather than some other activation's value.
  const auto bad = static_cast<transpeft::Activation>(7);
  if (!std::isnan(transpeft::act(bad, 1.0f)) || !std::isnan(transpeft::act_grad(bad, 1.0f))) {
    std::printf("FAIL unknown activation: expected NaN\n");
    ++g_failures;
  }

  if (g_failures != 0) {
    std::printf("test_activations: %d failure(s) over %d vectors\n", g_failures, checked);
    return 1;
  }
  std::printf("test_activations: OK (%d vectors, worst |err| / (1 + |want|) = %.3g)\n", checked, worst);
  return 0;
}
