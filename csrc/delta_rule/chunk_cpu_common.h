// Pieces shared by the chunked delta rule's CPU forward (chunk_cpu.cpp) and backward
// (chunk_bwd_cpu.cpp): the unit-lower chunk solve, row prefetch, and the chunks' K Kᵀ
// formed once per k head.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/l2norm.h"
#include "delta_rule/delta_rule.h"

namespace ahn {
namespace delta_rule_cpu {

constexpr int64_t kPad = 16;  // head-dim and chunk columns are padded to the widest vector (16 fp32)

// D[c, VP] <- (I - A)^-1 D for A = Aneg[c, c] (row stride lda) strictly lower, in blocks
// of 16 rows: the rows above a block enter through one product, the block itself row by row.
template <class I>
AHN_INLINE void solve_unit_lower(int64_t c, const float* Aneg, int64_t lda, float* D, int64_t VP) {
  for (int64_t r0 = 0; r0 < c; r0 += kPad) {
    const int64_t nb = std::min(kPad, c - r0);
    if (r0) gemm<I>(nb, VP, r0, Aneg + r0 * lda, lda, D, VP, D + r0 * VP, VP, 1.f);
    for (int64_t i = r0 + 1; i < r0 + nb; ++i) {
      float* __restrict di = D + i * VP;
      for (int64_t j = r0; j < i; ++j) {
        const float a = Aneg[i * lda + j];
        const float* __restrict dj = D + j * VP;
        for (int64_t col = 0; col < VP; ++col) di[col] += a * dj[col];
      }
    }
  }
}

// Rows of one head sit H·K elements apart (4 KiB at H = 8, K = 128), beyond the hardware
// prefetcher's reach, so every row load missed. Fetching the next chunk's rows while this
// one computes: 54.9 -> 51.5 ms (median of 6, one thread, T = 4096, H = 8, K = V = 128).
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// Rows sequence n absorbs into the memory (its length less the lag's window and sinks).
inline int64_t absorbed_rows(const ChunkParams& p, int64_t n) {
  const SeqHead at = seq_head(p, n, 0);
  return std::max<int64_t>(0, at.eos - at.bos - p.W - p.S);
}

// K Kᵀ of every chunk of every k head. It depends on k alone, so the HS / HK state heads
// that read one k head share it instead of each forming it (AHN: 8 state heads per k head).
// The pass runs over (chunk, k head) before the per-(sequence, state head) tasks, so it
// keeps both threads busy at B = 1, HK = 2.
struct KeyGrams {
  int64_t HK = 0, C = 0;
  std::vector<int64_t> first;      // [N + 1] sequence n's chunk ci is chunk first[n] + ci
  std::unique_ptr<float[]> grams;  // [chunks, HK, C, C] lower triangles (j <= i); the rest unset

  // K Kᵀ of chunk ci of sequence n, k head hk: row stride C.
  const float* at(int64_t n, int64_t hk, int64_t ci) const {
    return grams.get() + ((first[n] + ci) * HK + hk) * C * C;
  }
};

// Forms them (chunk_cpu.cpp), each k row L2-normalised first when p.l2norm.
KeyGrams key_grams(const ChunkParams& p, int num_threads);

}  // namespace delta_rule_cpu
}  // namespace ahn
