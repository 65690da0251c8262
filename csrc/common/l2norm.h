// The in-kernel L2 norm of q and k rows (use_qk_l2norm_in_kernel), one definition for the
// CPU kernels: the chunked delta rule (forward and backward), the fused recurrent one and
// the AHN cache's decode step.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/isa.h"

namespace ahn {

constexpr float kNormEps = 1e-6f;  // inside the sqrt: x / sqrt(sum x^2 + eps), as fla

// 1 / sqrt(sum x^2 + eps) over n contiguous floats.
AHN_ALWAYS_INLINE float rnorm(const float* x, int64_t n) {
  // Sixteen interleaved partial sums: one running sum is a serial chain of adds that cost
  // as much as the fused recurrent kernel's strip update at K = 128 (and GCC vectorises
  // no float reduction without -ffast-math).
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int64_t j = 0; j < 16; ++j) part[j] += x[i + j] * x[i + j];
  for (; i < n; ++i) part[0] += x[i] * x[i];
  float ss = 0.f;
  for (float s : part) ss += s;
  return 1.f / std::sqrt(ss + kNormEps);
}

AHN_ALWAYS_INLINE void l2_normalize(float* x, int64_t n) {
  const float r = rnorm(x, n);
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

}  // namespace ahn
