// Mamba2 SSD on CPU: what the token-serial scan forward (recurrent_cpu.cpp) and its
// backward (bwd_cpu.cpp) share: the gate arithmetic, row loads, and the one pass over a
// head's [P, NS] state that both directions are made of.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/isa.h"

namespace ahn {
namespace ssd_cpu {

constexpr int64_t kMaxDim = 256;  // P and NS; the bindings check it
constexpr float kSoftplusThreshold = 20.f;  // above it softplus(v) = v, as mamba and torch
// The range of the decay product a scaled state carries: g = h / a and u / a then stay
// within a factor 2^64 (1.8e19) of h and u, inside float's range (3.4e38) for any sane
// input, while folds (a pass over the state each) stay rare: every ~44 tokens at a
// decay of exp(-1) per token.
constexpr double kMinScale = 0x1p-64;

template <class T>
AHN_ALWAYS_INLINE void load_f32(const T* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_f32(x[i]);
}

// The rows a task reads lie a whole token (H P or G NS elements) apart, and a thread
// stalled on them: the row copy of x took two thirds of the time outside the state pass
// (perf, bench shape). Fetching the rows kAhead tokens ahead hides that.
constexpr int64_t kAhead = 4;

template <class T>
AHN_ALWAYS_INLINE void prefetch(const T* x, int64_t n) {
  for (int64_t i = 0; i < n * int64_t(sizeof(T)); i += 64) __builtin_prefetch(reinterpret_cast<const char*>(x) + i);
}

// x [n] as fp32: in place for fp32, else converted into `buf`.
template <class T>
AHN_ALWAYS_INLINE const float* as_f32(const T* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    load_f32(x, n, buf);
    return buf;
  }
}

// softplus(raw + bias) (or raw + bias) in double, once per token and head (negligible next
// to the P NS state work), so that the decay reaches the state unrounded.
inline double step_size(float raw, float bias, bool softplus) {
  const double v = double(raw) + double(bias);
  return softplus && v <= kSoftplusThreshold ? std::log1p(std::exp(v)) : v;
}

// g <- a g, rounded once per element: folds the scale of a scaled state into it.
AHN_ALWAYS_INLINE void scale_in_place(float* g, int64_t n, double a) {
  for (int64_t i = 0; i < n; ++i) g[i] = float(double(g[i]) * a);
}

// col[0:16] += cs[0:16] as one vector add: GCC split the plain loop into sixteen scalar
// adds (and, given col's old values to start from, assembled them lane by lane), which
// made the backward's passes twice as slow as the forward's (perf, bench shape).
AHN_ALWAYS_INLINE void add16(float* __restrict__ col, const float* __restrict__ cs) {
  typedef float v16 __attribute__((vector_size(64)));
  v16 a, b;
  __builtin_memcpy(&a, col, sizeof a);
  __builtin_memcpy(&b, cs, sizeof b);
  a += b;
  __builtin_memcpy(col, &a, sizeof a);
}

// R rows of one head's state, one token, in a single pass: for each row p,
//   h[p, :] = decay h[p, :] + u[p] b;   y[p] = h[p, :] · c                  (COL = false)
//   y[p] = h[p, :] · c;   col += v[p] h[p, :];   then h[p, :] += u[p] b    (COL, DECAY = false)
// (DECAY = false: decay = 1). The forward absorbs x Bᵀ and reads with C; the backward
// runs the same pass with its adjoint state (dy Cᵀ in, read with B) and gathers a column
// sum (dC, dB) in it, so that each pass touches the state once. The backward reads the
// state before the update: see bwd_cpu.cpp for why.
// decay = hi + lo, the double-precision decay split into two floats: rounding it to one
// float puts the same relative error on every element of a head's state at each token,
// which compounds over the tokens (1.1e-6 relative RMSE from the fp64 oracle after 200
// tokens at decay ~0.99; 2.6e-7 with the split). Sixteen partial sums per row: GCC
// vectorises no float reduction without -ffast-math; the 16 lanes are one AVX-512 (two
// AVX2) register, in a fixed order, so results do not depend on the thread count. R = 4
// rows share each load of b, c and col and keep four accumulators in registers.
template <bool DECAY, bool COL, int R>
AHN_ALWAYS_INLINE void rows_step(float* __restrict__ h, int64_t h_sp, int64_t NS, float hi, float lo,
                                 const float* __restrict__ u, const float* __restrict__ b,
                                 const float* __restrict__ c, float* __restrict__ y, const float* __restrict__ v,
                                 float* __restrict__ col) {
  float acc[R][16] = {};
  int64_t n = 0;
  for (; n + 16 <= NS; n += 16) {
    if constexpr (COL) {
      float cs[16] = {};  // the block's column sums, added to col after it (see add16)
      // Unrolled by hand: with COL GCC kept the row loop and spilled acc to the stack (and
      // the same pragma in the loop below halved the forward's speed).
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        float* __restrict__ hr = h + r * h_sp + n;
        for (int64_t k = 0; k < 16; ++k) {
          const float s = hr[k];
          hr[k] = DECAY ? hi * s + (lo * s + u[r] * b[n + k]) : s + u[r] * b[n + k];
          acc[r][k] += s * c[n + k];
          cs[k] += s * v[r];
        }
      }
      add16(col + n, cs);
    } else {
      for (int r = 0; r < R; ++r) {
        float* __restrict__ hr = h + r * h_sp + n;
        for (int64_t k = 0; k < 16; ++k) {
          const float s = DECAY ? hi * hr[k] + (lo * hr[k] + u[r] * b[n + k]) : hr[k] + u[r] * b[n + k];
          hr[k] = s;
          acc[r][k] += s * c[n + k];
        }
      }
    }
  }
  for (int64_t k = 0; n < NS; ++n, ++k)
    for (int r = 0; r < R; ++r) {
      float* hr = h + r * h_sp + n;
      const float old = hr[0], s = DECAY ? hi * old + (lo * old + u[r] * b[n]) : old + u[r] * b[n];
      hr[0] = s;
      acc[r][k] += (COL ? old : s) * c[n];
      if constexpr (COL) col[n] += old * v[r];
    }
  // Fixed-width halvings: GCC emitted a loop over a variable width as scalar adds, which
  // cost as much as the state pass itself at NS = 128.
  for (int r = 0; r < R; ++r) {
    float s8[8], s4[4];
    for (int k = 0; k < 8; ++k) s8[k] = acc[r][k] + acc[r][k + 8];
    for (int k = 0; k < 4; ++k) s4[k] = s8[k] + s8[k + 4];
    y[r] = (s4[0] + s4[2]) + (s4[1] + s4[3]);
  }
}

// The whole state [P, NS] (row stride h_sp), one token: rows_step over blocks of 4 rows.
// COL: col [NS] is set (not accumulated) to hᵀ v; y and col read h before the update.
template <bool DECAY, bool COL>
AHN_ALWAYS_INLINE void rows(float* h, int64_t h_sp, int64_t P, int64_t NS, double decay, const float* u,
                            const float* b, const float* c, float* y, const float* v = nullptr,
                            float* col = nullptr) {
  const float hi = float(decay), lo = float(decay - double(hi));
  if constexpr (COL)
    for (int64_t n = 0; n < NS; ++n) col[n] = 0.f;
  int64_t p = 0;
  for (; p + 4 <= P; p += 4)
    rows_step<DECAY, COL, 4>(h + p * h_sp, h_sp, NS, hi, lo, u + p, b, c, y + p, COL ? v + p : v, col);
  for (; p < P; ++p) rows_step<DECAY, COL, 1>(h + p * h_sp, h_sp, NS, hi, lo, u + p, b, c, y + p, COL ? v + p : v, col);
}

}  // namespace ssd_cpu
}  // namespace ahn
