// Sliding-window attention with sinks, forward on CPU: flash-style tiles, fp32 math.
//
// A task is (sequence, KV head, block of BQ query tokens); its tile holds the BQ · G
// query rows of the G query heads that share the KV head, so each key/value block is
// loaded and converted once and serves all of them. The task visits the key blocks of
// its sinks left of the window span, then those of the span [lo, i1), keeping per row a
// running max m, sum l and unnormalised output O (the online softmax), and never forms
// more than a [BQ·G, BK] score tile: work O(T·(W+S)), memory O(T).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/dispatch.h"
#include "swa/swa.h"

namespace ahn {
namespace {

constexpr int64_t BQ = 64;    // query tokens per task (the tile has BQ · G rows)
constexpr int64_t BK = 64;    // keys per block
constexpr int64_t kPad = 16;  // D and key columns are padded to the widest vector (16 fp32)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-thread fp32 scratch (zero-initialised; padding columns stay finite throughout).
struct Scratch {
  int64_t DP;
  std::vector<float> buf;
  float *Q, *O, *P, *kT, *V, *m, *l;

  Scratch(int64_t D, int64_t G) : DP(round_up(D, kPad)) {
    const int64_t M = BQ * G;
    const int64_t sizes[] = {
        M * DP,   // Q  [M, DP]   scale · q rows; row r = token r / G, query head r % G of the group
        M * DP,   // O  [M, DP]   unnormalised output rows
        M * BK,   // P  [M, BK]   scores, then exp(score - m)
        D * BK,   // kT [D, BK]   the key block, transposed
        BK * DP,  // V  [BK, DP]  the value block
        M, M,     // m, l [M]     running max and sum of exp per row
    };
    int64_t total = 0;
    for (int64_t n : sizes) total += n;
    buf.assign(total, 0.f);
    float* ptr = buf.data();
    float** fields[] = {&Q, &O, &P, &kT, &V, &m, &l};
    for (int f = 0; f < 7; ++f) {
      *fields[f] = ptr;
      ptr += sizes[f];
    }
  }
};

// One key block [j0, j0 + nk) against a task's M rows (positions local to the sequence).
struct Block {
  int64_t M, G, i0;  // tile rows, query heads per KV head, position of the task's first query
  int64_t j0, nk;    // position of the first key, keys in the block
  int64_t D, W, S;
  bool masked;  // some key of the block is hidden from some row
};

// exp(x) for x <= 0 (Cephes' expf polynomial, about 1 ulp); 0 below -87, where exp
// leaves the normal range, so that -inf (a hidden key) gives exactly 0. A scalar expf per
// score cost more than both products together.
template <class I>
AHN_INLINE typename I::vec vexp(typename I::vec x) {
  using V = typename I::vec;
  using IV = typename I::ivec;
  const V lo = V{} - 87.f;
  const IV under = x < lo;
  x = under ? lo : x;
  const V magic = V{} + 12582912.f;  // 1.5 · 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2 in two parts (Cody-Waite)
  V y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const IV e = __builtin_convertvector(n, IV) << 23;  // 2^n into the exponent field
  return (V)(((IV)y + e) & ~under);
}

template <class I>
AHN_INLINE void block_step(Scratch& s, const Block& b) {
  using V = typename I::vec;
  constexpr int L = I::L;
  const int64_t DP = s.DP, NK = round_up(b.nk, kPad);
  gemm<I>(b.M, NK, b.D, s.Q, DP, s.kT, BK, s.P, BK, 0.f);  // scores [M, NK]
  for (int64_t r = 0; r < b.M; ++r) {
    float* row = s.P + r * BK;
    // Row r sees the block's columns [0, sink_end) and [wlo, hi).
    int64_t hi = b.nk, sink_end = b.nk, wlo = 0;
    if (b.masked) {
      const int64_t i = b.i0 + r / b.G;
      hi = std::clamp<int64_t>(i - b.j0 + 1, 0, b.nk);
      sink_end = std::clamp<int64_t>(b.S - b.j0, 0, hi);
      wlo = b.W ? std::clamp<int64_t>(i - b.W + 1 - b.j0, 0, hi) : 0;
    }
    for (int64_t c = sink_end; c < wlo; ++c) row[c] = kNegInf;
    for (int64_t c = hi; c < NK; ++c) row[c] = kNegInf;
    V vmax = load<V>(row);
    for (int64_t c = L; c < NK; c += L) {
      const V x = load<V>(row + c);
      vmax = x > vmax ? x : vmax;
    }
    float row_max = vmax[0];
    for (int j = 1; j < L; ++j) row_max = std::max(row_max, vmax[j]);
    const float m_new = std::max(s.m[r], row_max);
    if (m_new == kNegInf) {  // nothing visible yet: exp(-inf - -inf) would be nan
      for (int64_t c = 0; c < NK; ++c) row[c] = 0.f;
      continue;
    }
    V vsum = {};
    for (int64_t c = 0; c < NK; c += L) {
      const V e = vexp<I>(load<V>(row + c) - m_new);
      store<V>(row + c, e);
      vsum += e;
    }
    float row_sum = 0.f;
    for (int j = 0; j < L; ++j) row_sum += vsum[j];
    const float alpha = std::exp(s.m[r] - m_new);  // 0 on the first visible block
    s.l[r] = s.l[r] * alpha + row_sum;
    s.m[r] = m_new;
    if (alpha != 1.f)
      for (int64_t d = 0; d < DP; ++d) s.O[r * DP + d] *= alpha;
  }
  gemm<I>(b.M, DP, b.nk, s.P, BK, s.V, DP, s.O, DP, 1.f);  // O += P V
}

// The block step is built for AVX-512, AVX2+FMA and the baseline, picked once at run time.
using StepFn = void (*)(Scratch&, const Block&);
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) void block_step_avx512(Scratch& s, const Block& b) {
  block_step<Avx512>(s, b);
}
__attribute__((target("arch=x86-64-v3"))) void block_step_avx2(Scratch& s, const Block& b) {
  block_step<Avx2>(s, b);
}
#endif
void block_step_baseline(Scratch& s, const Block& b) { block_step<Baseline>(s, b); }

StepFn pick_block_step() {
  switch (cpu_isa()) {
#if defined(__GNUC__) && defined(__x86_64__)
    case CpuIsa::avx512: return block_step_avx512;
    case CpuIsa::avx2: return block_step_avx2;
#endif
    default: return block_step_baseline;
  }
}

// One task: sequence n, KV head hk, query tokens [i0, i0 + BQ) of the sequence.
template <class T>
void run_task(const SwaParams& p, Scratch& s, int64_t n, int64_t hk, int64_t i0, StepFn step) {
  const int64_t G = p.HQ / p.HK, D = p.D, DP = s.DP;
  const int64_t b = p.cu_seqlens ? 0 : n;
  const int64_t bos = p.cu_seqlens ? p.cu_seqlens[n] : 0;
  const int64_t eos = p.cu_seqlens ? p.cu_seqlens[n + 1] : p.T;
  const int64_t i1 = std::min(i0 + BQ, eos - bos), M = (i1 - i0) * G;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  for (int64_t r = 0; r < M; ++r) {
    const T* qr = q + (bos + i0 + r / G) * p.q_st + (hk * G + r % G) * p.q_sh;
    for (int64_t d = 0; d < D; ++d) s.Q[r * DP + d] = p.scale * to_f32(qr[d]);
    for (int64_t d = 0; d < DP; ++d) s.O[r * DP + d] = 0.f;
    s.m[r] = kNegInf;
    s.l[r] = 0.f;
  }

  auto visit = [&](int64_t j0, int64_t j1) {
    for (; j0 < j1; j0 += BK) {
      const int64_t nk = std::min(BK, j1 - j0), last = j0 + nk - 1;
      for (int64_t c = 0; c < nk; ++c) {
        const T* kr = k + (bos + j0 + c) * p.k_st;
        const T* vr = v + (bos + j0 + c) * p.v_st;
        for (int64_t d = 0; d < D; ++d) s.kT[d * BK + c] = to_f32(kr[d]);
        for (int64_t d = 0; d < D; ++d) s.V[c * DP + d] = to_f32(vr[d]);
      }
      // Every row sees every key iff the last key is at or before the first query and
      // the last query still has the first key in its window (or the block is all sinks).
      const bool masked = last > i0 || !(p.W == 0 || i1 - 1 - j0 < p.W || last < p.S);
      step(s, Block{M, G, i0, j0, nk, D, p.W, p.S, masked});
    }
  };
  // The sinks left of the window span are visible to every row of the task (they are
  // < lo <= i0 and < S); the span [lo, i1) holds every other key any row can see.
  const int64_t lo = p.W ? std::max<int64_t>(0, i0 - p.W + 1) : 0;
  visit(0, std::min(p.S, lo));
  visit(lo, i1);

  for (int64_t r = 0; r < M; ++r) {
    const int64_t t = bos + i0 + r / G, h = hk * G + r % G;
    T* out = static_cast<T*>(p.o) + ((b * p.T + t) * p.HQ + h) * D;
    const float inv = 1.f / s.l[r];  // l >= 1: every query sees its own key, at the running max or below
    for (int64_t d = 0; d < D; ++d) out[d] = from_f32<T>(s.O[r * DP + d] * inv);  // the one downcast
    p.lse[(b * p.HQ + h) * p.T + t] = s.m[r] + std::log(s.l[r]);
  }
}

template <class T>
void run(const SwaParams& p, int num_threads) {
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (sequence, first query token of the block)
  for (int64_t n = 0; n < p.N; ++n) {
    const int64_t len = p.cu_seqlens ? p.cu_seqlens[n + 1] - p.cu_seqlens[n] : p.T;
    for (int64_t i0 = 0; i0 < len; i0 += BQ) blocks.emplace_back(n, i0);
  }
  const int64_t HK = p.HK, tasks = int64_t(blocks.size()) * HK;
  if (tasks == 0) return;
  static const StepFn step = pick_block_step();
  // Dynamic: tasks near a sequence start see fewer keys, and varlen lengths differ.
#pragma omp parallel num_threads(num_threads)
  {
    Scratch s(p.D, p.HQ / p.HK);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const auto [n, i0] = blocks[task / HK];
      run_task<T>(p, s, n, task % HK, i0, step);
    }
  }
}

}  // namespace

void launch_swa_fwd_cpu(const SwaParams& p, int num_threads) {
  dispatch_dtype(p.dtype, [&](auto tag) { run<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
