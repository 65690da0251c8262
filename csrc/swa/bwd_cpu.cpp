// Sliding-window attention with sinks, backward on CPU: flash-attention 2 style, fp32 math.
//
// First Σ_d dO_id O_id for every query row (fp32 [B, T, HQ], O(T)); delta_i is that
// minus dlse_i.
// Then two kinds of task run side by side; each owns the output rows it writes:
// - key task (sequence, KV head, keys [j0, j0 + BK)): walks the query tiles that see a
//   key of the block (the W - 1 tokens after it; every later tile when the block holds
//   sinks), recomputes scores, P = exp(s - lse) and dS, and accumulates dV += Pᵀ dO and
//   dK += dSᵀ Q over the BQ · G rows of the G query heads of the KV head;
// - query task (sequence, KV head, queries [i0, i0 + BQ)): visits the forward's key
//   blocks and accumulates dQ += dS K.
// P and dS are recomputed in both (seven products where flash-attention with atomic dQ
// adds needs five): the price of summing every gradient row in one task, in a fixed
// order, with no T x W partial buffers. Work O(T·(W+S)), memory O(T).
#include <algorithm>
#include <cstdint>
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
  float *Q, *dO, *dQ, *lse, *do_o, *dlse, *P, *dS, *kT, *vT, *K, *dK, *dV, *part;

  Scratch(int64_t D, int64_t G) : DP(round_up(D, kPad)) {
    const int64_t M = BQ * G;
    const int64_t sizes[] = {
        M * DP,   // Q   [M, DP]   scale · q rows; row r = token r / G, query head r % G of the group
        M * DP,   // dO  [M, DP]   upstream gradient rows
        M * DP,   // dQ  [M, DP]   dq / scale of a query task's rows
        M, M, M,  // lse, Σ dO·O, dlse [M]
        M * BK,   // P   [M, BK]   scores, then exp(score - lse)
        M * BK,   // dS  [M, BK]   dO Vᵀ, then P ∘ ((dO Vᵀ - Σ dO·O) + dlse)
        D * BK,   // kT  [D, BK]   the key block, transposed
        D * BK,   // vT  [D, BK]   the value block, transposed
        BK * DP,  // K   [BK, DP]  the key block
        BK * DP,  // dK  [BK, DP]  dk of a key task's keys
        BK * DP,  // dV  [BK, DP]  dv of a key task's keys
        BK * DP,  // part [BK, DP] one query tile's share of dK or dV
    };
    int64_t total = 0;
    for (int64_t n : sizes) total += n;
    buf.assign(total, 0.f);
    float* ptr = buf.data();
    float** fields[] = {&Q, &dO, &dQ, &lse, &do_o, &dlse, &P, &dS, &kT, &vT, &K, &dK, &dV, &part};
    for (int f = 0; f < 14; ++f) {
      *fields[f] = ptr;
      ptr += sizes[f];
    }
  }
};

// P = exp(Q kT - lse) and dS = P ∘ ((dO vT - Σ dO·O) + dlse) over the block's [M, NK] tile.
// dO vT - Σ dO·O cancels: both sums run in the same order with the same fused
// multiply-adds (`dot` below), so that a row seeing one key (O = v) gets exactly 0 there,
// and dlse is added after it, not folded into delta, which would round it at |dO·O|.
template <class I>
AHN_INLINE void probs(Scratch& s, const Block& b) {
  using V = typename I::vec;
  constexpr int L = I::L;
  const int64_t DP = s.DP, NK = round_up(b.nk, kPad);
  gemm<I>(b.M, NK, b.D, s.Q, DP, s.kT, BK, s.P, BK, 0.f);
  gemm<I>(b.M, NK, b.D, s.dO, DP, s.vT, BK, s.dS, BK, 0.f);
  for (int64_t r = 0; r < b.M; ++r) {
    float* p_row = s.P + r * BK;
    float* ds_row = s.dS + r * BK;
    if (b.masked)
      mask_row(b, r, p_row, NK);
    else
      std::fill(p_row + b.nk, p_row + NK, kNegInf);
    const V lse = V{} + s.lse[r], do_o = V{} + s.do_o[r], dlse = V{} + s.dlse[r];
    // Hidden keys give P = 0 and so dS = 0 (their dP, from stale or padding columns, is finite).
    for (int64_t c = 0; c < NK; c += L) {
      const V pr = vexp<I>(load<V>(p_row + c) - lse);
      store<V>(p_row + c, pr);
      store<V>(ds_row + c, pr * ((load<V>(ds_row + c) - do_o) + dlse));
    }
  }
}

