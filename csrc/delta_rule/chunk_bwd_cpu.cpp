// Delta rule / gated delta rule, chunked backward on CPU (fp32 math), by recomputation.
//
// Per chunk (notation of chunk_cpu.cpp: S_0 the state at the chunk start, G the in-chunk
// prefix sum of g, Γ_ij = exp(G_i - G_j) for i >= j, e_i = exp(G_last - G_i),
// L = strict_lower(diag(β) K Kᵀ ⊙ Γ), (I + L) Δ = diag(β) (V - diag(exp G) K S_0)) and
// dS the gradient of the chunk's end state, walking the chunks in reverse:
//   dΔ  = scale · lower(Q Kᵀ ⊙ Γ)ᵀ dO + diag(e) K dS,      R = (I + L)^-T dΔ
//   dS_0 = exp(G_last) dS + scale · (diag(exp G) Q)ᵀ dO - (diag(β exp G) K)ᵀ R
//   dQ  = diag(exp G) scale · dO S_0ᵀ + (scale · dO Δᵀ ⊙ Γ) K
//   dK  = diag(e) Δ dSᵀ + (scale · dO Δᵀ ⊙ Γ)ᵀ Q - diag(β exp G) R S_0ᵀ + (M + Mᵀ) K,
//         M = strict_lower(-R Δᵀ) ⊙ diag(β) Γ
//   dV  = diag(β) R,   dβ: rows of the same products (see reverse_step),
// and the gradient of slot k's log decay g_k as the sum of the terms that cross slot k,
// each an exp of a difference of prefix sums (R_i, Δ_j rows; dE_ij the gradient w.r.t.
// G_i - G_j through Γ, dE = (scale · dO Δᵀ) ⊙ Γ ⊙ Q Kᵀ - (R Δᵀ) ⊙ diag(β) Γ ⊙ K Kᵀ):
//   dg_k = sum_{i >= k > j} dE_ij                                       pairs across k
//        + sum_{i >= k} exp(G_i) (scale · dO_i · S_0ᵀ q_i - β_i R_i · S_0ᵀ k_i)   readouts of S_0
//        + sum_{j < k} e_j k_j · dS Δ_j                                 keys into the end state
//        + exp(G_last) dS · S_0                                         S_0 carried to the end.
// Not per-token readout minus key terms and a suffix sum: there the pairs on one side of k
// cancel, and their fp32 rounding, O(1) from the diagonal already, swamped the gradient
// that strong gates make tiny (relative errors 1e-4 at g = -4 per token, 4 at g = -20).
// This is reference.chunked_bwd with W, U eliminated: the UT solve's two gradients
// (drk, drv) collapse to drk = -R S_0ᵀ and dL = -strict_lower(R Δᵀ), so one triangular
// solve on V columns serves all of them. Each task first re-runs its forward, keeping the
// chunk-start states and Δ (K·V/C + V floats per token, transient), then walks back. Both
// walks read each chunk's K Kᵀ from one pass ahead of the tasks (KeyGrams): formed once
// per chunk and k head, not twice per state head.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/dispatch.h"
#include "common/pages.h"
#include "delta_rule/chunk_cpu_common.h"
#include "delta_rule/delta_rule.h"

namespace ahn {
namespace {

using namespace delta_rule_cpu;

// Per-task fp32 scratch (zero-initialised: padding columns stay 0 throughout).
struct Scratch {
  int64_t K, KP, V, VP, C;
  std::vector<float> buf;
  const float* KK = nullptr;  // [c, C] the chunk's K Kᵀ (lower triangle), in KeyGrams
  float *Xk, *Xq, *KE, *Y, *kT, *QK, *Gm, *Lneg, *Aqk, *DA, *MS, *PA, *PL;
  float *Vr, *P, *DO, *DT, *ST, *dhT, *dh, *R1, *DKE, *DQ, *DK;
  float *beta, *g, *eG, *eend, *dG, *dB, *cross, *reads;
  std::vector<double> G;  // [C] the in-chunk prefix sums of g, in fp64 (see prepare)

