// Pieces the CPU forward and backward of sliding-window attention share: tile sizes, the
// exp of a score tile, which columns of a key block a query row sees, and where a
// sequence lives.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/cpu_gemm.h"
#include "swa/swa.h"

namespace ahn {
namespace swa_cpu {

constexpr int64_t BQ = 64;    // query tokens per tile (the tile has BQ · G rows)
constexpr int64_t BK = 64;    // keys per block
constexpr int64_t kPad = 16;  // D and key columns are padded to the widest vector (16 fp32)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// One key block [j0, j0 + nk) against a tile of M rows (positions local to the sequence).
struct Block {
  int64_t M, G, i0;  // tile rows, query heads per KV head, position of the tile's first query
  int64_t j0, nk;    // position of the first key, keys in the block
  int64_t D, W, S;
  bool masked;  // some key of the block is hidden from some row
};

// Query tokens [i0, i1) against keys [j0, j0 + nk): false iff every query sees every
// key, that is the last key is at or before the first query and the last query still
// has the first key in its window (or the block is all sinks).
inline bool block_masked(int64_t i0, int64_t i1, int64_t j0, int64_t nk, int64_t W, int64_t S) {
  const int64_t last = j0 + nk - 1;
  return last > i0 || !(W == 0 || i1 - 1 - j0 < W || last < S);
}

// Hides the key columns that tile row r does not see: row[c] = -inf for c in
// [sink_end, wlo) and [hi, ncols); the row sees [0, sink_end) and [wlo, hi).
inline void mask_row(const Block& b, int64_t r, float* row, int64_t ncols) {
  const int64_t i = b.i0 + r / b.G;
  const int64_t hi = std::clamp<int64_t>(i - b.j0 + 1, 0, b.nk);
  const int64_t sink_end = std::clamp<int64_t>(b.S - b.j0, 0, hi);
  const int64_t wlo = b.W ? std::clamp<int64_t>(i - b.W + 1 - b.j0, 0, hi) : 0;
  for (int64_t c = sink_end; c < wlo; ++c) row[c] = kNegInf;
  for (int64_t c = hi; c < ncols; ++c) row[c] = kNegInf;
}

// Sequence n of a batch: its batch row, first token along T and length.
struct Seq {
  int64_t b, bos, len;
};

inline Seq sequence(const SwaParams& p, int64_t n) {
  if (!p.cu_seqlens) return {n, 0, p.T};
  return {0, p.cu_seqlens[n], p.cu_seqlens[n + 1] - p.cu_seqlens[n]};
}

}  // namespace swa_cpu
}  // namespace ahn
