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
#include <utility>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/dispatch.h"
#include "swa/cpu_common.h"

namespace ahn {
namespace {

using namespace swa_cpu;

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

template <class I>
AHN_INLINE void block_step(Scratch& s, const Block& b) {
  using V = typename I::vec;
  constexpr int L = I::L;
  const int64_t DP = s.DP, NK = round_up(b.nk, kPad);
  gemm<I>(b.M, NK, b.D, s.Q, DP, s.kT, BK, s.P, BK, 0.f);  // scores [M, NK]
  for (int64_t r = 0; r < b.M; ++r) {
    float* row = s.P + r * BK;
    if (b.masked)
      mask_row(b, r, row, NK);
    else
      std::fill(row + b.nk, row + NK, kNegInf);
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
  const auto [b, bos, len] = sequence(p, n);
  const int64_t i1 = std::min(i0 + BQ, len), M = (i1 - i0) * G;
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
      const int64_t nk = std::min(BK, j1 - j0);
      for (int64_t c = 0; c < nk; ++c) {
        const T* kr = k + (bos + j0 + c) * p.k_st;
        const T* vr = v + (bos + j0 + c) * p.v_st;
        for (int64_t d = 0; d < D; ++d) s.kT[d * BK + c] = to_f32(kr[d]);
        for (int64_t d = 0; d < D; ++d) s.V[c * DP + d] = to_f32(vr[d]);
      }
      step(s, Block{M, G, i0, j0, nk, D, p.W, p.S, block_masked(i0, i1, j0, nk, p.W, p.S)});
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
    for (int64_t i0 = 0; i0 < sequence(p, n).len; i0 += BQ) blocks.emplace_back(n, i0);
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