  Scratch(int64_t K_, int64_t V_, int64_t C_)
      : K(K_), KP(round_up(K_, kPad)), V(V_), VP(round_up(V_, kPad)), C(C_), G(C_) {
    float** fields[] = {&Xk, &Xq, &KE, &Y, &kT, &QK, &Gm, &Lneg, &Aqk, &DA, &MS, &PA, &PL,
                        &Vr, &P, &DO, &DT, &ST, &dhT, &dh, &R1, &DKE, &DQ, &DK,
                        &beta, &g, &eG, &eend, &dG, &dB, &cross, &reads};
    const int64_t sizes[] = {
        C * KP, C * KP,   // Xk, Xq [C, KP]   k̂ and q̂ rows
        C * KP,           // KE   [C, KP]     diag(e) K
        2 * C * KP,       // Y    [2c, KP]    diag(exp G) Q, then -diag(β exp G) K
        K * C,            // kT   [K, C]      Kᵀ
        C * C,            // QK   [C, C]      Q Kᵀ (lower triangle)
        C * C,            // Gm   [C, C]      Γ (lower triangle)
        C * C,            // Lneg [C, C]      -L
        C * C,            // Aqk  [C, C]      lower(Q Kᵀ ⊙ Γ), zero above the diagonal
        C * C,            // DA   [C, C]      scale · dO Δᵀ ⊙ Γ, zero above the diagonal
        C * C,            // MS   [C, C]      M + Mᵀ
        C * C, C * C,     // PA, PL [C, C]    scale · dO Δᵀ, R Δᵀ (lower triangles)
        C * VP,           // Vr   [C, VP]     v rows
        C * VP,           // P    [C, VP]     K S_0, then diag(e) Δ (forward pass)
        2 * C * VP,       // DO   [2c, VP]    scale · dO rows, then dΔ -> R rows
        VP * C,           // DT   [VP, C]     Δᵀ
        VP * KP,          // ST   [VP, KP]    S_0ᵀ
        VP * KP,          // dhT  [VP, KP]    dSᵀ
        K * VP,           // dh   [K, VP]     dS, the running state gradient
        2 * C * KP,       // R1   [2c, KP]    scale · dO S_0ᵀ, then R S_0ᵀ
        C * KP,           // DKE  [C, KP]     Δ dSᵀ
        C * KP, C * KP,   // DQ, DK [C, KP]
        C, C, C, C, C, C,     // beta, g, exp(G), e, dg, dβ
        C, C,                 // cross, reads: dg's pair and entering-state readout terms per slot
    };
    int64_t total = 0;
    for (int64_t s : sizes) total += s;
    buf.assign(total, 0.f);
    float* ptr = buf.data();
    for (size_t f = 0; f < sizeof(sizes) / sizeof(sizes[0]); ++f) {
      *fields[f] = ptr;
      ptr += sizes[f];
    }
  }
};

// The chunk's shared pieces, once k̂, beta, g and s.KK are loaded: G, exp(G), e, Γ and -L.
// G is summed in fp64: under strong gates dg's largest terms are exps of differences
// G_i - G_j of neighbours, and an fp32 G_i (|G| reaches 1280 at g = -20 per token, C = 64)
// puts its rounding into each: dg relative errors of up to 4e-5 at g = -20 (1e-4 at -50),
// 2e-7 with fp64 sums.
AHN_INLINE void prepare(Scratch& s, int64_t c) {
  const int64_t K = s.K, KP = s.KP, C = s.C;
  double acc = 0.0;
  for (int64_t i = 0; i < c; ++i) {
    acc += s.g[i];
    s.G[i] = acc;
    s.eG[i] = std::exp(acc);
  }
  for (int64_t i = 0; i < c; ++i) {
    s.eend[i] = std::exp(s.G[c - 1] - s.G[i]);
    for (int64_t d = 0; d < K; ++d) s.KE[i * KP + d] = s.eend[i] * s.Xk[i * KP + d];
  }
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      s.Gm[i * C + j] = std::exp(s.G[i] - s.G[j]);
      s.Lneg[i * C + j] = j < i ? -s.beta[i] * s.KK[i * C + j] * s.Gm[i * C + j] : 0.f;
    }
}

// Forward: Δ of this chunk into D [c, VP] and S advanced to the chunk end.
template <class I>
AHN_INLINE void forward_step(Scratch& s, int64_t c, float* S, float* D) {
  const int64_t K = s.K, KP = s.KP, VP = s.VP, C = s.C;
  prepare(s, c);
  gemm<I>(c, VP, K, s.Xk, KP, S, VP, s.P, VP, 0.f);  // K S_0
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < VP; ++j) D[i * VP + j] = s.beta[i] * (s.Vr[i * VP + j] - s.eG[i] * s.P[i * VP + j]);
  solve_unit_lower<I>(c, s.Lneg, C, D, VP);
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < VP; ++j) s.P[i * VP + j] = s.eend[i] * D[i * VP + j];
  gemm<I, /*TA=*/true>(K, VP, c, s.Xk, KP, s.P, VP, S, VP, std::exp(s.G[c - 1]));
}