// acc[nk, DP] += Aᵀ B over the tile's M rows (A [M, BK], B [M, DP]), in sums of kChunk
// rows added one by one: a sink key meets every query, and one running sum over all
// T · G rows had 5x the max error of the fp32 reference (T = 1000, G = 8, S = 64).
constexpr int64_t kChunk = 64;

template <class I>
AHN_INLINE void add_product_t(Scratch& s, const Block& b, const float* A, const float* B, float* acc) {
  for (int64_t r0 = 0; r0 < b.M; r0 += kChunk) {
    gemm<I, true>(b.nk, s.DP, std::min(kChunk, b.M - r0), A + r0 * BK, BK, B + r0 * s.DP, s.DP, s.part, s.DP, 0.f);
    for (int64_t x = 0; x < b.nk * s.DP; ++x) acc[x] += s.part[x];
  }
}

template <class I>
AHN_INLINE void step_dkdv(Scratch& s, const Block& b) {
  probs<I>(s, b);
  add_product_t<I>(s, b, s.P, s.dO, s.dV);  // dV += Pᵀ dO
  add_product_t<I>(s, b, s.dS, s.Q, s.dK);  // dK += dSᵀ Q
}

template <class I>
AHN_INLINE void step_dq(Scratch& s, const Block& b) {
  probs<I>(s, b);
  gemm<I>(b.M, s.DP, b.nk, s.dS, BK, s.K, s.DP, s.dQ, s.DP, 1.f);  // dQ += dS K
}

// Σ_d a_d b_d in the order, and with the fused multiply-adds where the ISA has them, of
// the sums of a product tile (one accumulator per element, fed term by term).
AHN_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

// The block steps are built for AVX-512, AVX2+FMA and the baseline, picked once at run time.
using StepFn = void (*)(Scratch&, const Block&);
using DotFn = float (*)(const float*, const float*, int64_t);
struct Steps {
  StepFn dkdv, dq;
  DotFn dot;
};
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) void dkdv_avx512(Scratch& s, const Block& b) { step_dkdv<Avx512>(s, b); }
__attribute__((target("arch=x86-64-v4"))) void dq_avx512(Scratch& s, const Block& b) { step_dq<Avx512>(s, b); }
__attribute__((target("arch=x86-64-v3"))) void dkdv_avx2(Scratch& s, const Block& b) { step_dkdv<Avx2>(s, b); }
__attribute__((target("arch=x86-64-v3"))) void dq_avx2(Scratch& s, const Block& b) { step_dq<Avx2>(s, b); }
__attribute__((target("arch=x86-64-v3"))) float dot_fma(const float* a, const float* b, int64_t n) { return dot(a, b, n); }
#endif
void dkdv_baseline(Scratch& s, const Block& b) { step_dkdv<Baseline>(s, b); }
void dq_baseline(Scratch& s, const Block& b) { step_dq<Baseline>(s, b); }
float dot_baseline(const float* a, const float* b, int64_t n) { return dot(a, b, n); }

Steps pick_steps() {
  switch (cpu_isa()) {
#if defined(__GNUC__) && defined(__x86_64__)
    case CpuIsa::avx512: return {dkdv_avx512, dq_avx512, dot_fma};
    case CpuIsa::avx2: return {dkdv_avx2, dq_avx2, dot_fma};
#endif
    default: return {dkdv_baseline, dq_baseline, dot_baseline};
  }
}

