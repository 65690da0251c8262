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