// D [c, VP] <- (I + L)^-T D (Lneg = -L strictly lower): back substitution in blocks of 16
// rows from the bottom, the rows below a block entering through one product.
template <class I>
AHN_INLINE void solve_unit_lower_t(int64_t c, const float* Lneg, int64_t lda, float* D, int64_t VP) {
  for (int64_t r0 = (c - 1) / kPad * kPad; r0 >= 0; r0 -= kPad) {
    const int64_t r1 = std::min(r0 + kPad, c);
    if (r1 < c) gemm<I, /*TA=*/true>(r1 - r0, VP, c - r1, Lneg + r1 * lda + r0, lda, D + r1 * VP, VP, D + r0 * VP, VP, 1.f);
    for (int64_t i = r1 - 2; i >= r0; --i) {
      float* __restrict di = D + i * VP;
      for (int64_t j = i + 1; j < r1; ++j) {
        const float a = Lneg[j * lda + i];
        const float* __restrict dj = D + j * VP;
        for (int64_t col = 0; col < VP; ++col) di[col] += a * dj[col];
      }
    }
  }
}

// dst[c, r] = src[r, c] for r < rows, c < cols, in 16 x 16 tiles: a plain column walk
// writes one cache line per element (rows are 512 B apart at K = V = 128).
AHN_INLINE void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += kPad)
    for (int64_t c0 = 0; c0 < cols; c0 += kPad) {
      const int64_t r1 = std::min(rows, r0 + kPad), c1 = std::min(cols, c0 + kPad);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

AHN_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Reverse: with scale · dO in DO's first c rows, S_0, Δ and dS = s.dh (the chunk end's
// gradient), leaves dQ in DQ, dK in DK, dV in DO's rows c.., dβ in dB, dg in dG and
// dS_0 in s.dh.
template <class I>
AHN_INLINE void reverse_step(Scratch& s, int64_t c, const float* S0, const float* D) {
  const int64_t K = s.K, KP = s.KP, V = s.V, VP = s.VP, C = s.C, CP = round_up(c, kPad);
  prepare(s, c);
  transpose(c, K, s.Xk, KP, s.kT, C);
  gemm<I>(c, CP, K, s.Xq, KP, s.kT, C, s.QK, C, 0.f, Tri::lower_c);  // Q Kᵀ
  for (int64_t i = 0; i < c; ++i) {
    for (int64_t j = 0; j <= i; ++j) s.Aqk[i * C + j] = s.QK[i * C + j] * s.Gm[i * C + j];
    for (int64_t j = i + 1; j < c; ++j) s.Aqk[i * C + j] = 0.f;
  }
  transpose(K, V, S0, VP, s.ST, KP);
  transpose(K, V, s.dh, VP, s.dhT, KP);
  transpose(c, V, D, VP, s.DT, C);
  const float gain = std::exp(s.G[c - 1]);
  float passed = 0.f;  // dg's term of the entering state carried to the chunk end: gain dS · S_0
  for (int64_t i = 0; i < K; ++i) passed += dot(s.dh + i * VP, S0 + i * VP, V);
  passed *= gain;

  float* const R = s.DO + c * VP;
  gemm<I>(c, VP, K, s.KE, KP, s.dh, VP, R, VP, 0.f);                 // diag(e) K dS
  gemm<I, /*TA=*/true>(c, VP, c, s.Aqk, C, s.DO, VP, R, VP, 1.f);   // + lower(Q Kᵀ ⊙ Γ)ᵀ scale dO
  solve_unit_lower_t<I>(c, s.Lneg, C, R, VP);                         // R = (I + L)^-T dΔ
  gemm<I>(2 * c, KP, V, s.DO, VP, s.ST, KP, s.R1, KP, 0.f);          // [scale dO; R] S_0ᵀ
  gemm<I>(c, KP, V, D, VP, s.dhT, KP, s.DKE, KP, 0.f);                // Δ dSᵀ
  gemm<I>(c, CP, V, s.DO, VP, s.DT, C, s.PA, C, 0.f, Tri::lower_c);  // scale dO Δᵀ
  gemm<I>(c, CP, V, R, VP, s.DT, C, s.PL, C, 0.f, Tri::lower_c);     // R Δᵀ
  for (int64_t i = 0; i < c; ++i)
    for (int64_t d = 0; d < K; ++d) {
      s.Y[i * KP + d] = s.eG[i] * s.Xq[i * KP + d];
      s.Y[(c + i) * KP + d] = -s.beta[i] * s.eG[i] * s.Xk[i * KP + d];
    }
  // dS_0 = gain dS + [diag(exp G) Q; -diag(β exp G) K]ᵀ [scale dO; R]
  gemm<I, /*TA=*/true>(K, VP, 2 * c, s.Y, KP, s.DO, VP, s.dh, VP, gain);

  // dg_k, the gradient of slot k's log decay, sums the terms that cross slot k (see the file
  // comment); here dE_ij, the gradient w.r.t. G_i - G_j through Γ, of the pairs i >= k > j:
  // cross[k] = sum_{i >= k} sum_{j < k} dE_ij, row i's exclusive prefix sums added column-wise.
  for (int64_t j = 0; j < c; ++j) s.cross[j] = 0.f;
  float keys = 0.f;  // sum_{j < i} e_j k_j · (dS Δ_j): keys into the chunk end state
  for (int64_t i = 0; i < c; ++i) {
    float dbeta = 0.f, pre = 0.f;  // pre = sum_{j' < j} dE_ij'
    for (int64_t j = 0; j < i; ++j) {
      const float gm = s.Gm[i * C + j];
      const float da = s.PA[i * C + j] * gm;
      const float dl = -s.PL[i * C + j];  // dL_ij
      const float dkk = dl * s.beta[i] * gm;
      dbeta += dl * s.KK[i * C + j] * gm;
      s.DA[i * C + j] = da;
      s.MS[i * C + j] = dkk;
      s.MS[j * C + i] = dkk;
      s.cross[j] += pre;
      pre += da * s.QK[i * C + j] + dkk * s.KK[i * C + j];
    }
    s.cross[i] += pre;
    s.DA[i * C + i] = s.PA[i * C + i];  // Γ_ii = 1
    for (int64_t j = i + 1; j < c; ++j) s.DA[i * C + j] = 0.f;
    s.MS[i * C + i] = 0.f;
    const float* xk = s.Xk + i * KP;
    const float* drv = R + i * VP;
    const float* drk_neg = s.R1 + (c + i) * KP;  // R S_0ᵀ = -drk
    const float dq_g_q = dot(s.R1 + i * KP, s.Xq + i * KP, K);
    const float drk_k = -dot(drk_neg, xk, K);
    s.reads[i] = s.eG[i] * (dq_g_q + s.beta[i] * drk_k);
    s.dG[i] = keys + passed;
    keys += dot(s.DKE + i * KP, xk, K) * s.eend[i];
    dbeta += s.eG[i] * drk_k + dot(drv, s.Vr + i * VP, V);
    for (int64_t d = 0; d < KP; ++d) {
      s.DQ[i * KP + d] = s.eG[i] * s.R1[i * KP + d];
      s.DK[i * KP + d] = s.eend[i] * s.DKE[i * KP + d] - s.beta[i] * s.eG[i] * drk_neg[d];
    }
    s.dB[i] = dbeta;
  }
  gemm<I>(c, KP, c, s.DA, C, s.Xk, KP, s.DQ, KP, 1.f, Tri::lower_a);  // + (dO Δᵀ ⊙ Γ) K
  gemm<I, /*TA=*/true>(c, KP, c, s.DA, C, s.Xq, KP, s.DK, KP, 1.f);    // + (dO Δᵀ ⊙ Γ)ᵀ Q
  gemm<I>(c, KP, c, s.MS, C, s.Xk, KP, s.DK, KP, 1.f);                  // + (M + Mᵀ) K
  float reads = 0.f;  // sum_{i >= k} of the entering state's readouts
  for (int64_t i = c - 1; i >= 0; --i) {
    for (int64_t j = 0; j < VP; ++j) R[i * VP + j] *= s.beta[i];  // dV
    reads += s.reads[i];
    s.dG[i] += reads + s.cross[i];
  }
}

struct Steps {
  void (*forward)(Scratch&, int64_t, float*, float*);
  void (*reverse)(Scratch&, int64_t, const float*, const float*);
};

// One x86-64 binary serves every CPU: both steps are built per ISA, picked once.
#define AHN_DEFINE_STEPS(NAME, TARGET, ISA)                                                                \
  TARGET void forward_##NAME(Scratch& s, int64_t c, float* S, float* D) { forward_step<ISA>(s, c, S, D); } \
  TARGET void reverse_##NAME(Scratch& s, int64_t c, const float* S, const float* D) {                      \
    reverse_step<ISA>(s, c, S, D);                                                                         \
  }