// Loads the tile rows of query tokens [i0, i1) of sequence sq and KV head hk.
template <class T>
void load_rows(const SwaBwdParams& p, Scratch& s, const Seq& sq, int64_t hk, int64_t i0, int64_t i1,
               const float* do_o) {
  const SwaParams& f = p.fwd;
  const int64_t G = f.HQ / f.HK, D = f.D, DP = s.DP;
  const T* q = static_cast<const T*>(f.q) + sq.b * f.q_sb;
  const T* dout = static_cast<const T*>(p.dout) + sq.b * p.do_sb;
  for (int64_t r = 0; r < (i1 - i0) * G; ++r) {
    const int64_t t = sq.bos + i0 + r / G, h = hk * G + r % G;
    const T* qr = q + t * f.q_st + h * f.q_sh;
    const T* dor = dout + t * p.do_st + h * p.do_sh;
    for (int64_t d = 0; d < D; ++d) s.Q[r * DP + d] = f.scale * to_f32(qr[d]);
    for (int64_t d = 0; d < D; ++d) s.dO[r * DP + d] = to_f32(dor[d]);
    s.lse[r] = f.lse[(sq.b * f.HQ + h) * f.T + t];
    s.do_o[r] = do_o[(sq.b * f.T + t) * f.HQ + h];
    s.dlse[r] = p.dlse ? p.dlse[(sq.b * f.HQ + h) * f.T + t] : 0.f;
  }
}

// Loads keys [j0, j0 + nk) of sequence sq and KV head hk: kT and vT, and K for a query task.
template <class T>
void load_keys(const SwaParams& f, Scratch& s, const Seq& sq, int64_t hk, int64_t j0, int64_t nk, bool with_k) {
  const T* k = static_cast<const T*>(f.k) + sq.b * f.k_sb + hk * f.k_sh;
  const T* v = static_cast<const T*>(f.v) + sq.b * f.v_sb + hk * f.v_sh;
  for (int64_t c = 0; c < nk; ++c) {
    const T* kr = k + (sq.bos + j0 + c) * f.k_st;
    const T* vr = v + (sq.bos + j0 + c) * f.v_st;
    for (int64_t d = 0; d < f.D; ++d) s.kT[d * BK + c] = to_f32(kr[d]);
    for (int64_t d = 0; d < f.D; ++d) s.vT[d * BK + c] = to_f32(vr[d]);
    if (with_k)
      for (int64_t d = 0; d < f.D; ++d) s.K[c * s.DP + d] = s.kT[d * BK + c];
  }
}

// The last query token (exclusive) that sees a key of [j0, j0 + nk): the window after
// the block, or the whole sequence when the block holds a sink or there is no window.
int64_t query_end(const SwaParams& f, int64_t len, int64_t j0, int64_t nk) {
  return f.W == 0 || j0 < f.S ? len : std::min(len, j0 + nk - 1 + f.W);
}

// Key task: dk, dv of keys [j0, j0 + BK) of sequence n, KV head hk.
template <class T>
void key_task(const SwaBwdParams& p, Scratch& s, int64_t n, int64_t hk, int64_t j0, const float* do_o,
              StepFn step) {
  const SwaParams& f = p.fwd;
  const Seq sq = sequence(f, n);
  const int64_t G = f.HQ / f.HK, D = f.D, DP = s.DP;
  const int64_t nk = std::min(BK, sq.len - j0), i_end = query_end(f, sq.len, j0, nk);
  load_keys<T>(f, s, sq, hk, j0, nk, false);
  std::fill(s.dK, s.dK + BK * DP, 0.f);
  std::fill(s.dV, s.dV + BK * DP, 0.f);
  // Query tiles start at the block's first key: only the first one meets the diagonal.
  for (int64_t i0 = j0; i0 < i_end; i0 += BQ) {
    const int64_t i1 = std::min(i0 + BQ, i_end);
    load_rows<T>(p, s, sq, hk, i0, i1, do_o);
    step(s, Block{(i1 - i0) * G, G, i0, j0, nk, D, f.W, f.S, block_masked(i0, i1, j0, nk, f.W, f.S)});
  }
  for (int64_t c = 0; c < nk; ++c) {
    const int64_t row = ((sq.b * f.T + sq.bos + j0 + c) * f.HK + hk) * D;
    for (int64_t d = 0; d < D; ++d) {  // the one downcast of each
      static_cast<T*>(p.dk)[row + d] = from_f32<T>(s.dK[c * DP + d]);
      static_cast<T*>(p.dv)[row + d] = from_f32<T>(s.dV[c * DP + d]);
    }
  }
}

