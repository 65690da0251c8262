// Delta rule / gated delta rule, chunked (WY / UT) forward on CPU (fp32 state and math).
//
// Per chunk of c <= C tokens with state S_0 [K, V], G the in-chunk inclusive prefix
// sum of g and Γ_ij = exp(G_i - G_j) (i >= j), the token loop unrolls to
//   (I + A) Δ = diag(β) (V - diag(exp G) K S_0),   A = strict_lower(diag(β) (K Kᵀ ⊙ Γ))
//   O   = scale · (diag(exp G) Q S_0 + lower(Q Kᵀ ⊙ Γ) Δ)
//   S_c = exp(G_last) S_0 + (diag(exp(G_last - G)) K)ᵀ Δ
// (Δ = U - W S_0 of the WY form, solved directly: one triangular solve on V columns
// instead of two on K and V). Every exponent is of a difference <= 0, so strong decays
// underflow to 0 and never form 0·inf.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/dispatch.h"
#include "common/pages.h"
#include "delta_rule/chunk_cpu_common.h"
#include "delta_rule/delta_rule.h"

namespace ahn {
namespace {

using namespace delta_rule_cpu;

// Per-task fp32 scratch (zero-initialised; padding columns stay 0 throughout).
struct Scratch {
  int64_t K, VP, C;
  std::vector<float> buf;
  float *S, *X, *kT, *KQ, *P, *D, *Akk, *Aqk, *O, *beta, *g, *G, *eG;

  Scratch(int64_t K_, int64_t V, int64_t C_) : K(K_), VP(round_up(V, kPad)), C(C_) {
    const int64_t sizes[] = {
        K * VP,      // S   [K, VP]     the state
        2 * C * K,   // X   [2c, K]     the chunk's k rows, then its q rows
        K * C,       // kT  [K, C]      kᵀ
        2 * C * C,   // KQ  [2c, C]     K Kᵀ rows, then Q Kᵀ rows
        2 * C * VP,  // P   [2c, VP]    K S_0 rows, then Q S_0 rows
        C * VP,      // D   [C, VP]     v, then the right-hand side, then Δ, then decayed Δ
        C * C,       // Akk [C, C]      -A (negated: the solve accumulates with +)
        C * C,       // Aqk [C, C]      lower(Q Kᵀ ⊙ Γ), zero above the diagonal
        C * VP,      // O   [C, VP]     unscaled output rows
        C, C, C, C,  // beta, g, G, exp(G)
    };
    int64_t total = 0;
    for (int64_t s : sizes) total += s;
    buf.assign(total, 0.f);
    float* ptr = buf.data();
    float** fields[] = {&S, &X, &kT, &KQ, &P, &D, &Akk, &Aqk, &O, &beta, &g, &G, &eG};
    for (int f = 0; f < 13; ++f) {
      *fields[f] = ptr;
      ptr += sizes[f];
    }
  }
};

// One chunk of c tokens: X, D (v rows), beta and g are loaded; computes O (unscaled)
// and advances S. kk: the chunk's K Kᵀ (row stride C) when shared (KeyGrams), else null.
template <class I>
AHN_INLINE void chunk_step(Scratch& s, int64_t c, const float* kk, bool l2norm) {
  const int64_t K = s.K, VP = s.VP, C = s.C, CP = round_up(c, kPad);
  float* const X = s.X;
  if (l2norm)
    for (int64_t i = 0; i < 2 * c; ++i) l2_normalize(X + i * K, K);
  for (int64_t i = 0; i < c; ++i)
    for (int64_t d = 0; d < K; ++d) s.kT[d * C + i] = X[i * K + d];
  float acc = 0.f;
  for (int64_t i = 0; i < c; ++i) {
    acc += s.g[i];
    s.G[i] = acc;
    s.eG[i] = std::exp(acc);
  }

  if (!kk) gemm<I>(c, CP, K, X, K, s.kT, C, s.KQ, C, 0.f, Tri::lower_c);         // K Kᵀ
  gemm<I>(c, CP, K, X + c * K, K, s.kT, C, s.KQ + c * C, C, 0.f, Tri::lower_c);  // Q Kᵀ
  gemm<I>(2 * c, VP, K, X, K, s.S, VP, s.P, VP, 0.f);                             // [K; Q] S_0

  for (int64_t i = 0; i < c; ++i) {
    const float* kkr = (kk ? kk : s.KQ) + i * C;
    const float* qk = s.KQ + (c + i) * C;
    for (int64_t j = 0; j < i; ++j) {
      const float decay = std::exp(s.G[i] - s.G[j]);
      s.Akk[i * C + j] = -s.beta[i] * kkr[j] * decay;
      s.Aqk[i * C + j] = qk[j] * decay;
    }
    s.Aqk[i * C + i] = qk[i];
    for (int64_t j = i + 1; j < CP; ++j) s.Aqk[i * C + j] = 0.f;
    float* d = s.D + i * VP;
    const float* pk = s.P + i * VP;
    for (int64_t j = 0; j < VP; ++j) d[j] = s.beta[i] * (d[j] - s.eG[i] * pk[j]);
  }

  solve_unit_lower<I>(c, s.Akk, C, s.D, VP);  // (I + A) Δ = rhs

  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < VP; ++j) s.O[i * VP + j] = s.eG[i] * s.P[(c + i) * VP + j];
  gemm<I>(c, VP, c, s.Aqk, C, s.D, VP, s.O, VP, 1.f, Tri::lower_a);