AHN_DEFINE_STEPS(avx512, AHN_TARGET("arch=x86-64-v4"), Avx512)
AHN_DEFINE_STEPS(avx2, AHN_TARGET("arch=x86-64-v3"), Avx2)
AHN_DEFINE_STEPS(baseline, , Baseline)
#undef AHN_DEFINE_STEPS

// Stores a gradient row [D] (fp32) of an input x with H heads: through the L2 norm of x
// when l2norm (dx = r dy - r³ x (x · dy)), then one downcast to x's dtype.
template <class T>
AHN_INLINE void store_grad(float* acc, int64_t D, const T* xrow, bool l2norm, T* out) {
  if (l2norm) {
    float xr[256];
    for (int64_t d = 0; d < D; ++d) xr[d] = to_f32(xrow[d]);
    const float rn = rnorm(xr, D), xd = dot(xr, acc, D);
    for (int64_t d = 0; d < D; ++d) acc[d] = rn * acc[d] - rn * rn * rn * xr[d] * xd;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = from_f32<T>(acc[d]);  // the one downcast
}

// Where the rows of dq, dk or dv go. A head that one state head owns (H = HS) is finished
// by that task; shared heads collect per-state-head fp32 partials [B, T, HS, D], summed
// over each group afterwards in head order (deterministic, no atomics).
template <class T>
struct GradSink {
  const ChunkParams* p;
  const void* x;  // the input: [B, T, H, D] with strides sb, st, sh
  int64_t sb, st, sh, H, D;
  bool l2norm;
  T* out;       // [B, T, H, D] contiguous
  float* part;  // [B, T, HS, D] fp32 when H < HS, else null

  // Row t of batch b, state head h (its own head when H = HS).
  void put(int64_t b, int64_t t, int64_t h, float* acc) const {
    const int64_t row = b * p->T + t;
    if (part) {
      std::copy(acc, acc + D, part + (row * p->HS + h) * D);
      return;
    }
    store_grad<T>(acc, D, static_cast<const T*>(x) + b * sb + t * st + h * sh, l2norm, out + (row * H + h) * D);
  }
  void zero(int64_t b, int64_t t, int64_t h) const {
    const int64_t row = b * p->T + t;
    if (part)
      std::fill(part + (row * p->HS + h) * D, part + (row * p->HS + h + 1) * D, 0.f);
    else
      std::fill(out + (row * H + h) * D, out + (row * H + h + 1) * D, from_f32<T>(0.f));
  }
  // out = the group sums of the partials, rows [0, rows).
  // Faults in the pages of the buffer the tasks write (see common/pages.h).
  void prepare(int64_t rows, int num_threads) const {
    if (part)
      prepare_pages(part, rows * p->HS * D * int64_t(sizeof(float)), num_threads);
    else
      prepare_pages(out, rows * H * D * int64_t(sizeof(T)), num_threads);
  }
  void reduce(int64_t rows, int num_threads) const {
    if (!part) return;
    const int64_t HS = p->HS, G = HS / H;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; ++r) {
      float acc[256];
      const int64_t b = r / p->T, t = r % p->T;
      for (int64_t hh = 0; hh < H; ++hh) {
        const float* src = part + (r * HS + hh * G) * D;
        std::copy(src, src + D, acc);
        for (int64_t s = 1; s < G; ++s)
          for (int64_t d = 0; d < D; ++d) acc[d] += src[s * D + d];
        store_grad<T>(acc, D, static_cast<const T*>(x) + b * sb + t * st + hh * sh, l2norm, out + (r * H + hh) * D);
      }
    }
  }
};

