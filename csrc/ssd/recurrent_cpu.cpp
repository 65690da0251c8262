// Mamba2 SSD on CPU, token-serial: the scan forward and the decode step (fp32 state and math).
//
// Why token-serial rather than chunked: per token and head the recurrence costs about
// 4 P NS flops; the chunked form adds the intra-chunk C Bᵀ and its product with x
// (about 2 L (NS + P) more per token for chunk length L), which on a CPU buys nothing,
// since a thread holds one head's [P, NS] state in L1/L2 anyway (32 KiB at P = 64,
// NS = 128) and walks the tokens in order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "common/isa.h"
#include "ssd/ssd.h"

namespace ahn {
namespace {

constexpr int64_t kMaxDim = 256;  // P and NS; the bindings check it
constexpr float kSoftplusThreshold = 20.f;  // above it softplus(v) = v, as mamba and torch
// The range of the decay product a scaled state carries: g = h / a and u / a then stay
// within a factor 2^64 (1.8e19) of h and u, inside float's range (3.4e38) for any sane
// input, while folds (a pass over the state each) stay rare: every ~44 tokens at a
// decay of exp(-1) per token.
constexpr double kMinScale = 0x1p-64;


template <class T>
void load_f32(const T* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_f32(x[i]);
}

// The rows a task reads lie a whole token (H P or G NS elements) apart, and a thread
// stalled on them: the row copy of x took two thirds of the time outside the state pass
// (perf, bench shape). Fetching the rows kAhead tokens ahead hides that.
constexpr int64_t kAhead = 4;

template <class T>
void prefetch(const T* x, int64_t n) {
  for (int64_t i = 0; i < n * int64_t(sizeof(T)); i += 64) __builtin_prefetch(reinterpret_cast<const char*>(x) + i);
}

// x [n] as fp32: in place for fp32, else converted into `buf`.
template <class T>
const float* as_f32(const T* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    load_f32(x, n, buf);
    return buf;
  }
}

// The gates in double, once per token and head (negligible next to the P NS state work),
// so that the decay reaches the state unrounded (see rows_step and the scan's scale a).
double step_size(float raw, float bias, bool softplus) {
  const double v = double(raw) + double(bias);
  return softplus && v <= kSoftplusThreshold ? std::log1p(std::exp(v)) : v;
}

// R rows of one head's state, one token, in a single pass: for each row p,
//   h[p, :] = decay h[p, :] + u[p] B;   y[p] = h[p, :] · C       (DECAY = false: decay = 1).
// decay = hi + lo, the double-precision decay split into two floats: rounding it to one
// float puts the same relative error on every element of a head's state at each token,
// which compounds over the tokens (1.1e-6 relative RMSE from the fp64 oracle after 200
// tokens at decay ~0.99; 2.6e-7 with the split). Sixteen partial sums per row: GCC
// vectorises no float reduction without -ffast-math; the 16 lanes are one AVX-512 (two
// AVX2) register, in a fixed order, so results do not depend on the thread count. R = 4
// rows share each load of B and C and keep four accumulators in registers.
template <bool DECAY, int R>
AHN_ALWAYS_INLINE void rows_step(float* __restrict__ h, int64_t h_sp, int64_t NS, float hi, float lo,
                      const float* __restrict__ u, const float* __restrict__ Bv, const float* __restrict__ Cv,
                      float* __restrict__ y) {
  float acc[R][16] = {};
  int64_t n = 0;
  for (; n + 16 <= NS; n += 16)
    for (int r = 0; r < R; ++r) {
      float* __restrict__ hr = h + r * h_sp + n;
      for (int64_t k = 0; k < 16; ++k) {
        const float s = DECAY ? hi * hr[k] + (lo * hr[k] + u[r] * Bv[n + k]) : hr[k] + u[r] * Bv[n + k];
        hr[k] = s;
        acc[r][k] += s * Cv[n + k];
      }
    }
  for (int64_t k = 0; n < NS; ++n, ++k)
    for (int r = 0; r < R; ++r) {
      float* hr = h + r * h_sp + n;
      const float s = DECAY ? hi * hr[0] + (lo * hr[0] + u[r] * Bv[n]) : hr[0] + u[r] * Bv[n];
      hr[0] = s;
      acc[r][k] += s * Cv[n];
    }
  // Fixed-width halvings: GCC emitted a loop over a variable width as scalar adds, which
  // cost as much as the state pass itself at NS = 128.
  for (int r = 0; r < R; ++r) {
    float s8[8], s4[4];
    for (int k = 0; k < 8; ++k) s8[k] = acc[r][k] + acc[r][k + 8];
    for (int k = 0; k < 4; ++k) s4[k] = s8[k] + s8[k + 4];
    y[r] = (s4[0] + s4[2]) + (s4[1] + s4[3]);
  }
}

template <bool DECAY>
AHN_ALWAYS_INLINE void rows(float* h, int64_t h_sp, int64_t P, int64_t NS, double decay, const float* u,
                            const float* Bv, const float* Cv, float* y) {
  const float hi = float(decay), lo = float(decay - double(hi));
  int64_t p = 0;
  for (; p + 4 <= P; p += 4) rows_step<DECAY, 4>(h + p * h_sp, h_sp, NS, hi, lo, u + p, Bv, Cv, y + p);
  for (; p < P; ++p) rows_step<DECAY, 1>(h + p * h_sp, h_sp, NS, hi, lo, u + p, Bv, Cv, y + p);
}

// One token on one head: the state [P, NS] (row stride h_sp) decays by `decay` and
// absorbs u Bᵀ; y [P] = h C. The decode step.
AHN_ISA_CLONES void state_step(float* h, int64_t h_sp, int64_t P, int64_t NS, double decay, const float* u,
                               const float* Bv, const float* Cv, float* y) {
  rows<true>(h, h_sp, P, NS, decay, u, Bv, Cv, y);
}

// The scan's step on a scaled state g = h / a (row stride NS): g += u Bᵀ; y = g C.
// Carrying the decay in the double scalar a halves the work per state element (two
// FMAs, not four) and rounds nothing of the decay into the state until a fold.
AHN_ISA_CLONES void scaled_step(float* g, int64_t P, int64_t NS, const float* u, const float* Bv, const float* Cv,
                                float* y) {
  rows<false>(g, NS, P, NS, 1.0, u, Bv, Cv, y);
}

// g <- a g, rounded once per element: folds the scale of a scaled state into it.
AHN_ISA_CLONES void fold(float* g, int64_t n, double a) {
  for (int64_t i = 0; i < n; ++i) g[i] = float(double(g[i]) * a);
}

// The per-token terms outside the state: y = (y + D x) · silu(z), stored in T.
template <class T>
void finish_store(const float* y, const T* x, const float* D, int64_t D_sp, const T* z, int64_t P, T* out) {
  for (int64_t p = 0; p < P; ++p) {
    float v = y[p];
    if (D) v += D[p * D_sp] * to_f32(x[p]);
    if (z) {
      const float zv = to_f32(z[p]);
      v *= zv / (1.f + std::exp(-zv));
    }
    out[p] = from_f32<T>(v);
  }
}

// One task of the scan: sequence n, head h.
template <class T>
void scan_head(const ScanParams& p, int64_t n, int64_t h) {
  const int64_t P = p.P, NS = p.NS;
  const int64_t b = p.cu_seqlens ? 0 : n;
  const int64_t bos = p.cu_seqlens ? p.cu_seqlens[n] : 0;
  const int64_t eos = p.cu_seqlens ? p.cu_seqlens[n + 1] : p.T;
  const int64_t g = h / (p.H / p.G);
  // Element offsets of row 0 of this batch entry and head; pointers are formed only at
  // an access, since with no tokens the inputs may be empty and null.
  const int64_t x0 = b * p.x_sb + h * p.x_sh, dt0 = b * p.dt_sb + h * p.dt_sh;
  const int64_t B0 = b * p.B_sb + g * p.B_sg, C0 = b * p.C_sb + g * p.C_sg;
  const int64_t z0 = b * p.z_sb + h * p.z_sh;
  const int64_t y0 = (b * p.T * p.H + h) * P, y_st = p.H * P;
  const float* D = p.D ? p.D + h * p.D_sh : nullptr;
  const double A = p.A[h];
  const float bias = p.dt_bias ? p.dt_bias[h] : 0.f;

  float* const st = p.ht + (n * p.H + h) * P * NS;  // the state lives in its output slot
  if (p.h0)
    std::copy(p.h0 + (n * p.H + h) * P * NS, p.h0 + (n * p.H + h + 1) * P * NS, st);
  else
    std::fill(st, st + P * NS, 0.f);

  // The state is h = a g: g in st, the decay product a since the last fold in double.
  // a is folded into g at the start of every chunk of C absorbed tokens, so that a scan
  // split at a chunk multiple and continued from its final state is bitwise the whole
  // scan (DESIGN §4), and in between before 1 / a could push g or u / a out of float's range.
  double a = 1.0;
  float u[kMaxDim], Bv[kMaxDim], Cv[kMaxDim], y[kMaxDim];
  for (int64_t t = bos; t < eos; ++t) {
    const int64_t j = t - bos - p.W;  // the token (within the sequence) absorbed at row t
    if (j >= p.S) {
      const int64_t r = bos + j;
      const double dt =
          std::min(std::max(step_size(p.dt[dt0 + r * p.dt_st], bias, p.dt_softplus), double(p.dt_min)),
                   double(p.dt_max));
      if ((j - p.S) % p.C == 0 && a != 1.0) {
        fold(st, P * NS, a);
        a = 1.0;
      }
      a *= std::exp(dt * A);
      if (a < kMinScale || a > 1.0 / kMinScale) {  // a = 0 (a decay that underflows) resets the state; A > 0 grows a
        fold(st, P * NS, a);
        a = 1.0;
      }
      load_f32(static_cast<const T*>(p.x) + x0 + r * p.x_st, P, u);
      const double w = dt / a;
      for (int64_t i = 0; i < P; ++i) u[i] = float(w * u[i]);
      const T* Br = static_cast<const T*>(p.Bm) + B0 + r * p.B_st;
      const T* Cr = static_cast<const T*>(p.Cm) + C0 + t * p.C_st;
      if (t + kAhead < eos) {
        prefetch(static_cast<const T*>(p.x) + x0 + (r + kAhead) * p.x_st, P);
        prefetch(Br + kAhead * p.B_st, NS);
        prefetch(Cr + kAhead * p.C_st, NS);
      }
      scaled_step(st, P, NS, u, as_f32(Br, NS, Bv), as_f32(Cr, NS, Cv), y);
      for (int64_t i = 0; i < P; ++i) y[i] = float(a * y[i]);
    } else {
      std::fill(y, y + P, 0.f);  // empty memory
    }
    finish_store(y, static_cast<const T*>(p.x) + x0 + t * p.x_st, D, p.D_sp,
                 p.z ? static_cast<const T*>(p.z) + z0 + t * p.z_st : nullptr, P, static_cast<T*>(p.y) + y0 + t * y_st);
  }
  if (a != 1.0) fold(st, P * NS, a);
}

template <class T>
void scan(const ScanParams& p, int num_threads) {
  const int64_t N = p.N, H = p.H;
  // Dynamic: under varlen, sequences of very different lengths must not pile onto one thread.
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) scan_head<T>(p, n, h);
}

