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

#include "common/dispatch.h"
#include "common/isa.h"
#include "common/pages.h"
#include "ssd/cpu_step.h"
#include "ssd/ssd.h"

namespace ahn {
namespace {

using namespace ssd_cpu;

// One token on one head: the state [P, NS] (row stride h_sp) decays by `decay` and
// absorbs u Bᵀ; y [P] = h C. The decode step.
AHN_ISA_CLONES void state_step(float* h, int64_t h_sp, int64_t P, int64_t NS, double decay, const float* u,
                               const float* Bv, const float* Cv, float* y) {
  rows<true, false>(h, h_sp, P, NS, decay, u, Bv, Cv, y);
}

// The scan's step on a scaled state g = h / a (row stride NS): g += u Bᵀ; y = g C.
// Carrying the decay in the double scalar a halves the work per state element (two
// FMAs, not four) and rounds nothing of the decay into the state until a fold.
AHN_ISA_CLONES void scaled_step(float* g, int64_t P, int64_t NS, const float* u, const float* Bv, const float* Cv,
                                float* y) {
  rows<false, false>(g, NS, P, NS, 1.0, u, Bv, Cv, y);
}

// g <- a g, rounded once per element: folds the scale of a scaled state into it.
AHN_ISA_CLONES void fold(float* g, int64_t n, double a) { scale_in_place(g, n, a); }

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
  prepare_pages(p.y, p.B * p.T * H * p.P * int64_t(sizeof(T)), num_threads);
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