template <class T>
struct Sinks {
  GradSink<T> dq, dk, dv;
};

// One task: sequence n, state head h. Writes its rows of dq / dk / dv (or their partials),
// dbeta and dg, and its dh0.
template <class T>
void run_head(const ChunkBwdParams& pb, const Sinks<T>& sink, int64_t n, int64_t h, const Steps& steps_fn,
              const KeyGrams& kg) {
  const ChunkParams& p = pb.fwd;
  const int64_t K = p.K, V = p.V, C = p.C, HS = p.HS;
  const SeqHead at = seq_head(p, n, h);
  const int64_t b = at.b, bos = at.bos, eos = at.eos;
  const int64_t steps = std::max<int64_t>(0, eos - bos - p.W - p.S);
  const int64_t hq = at.hq, hk = at.hk, hv = at.hv;
  const int64_t q0 = at.q, k0 = at.k, v0 = at.v, g0 = at.g, beta0 = at.beta, state = at.state;
  const int64_t do0 = b * pb.do_sb + h * pb.do_sh;
  const int64_t row0 = b * p.T;  // row of token 0 in the [B·T, HS] gate gradients
  // A sink's head: the task's own head when it is not shared, else the state head (partials).
  const int64_t sq = sink.dq.part ? h : hq, sk = sink.dk.part ? h : hk, sv = sink.dv.part ? h : hv;

  for (int64_t t = bos; t < eos; ++t) {  // rows nothing reaches keep a zero gradient
    sink.dq.zero(b, t, sq);
    sink.dk.zero(b, t, sk);
    sink.dv.zero(b, t, sv);
    pb.dbeta[(row0 + t) * HS + h] = 0.f;
    if (pb.dg) pb.dg[(row0 + t) * HS + h] = 0.f;
  }

  Scratch s(K, V, C);
  const int64_t KP = s.KP, VP = s.VP, NC = (steps + C - 1) / C;
  // Fully written before read: no zero fill (4 MiB of states per head at T = 4096, K = V = 128).
  std::unique_ptr<float[]> S_start(new float[NC * K * VP]);  // [NC, K, VP] state at each chunk start
  std::unique_ptr<float[]> deltas(new float[steps * VP]);    // [steps, VP] Δ rows
  std::vector<float> S(K * VP, 0.f);                          // [K, VP] running state
  if (p.h0)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j) S[i * VP + j] = p.h0[state + i * V + j];

  auto load = [&](int64_t i0, int64_t c, bool with_q) {
    const int64_t kv = bos + p.S + i0, qo = kv + p.W;
    for (int64_t i = 0; i < c; ++i) {
      const T* kr = static_cast<const T*>(p.k) + k0 + (kv + i) * p.k_st;
      const T* vr = static_cast<const T*>(p.v) + v0 + (kv + i) * p.v_st;
      for (int64_t d = 0; d < K; ++d) s.Xk[i * KP + d] = to_f32(kr[d]);
      for (int64_t j = 0; j < V; ++j) s.Vr[i * VP + j] = to_f32(vr[j]);
      if (p.l2norm) l2_normalize(s.Xk + i * KP, K);
      s.beta[i] = p.beta[beta0 + (kv + i) * p.beta_st];
      s.g[i] = p.g ? p.g[g0 + (kv + i) * p.g_st] : 0.f;
      if (!with_q) continue;
      const T* qr = static_cast<const T*>(p.q) + q0 + (qo + i) * p.q_st;
      for (int64_t d = 0; d < K; ++d) s.Xq[i * KP + d] = to_f32(qr[d]);
      if (p.l2norm) l2_normalize(s.Xq + i * KP, K);
      const T* dor = static_cast<const T*>(pb.grad_o) + do0 + (qo + i) * pb.do_st;
      for (int64_t j = 0; j < V; ++j) s.DO[i * VP + j] = p.scale * to_f32(dor[j]);
    }
  };

  // The rows of the chunk processed next arrive while this one computes (see prefetch()).
  auto fetch = [&](int64_t ci, bool with_q) {
    if (ci < 0 || ci >= NC) return;
    const int64_t kv = bos + p.S + ci * C, qo = kv + p.W;
    for (int64_t i = 0; i < std::min(C, steps - ci * C); ++i) {
      prefetch(static_cast<const T*>(p.k) + k0 + (kv + i) * p.k_st, K * sizeof(T));
      prefetch(static_cast<const T*>(p.v) + v0 + (kv + i) * p.v_st, V * sizeof(T));
      if (!with_q) continue;
      prefetch(static_cast<const T*>(p.q) + q0 + (qo + i) * p.q_st, K * sizeof(T));
      prefetch(static_cast<const T*>(pb.grad_o) + do0 + (qo + i) * pb.do_st, V * sizeof(T));
    }
  };

  for (int64_t ci = 0; ci < NC; ++ci) {
    const int64_t i0 = ci * C, c = std::min(C, steps - i0);
    load(i0, c, false);
    fetch(ci + 1, false);
    std::copy(S.begin(), S.end(), S_start.get() + ci * K * VP);
    s.KK = kg.at(n, hk, ci);
    steps_fn.forward(s, c, S.data(), deltas.get() + i0 * VP);
  }

  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < V; ++j) s.dh[i * VP + j] = pb.grad_ht[state + i * V + j];
  for (int64_t ci = NC - 1; ci >= 0; --ci) {
    const int64_t i0 = ci * C, c = std::min(C, steps - i0);
    load(i0, c, true);
    fetch(ci - 1, true);
    s.KK = kg.at(n, hk, ci);
    steps_fn.reverse(s, c, S_start.get() + ci * K * VP, deltas.get() + i0 * VP);
    const int64_t kv = bos + p.S + i0, qo = kv + p.W;
    for (int64_t i = 0; i < c; ++i) {
      sink.dq.put(b, qo + i, sq, s.DQ + i * KP);
      sink.dk.put(b, kv + i, sk, s.DK + i * KP);
      sink.dv.put(b, kv + i, sv, s.DO + (c + i) * VP);
      pb.dbeta[(row0 + kv + i) * HS + h] = s.dB[i];
      if (pb.dg) pb.dg[(row0 + kv + i) * HS + h] = s.dG[i];
    }
  }
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < V; ++j) pb.dh0[state + i * V + j] = s.dh[i * VP + j];
}

