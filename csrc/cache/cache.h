// The AHN memory's decode step over the ring-buffer cache: parameters and launcher (torch-free).
//
// For sequence b at position p = cache_seqlens[b] and state head h (q head h / (HS / HQ),
// k/v head h / (HS / HK)): if e = p - W >= S, token e leaves the window now. Its k/v sit
// in slot S + (e - S) mod W = S + (p - S) mod W of the cache and its arrival-time gates
// in gates[b, (p - S) mod W, h]; the fp32 state [K, V] absorbs it, with k̂ = k / |k|
// (eps 1e-6 inside the sqrt), by the rule
//   delta:        S' = S + β k̂ (v - Sᵀ k̂)ᵀ                    gates (β)
//   gated_delta:  S' = α S + β k̂ (v - α Sᵀ k̂)ᵀ,  α = e^g         gates (β, g)
//   ssd:          S' = α S + dt k̂ vᵀ,            α = e^(dt A)    gates (dt)
// and o = scale · S'ᵀ q̂. Otherwise the memory is empty: o = 0, the state is untouched.
// Then, if p >= S, gates_new[b, h] is stored in gates[b, (p - S) mod W, h], after the
// evicted token's gates were read (same task, same slot).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace ahn {

enum class MemoryRule : int { delta = 0, gated_delta = 1, ssd = 2 };

struct EvictUpdateParams {
  float* state = nullptr;                  // [B, HS, K, V]       fp32, mutated (strides state_sb, _sh, _sk)
  const void* q = nullptr;                 // [B, 1, HQ, K]       dtype
  const void* k_cache = nullptr;           // [B, S + W, HK, K]   dtype
  const void* v_cache = nullptr;           // [B, S + W, HK, V]   dtype
  float* gates = nullptr;                  // [B, W, HS, n_gates] fp32, mutated
  const float* gates_new = nullptr;        // [B, HS, n_gates]    fp32
  const int32_t* cache_seqlens = nullptr;  // [B]                 positions, >= 0
  const float* A = nullptr;                // [HS]                fp32 contiguous (ssd only)
  void* o = nullptr;                       // [B, 1, HS, V]       dtype, contiguous

  int64_t B = 0, HQ = 0, HK = 0, HS = 0, K = 0, V = 0, W = 0, S = 0, n_gates = 0;

  // Strides in elements; the last dim has stride 1 (gates: when n_gates > 1).
  int64_t state_sb = 0, state_sh = 0, state_sk = 0;
  int64_t q_sb = 0, q_sh = 0;
  int64_t kc_sb = 0, kc_st = 0, kc_sh = 0;
  int64_t vc_sb = 0, vc_st = 0, vc_sh = 0;
  int64_t g_sb = 0, g_st = 0, g_sh = 0;
  int64_t gn_sb = 0, gn_sh = 0;

  MemoryRule rule = MemoryRule::delta;
  float scale = 1.f;
  DType dtype = DType::f32;  // of q, the caches and o
};

// CPU: OpenMP over (sequence, state head) tasks, each computed alone, so results do not
// depend on `num_threads`; allocates nothing.
void launch_ahn_evict_update_cpu(const EvictUpdateParams& p, int num_threads);

}  // namespace ahn
