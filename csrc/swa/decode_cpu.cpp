// Sliding-window attention decode over the AHN ring-buffer cache, on CPU (fp32 math).
//
// A task is (sequence, KV head). It first writes the new token's k/v into its slot (the
// caller has already folded the token leaving the window into the memory), then runs
// the G query heads of the group over the valid slots in blocks of BK keys with an online
// softmax: each block's k/v rows are loaded once for all G heads, and the products go
// through the register-tiled GEMM with the keys as rows: scoresᵀ [BK, GP] = K Qᵀ, then
// O [G, D] += P V, P read from its transpose. Keys as rows means no transpose of the
// cache: fp32 k (and v, when D needs no padding) are multiplied where they lie; f16/bf16
// rows are converted once. The softmax runs across keys with the G heads in vector lanes
// (GP = G padded to 16). Transposing each key block instead made the kernel 3-8x slower
// (single thread, W = 4096, S = 64, HQ = 16, HK = 2, D = 128, fp32: 11-14 ms against
// 1.7-4.5 ms on a shared, loaded machine).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/dispatch.h"
#include "swa/cpu_common.h"  // vexp: the forward's exp of a score tile
#include "swa/swa.h"

namespace ahn {
namespace {

constexpr int64_t BK = 64;    // keys per block
constexpr int64_t kPad = 16;  // D and key columns are padded to the widest vector (16 fp32)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-thread fp32 scratch, kept across calls (OpenMP reuses its threads), so that a
// decode step allocates nothing once a thread has served one of this size.
struct Scratch {
  int64_t DP = 0, GP = 0, G = 0;
  std::vector<float> buf;
  float *Qt, *O, *St, *K, *V, *m, *l;