template <class T>
void run(const ChunkBwdParams& pb, int num_threads) {
  const ChunkParams& p = pb.fwd;
  const int64_t N = p.N, HS = p.HS, rows = p.B * p.T;
  // Partials of shared heads, uninitialised: every task zeroes its own rows.
  auto partial = [&](int64_t H, int64_t D) { return std::unique_ptr<float[]>(H < HS ? new float[rows * HS * D] : nullptr); };
  auto pq = partial(p.HQ, p.K), pk = partial(p.HK, p.K), pv = partial(p.HV, p.V);  // [B, T, HS, K|K|V]
  const Sinks<T> sink{{&p, p.q, p.q_sb, p.q_st, p.q_sh, p.HQ, p.K, p.l2norm, static_cast<T*>(pb.dq), pq.get()},
                      {&p, p.k, p.k_sb, p.k_st, p.k_sh, p.HK, p.K, p.l2norm, static_cast<T*>(pb.dk), pk.get()},
                      {&p, p.v, p.v_sb, p.v_st, p.v_sh, p.HV, p.V, false, static_cast<T*>(pb.dv), pv.get()}};
  for (const GradSink<T>* g : {&sink.dq, &sink.dk, &sink.dv}) g->prepare(rows, num_threads);
  // Rows past the last sequence (none once cu_seqlens is validated) belong to no task.
  for (int64_t r = p.cu_seqlens ? p.cu_seqlens[N] : rows; r < rows; ++r)
    for (int64_t h = 0; h < HS; ++h) {
      sink.dq.zero(0, r, sink.dq.part ? h : h / (HS / p.HQ));
      sink.dk.zero(0, r, sink.dk.part ? h : h / (HS / p.HK));
      sink.dv.zero(0, r, sink.dv.part ? h : h / (HS / p.HV));
      pb.dbeta[r * HS + h] = 0.f;
      if (pb.dg) pb.dg[r * HS + h] = 0.f;
    }
  static const Steps steps{pick(forward_avx512, forward_avx2, forward_baseline),
                           pick(reverse_avx512, reverse_avx2, reverse_baseline)};
  const KeyGrams kg = key_grams(p, num_threads);
  // Dynamic: under varlen, sequences of very different lengths must not pile onto one thread.
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < HS; ++h) run_head<T>(pb, sink, n, h, steps, kg);
  sink.dq.reduce(rows, num_threads);
  sink.dk.reduce(rows, num_threads);
  sink.dv.reduce(rows, num_threads);
}

}  // namespace

void launch_chunk_bwd_cpu(const ChunkBwdParams& p, int num_threads) {
  dispatch_dtype(p.fwd.dtype, [&](auto tag) { run<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