template <class T>
void state_update(const StateUpdateParams& p, int num_threads) {
  const int64_t B = p.B, H = p.H, P = p.P, NS = p.NS;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / p.G);
      const int64_t slot = p.idx ? p.idx[b] : b;
      const double dt = step_size(p.dt[b * p.dt_sb + h * p.dt_sh], p.dt_bias ? p.dt_bias[h] : 0.f, p.dt_softplus);
      const T* x = static_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh;
      float xdt[kMaxDim], Bv[kMaxDim], Cv[kMaxDim], y[kMaxDim];
      load_f32(x, P, xdt);
      for (int64_t i = 0; i < P; ++i) xdt[i] *= float(dt);
      load_f32(static_cast<const T*>(p.Bm) + b * p.B_sb + g * p.B_sg, NS, Bv);
      load_f32(static_cast<const T*>(p.Cm) + b * p.C_sb + g * p.C_sg, NS, Cv);
      state_step(p.state + slot * p.state_sb + h * p.state_sh, p.state_sp, P, NS, std::exp(dt * p.A[h]), xdt,
                 Bv, Cv, y);
      finish_store(y, x, p.D ? p.D + h * p.D_sh : nullptr, p.D_sp,
                   p.z ? static_cast<const T*>(p.z) + b * p.z_sb + h * p.z_sh : nullptr, P,
                   static_cast<T*>(p.y) + (b * H + h) * P);
    }
}

}  // namespace

void launch_ssd_scan_fwd_cpu(const ScanParams& p, int num_threads) {
  dispatch_dtype(p.dtype, [&](auto tag) { scan<decltype(tag)>(p, std::max(num_threads, 1)); });
}

void launch_ssd_state_update_cpu(const StateUpdateParams& p, int num_threads) {
  dispatch_dtype(p.dtype, [&](auto tag) { state_update<decltype(tag)>(p, std::max(num_threads, 1)); });
}

}  // namespace ahn
