// Sliding-window attention with sink tokens: parameters and launchers (torch-free).
//
// Within one sequence, key j is visible to query i iff j <= i and (i - j < W or j < S);
// W = 0 means full causal. Query head h reads key/value head h / (HQ / HK). Per query
// row, with s_j = scale · q·k_j over the visible keys:
//   o = Σ_j softmax(s)_j v_j,   lse = log Σ_j exp(s_j)   (natural log, fp32)
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace ahn {

struct SwaParams {
  // Pointers (host addresses of the first element).
  const void* q = nullptr;             // [B, T, HQ, D]  dtype
  const void* k = nullptr;             // [B, T, HK, D]  dtype
  const void* v = nullptr;             // [B, T, HK, D]  dtype
  void* o = nullptr;                   // [B, T, HQ, D]  dtype, contiguous
  float* lse = nullptr;                // [B, HQ, T]     fp32, contiguous
  const int64_t* cu_seqlens = nullptr; // [N + 1]; nullptr = N = B sequences of length T

  // Sizes: batch, tokens, sequences, heads, head dim, window (0 = full causal), sinks.
  int64_t B = 0, T = 0, N = 0;
  int64_t HQ = 0, HK = 0, D = 0;
  int64_t W = 0, S = 0;

  // Strides in elements over (batch, time, head); the last dim has stride 1.
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  int64_t v_sb = 0, v_st = 0, v_sh = 0;

  float scale = 1.f;
  DType dtype = DType::f32;  // of q, k, v and o
};

// CPU forward: flash-style tiles with an online softmax that visit only the sink and
// window key blocks of each query block (O(T·(W+S)) work, O(T) memory); OpenMP over
// (sequence, KV head, query block) tasks, each computed alone, so results do not depend
// on `num_threads`; fp32 math for every dtype.
void launch_swa_fwd_cpu(const SwaParams& p, int num_threads);

// Backward inputs and outputs beside the forward's (o and lse are read, not written).
// With P = exp(s - lse), dP = dO·Vᵀ and delta_i = Σ_d dO_id O_id - dlse_i:
//   dS = P ∘ (dP - delta),  dq = scale · dS K,  dk = scale · dSᵀ q,  dv = Pᵀ dO,
// dk and dv summed over the G query heads of a KV head.
struct SwaBwdParams {
  SwaParams fwd;                 // q, k, v, o [B, T, HQ, D] contiguous, lse, sizes, strides, scale, dtype
  const void* dout = nullptr;    // [B, T, HQ, D]  fwd.dtype
  const float* dlse = nullptr;   // [B, HQ, T]     fp32 contiguous; nullptr = no gradient of lse
  void* dq = nullptr;            // [B, T, HQ, D]  fwd.dtype, contiguous
  void* dk = nullptr;            // [B, T, HK, D]  fwd.dtype, contiguous
  void* dv = nullptr;            // [B, T, HK, D]  fwd.dtype, contiguous
  int64_t do_sb = 0, do_st = 0, do_sh = 0;  // dout strides (last dim stride 1)
};

// CPU backward (flash-attention 2 style, recomputing P from the saved lse): dk and dv by
// (sequence, KV head, key block) tasks that visit the query tiles seeing the block, dq by
// (sequence, KV head, query block) tasks that visit the forward's key blocks; each output
// row is owned by one task and summed in a fixed order, so results do not depend on
// `num_threads`. Work O(T·(W+S)), extra memory O(T); fp32 math for every dtype.
void launch_swa_bwd_cpu(const SwaBwdParams& p, int num_threads);

}  // namespace ahn

// ---- decode over the AHN ring-buffer cache ----------------------------------------
namespace ahn {

// One new token per sequence b at position p = cache_seqlens[b]. Token t lives in slot t
// if t < S, else in slot S + (t - S) mod W. The step writes k_new/v_new into slot(p),
// then attends q over slots 0 .. min(p, S + W - 1): after the write those hold exactly
// the sinks and the last W tokens up to p (softmax does not care about slot order).
struct SwaDecodeParams {
  const void* q = nullptr;                 // [B, 1, HQ, D]     dtype
  void* k_cache = nullptr;                 // [B, S + W, HK, D] dtype, mutated
  void* v_cache = nullptr;                 // [B, S + W, HK, D] dtype, mutated
  const void* k_new = nullptr;             // [B, 1, HK, D]     dtype
  const void* v_new = nullptr;             // [B, 1, HK, D]     dtype
  const int32_t* cache_seqlens = nullptr;  // [B]               positions, >= 0
  void* o = nullptr;                       // [B, 1, HQ, D]     dtype, contiguous

  int64_t B = 0, HQ = 0, HK = 0, D = 0, W = 0, S = 0;

  // Strides in elements; the last dim has stride 1. Caches: (batch, slot, head).
  int64_t q_sb = 0, q_sh = 0;
  int64_t kc_sb = 0, kc_st = 0, kc_sh = 0;
  int64_t vc_sb = 0, vc_st = 0, vc_sh = 0;
  int64_t kn_sb = 0, kn_sh = 0;
  int64_t vn_sb = 0, vn_sh = 0;

  float scale = 1.f;
  DType dtype = DType::f32;  // of q, the caches, k_new, v_new and o
};

// CPU: OpenMP over (sequence, KV head) tasks; a task loads each cached k/v row once for
// the G = HQ / HK query heads that read it (fp32 online softmax), and is computed alone,
// so results do not depend on `num_threads`. No allocation after a thread's first call.
void launch_swa_decode_cpu(const SwaDecodeParams& p, int num_threads);

}  // namespace ahn
