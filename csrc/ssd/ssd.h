// Mamba2 SSD: parameters and launchers of the CPU scan and decode step (torch-free).
//
// Per head h (B/C group h / (H/G)), a fp32 state [P, NS] (mamba's layout, P first):
//   dt_t = clamp(softplus(dt_t + dt_bias), dt_min, dt_max)   softplus optional, threshold 20
//   h_t  = exp(dt_t A_h) h_{t-1} + dt_t x_t B_tᵀ
//   y_t  = (h_t C_t + D x_t) · silu(z_t)
// All math in fp32; x, B, C, z and y are fp32, fp16 or bf16 (`dtype`), converted at
// load and store. Gates (dt, A, dt_bias, D) arrive as fp32.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace ahn {

// The scan forward with AHN's lag. Per sequence [bos, eos) and lag (W, S) (W = 0:
// none), the state absorbs rows bos+S .. eos-1-W in order; output row bos+S+W+j
// reads, with C of that row, the state after absorbing row bos+S+j; rows before
// bos+S+W have an empty memory (readout 0) but still get D x and silu(z).
struct ScanParams {
  // Pointers (host addresses of the first element).
  const void* x = nullptr;             // [B, T, H, P]   dtype
  const float* dt = nullptr;           // [B, T, H]      fp32, raw (before bias, softplus, clamp)
  const float* A = nullptr;            // [H]            fp32 contiguous
  const void* Bm = nullptr;            // [B, T, G, NS]  dtype
  const void* Cm = nullptr;            // [B, T, G, NS]  dtype
  const float* D = nullptr;            // [H, P]         fp32 (strides D_sh, D_sp); nullptr = none
  const void* z = nullptr;             // [B, T, H, P]   dtype; nullptr = no gate
  const float* dt_bias = nullptr;      // [H]            fp32 contiguous; nullptr = none
  const float* h0 = nullptr;           // [N, H, P, NS]  fp32 contiguous; nullptr = zeros
  void* y = nullptr;                   // [B, T, H, P]   dtype, contiguous
  float* ht = nullptr;                 // [N, H, P, NS]  fp32 contiguous
  const int64_t* cu_seqlens = nullptr; // [N + 1]; nullptr = N = B sequences of length T

  // Sizes: batch, tokens, sequences, heads, groups, head dim, state dim, chunk (where the
  // scan folds its scaled state: results continue bitwise at its multiples), lag window and sinks.
  int64_t B = 0, T = 0, N = 0;
  int64_t H = 0, G = 0, P = 0, NS = 0;
  int64_t C = 256, W = 0, S = 0;

  // Strides in elements over (batch, time, head or group); the last dim has stride 1.
  int64_t x_sb = 0, x_st = 0, x_sh = 0;
  int64_t dt_sb = 0, dt_st = 0, dt_sh = 0;
  int64_t B_sb = 0, B_st = 0, B_sg = 0;
  int64_t C_sb = 0, C_st = 0, C_sg = 0;
  int64_t z_sb = 0, z_st = 0, z_sh = 0;
  int64_t D_sh = 0, D_sp = 0;  // D [H] passes D_sp = 0

  bool dt_softplus = false;
  float dt_min = 0.f, dt_max = 0.f;
  DType dtype = DType::f32;  // of x, B, C, z and y
};

// The scan's backward: the gradients of ScanParams' y and ht w.r.t. its inputs, for the
// upstream gradients dout (of y) and dht (of ht). `scan` holds the forward's inputs,
// sizes, strides and flags (its y and ht are unused). Gradients of B and C sum over the
// heads of a group in head order, and those of A, D, dt_bias over the sequences in
// sequence order, so results do not depend on the thread count.
struct ScanBwdParams {
  ScanParams scan;
  const void* dout = nullptr;          // [B, T, H, P]   dtype (strides dout_sb, dout_st, dout_sh)
  const float* dht = nullptr;          // [N, H, P, NS]  fp32 contiguous
  void* dx = nullptr;                  // [B, T, H, P]   dtype, contiguous
  float* ddt = nullptr;                // [B, T, H]      fp32, contiguous (of the raw dt)
  float* dA = nullptr;                 // [H]            fp32
  void* dB = nullptr;                  // [B, T, G, NS]  dtype, contiguous
  void* dC = nullptr;                  // [B, T, G, NS]  dtype, contiguous
  float* dD = nullptr;                 // [H, P], or [H] when scan.D_sp = 0; fp32; set iff scan.D is
  void* dz = nullptr;                  // [B, T, H, P]   dtype, contiguous; set iff scan.z is
  float* ddt_bias = nullptr;           // [H]            fp32; set iff scan.dt_bias is
  float* dh0 = nullptr;                // [N, H, P, NS]  fp32 contiguous (also without scan.h0)
  int64_t dout_sb = 0, dout_st = 0, dout_sh = 0;
};

// One decode step (no dt clamp, as mamba's selective_state_update): row b updates
// state[idx[b]] (state[b] when idx is null) in place and writes y[b].
struct StateUpdateParams {
  float* state = nullptr;              // [NB, H, P, NS] fp32 (strides state_sb, state_sh, state_sp)
  const void* x = nullptr;             // [B, H, P]      dtype
  const float* dt = nullptr;           // [B, H]         fp32, raw
  const float* A = nullptr;            // [H]            fp32 contiguous
  const void* Bm = nullptr;            // [B, G, NS]     dtype
  const void* Cm = nullptr;            // [B, G, NS]     dtype
  const float* D = nullptr;            // [H, P]         fp32 (strides D_sh, D_sp); nullptr = none
  const void* z = nullptr;             // [B, H, P]      dtype; nullptr = no gate
  const float* dt_bias = nullptr;      // [H]            fp32 contiguous; nullptr = none
  const int64_t* idx = nullptr;        // [B] distinct slots in 0 .. NB-1; nullptr = row b is slot b
  void* y = nullptr;                   // [B, H, P]      dtype, contiguous

  int64_t B = 0, NB = 0, H = 0, G = 0, P = 0, NS = 0;

  int64_t state_sb = 0, state_sh = 0, state_sp = 0;
  int64_t x_sb = 0, x_sh = 0;
  int64_t dt_sb = 0, dt_sh = 0;
  int64_t B_sb = 0, B_sg = 0;
  int64_t C_sb = 0, C_sg = 0;
  int64_t z_sb = 0, z_sh = 0;
  int64_t D_sh = 0, D_sp = 0;

  bool dt_softplus = false;
  DType dtype = DType::f32;  // of x, B, C, z and y
};

// CPU: OpenMP over sequences x heads, each task token-serial with its state in
// cache, so results do not depend on `num_threads`.
void launch_ssd_scan_fwd_cpu(const ScanParams& p, int num_threads);
// CPU: OpenMP over sequences x heads, each task two token-serial passes (see bwd_cpu.cpp),
// then fixed-order sums over heads and sequences.
void launch_ssd_scan_bwd_cpu(const ScanBwdParams& p, int num_threads);
// CPU: OpenMP over rows x heads.
void launch_ssd_state_update_cpu(const StateUpdateParams& p, int num_threads);

}  // namespace ahn