// Query task: dq of query tokens [i0, i0 + BQ) of sequence n, KV head hk's G heads.
template <class T>
void query_task(const SwaBwdParams& p, Scratch& s, int64_t n, int64_t hk, int64_t i0, const float* do_o,
                StepFn step) {
  const SwaParams& f = p.fwd;
  const Seq sq = sequence(f, n);
  const int64_t G = f.HQ / f.HK, D = f.D, DP = s.DP;
  const int64_t i1 = std::min(i0 + BQ, sq.len), M = (i1 - i0) * G;
  load_rows<T>(p, s, sq, hk, i0, i1, do_o);
  std::fill(s.dQ, s.dQ + M * DP, 0.f);
  auto visit = [&](int64_t j0, int64_t j1) {
    for (; j0 < j1; j0 += BK) {
      const int64_t nk = std::min(BK, j1 - j0);
      load_keys<T>(f, s, sq, hk, j0, nk, true);
      step(s, Block{M, G, i0, j0, nk, D, f.W, f.S, block_masked(i0, i1, j0, nk, f.W, f.S)});
    }
  };
  // As the forward: the sinks left of the window span, then the span [lo, i1).
  const int64_t lo = f.W ? std::max<int64_t>(0, i0 - f.W + 1) : 0;
  visit(0, std::min(f.S, lo));
  visit(lo, i1);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t t = sq.bos + i0 + r / G, h = hk * G + r % G;
    T* out = static_cast<T*>(p.dq) + ((sq.b * f.T + t) * f.HQ + h) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = from_f32<T>(f.scale * s.dQ[r * DP + d]);  // the one downcast
  }
}

struct Task {
  int64_t n, pos;  // sequence, first key (key task) or query (query task) of the block
  bool keys;
  int64_t cost;  // query-key pairs it visits, to start the longest first
};

template <class T>
void run(const SwaBwdParams& p, int num_threads) {
  const SwaParams& f = p.fwd;
  std::vector<Task> blocks;
  for (int64_t n = 0; n < f.N; ++n) {
    const int64_t len = sequence(f, n).len;
    for (int64_t x0 = 0; x0 < len; x0 += BQ) {
      const int64_t nx = std::min(BQ, len - x0);  // BQ = BK: one grid serves both task kinds
      const int64_t lo = f.W ? std::max<int64_t>(0, x0 - f.W + 1) : 0;
      blocks.push_back({n, x0, true, nx * (query_end(f, len, x0, nx) - x0)});
      blocks.push_back({n, x0, false, nx * (std::min(f.S, lo) + x0 + nx - lo)});
    }
  }
  // Longest first, so that the dynamic schedule ends evenly (sink key blocks see every query).
  std::stable_sort(blocks.begin(), blocks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t HK = f.HK, tasks = int64_t(blocks.size()) * HK, rows = f.B * f.T;
  if (tasks == 0) return;
  static const Steps steps = pick_steps();
  std::vector<float> do_o(rows * f.HQ);  // [B, T, HQ] Σ_d dO·O
#pragma omp parallel num_threads(num_threads)
  {
    Scratch s(f.D, f.HQ / f.HK);
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < rows; ++bt) {
      const int64_t b = bt / f.T, t = bt % f.T;
      for (int64_t h = 0; h < f.HQ; ++h) {
        const T* dor = static_cast<const T*>(p.dout) + b * p.do_sb + t * p.do_st + h * p.do_sh;
        const T* o = static_cast<const T*>(f.o) + (bt * f.HQ + h) * f.D;
        for (int64_t d = 0; d < f.D; ++d) {  // fp32 rows, as the tiles hold them
          s.dO[d] = to_f32(dor[d]);
          s.Q[d] = to_f32(o[d]);
        }
        do_o[bt * f.HQ + h] = steps.dot(s.dO, s.Q, f.D);
      }
    }
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const Task& tk = blocks[task / HK];
      if (tk.keys)
        key_task<T>(p, s, tk.n, task % HK, tk.pos, do_o.data(), steps.dkdv);
      else
        query_task<T>(p, s, tk.n, task % HK, tk.pos, do_o.data(), steps.dq);
    }
  }
}

}  // namespace

void launch_swa_bwd_cpu(const SwaBwdParams& p, int num_threads) {
  dispatch_dtype(p.fwd.dtype, [&](auto tag) { run<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
