// Delta rule / gated delta rule, token-serial forward on CPU (fp32 state and math).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/dispatch.h"
#include "common/isa.h"
#include "common/l2norm.h"
#include "delta_rule/delta_rule.h"

namespace ahn {
namespace {

// Work split. Column j of S_t depends only on column j of S_{t-1} and v_t[j] (plus
// q, k, g, beta, shared by all columns), so a task (sequence, state head) keeps its
// state as [K, BV] column strips and runs the tokens in blocks of TB: a block's q
// and k are loaded (and normalised) once, then each strip runs through the whole
// block while it and the block's q, k (32 KiB at K = 128) sit in L1. The BV-wide
// inner loops vectorise with no remainder. Measured at B = 1, T = 2048, H = 8,
// K = V = 128, one thread: one task per strip loading q, k per strip and token,
// 55-80 ms; token blocks, 31-49 ms (a shared 2-core VM, hence the ranges).
constexpr int64_t BV = 32;
constexpr int64_t TB = 16;

template <class T>
void load_f32(const T* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_f32(x[i]);
}

// One token on one [K, BV] strip: u = beta (v - alpha S_{t-1}ᵀ k);
// S_t = alpha S_{t-1} + k uᵀ;  o = S_tᵀ q (unscaled).
// Rows go four at a time so that each load and store of the kv / o accumulators
// (GCC keeps them in memory across the row loop) serves four rows: 3.5x faster than
// one row at a time under AVX-512.
AHN_ISA_CLONES void strip_step(float (*S)[BV], int64_t K, const float* q, const float* k, const float* v,
                               float alpha, float beta, float* o) {
  float kv[BV] = {};
  int64_t i = 0;
  for (; i + 4 <= K; i += 4)
    for (int64_t j = 0; j < BV; ++j)
      kv[j] += (k[i] * S[i][j] + k[i + 1] * S[i + 1][j]) + (k[i + 2] * S[i + 2][j] + k[i + 3] * S[i + 3][j]);
  for (; i < K; ++i)
    for (int64_t j = 0; j < BV; ++j) kv[j] += k[i] * S[i][j];

  float u[BV];
  for (int64_t j = 0; j < BV; ++j) u[j] = beta * (v[j] - alpha * kv[j]);

  float acc[BV] = {};
  for (i = 0; i + 4 <= K; i += 4)
    for (int64_t j = 0; j < BV; ++j) {
      const float s0 = alpha * S[i][j] + k[i] * u[j];
      const float s1 = alpha * S[i + 1][j] + k[i + 1] * u[j];
      const float s2 = alpha * S[i + 2][j] + k[i + 2] * u[j];
      const float s3 = alpha * S[i + 3][j] + k[i + 3] * u[j];
      S[i][j] = s0;
      S[i + 1][j] = s1;
      S[i + 2][j] = s2;
      S[i + 3][j] = s3;
      acc[j] += (q[i] * s0 + q[i + 1] * s1) + (q[i + 2] * s2 + q[i + 3] * s3);
    }
  for (; i < K; ++i)
    for (int64_t j = 0; j < BV; ++j) {
      const float s = alpha * S[i][j] + k[i] * u[j];
      S[i][j] = s;
      acc[j] += q[i] * s;
    }
  for (int64_t j = 0; j < BV; ++j) o[j] = acc[j];
}

// One task: sequence n, state head h.
template <class T>
void run_head(const FusedRecurrentParams& p, int64_t n, int64_t h) {
  const int64_t K = p.K, V = p.V, NV = (V + BV - 1) / BV, VP = NV * BV;
  const SeqHead at = seq_head(p, n, h);
  const int64_t bos = at.bos, eos = at.eos;
  const int64_t q0 = at.q, k0 = at.k, v0 = at.v, g0 = at.g, beta0 = at.beta, o0 = at.o, state = at.state;
  const int64_t o_st = p.HS * V;

  // strips [NV, K, BV] | q [TB, K] | k [TB, K] | v [TB, VP]; padding columns stay 0,
  // so padded state columns stay 0 too.
  std::vector<float> buf(NV * K * BV + TB * (2 * K + VP));
  float* const qb = buf.data() + NV * K * BV;
  float* const kb = qb + TB * K;
  float* const vb = kb + TB * K;
  float alpha[TB], bt[TB], ot[BV];
  auto strip = [&](int64_t iv) { return reinterpret_cast<float(*)[BV]>(buf.data() + iv * K * BV); };

  if (p.h0)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j) strip(j / BV)[i][j % BV] = p.h0[state + i * V + j];

  for (int64_t t0 = bos; t0 < eos; t0 += TB) {
    const int64_t nt = std::min(TB, eos - t0);
    for (int64_t r = 0; r < nt; ++r) {
      const int64_t t = t0 + r;
      load_f32(static_cast<const T*>(p.q) + q0 + t * p.q_st, K, qb + r * K);
      load_f32(static_cast<const T*>(p.k) + k0 + t * p.k_st, K, kb + r * K);
      load_f32(static_cast<const T*>(p.v) + v0 + t * p.v_st, V, vb + r * VP);
      if (p.l2norm) {
        l2_normalize(qb + r * K, K);
        l2_normalize(kb + r * K, K);
      }
      alpha[r] = p.g ? std::exp(p.g[g0 + t * p.g_st]) : 1.f;
      bt[r] = p.beta[beta0 + t * p.beta_st];
    }
    for (int64_t iv = 0; iv < NV; ++iv) {
      const int64_t c0 = iv * BV, nc = std::min(BV, V - c0);
      for (int64_t r = 0; r < nt; ++r) {
        strip_step(strip(iv), K, qb + r * K, kb + r * K, vb + r * VP + c0, alpha[r], bt[r], ot);
        T* out = static_cast<T*>(p.o) + o0 + (t0 + r) * o_st + c0;
        for (int64_t j = 0; j < nc; ++j) out[j] = from_f32<T>(p.scale * ot[j]);
      }
    }
  }

  if (p.ht)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j) p.ht[state + i * V + j] = strip(j / BV)[i][j % BV];
}

template <class T>
void run(const FusedRecurrentParams& p, int num_threads) {
  const int64_t N = p.N, HS = p.HS;
  // Dynamic: under varlen, sequences of very different lengths must not pile onto one thread.
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < HS; ++h) run_head<T>(p, n, h);
}

}  // namespace

void launch_fused_recurrent_fwd_cpu(const FusedRecurrentParams& p, int num_threads) {
  dispatch_dtype(p.dtype, [&](auto tag) { run<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