  void fit(int64_t D, int64_t G_) {
    if (DP == round_up(D, kPad) && G == G_) return;
    DP = round_up(D, kPad);
    G = G_;
    GP = round_up(G, kPad);
    const int64_t sizes[] = {
        DP * GP,  // Qt [DP, GP]  scale · qᵀ of the group's query heads (padding zero)
        G * DP,   // O  [G, DP]   unnormalised output rows
        BK * GP,  // St [BK, GP]  scoresᵀ, then exp(score - m)
        BK * DP,  // K  [BK, DP]  the key block in fp32 (f16/bf16 keys)
        BK * DP,  // V  [BK, DP]  the value block in fp32 (f16/bf16 or padded values)
        GP, GP,   // m, l [GP]    running max and sum of exp per head
    };
    int64_t total = 0;
    for (int64_t n : sizes) total += n;
    buf.assign(total, 0.f);  // zero: padding stays finite throughout
    float* ptr = buf.data();
    float** fields[] = {&Qt, &O, &St, &K, &V, &m, &l};
    for (int f = 0; f < 7; ++f) {
      *fields[f] = ptr;
      ptr += sizes[f];
    }
  }
};

// One block of nk keys (kb, row stride ldk) and values (vb, row stride ldv).
template <class I>
AHN_INLINE void block_step(Scratch& s, int64_t D, int64_t nk, const float* kb, int64_t ldk, const float* vb,
                           int64_t ldv) {
  using V = typename I::vec;
  constexpr int L = I::L;
  const int64_t GP = s.GP, DP = s.DP;
  gemm<I>(nk, GP, D, kb, ldk, s.Qt, GP, s.St, GP, 0.f);  // scoresᵀ [nk, GP]
  for (int64_t g0 = 0; g0 < GP; g0 += L) {  // L heads at a time, one per lane
    V vmax = load<V>(s.St + g0);
    for (int64_t c = 1; c < nk; ++c) {
      const V x = load<V>(s.St + c * GP + g0);
      vmax = x > vmax ? x : vmax;
    }
    const V m_old = load<V>(s.m + g0);
    const V m_new = m_old > vmax ? m_old : vmax;
    V vsum = {};
    for (int64_t c = 0; c < nk; ++c) {
      const V e = swa_cpu::vexp<I>(load<V>(s.St + c * GP + g0) - m_new);
      store<V>(s.St + c * GP + g0, e);
      vsum += e;
    }
    const V alpha = swa_cpu::vexp<I>(m_old - m_new);  // 0 on the first block (m_old = -inf)
    store<V>(s.l + g0, load<V>(s.l + g0) * alpha + vsum);
    store<V>(s.m + g0, m_new);
    for (int64_t j = 0; j < L && g0 + j < s.G; ++j)
      if (alpha[j] != 1.f)
        for (int64_t d = 0; d < DP; ++d) s.O[(g0 + j) * DP + d] *= alpha[j];
  }
  gemm<I, true>(s.G, DP, nk, s.St, GP, vb, ldv, s.O, DP, 1.f);  // O += P V, P given as Pᵀ = St
}

// Built for AVX-512, AVX2+FMA and the baseline, picked once at run time.
using StepFn = void (*)(Scratch&, int64_t, int64_t, const float*, int64_t, const float*, int64_t);
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) void block_step_avx512(Scratch& s, int64_t D, int64_t nk, const float* kb,
                                                                   int64_t ldk, const float* vb, int64_t ldv) {
  block_step<Avx512>(s, D, nk, kb, ldk, vb, ldv);
}
__attribute__((target("arch=x86-64-v3"))) void block_step_avx2(Scratch& s, int64_t D, int64_t nk, const float* kb,
                                                                 int64_t ldk, const float* vb, int64_t ldv) {
  block_step<Avx2>(s, D, nk, kb, ldk, vb, ldv);
}
#endif
void block_step_baseline(Scratch& s, int64_t D, int64_t nk, const float* kb, int64_t ldk, const float* vb,
                         int64_t ldv) {
  block_step<Baseline>(s, D, nk, kb, ldk, vb, ldv);
}

StepFn pick_block_step() {
  switch (cpu_isa()) {
#if defined(__GNUC__) && defined(__x86_64__)
    case CpuIsa::avx512: return block_step_avx512;
    case CpuIsa::avx2: return block_step_avx2;
#endif
    default: return block_step_baseline;
  }
}

// One task: sequence b, KV head hk.
template <class T>
void run_task(const SwaDecodeParams& p, Scratch& s, int64_t b, int64_t hk, StepFn step) {
  const int64_t G = p.HQ / p.HK, D = p.D, DP = s.DP;
  const int64_t pos = p.cache_seqlens[b];
  const int64_t slot = pos < p.S ? pos : p.S + (pos - p.S) % p.W;
  T* kc = static_cast<T*>(p.k_cache) + b * p.kc_sb + hk * p.kc_sh;
  T* vc = static_cast<T*>(p.v_cache) + b * p.vc_sb + hk * p.vc_sh;
  std::memcpy(kc + slot * p.kc_st, static_cast<const T*>(p.k_new) + b * p.kn_sb + hk * p.kn_sh, D * sizeof(T));
  std::memcpy(vc + slot * p.vc_st, static_cast<const T*>(p.v_new) + b * p.vn_sb + hk * p.vn_sh, D * sizeof(T));

  for (int64_t r = 0; r < G; ++r) {
    const T* qr = static_cast<const T*>(p.q) + b * p.q_sb + (hk * G + r) * p.q_sh;
    for (int64_t d = 0; d < D; ++d) s.Qt[d * s.GP + r] = p.scale * to_f32(qr[d]);
    std::fill(s.O + r * DP, s.O + (r + 1) * DP, 0.f);
  }
  std::fill(s.m, s.m + s.GP, kNegInf);
  std::fill(s.l, s.l + s.GP, 0.f);
  // Slots 0 .. min(pos, S + W - 1) hold valid tokens; the others were never written.
  const int64_t n = std::min(pos + 1, p.S + p.W);
  constexpr bool kF32 = std::is_same_v<T, float>;
  const bool v_in_place = kF32 && D == DP;  // gemm reads DP columns of each value row
  for (int64_t j0 = 0; j0 < n; j0 += BK) {
    const int64_t nk = std::min(BK, n - j0);
    const float *kb = s.K, *vb = s.V;
    int64_t ldk = DP, ldv = DP;
    if constexpr (kF32) kb = kc + j0 * p.kc_st, ldk = p.kc_st;  // gemm reads D columns of each key row
    if constexpr (kF32)
      if (v_in_place) vb = vc + j0 * p.vc_st, ldv = p.vc_st;
    for (int64_t c = 0; c < nk; ++c) {
      if (!kF32) {
        const T* kr = kc + (j0 + c) * p.kc_st;
        for (int64_t d = 0; d < D; ++d) s.K[c * DP + d] = to_f32(kr[d]);
      }
      if (!v_in_place) {
        const T* vr = vc + (j0 + c) * p.vc_st;
        for (int64_t d = 0; d < D; ++d) s.V[c * DP + d] = to_f32(vr[d]);
      }
    }
    step(s, D, nk, kb, ldk, vb, ldv);
  }
  for (int64_t r = 0; r < G; ++r) {
    T* out = static_cast<T*>(p.o) + (b * p.HQ + hk * G + r) * D;
    const float inv = 1.f / s.l[r];  // l >= 1: the row's maximum contributes exp(0)
    for (int64_t d = 0; d < D; ++d) out[d] = from_f32<T>(s.O[r * DP + d] * inv);  // the one downcast
  }
}

template <class T>
void run(const SwaDecodeParams& p, int num_threads) {
  const int64_t HK = p.HK, tasks = p.B * HK;
  static const StepFn step = pick_block_step();
#pragma omp parallel num_threads(num_threads)
  {
    static thread_local Scratch s;
    s.fit(p.D, p.HQ / HK);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) run_task<T>(p, s, task / HK, task % HK, step);
  }
}

}  // namespace

void launch_swa_decode_cpu(const SwaDecodeParams& p, int num_threads) {
  dispatch_dtype(p.dtype, [&](auto tag) { run<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
