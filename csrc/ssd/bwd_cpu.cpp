// Mamba2 SSD scan backward on CPU, token-serial: two passes per (sequence, head), fp32 state and math.
//
// Per head, in the notation of ssd.h (absorbed token m with decay a_m = exp(dt_m A) and key
// u_m = dt_m x_m, read out at row t(m) = m + W; dy_t = dout_t silu(z_t), the gradient of
// the memory readout y_t = h_m C_t; Λ the prefix sums of the log decays dt A):
//   G_m = a_{m+1} G_{m+1} + dy_{t(m)} C_{t(m)}ᵀ,  G_{M-1} += dht     (G_m = dL/dh_m)
//   dC_{t(m)} = h_mᵀ dy_{t(m)},  du_m = G_m B_m,  dB_m = G_mᵀ u_m,  dh0 = a_0 G_0
//   dλ_m = <G_m, a_m h_{m-1}> = <dht, a_{M-1} h_{M-2}>
//          + Σ_{k >= m} (<dy_{t(k)}, a_k h_{k-1} C_{t(k)}> - [k < M-1] <a_{k+1} G_{k+1} B_k, u_k>)
// The last line holds because h reaches readout t through the factor exp(Λ_t) and key m
// through exp(-Λ_m): the gradient w.r.t. Λ_t is a readout's dot minus a key's (the
// term (dy_k·u_k)(C_k·B_k), in both, cancels). It replaces the product of the two
// states, which the reverse walk would need every h_{m-1} for (stored, or recomputed from
// checkpoints), by two dots of P-vectors per token. Both dots read the states before
// token k's update: with the updated ones, each held the O(1) term above, and under
// strong decays (dλ small) their difference lost dA to 1e-3 (test_cpu_bwd_strong_decay_...).
// So pass 1 walks forward, recomputing h as the forward kernel does (a scaled state),
// and gathers dC, the readout (for dz) and its dot; pass 2 walks back with G in the same
// scaled form, the same step with B and C swapped, and gathers du, dB and the decay's
// gradient. Nothing is stored between the passes but three doubles per token; each pass
// costs one sweep of the [P, NS] state per token, three FMAs per element (the forward: two).
// A chunked backward does more: besides the same P NS terms (state pass, dC, du, dB and the
// readout for dz, ~12 P NS flops per token) it forms C Bᵀ, dy xᵀ and their products per
// chunk (~8 L (P + NS) more per token at chunk length L), worth it only where matmul
// units make flops cheap (GPUs).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/isa.h"
#include "common/pages.h"
#include "ssd/cpu_step.h"
#include "ssd/ssd.h"

