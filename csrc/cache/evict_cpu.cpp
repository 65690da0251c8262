// The AHN memory's decode step on CPU: fold the evicted token into the fp32 state, read it.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cache/cache.h"
#include "common/dispatch.h"
#include "common/isa.h"
#include "common/l2norm.h"

namespace ahn {

namespace {

constexpr int64_t kMaxDim = 256;   // K and V; the bindings check it
constexpr int64_t BV = 32;         // state columns per strip

template <class T>
void load_f32(const T* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_f32(x[i]);
}

// The shared row norm (common/l2norm.h), built into each ISA clone.
AHN_ISA_CLONES void normalize_row(float* x, int64_t n) { l2_normalize(x, n); }

// One [K, nc] column strip of the state (row stride ld), nc <= BV, in two passes that
// keep it in L1: u = w (v - α Sᵀ k) (delta family) or u = w v (ssd); then
// S' = α S + k uᵀ and o = S'ᵀ q (unscaled). Column j of S' depends only on column j of
// S, so strips are independent. Rows go four at a time so that each load and store of
// the kv / acc accumulators serves four rows (as the fused recurrent kernel measured).
AHN_ISA_CLONES void fold_strip(float* __restrict__ S, int64_t ld, int64_t K, int64_t nc, const float* q,
                               const float* k, const float* v, float alpha, float w, bool correct, float* o) {
  float u[BV] = {}, acc[BV] = {};
  if (correct) {
    float kv[BV] = {};
    int64_t i = 0;
    for (; i + 4 <= K; i += 4) {
      const float* s0 = S + i * ld;
      for (int64_t j = 0; j < nc; ++j)
        kv[j] += (k[i] * s0[j] + k[i + 1] * s0[ld + j]) + (k[i + 2] * s0[2 * ld + j] + k[i + 3] * s0[3 * ld + j]);
    }
    for (; i < K; ++i)
      for (int64_t j = 0; j < nc; ++j) kv[j] += k[i] * S[i * ld + j];
    for (int64_t j = 0; j < nc; ++j) u[j] = w * (v[j] - alpha * kv[j]);
  } else {
    for (int64_t j = 0; j < nc; ++j) u[j] = w * v[j];
  }
  int64_t i = 0;
  for (; i + 4 <= K; i += 4) {
    float* s0 = S + i * ld;
    for (int64_t j = 0; j < nc; ++j) {
      const float a0 = alpha * s0[j] + k[i] * u[j];
      const float a1 = alpha * s0[ld + j] + k[i + 1] * u[j];
      const float a2 = alpha * s0[2 * ld + j] + k[i + 2] * u[j];
      const float a3 = alpha * s0[3 * ld + j] + k[i + 3] * u[j];
      s0[j] = a0;
      s0[ld + j] = a1;
      s0[2 * ld + j] = a2;
      s0[3 * ld + j] = a3;
      acc[j] += (q[i] * a0 + q[i + 1] * a1) + (q[i + 2] * a2 + q[i + 3] * a3);
    }
  }
  for (; i < K; ++i)
    for (int64_t j = 0; j < nc; ++j) {
      const float a = alpha * S[i * ld + j] + k[i] * u[j];
      S[i * ld + j] = a;
      acc[j] += q[i] * a;
    }
  for (int64_t j = 0; j < nc; ++j) o[j] = acc[j];
}

// One task: sequence b, state head h.
template <class T>
void run_task(const EvictUpdateParams& p, int64_t b, int64_t h) {
  const int64_t K = p.K, V = p.V, pos = p.cache_seqlens[b];
  T* out = static_cast<T*>(p.o) + (b * p.HS + h) * V;
  float* gate = pos >= p.S ? p.gates + b * p.g_sb + (pos - p.S) % p.W * p.g_st + h * p.g_sh : nullptr;
  if (pos - p.W >= p.S) {
    const int64_t slot = p.S + (pos - p.S) % p.W;  // = the slot of token pos - W
    const int64_t hq = h / (p.HS / p.HQ), hk = h / (p.HS / p.HK);
    float q[kMaxDim], k[kMaxDim], v[kMaxDim], o[kMaxDim];
    load_f32(static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh, K, q);
    load_f32(static_cast<const T*>(p.k_cache) + b * p.kc_sb + slot * p.kc_st + hk * p.kc_sh, K, k);
    load_f32(static_cast<const T*>(p.v_cache) + b * p.vc_sb + slot * p.vc_st + hk * p.vc_sh, V, v);
    normalize_row(q, K);
    normalize_row(k, K);
    // The decay in double, rounded once: e^(dt A) is not e^(float(dt A)) to float precision.
    float alpha = 1.f;
    if (p.rule == MemoryRule::gated_delta) alpha = float(std::exp(double(gate[1])));
    if (p.rule == MemoryRule::ssd) alpha = float(std::exp(double(gate[0]) * double(p.A[h])));
    float* st = p.state + b * p.state_sb + h * p.state_sh;
    for (int64_t c0 = 0; c0 < V; c0 += BV)
      fold_strip(st + c0, p.state_sk, K, std::min(BV, V - c0), q, k, v + c0, alpha, gate[0],
                 p.rule != MemoryRule::ssd, o + c0);
    for (int64_t j = 0; j < V; ++j) out[j] = from_f32<T>(p.scale * o[j]);  // the one downcast
  } else {
    std::fill(out, out + V, from_f32<T>(0.f));  // empty memory
  }
  if (gate) std::copy(p.gates_new + b * p.gn_sb + h * p.gn_sh, p.gates_new + b * p.gn_sb + h * p.gn_sh + p.n_gates, gate);
}

template <class T>
void run(const EvictUpdateParams& p, int num_threads) {
  const int64_t HS = p.HS, tasks = p.B * HS;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t task = 0; task < tasks; ++task) run_task<T>(p, task / HS, task % HS);
}

}  // namespace

void launch_ahn_evict_update_cpu(const EvictUpdateParams& p, int num_threads) {
  dispatch_dtype(p.dtype, [&](auto tag) { run<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
