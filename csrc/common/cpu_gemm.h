// Register-blocked fp32 micro-kernels for the CPU kernels: GCC/Clang vector types sized
// per ISA, a tile product and a small row-major GEMM over contiguous scratch, and the
// run-time ISA choice. A kernel instantiates its hot step with each `Isa` inside a
// function built for that ISA (`__attribute__((target(...)))`) and picks one with
// `cpu_isa()`, so one x86-64 binary serves every CPU.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ahn {

#define AHN_INLINE inline __attribute__((always_inline))

// The register tile of each ISA build: MR rows x NV vectors of L fp32 lanes, sized so
// that every accumulator stays in a register (AVX-512: 16 of 32 zmm; AVX2: 8 of 16 ymm;
// SSE2 and others: 8 xmm / q). Vectors are GCC/Clang vector extensions whose width
// matches the ISA: 16-lane vectors compiled for AVX2 went through the stack (315 ms
// against 85 ms for 8-lane ones, one thread, chunked delta rule T = 4096, H = 8,
// K = V = 128), and plain arrays were kept in memory by GCC across the inner loop.
// AVX-512 8 x 32 against 4 x 32: 58.7 -> 55.7 ms.
template <int L_, int MR_, int NV_>
struct Isa {
  static constexpr int L = L_, MR = MR_, NV = NV_;
  typedef float vec __attribute__((vector_size(L_ * sizeof(float))));
  typedef int32_t ivec __attribute__((vector_size(L_ * sizeof(int32_t))));
};
using Avx512 = Isa<16, 8, 2>;
using Avx2 = Isa<8, 4, 2>;
using Baseline = Isa<4, 4, 2>;

enum class CpuIsa { avx512, avx2, baseline };

// The widest build this CPU runs (asked once per call; callers cache it in a static).
inline CpuIsa cpu_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return CpuIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return CpuIsa::avx2;
#endif
  return CpuIsa::baseline;
}

// The build of a function for `arch` (a GCC target such as "arch=x86-64-v4"); elsewhere
// one plain build, and cpu_isa() says baseline.
#if defined(__GNUC__) && defined(__x86_64__)
#define AHN_TARGET(arch) __attribute__((target(arch)))
#else
#define AHN_TARGET(arch)
#endif

// Of one step built per ISA (avx512, avx2, baseline), the one for this CPU.
template <class Fn>
Fn pick(Fn avx512, Fn avx2, Fn baseline) {
  switch (cpu_isa()) {
    case CpuIsa::avx512: return avx512;
    case CpuIsa::avx2: return avx2;
    default: return baseline;
  }
}

// (-Wpsabi warns that passing wide vectors by value differs between ISAs; these helpers
// are always inlined, so no call crosses that ABI.)
#pragma GCC diagnostic ignored "-Wpsabi"
template <class V>
AHN_INLINE V load(const float* p) {
  V x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}

template <class V>
AHN_INLINE void store(float* p, V x) {
  __builtin_memcpy(p, &x, sizeof x);
}

AHN_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[MR, L·NV] = beta·C + A[MR, kd] · B[kd, L·NV], all row-major fp32; beta = 0 ignores C.
// TA: A is given transposed, as row-major [kd, MR] with row stride lda.
template <class I, int MR, int NV, bool TA>
AHN_INLINE void tile(int64_t kd, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                     float* __restrict C, int64_t ldc, float beta) {
  using V = typename I::vec;
  constexpr int L = I::L;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = beta == 0.f ? V{} : beta * load<V>(C + r * ldc + j * L);
  for (int64_t p = 0; p < kd; ++p) {
    V b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = load<V>(B + p * ldb + j * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float a = TA ? A[p * lda + r] : A[r * lda + p];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += a * b[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) store<V>(C + r * ldc + j * L, acc[r][j]);
}

// Which triangle of a product is known to vanish or is not wanted.
enum class Tri {
  full,     // dense
  lower_a,  // row i of A is zero past column i: a row tile stops its inner loop at its last row
  lower_c,  // only C's lower triangle (column <= row) is wanted: column blocks skip the rows above them
};

// C[M, N] = beta·C + A[M, kd] · B[kd, N] over rows [i0, M), N a multiple of L·NV.
template <class I, int NV, bool TA>
AHN_INLINE void gemm_cols(int64_t i0, int64_t M, int64_t kd, const float* A, int64_t lda, const float* B,
                          int64_t ldb, float* C, int64_t ldc, float beta, bool lower_a) {
  constexpr int MR = I::MR;
  auto a = [&](int64_t i) { return TA ? A + i : A + i * lda; };
  int64_t i = i0;
  for (; i + MR <= M; i += MR)
    tile<I, MR, NV, TA>(lower_a ? std::min(kd, i + MR) : kd, a(i), lda, B, ldb, C + i * ldc, ldc, beta);
  for (; i < M; ++i)
    tile<I, 1, NV, TA>(lower_a ? std::min(kd, i + 1) : kd, a(i), lda, B, ldb, C + i * ldc, ldc, beta);
}

// C[M, N] = beta·C + A[M, kd] · B[kd, N], N a multiple of 16; TA: A is given transposed
// ([kd, M], row stride lda).
template <class I, bool TA = false>
AHN_INLINE void gemm(int64_t M, int64_t N, int64_t kd, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc, float beta, Tri tri = Tri::full) {
  constexpr int W = I::L * I::NV;
  const bool lower_a = tri == Tri::lower_a;
  auto first_row = [&](int64_t j) { return tri == Tri::lower_c ? std::min(j, M) : int64_t(0); };
  int64_t j = 0;
  for (; j + W <= N; j += W) gemm_cols<I, I::NV, TA>(first_row(j), M, kd, A, lda, B + j, ldb, C + j, ldc, beta, lower_a);
  for (; j < N; j += I::L) gemm_cols<I, 1, TA>(first_row(j), M, kd, A, lda, B + j, ldb, C + j, ldc, beta, lower_a);
}

}  // namespace ahn