  // S_c = exp(G_last) S_0 + Kᵀ (diag(exp(G_last - G)) Δ): Δ is scaled in place (O has
  // read it), and K enters transposed straight from X.
  const float G_last = s.G[c - 1];
  for (int64_t i = 0; i < c; ++i) {
    const float e = std::exp(G_last - s.G[i]);
    for (int64_t j = 0; j < VP; ++j) s.D[i * VP + j] *= e;
  }
  gemm<I, /*TA=*/true>(K, VP, c, X, K, s.D, VP, s.S, VP, std::exp(G_last));
}

// One chunk's K Kᵀ for KeyGrams: X [c, K] the k rows (normalised here, as chunk_step
// does, so both see the same k̂), kT [K, C] scratch, KK [c, C] the lower triangle.
template <class I>
AHN_INLINE void key_gram(float* X, int64_t c, int64_t K, int64_t C, bool l2norm, float* kT, float* KK) {
  if (l2norm)
    for (int64_t i = 0; i < c; ++i) l2_normalize(X + i * K, K);
  for (int64_t i = 0; i < c; ++i)
    for (int64_t d = 0; d < K; ++d) kT[d * C + i] = X[i * K + d];
  gemm<I>(c, round_up(c, kPad), K, X, K, kT, C, KK, C, 0.f, Tri::lower_c);
}

// One x86-64 binary serves every CPU: the chunk step and the K Kᵀ pass are built for
// AVX-512, AVX2+FMA and the baseline, each with its own tile, and picked once at run time.
using StepFn = void (*)(Scratch&, int64_t, const float*, bool);
using GramFn = void (*)(float*, int64_t, int64_t, int64_t, bool, float*, float*);
#define AHN_DEFINE_STEPS(NAME, TARGET, ISA)                                                               \
  TARGET void chunk_step_##NAME(Scratch& s, int64_t c, const float* kk, bool l2) {                        \
    chunk_step<ISA>(s, c, kk, l2);                                                                        \
  }                                                                                                       \
  TARGET void key_gram_##NAME(float* X, int64_t c, int64_t K, int64_t C, bool l2, float* kT, float* KK) { \
    key_gram<ISA>(X, c, K, C, l2, kT, KK);                                                                \
  }
AHN_DEFINE_STEPS(avx512, AHN_TARGET("arch=x86-64-v4"), Avx512)
AHN_DEFINE_STEPS(avx2, AHN_TARGET("arch=x86-64-v3"), Avx2)
AHN_DEFINE_STEPS(baseline, , Baseline)
#undef AHN_DEFINE_STEPS

template <class T>
void fill_key_grams(const ChunkParams& p, KeyGrams& kg, const std::vector<int64_t>& seq, int num_threads) {
  static const GramFn gram = pick(key_gram_avx512, key_gram_avx2, key_gram_baseline);
  const int64_t K = p.K, C = p.C, HK = p.HK, chunks = int64_t(seq.size());
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> X(C * K), kT(K * C, 0.f);  // [C, K] k rows, [K, C] their transpose
#pragma omp for collapse(2) schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch)
      for (int64_t hk = 0; hk < HK; ++hk) {
        const int64_t n = seq[ch], ci = ch - kg.first[n];
        const SeqHead at = seq_head(p, n, hk * (p.HS / HK));  // the first state head reading k head hk
        const int64_t c = std::min(C, absorbed_rows(p, n) - ci * C), kv = at.bos + p.S + ci * C;
        for (int64_t i = 0; i < c; ++i) {
          const T* kr = static_cast<const T*>(p.k) + at.k + (kv + i) * p.k_st;
          for (int64_t d = 0; d < K; ++d) X[i * K + d] = to_f32(kr[d]);
        }
        gram(X.data(), c, K, C, p.l2norm, kT.data(), kg.grams.get() + (ch * HK + hk) * C * C);
      }
  }
}

