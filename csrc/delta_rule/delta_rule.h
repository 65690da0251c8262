// Delta rule and gated delta rule: parameters and launchers (torch-free).
//
// Per state head h (HS = max(HQ, HK, HV)), token by token:
//   S_t = exp(g_t) (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ      (g = 0 for DeltaNet)
//   o_t = scale · S_tᵀ q_t
// with q, k L2-normalised in-kernel (eps 1e-6) when `l2norm` is set. State head h
// reads q head h / (HS/HQ), k head h / (HS/HK), v head h / (HS/HV).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace ahn {

struct FusedRecurrentParams {
  // Pointers (host or device addresses of the first element).
  const void* q = nullptr;             // [B, T, HQ, K]  dtype
  const void* k = nullptr;             // [B, T, HK, K]  dtype
  const void* v = nullptr;             // [B, T, HV, V]  dtype
  const float* g = nullptr;            // [B, T, HS]     fp32 log-decay; nullptr for DeltaNet
  const float* beta = nullptr;         // [B, T, HS]     fp32
  const float* h0 = nullptr;           // [N, HS, K, V]  fp32 contiguous; nullptr = zeros
  void* o = nullptr;                   // [B, T, HS, V]  dtype, contiguous
  float* ht = nullptr;                 // [N, HS, K, V]  fp32 contiguous; nullptr = not stored
  const int64_t* cu_seqlens = nullptr; // [N + 1]; nullptr = N = B sequences of length T

  // Sizes.
  int64_t B = 0, T = 0, N = 0;
  int64_t HQ = 0, HK = 0, HV = 0, HS = 0;
  int64_t K = 0, V = 0;

  // Strides in elements over (batch, time, head); the last dim has stride 1.
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  int64_t v_sb = 0, v_st = 0, v_sh = 0;
  int64_t g_sb = 0, g_st = 0, g_sh = 0;
  int64_t beta_sb = 0, beta_st = 0, beta_sh = 0;

  float scale = 1.f;
  bool l2norm = false;
  DType dtype = DType::f32;  // of q, k, v and o
};

// Chunked (WY / UT) forward: the same recurrence in chunks of C tokens, with AHN's
// lagged readout. Per sequence [bos, eos) of length L and lag (W, S) (W = 0: none),
// the state absorbs k/v/g/beta rows bos+S .. eos-1-W in order; output row
// bos+S+W+j reads the state after absorbing row bos+S+j, with q row bos+S+W+j;
// output rows bos .. min(eos, bos+S+W)-1 are 0. Without lag row t absorbs token t.
struct ChunkParams : FusedRecurrentParams {  // ht must be set; host addresses
  int64_t C = 64, W = 0, S = 0;  // chunk, lag window and sinks
};

// Chunked backward: gradients of <o, grad_o> + <ht, grad_ht> w.r.t. q, k, v, beta, g and h0
// (dh0 also when fwd.h0 is null: the gradient w.r.t. a zero state). fwd.o and fwd.ht are
// not read. dq, dk, dv are summed over the state heads that share a q / k / v head, and
// taken through the in-kernel L2 norm when fwd.l2norm is set.
struct ChunkBwdParams {
  ChunkParams fwd;                     // the forward's inputs and sizes
  const void* grad_o = nullptr;        // [B, T, HS, V]  fwd.dtype
  const float* grad_ht = nullptr;      // [N, HS, K, V]  fp32 contiguous
  void* dq = nullptr;                  // [B, T, HQ, K]  fwd.dtype, contiguous
  void* dk = nullptr;                  // [B, T, HK, K]  fwd.dtype, contiguous
  void* dv = nullptr;                  // [B, T, HV, V]  fwd.dtype, contiguous
  float* dbeta = nullptr;              // [B, T, HS]     fp32 contiguous
  float* dg = nullptr;                 // [B, T, HS]     fp32 contiguous; nullptr for DeltaNet
  float* dh0 = nullptr;                // [N, HS, K, V]  fp32 contiguous
  int64_t do_sb = 0, do_st = 0, do_sh = 0;  // grad_o strides (last dim stride 1)
};

// CPU: OpenMP over sequences x state heads, `num_threads` threads.
void launch_fused_recurrent_fwd_cpu(const FusedRecurrentParams& p, int num_threads);
// CUDA: one block per (sequence, state head, V tile); `stream` is a cudaStream_t. Element offsets
// are int64 with `int64_offsets` (set when one can reach 2^31), else int32.
void launch_fused_recurrent_fwd_cuda(const FusedRecurrentParams& p, bool int64_offsets, void* stream);
// CPU: OpenMP over sequences x state heads (each task runs its chunks in order, so
// results do not depend on `num_threads`); fp32 math for every dtype.
void launch_chunk_fwd_cpu(const ChunkParams& p, int num_threads);
// CPU backward by recomputation: one task per (sequence, state head) re-runs its forward
// chunk states, then walks the chunks in reverse. Gradients of q / k / v heads shared by
// several state heads are kept as per-state-head fp32 partials and summed per group in a
// fixed order afterwards (no atomics), so results do not depend on `num_threads`.
void launch_chunk_bwd_cpu(const ChunkBwdParams& p, int num_threads);

#if defined(__CUDACC__)
#define AHN_HOST_DEVICE __host__ __device__
#else
#define AHN_HOST_DEVICE
#endif

// Where the task (sequence n, state head h) reads and writes: its token range and the
// element offsets of its token 0. Pointers are formed only at an access, since with no
// tokens (T = 0) the tensors may be empty and null.
struct SeqHead {
  int64_t b, bos, eos;       // batch row; tokens [bos, eos) of it
  int64_t hq, hk, hv;        // the q, k, v heads that state head h reads
  int64_t q, k, v, g, beta;  // offsets of token 0 in the inputs
  int64_t o;                 // offset of token 0 in o [B, T, HS, V] (contiguous)
  int64_t state;             // offset of this head's [K, V] in h0 / ht
};

template <class Params>
AHN_HOST_DEVICE inline SeqHead seq_head(const Params& p, int64_t n, int64_t h) {
  SeqHead s;
  s.b = p.cu_seqlens ? 0 : n;
  s.bos = p.cu_seqlens ? p.cu_seqlens[n] : 0;
  s.eos = p.cu_seqlens ? p.cu_seqlens[n + 1] : p.T;
  s.hq = h / (p.HS / p.HQ);
  s.hk = h / (p.HS / p.HK);
  s.hv = h / (p.HS / p.HV);
  s.q = s.b * p.q_sb + s.hq * p.q_sh;
  s.k = s.b * p.k_sb + s.hk * p.k_sh;
  s.v = s.b * p.v_sb + s.hv * p.v_sh;
  s.g = s.b * p.g_sb + h * p.g_sh;
  s.beta = s.b * p.beta_sb + h * p.beta_sh;
  s.o = (s.b * p.T * p.HS + h) * p.V;
  s.state = (n * p.HS + h) * p.K * p.V;
  return s;
}

}  // namespace ahn
