// Delta rule / gated delta rule, token-serial forward on CUDA (fp32 state in registers).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/check.h"
#include "common/dtype.h"
#include "delta_rule/delta_rule.h"

namespace ahn {
namespace {

constexpr int kWarps = 4;
constexpr float kNormEps = 1e-6f;  // inside the sqrt: x / sqrt(sum x^2 + eps), as fla

// Register tile for K bucket KB (K <= KB; rows >= K hold zeros and stay zero).
// TK lanes of a warp share one state column; lane tk holds rows tk, tk + TK, ...
// (R = KB / TK of them), so every reduction over K is a TK-lane shuffle and no
// block-level synchronisation exists. TK grows with KB to keep R <= 16 registers.
template <int KB>
struct Tile {
  static constexpr int TK = KB <= 64 ? 4 : KB / 16;
  static constexpr int R = KB / TK;
  static constexpr int BV = 32 / TK * kWarps;  // state columns per block
};

// One token's inputs, kept in the storage type: converting right after the load
// would stall on it, and the loads for token t+1 are meant to fly during token t.
template <int R, class T>
struct TokenIn {
  T q[R], k[R], v;
  float g, beta;
};

// Grid: x = sequence * HS + state head (so > 65,535 sequences fit), y = V tile.
// I: the element offset type, int32_t unless an offset can reach 2^31 (ahn_kernels/_index.py).
// seq_head works in int64; its offsets, below 2^31 on the int32 path, are narrowed once.
template <int KB, class T, class I>
__global__ void __launch_bounds__(32 * kWarps) fused_recurrent_fwd_kernel(const FusedRecurrentParams p) {
  constexpr int TK = Tile<KB>::TK, R = Tile<KB>::R;
  const int tk = threadIdx.x % TK;
  const I col = I(blockIdx.y) * Tile<KB>::BV + threadIdx.x / TK;
  const bool col_ok = col < p.V;
  const I n = I(blockIdx.x) / I(p.HS), h = I(blockIdx.x) % I(p.HS);
  const SeqHead at = seq_head(p, n, h);
  const I bos = I(at.bos), eos = I(at.eos);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* o = static_cast<T*>(p.o);
  const I q0 = I(at.q), k0 = I(at.k), v0 = I(at.v) + col, g0 = I(at.g), beta0 = I(at.beta);
  // A token stride of a size-1 T dim may not fit I; t is 0 there, and so is the narrowed product.
  const I q_st = I(p.q_st), k_st = I(p.k_st), v_st = I(p.v_st), g_st = I(p.g_st), beta_st = I(p.beta_st);
  const I o0 = I(at.o) + col;
  const I o_st = I(p.HS * p.V);
  const I state = I(at.state) + col;  // S[0, col] of this head in h0 / ht
  const I K = I(p.K), V = I(p.V);

  float S[R];  // S[tk + r * TK, col]
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const I i = tk + r * TK;
    S[r] = (p.h0 && col_ok && i < K) ? p.h0[state + i * V] : 0.f;
  }

  const T zero = from_f32<T>(0.f);
  auto load = [&](I t, TokenIn<R, T>& x) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const I i = tk + r * TK;
      x.q[r] = i < K ? q[q0 + t * q_st + i] : zero;
      x.k[r] = i < K ? k[k0 + t * k_st + i] : zero;
    }
    x.v = col_ok ? v[v0 + t * v_st] : zero;
    x.g = p.g ? p.g[g0 + t * g_st] : 0.f;
    x.beta = p.beta[beta0 + t * beta_st];
  };

  TokenIn<R, T> cur, next;
  if (bos < eos) load(bos, cur);
  for (I t = bos; t < eos; ++t) {
    if (t + 1 < eos) load(t + 1, next);

    float qf[R], kf[R];
    // Partial sums over this lane's rows: Sᵀk, Sᵀq, k·q, |k|², |q|². The fused
    // readout below needs only the pre-update state, so one shuffle round per token.
    float part[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int r = 0; r < R; ++r) {
      qf[r] = to_f32(cur.q[r]);
      kf[r] = to_f32(cur.k[r]);
      part[0] += S[r] * kf[r];
      part[1] += S[r] * qf[r];
      part[2] += kf[r] * qf[r];
      part[3] += kf[r] * kf[r];
      part[4] += qf[r] * qf[r];
    }
#pragma unroll
    for (int m = TK / 2; m > 0; m /= 2)
#pragma unroll
      for (int c = 0; c < 5; ++c) part[c] += __shfl_xor_sync(0xffffffffu, part[c], m);

    const float rk = p.l2norm ? 1.f / sqrtf(part[3] + kNormEps) : 1.f;
    const float rq = p.l2norm ? 1.f / sqrtf(part[4] + kNormEps) : 1.f;
    const float alpha = p.g ? expf(cur.g) : 1.f;
    // u = beta (v - alpha S_{t-1}ᵀ k̂);  S_t = alpha S_{t-1} + k̂ uᵀ;
    // S_tᵀ q̂ = alpha S_{t-1}ᵀ q̂ + (k̂·q̂) u.
    const float u = cur.beta * (to_f32(cur.v) - alpha * rk * part[0]);
#pragma unroll
    for (int r = 0; r < R; ++r) S[r] = alpha * S[r] + rk * kf[r] * u;
    if (tk == 0 && col_ok) o[o0 + t * o_st] = from_f32<T>(p.scale * rq * (alpha * part[1] + rk * part[2] * u));
    cur = next;
  }

  if (p.ht && col_ok)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const I i = tk + r * TK;
      if (i < K) p.ht[state + i * V] = S[r];
    }
}

template <int KB, class T, class I>
void launch(const FusedRecurrentParams& p, cudaStream_t stream) {
  const int64_t tiles = (p.V + Tile<KB>::BV - 1) / Tile<KB>::BV;
  fused_recurrent_fwd_kernel<KB, T, I><<<dim3(unsigned(p.N * p.HS), unsigned(tiles)), 32 * kWarps, 0, stream>>>(p);
}

using Launcher = void (*)(const FusedRecurrentParams&, cudaStream_t);

// The instantiations: offset type x K bucket (rows of the register tile) x dtype.
template <class I>
constexpr Launcher kLaunchers[4][3] = {
    {launch<32, float, I>, launch<32, f16, I>, launch<32, bf16, I>},
    {launch<64, float, I>, launch<64, f16, I>, launch<64, bf16, I>},
    {launch<128, float, I>, launch<128, f16, I>, launch<128, bf16, I>},
    {launch<256, float, I>, launch<256, f16, I>, launch<256, bf16, I>},
};

}  // namespace

void launch_fused_recurrent_fwd_cuda(const FusedRecurrentParams& p, bool int64_offsets, void* stream) {
  AHN_CHECK(p.K >= 1 && p.K <= 256, "K must be in 1..256");
  AHN_CHECK(p.N * p.HS < (int64_t(1) << 31), "N * HS must be < 2^31");
  if (p.N * p.HS == 0) return;
  const int bucket = p.K <= 32 ? 0 : p.K <= 64 ? 1 : p.K <= 128 ? 2 : 3;
  const Launcher run = int64_offsets ? kLaunchers<int64_t>[bucket][int(p.dtype)]
                                     : kLaunchers<int32_t>[bucket][int(p.dtype)];
  run(p, static_cast<cudaStream_t>(stream));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ahn_kernels: fused_recurrent_fwd launch failed: ") + cudaGetErrorString(err));
}

}  // namespace ahn