// One task: sequence n, state head h.
template <class T>
void run_head(const ChunkParams& p, int64_t n, int64_t h, StepFn chunk_step, const KeyGrams* kg) {
  const int64_t K = p.K, V = p.V, C = p.C;
  const SeqHead at = seq_head(p, n, h);
  const int64_t bos = at.bos, eos = at.eos;
  const int64_t steps = std::max<int64_t>(0, eos - bos - p.W - p.S);  // rows the memory absorbs
  const int64_t q0 = at.q, k0 = at.k, v0 = at.v, g0 = at.g, beta0 = at.beta, o0 = at.o, state = at.state;
  const int64_t o_st = p.HS * V;

  // Rows whose memory is empty (t - W < S) are 0.
  for (int64_t t = bos; t < std::min(eos, bos + p.S + p.W); ++t)
    for (int64_t j = 0; j < V; ++j) static_cast<T*>(p.o)[o0 + t * o_st + j] = from_f32<T>(0.f);

  Scratch s(K, V, C);
  const int64_t VP = s.VP;
  if (p.h0)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j) s.S[i * VP + j] = p.h0[state + i * V + j];

  for (int64_t i0 = 0; i0 < steps; i0 += C) {
    const int64_t c = std::min(C, steps - i0);
    const int64_t kv = bos + p.S + i0, qo = kv + p.W;  // first absorbed row, first read / output row
    for (int64_t i = 0; i < c; ++i) {
      const T* kr = static_cast<const T*>(p.k) + k0 + (kv + i) * p.k_st;
      const T* qr = static_cast<const T*>(p.q) + q0 + (qo + i) * p.q_st;
      const T* vr = static_cast<const T*>(p.v) + v0 + (kv + i) * p.v_st;
      for (int64_t d = 0; d < K; ++d) s.X[i * K + d] = to_f32(kr[d]);
      for (int64_t d = 0; d < K; ++d) s.X[(c + i) * K + d] = to_f32(qr[d]);
      for (int64_t j = 0; j < V; ++j) s.D[i * VP + j] = to_f32(vr[j]);
      s.beta[i] = p.beta[beta0 + (kv + i) * p.beta_st];
      s.g[i] = p.g ? p.g[g0 + (kv + i) * p.g_st] : 0.f;
    }
    // The next chunk's rows arrive while this one computes.
    for (int64_t i = c; i < std::min(2 * C, steps - i0); ++i) {
      prefetch(static_cast<const T*>(p.k) + k0 + (kv + i) * p.k_st, K * sizeof(T));
      prefetch(static_cast<const T*>(p.q) + q0 + (qo + i) * p.q_st, K * sizeof(T));
      prefetch(static_cast<const T*>(p.v) + v0 + (kv + i) * p.v_st, V * sizeof(T));
    }
    chunk_step(s, c, kg ? kg->at(n, at.hk, i0 / C) : nullptr, p.l2norm);
    for (int64_t i = 0; i < c; ++i) {
      T* out = static_cast<T*>(p.o) + o0 + (qo + i) * o_st;
      for (int64_t j = 0; j < V; ++j) out[j] = from_f32<T>(p.scale * s.O[i * VP + j]);  // the one downcast
    }
  }

  if (p.ht)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j) p.ht[state + i * V + j] = s.S[i * VP + j];
}

template <class T>
void run(const ChunkParams& p, int num_threads) {
  const int64_t N = p.N, HS = p.HS;
  static const StepFn step = pick(chunk_step_avx512, chunk_step_avx2, chunk_step_baseline);
  prepare_pages(p.o, p.B * p.T * HS * p.V * int64_t(sizeof(T)), num_threads);  // o [B, T, HS, V]
  // With shared k heads their K Kᵀ is formed once up front; else each task forms its own
  // in cache (a pass over memory would only add traffic).
  const KeyGrams kg = p.HK < HS ? key_grams(p, num_threads) : KeyGrams{};
  const KeyGrams* shared = p.HK < HS ? &kg : nullptr;
  // Dynamic: under varlen, sequences of very different lengths must not pile onto one thread.
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < HS; ++h) run_head<T>(p, n, h, step, shared);
}

}  // namespace

namespace delta_rule_cpu {

KeyGrams key_grams(const ChunkParams& p, int num_threads) {
  KeyGrams kg;
  kg.HK = p.HK;
  kg.C = p.C;
  kg.first.assign(p.N + 1, 0);
  std::vector<int64_t> seq;  // [chunks] the sequence of each chunk
  for (int64_t n = 0; n < p.N; ++n) {
    kg.first[n + 1] = kg.first[n] + (absorbed_rows(p, n) + p.C - 1) / p.C;
    seq.resize(kg.first[n + 1], n);
  }
  // Every lower triangle is written before it is read: no zero fill.
  kg.grams.reset(new float[kg.first[p.N] * p.HK * p.C * p.C]);  // [chunks, HK, C, C]
  dispatch_dtype(p.dtype, [&](auto tag) { fill_key_grams<decltype(tag)>(p, kg, seq, num_threads); });
  return kg;
}

}  // namespace delta_rule_cpu

void launch_chunk_fwd_cpu(const ChunkParams& p, int num_threads) {
  dispatch_dtype(p.dtype, [&](auto tag) { run<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