namespace ahn {
namespace {

using namespace ssd_cpu;

AHN_ISA_CLONES void fold(float* g, int64_t n, double a) { scale_in_place(g, n, a); }

// One token of either pass on a scaled state g [P, NS]: y = g c; col = gᵀ v; then g += u bᵀ.
AHN_ISA_CLONES void step(float* g, int64_t P, int64_t NS, const float* u, const float* b, const float* c, float* y,
                         const float* v, float* col) {
  rows<false, true>(g, NS, P, NS, 1.0, u, b, c, y, v, col);
}

double dot(const float* a, const float* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}

// The step size the forward uses (bias, softplus, clamp, in double) and its derivative
// w.r.t. the raw dt, with torch's conventions: the clamp passes its bounds, softplus is
// the identity above its threshold.
double step_and_slope(const ScanParams& p, float raw, float bias, double* slope) {
  const double v = double(raw) + double(bias);
  const double act = step_size(raw, bias, p.dt_softplus);
  double d = act >= double(p.dt_min) && act <= double(p.dt_max) ? 1.0 : 0.0;
  if (p.dt_softplus && v <= kSoftplusThreshold) d /= 1.0 + std::exp(-v);
  *slope = d;
  return std::min(std::max(act, double(p.dt_min)), double(p.dt_max));
}

// Per-task sums that cross sequences: [0] dA, [1] ddt_bias, [2 ..] dD per p.
constexpr int64_t kSums = 2;

// One task of the backward: sequence n, head h. dB_h, dC_h: [B, T, H, NS] fp32, this
// head's share of dB, dC; sums: [kSums + P] doubles.
template <class T>
void bwd_head(const ScanBwdParams& q, int64_t n, int64_t h, float* dB_h, float* dC_h, double* sums) {
  const ScanParams& p = q.scan;
  const int64_t P = p.P, NS = p.NS, H = p.H;
  const int64_t b = p.cu_seqlens ? 0 : n;
  const int64_t bos = p.cu_seqlens ? p.cu_seqlens[n] : 0;
  const int64_t eos = p.cu_seqlens ? p.cu_seqlens[n + 1] : p.T;
  const int64_t g = h / (H / p.G);
  // Element offsets (pointers are formed only at an access: with no tokens the inputs may be null).
  const int64_t x0 = b * p.x_sb + h * p.x_sh, dt0 = b * p.dt_sb + h * p.dt_sh;
  const int64_t B0 = b * p.B_sb + g * p.B_sg, C0 = b * p.C_sb + g * p.C_sg;
  const int64_t z0 = b * p.z_sb + h * p.z_sh, do0 = b * q.dout_sb + h * q.dout_sh;
  auto row = [&](int64_t t) { return (b * p.T + t) * H + h; };  // (b, t, h) of the contiguous outputs
  const T* x = static_cast<const T*>(p.x);
  const T* Bm = static_cast<const T*>(p.Bm);
  const T* Cm = static_cast<const T*>(p.Cm);
  const T* z = static_cast<const T*>(p.z);
  const T* dout = static_cast<const T*>(q.dout);
  T* dx = static_cast<T*>(q.dx);
  const float* D = p.D ? p.D + h * p.D_sh : nullptr;
  const double A = p.A[h];
  const float bias = p.dt_bias ? p.dt_bias[h] : 0.f;

  // Absorbed token m (0 <= m < M) is read from row first + m and read out at row first + W + m.
  const int64_t first = bos + p.S;
  const int64_t M = std::max<int64_t>(0, eos - first - p.W);
  std::vector<double> dts(3 * M);  // [3, M]: dt, d dt / d raw dt, <dy, y> of the readout
  double* const slope = dts.data() + M;
  double* const ydot = dts.data() + 2 * M;

  float u[kMaxDim], Bv[kMaxDim], Cv[kMaxDim], y[kMaxDim], dy[kMaxDim], col[kMaxDim], xr[kMaxDim];
  // dy = dout silu(z) at row t; with z also dout itself into `raw` and silu'(z) into `dsilu`.
  auto load_dy = [&](int64_t t, float* raw, float* dsilu) {
    const T* d = dout + do0 + t * q.dout_st;
    if (!z) return load_f32(d, P, dy);
    const T* zt = z + z0 + t * p.z_st;
    for (int64_t i = 0; i < P; ++i) {
      const float zv = to_f32(zt[i]), sig = 1.f / (1.f + std::exp(-zv)), dv = to_f32(d[i]);
      dy[i] = dv * (zv * sig);
      if (raw) {
        raw[i] = dv;
        dsilu[i] = sig * (1.f + zv * (1.f - sig));
      }
    }
  };

  // Pass 1: forward. The state h = a g as in the forward kernel (g in the dh0 slot).
  float* const st = q.dh0 + (n * H + h) * P * NS;
  if (p.h0)
    std::copy(p.h0 + (n * H + h) * P * NS, p.h0 + (n * H + h + 1) * P * NS, st);
  else
    std::fill(st, st + P * NS, 0.f);
  double a = 1.0;
  const float* const dht = q.dht + (n * H + h) * P * NS;
  double lam = 0.0;  // dλ_m, summed from the last token down
  double* const dD = sums + kSums;
  float raw[kMaxDim], dsilu[kMaxDim];
  for (int64_t t = bos; t < eos; ++t) {
    load_dy(t, raw, dsilu);
    float* const dC_t = dC_h + row(t) * NS;
    const int64_t m = t - first - p.W;  // the token read out at row t
    if (m >= 0) {
      const int64_t r = first + m;
      dts[m] = step_and_slope(p, p.dt[dt0 + r * p.dt_st], bias, &slope[m]);
      if (m % p.C == 0 && a != 1.0) {
        fold(st, P * NS, a);
        a = 1.0;
      }
      a *= std::exp(dts[m] * A);
      if (a < kMinScale || a > 1.0 / kMinScale) {
        fold(st, P * NS, a);
        a = 1.0;
      }
      load_f32(x + x0 + r * p.x_st, P, xr);
      const double w = dts[m] / a;
      for (int64_t i = 0; i < P; ++i) u[i] = float(w * xr[i]);
      const T* Br = Bm + B0 + r * p.B_st;
      const T* Ct = Cm + C0 + t * p.C_st;
      if (t + kAhead < eos) {
        prefetch(x + x0 + (r + kAhead) * p.x_st, P);
        prefetch(dout + do0 + (t + kAhead) * q.dout_st, P);
        prefetch(Br + kAhead * p.B_st, NS);
        prefetch(Ct + kAhead * p.C_st, NS);
      }
      if (m == M - 1) lam = a * dot(dht, st, P * NS);  // <dht, a_m h_{m-1}>, see pass 2
      const float* Bf = as_f32(Br, NS, Bv);
      const float* Cf = as_f32(Ct, NS, Cv);
      step(st, P, NS, u, Bf, Cf, y, dy, col);  // y, col from a_m h_{m-1} (scaled by 1 / a)
      const double bc = dot(Bf, Cf, NS), ux = dts[m] * dot(dy, xr, P);
      double yd = 0.0;
      for (int64_t i = 0; i < P; ++i) {
        const double prev = a * y[i];
        yd += dy[i] * prev;
        y[i] = float(prev + dts[m] * xr[i] * bc);
      }
      ydot[m] = yd;
      for (int64_t k = 0; k < NS; ++k) dC_t[k] = float(a * col[k] + ux * Bf[k]);
    } else {
      std::fill(y, y + P, 0.f);  // empty memory
      std::fill(dC_t, dC_t + NS, 0.f);
    }
    // The row's own terms: dz, dD, and dx, ddt, dB where no token is absorbed from it.
    const T* xt = x + x0 + t * p.x_st;
    if (z) {
      T* dz = static_cast<T*>(q.dz) + row(t) * P;
      for (int64_t i = 0; i < P; ++i) {
        const float yi = D ? y[i] + D[i * p.D_sp] * to_f32(xt[i]) : y[i];
        dz[i] = from_f32<T>(raw[i] * yi * dsilu[i]);
      }
    }
    if (D)
      for (int64_t i = 0; i < P; ++i) dD[i] += double(dy[i]) * to_f32(xt[i]);
    if (t < first || t >= first + M) {
      for (int64_t i = 0; i < P; ++i) dx[row(t) * P + i] = from_f32<T>(D ? D[i * p.D_sp] * dy[i] : 0.f);
      q.ddt[row(t)] = 0.f;
      std::fill(dB_h + row(t) * NS, dB_h + (row(t) + 1) * NS, 0.f);
    }
  }


  // Pass 2: reverse. G = s γ, γ in the dh0 slot; s is the product of the decays walked.
  std::copy(dht, dht + P * NS, st);
  double s = 1.0, dA = 0.0, dbias = 0.0;
  for (int64_t m = M - 1; m >= 0; --m) {
    const int64_t r = first + m, t = r + p.W;
    if (m < M - 1) s *= std::exp(dts[m + 1] * A);
    if (s < kMinScale || s > 1.0 / kMinScale) {
      fold(st, P * NS, s);
      s = 1.0;
    }
    load_dy(t, nullptr, nullptr);
    for (int64_t i = 0; i < P; ++i) u[i] = float(dy[i] / s);
    const T* Br = Bm + B0 + r * p.B_st;
    const T* Ct = Cm + C0 + t * p.C_st;
    if (m >= kAhead) {
      prefetch(x + x0 + (r - kAhead) * p.x_st, P);
      prefetch(dout + do0 + (t - kAhead) * q.dout_st, P);
      prefetch(Br - kAhead * p.B_st, NS);
      prefetch(Ct - kAhead * p.C_st, NS);
    }
    load_f32(x + x0 + r * p.x_st, P, xr);
    float key[kMaxDim];  // u_m = dt x
    for (int64_t i = 0; i < P; ++i) key[i] = float(dts[m] * xr[i]);
    const float* Bf = as_f32(Br, NS, Bv);
    const float* Cf = as_f32(Ct, NS, Cv);
    step(st, P, NS, u, Cf, Bf, y, key, col);  // y, col from a_{m+1} G_{m+1} (scaled by 1 / s)
    const double bc = dot(Bf, Cf, NS), uy = dot(dy, key, P);
    double kd = 0.0, xd = 0.0;
    for (int64_t i = 0; i < P; ++i) {
      const double prev = s * y[i];
      kd += prev * key[i];
      y[i] = float(prev + dy[i] * bc);  // du
      xd += double(y[i]) * xr[i];
    }
    float* const dB_r = dB_h + row(r) * NS;
    for (int64_t k = 0; k < NS; ++k) dB_r[k] = float(s * col[k] + uy * Cf[k]);
    // The last token's key term <dht B, u> is the part of <dht, h_{M-1}> that lam's start
    // already leaves out.
    lam += m == M - 1 ? ydot[m] : ydot[m] - kd;
    dA += dts[m] * lam;
    const double ddt = slope[m] * (A * lam + xd);
    q.ddt[row(r)] = float(ddt);
    dbias += ddt;
    if (D) load_dy(r, nullptr, nullptr);  // dx = dt du + D dy of row r
    for (int64_t i = 0; i < P; ++i)
      dx[row(r) * P + i] = from_f32<T>(float(dts[m] * y[i]) + (D ? D[i * p.D_sp] * dy[i] : 0.f));
  }
  if (M > 0) fold(st, P * NS, s * std::exp(dts[0] * A));  // dh0 = a_0 G_0
  sums[0] = dA;
  sums[1] = dbias;
}

// dB or dC [B, T, G, NS] in T: the per-head shares [B, T, H, NS] summed over each group's
// heads in head order.
template <class T>
void sum_groups(const float* per_head, int64_t rows, int64_t H, int64_t G, int64_t NS, void* out, int num_threads) {
  const int64_t R = H / G;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t i = 0; i < rows * G; ++i) {
    const float* src = per_head + i * R * NS;  // row i / G, heads (i % G) R ..
    T* dst = static_cast<T*>(out) + i * NS;
    for (int64_t k = 0; k < NS; ++k) {
      float v = src[k];
      for (int64_t j = 1; j < R; ++j) v += src[j * NS + k];
      dst[k] = from_f32<T>(v);
    }
  }
}

template <class T>
void scan_bwd(const ScanBwdParams& q, int num_threads) {
  const ScanParams& p = q.scan;
  const int64_t N = p.N, H = p.H, P = p.P, NS = p.NS, rows = p.B * p.T;
  // With one head per group in fp32 the heads' shares are the gradients themselves.
  const bool direct = std::is_same_v<T, float> && p.G == H;
  std::unique_ptr<float[]> shares(direct ? nullptr : new float[2 * rows * H * NS]);  // [2, B, T, H, NS]
  float* dB_h = direct ? static_cast<float*>(q.dB) : shares.get();
  float* dC_h = direct ? static_cast<float*>(q.dC) : shares.get() + rows * H * NS;
  prepare_pages(q.dx, rows * H * P * int64_t(sizeof(T)), num_threads);
  if (q.dz) prepare_pages(q.dz, rows * H * P * int64_t(sizeof(T)), num_threads);
  if (direct) {
    prepare_pages(q.dB, rows * H * NS * int64_t(sizeof(float)), num_threads);
    prepare_pages(q.dC, rows * H * NS * int64_t(sizeof(float)), num_threads);
  } else {
    prepare_pages(shares.get(), 2 * rows * H * NS * int64_t(sizeof(float)), num_threads);
  }
  std::vector<double> sums(N * H * (kSums + P), 0.0);  // [N, H, kSums + P]
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) bwd_head<T>(q, n, h, dB_h, dC_h, sums.data() + (n * H + h) * (kSums + P));
  if (!direct) {
    sum_groups<T>(dB_h, rows, H, p.G, NS, q.dB, num_threads);
    sum_groups<T>(dC_h, rows, H, p.G, NS, q.dC, num_threads);
  }
  for (int64_t h = 0; h < H; ++h) {
    double dA = 0.0, dbias = 0.0, dD = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const double* s = sums.data() + (n * H + h) * (kSums + P);
      dA += s[0];
      dbias += s[1];
    }
    q.dA[h] = float(dA);
    if (q.ddt_bias) q.ddt_bias[h] = float(dbias);
    if (!q.dD) continue;
    for (int64_t i = 0; i < P; ++i) {
      double v = 0.0;
      for (int64_t n = 0; n < N; ++n) v += sums[(n * H + h) * (kSums + P) + kSums + i];
      if (p.D_sp) q.dD[h * P + i] = float(v);
      dD += v;
    }
    if (!p.D_sp) q.dD[h] = float(dD);
  }
}

}  // namespace

void launch_ssd_scan_bwd_cpu(const ScanBwdParams& p, int num_threads) {
  dispatch_dtype(p.scan.dtype, [&](auto tag) { scan_bwd<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
