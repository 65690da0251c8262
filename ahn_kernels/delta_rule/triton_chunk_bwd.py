"""Chunked delta rule and gated delta rule backward, in Triton, by recomputation.

The math of ``reference.chunked_bwd`` with W and U eliminated (as in the CPU backward,
``csrc/delta_rule/chunk_bwd_cpu.cpp``). Notation of ``triton_chunk.py``; per chunk, with
dS the gradient of the chunk's end state and e = exp(G_C - G):

    dΔ   = scale · (Q Kᵀ ⊙ Γ)ᵀ dO + diag(e) K dS,      R = Aᵀ dΔ
    dS_0 = exp(G_C) dS + scale · (diag(exp G) Q)ᵀ dO - (diag(β exp G) K)ᵀ R
    dQ   = scale · diag(exp G) dO S_0ᵀ + (scale · dO Δᵀ ⊙ Γ) K
    dK   = diag(e) Δ dSᵀ + (scale · dO Δᵀ ⊙ Γ)ᵀ Q - diag(β exp G) R S_0ᵀ + (M + Mᵀ) K,
           M = strict_lower(-R Δᵀ) ⊙ diag(β) Γ
    dV   = diag(β) R;  dβ: row sums of the same products; dg_k: the terms whose decay spans step k.

Stages (the forward's stages 1 and 2 first recompute A, S_0 and Δ; the per-chunk
states and their gradients are transient scratch, 2·K·V/C floats per token and head):
1. ``chunk_state_bwd_kernel`` (sequence x state head x V tile): the reverse pass over
   chunks; stores R and dS per chunk, and dh0. Like the forward's state pass it keeps dS in
   memory (dS_end, per chunk, stays in L2) and works in [BK, BV] slices, so no tile grows
   with K or V.
2. ``triton_chunk_bwd_grad.py``: per chunk and state head, every gradient above, in three
   kernels: the state terms of dq and dk per K slice, then dv, dβ, dg and the gradients
   w.r.t. Q̂ K̂ᵀ and K̂ K̂ᵀ, then their terms of dq and dk per K slice. dq, dk and dv go per
   state head to fp32 scratch, dβ and dg straight to their outputs.
3. ``chunk_grad_reduce_kernel`` (token block x head): sums the dq / dk / dv scratch over
   each group in head order (deterministic, no atomics), applies the l2-norm backward
   dx = r dy - r³ x (x · dy), and casts once at the store.

Tiles, untuned (no GPU to measure): BT = C, K slices of 32 (16 in the reverse pass), V tiles
of 16, for every input dtype and head dim (K and V are loop counts or grid axes), 8 warps.
ptxas (``python -m ahn_kernels.triton_aot`` and a sweep of the variants the launcher picks,
sm_80 and sm_90: bf16 and fp32 at C = 16 / 32 / 64, fp16 at C = 64, head dims multiples of 16
or not, options on or off): at most 47 KB of shared memory per block (an A100 block may have
163 KB, an H100's 227 KB). No spills with head dims multiples of 16, except where ptxas holds
a kernel to 128 or 64 registers: the fp32 reverse pass on sm_90 (2 words) and
``chunk_grad_kernel`` on sm_80 at C = 32 (bf16) and 16 (fp32) with no option on (2). With
other head dims (narrower loads): the reverse pass up to 12 words (16-bit inputs, sm_90),
``chunk_grad_kernel`` up to 30 (fp32, sm_80, C = 64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._index import needs_int64
from ..scan_tiles import chunk_decays, dot_f32, dot_in, sequence
from .triton_chunk import (
    L2NORM_EPS,
    NUM_WARPS,
    _guard,
    _load_gate,
    _load_rows,
    aot_case,
    block_k,
    chunk_fwd_states,
    whole_tiles,
)
from .triton_chunk_bwd_grad import BK, BV, SUMS, chunk_grad_intra_kernel, chunk_grad_kernel, chunk_grad_state_kernel

# K slice of the reverse pass (its V tile is BV): the pass is latency-bound, and slices of 32 spill
# where 16 do not (ptxas, odd head dims: 64 words for fp32 on sm_80, 38 for bf16 on sm_90).
STATE_BK = 16
BR = 16  # token rows per program of the reduction


@triton.jit
def chunk_state_bwd_kernel(
    # pointers
    q, k, do, g, beta, A, dht, R, dS_end, dh0, first_slot, cu_seqlens,
    # sizes
    T, HS, HQ, HK, K, V, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_dob, stride_dot, stride_doh,
    stride_gb, stride_gt, stride_gh,
    stride_betab, stride_betat, stride_betah,
    # meta
    scale,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    """The chunks of one sequence in reverse: R -> R [slots, HS, BT, V], dS -> dS_end [slots, HS, K, V], dh0.

    dS lives in dS_end (each chunk's is stored anyway, and stays in L2), read and written in
    [BK, BV] slices, as the forward's state pass keeps S: a whole [K, BV] fp32 gradient in
    registers asks 173 KB of shared memory and spills at K = 128 (ptxas, sm_80, bf16).
    """
    # Axis 0 carries N·HS, which may pass 65,535 (the limit of axes 1 and 2).
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // HS
    i_h = i_nh % HS
    i_b, bos, M = sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    row_kv = bos + S
    row_q = row_kv + W
    i_hq = i_h // (HS // HQ)
    i_hk = i_h // (HS // HK)
    DT: tl.constexpr = q.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    NT = tl.cdiv(M, BT)
    first = tl.load(first_slot + i_n).to(tl.int64 if INT64 else tl.int32)
    p_dh0 = dh0 + i_nh.to(tl.int64 if INT64 else tl.int32) * K * V
    p_dh = dS_end + ((first + NT - 1) * HS + i_h) * K * V  # dS of the current chunk's end state
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        off_h = o_k[:, None] * V + o_v[None, :]
        b_dh = tl.load(dht + i_nh.to(tl.int64 if INT64 else tl.int32) * K * V + off_h, mask=(o_k[:, None] < K) & m_v[None, :], other=0.0)
        # A sequence without chunks owns no slot (its first slot is the next sequence's): dh0 = dht.
        tl.store(p_dh + off_h, b_dh, mask=(o_k[:, None] < tl.where(NT > 0, K, 0)) & m_v[None, :])
        tl.store(p_dh0 + off_h, b_dh, mask=(o_k[:, None] < tl.where(NT == 0, K, 0)) & m_v[None, :])

    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        i_s = first + i_t
        tl.debug_barrier()  # this chunk's dS, written by other threads, is visible
        # Q Kᵀ, K dS and the squared row norms, over K slices; the norms applied after.
        # The chunk's q and k rows, for every K slice of both passes (no per-slice row arithmetic).
        o_r = i_t * BT + o_t
        p_q = q + i_b * stride_qb + (row_q + o_r[:, None]) * stride_qt + i_hq * stride_qh
        p_k = k + i_b * stride_kb + (row_kv + o_r[:, None]) * stride_kt + i_hk * stride_kh
        m_r = o_r[:, None] < M
        b_qk = tl.zeros([BT, BT], dtype=tl.float32)
        b_kdh = tl.zeros([BT, BV], dtype=tl.float32)
        b_sq = tl.zeros([BT], dtype=tl.float32)
        b_sk = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_qk = m_r & (o_k[None, :] < K)
            b_q = tl.load(p_q + o_k[None, :], mask=m_qk, other=0.0).to(tl.float32)
            b_k = tl.load(p_k + o_k[None, :], mask=m_qk, other=0.0).to(tl.float32)
            b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0.0)
            b_qk += dot_in(b_q, tl.trans(b_k), DT)
            b_kdh += dot_f32(b_k, b_dh, DT)
            b_sq += tl.sum(b_q * b_q, 1)
            b_sk += tl.sum(b_k * b_k, 1)
        if USE_QK_L2NORM:
            b_rq = tl.rsqrt(b_sq + L2NORM_EPS)
            b_rk = tl.rsqrt(b_sk + L2NORM_EPS)
        else:
            b_rq = tl.full([BT], 1.0, dtype=tl.float32)
            b_rk = tl.full([BT], 1.0, dtype=tl.float32)
        b_beta = _load_gate(beta, i_b, row_kv, i_h, M, stride_betab, stride_betat, stride_betah, i_t, BT)
        if USE_G:
            b_g = _load_gate(g, i_b, row_kv, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
        else:
            b_g = tl.zeros([BT], dtype=tl.float32)
        b_G, b_gamma, b_rest, g_last = chunk_decays(b_g, BT)
        b_qk = b_qk * b_rq[:, None] * b_rk[None, :] * b_gamma
        b_do = _load_rows(do, i_b, row_q, i_h, M, V, stride_dob, stride_dot, stride_doh, i_t, i_v * BV, BT, BV)
        b_ddelta = scale * dot_f32(tl.trans(b_qk), b_do, DT) + (b_rk * tl.exp(b_rest))[:, None] * b_kdh
        b_A = tl.load(A + (i_s * HS + i_h) * BT * BT + o_t[:, None] * BT + o_t[None, :])
        b_R = dot_f32(tl.trans(b_A), b_ddelta, DT)
        tl.store(R + (i_s * HS + i_h) * BT * V + o_t[:, None] * V + o_v[None, :], b_R, mask=m_v[None, :])
        # dS_0 = exp(G_C) dS + scale (diag(r_q exp G) Q)ᵀ dO - (diag(β r_k exp G) K)ᵀ R into the
        # previous chunk's dS, or dh0 before the first chunk.
        b_qe = b_rq * tl.exp(b_G) * scale
        b_ke = b_beta * b_rk * tl.exp(b_G)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            off_h = o_k[:, None] * V + o_v[None, :]
            m_qk = m_r & (o_k[None, :] < K)
            b_q = tl.load(p_q + o_k[None, :], mask=m_qk, other=0.0).to(tl.float32)
            b_k = tl.load(p_k + o_k[None, :], mask=m_qk, other=0.0).to(tl.float32)
            b_dh = tl.exp(g_last) * tl.load(p_dh + off_h, mask=(o_k[:, None] < K) & m_v[None, :], other=0.0)
            b_dh += dot_f32(tl.trans(b_q * b_qe[:, None]), b_do, DT) - dot_f32(tl.trans(b_k * b_ke[:, None]), b_R, DT)
            tl.store(p_dh - HS * K * V + off_h, b_dh, mask=(o_k[:, None] < tl.where(i_t > 0, K, 0)) & m_v[None, :])
            tl.store(p_dh0 + off_h, b_dh, mask=(o_k[:, None] < tl.where(i_t == 0, K, 0)) & m_v[None, :])
        p_dh -= HS * K * V


@triton.jit
def chunk_grad_reduce_kernel(
    # pointers
    x, part, dx,
    # sizes
    T, H, G, D, n_rows,
    # strides (elements) of x's [B, T, H] axes; part and dx are contiguous
    stride_xb, stride_xt, stride_xh,
    # meta
    BR: tl.constexpr,
    BD: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    INT64: tl.constexpr,
):
    """dx[b, t, h] = l2norm_bwd(x[b, t, h], Σ_{j<G} part[b, t, h·G + j]); part [B, T, H·G, D] fp32."""
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64 if INT64 else tl.int32)  # flattened b·T + t
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < n_rows) & (o_d[None, :] < D)
    b_dy = tl.zeros([BR, BD], dtype=tl.float32)
    for j in range(0, G):
        b_dy += tl.load(part + (o_r[:, None] * H * G + i_h * G + j) * D + o_d[None, :], mask=m, other=0.0)
    if USE_QK_L2NORM:
        p_x = x + (o_r // T)[:, None] * stride_xb + (o_r % T)[:, None] * stride_xt + i_h * stride_xh + o_d[None, :]
        b_x = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
        b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) + L2NORM_EPS)
        b_dy = b_r[:, None] * b_dy - (b_r * b_r * b_r * tl.sum(b_x * b_dy, 1))[:, None] * b_x
    tl.store(dx + (o_r[:, None] * H + i_h) * D + o_d[None, :], b_dy.to(dx.dtype.element_ty), mask=m)


def _reduce(x, part, dx, use_qk_l2norm):
    B, T, H, D = dx.shape
    if B * T * H == 0:
        return
    chunk_grad_reduce_kernel[(triton.cdiv(B * T, BR), H)](
        x, part, dx,
        T, H, part.shape[2] // H, D, B * T,
        *x.stride()[:3],
        BR=BR, BD=block_k(D), USE_QK_L2NORM=use_qk_l2norm, INT64=needs_int64(x, part, dx), num_warps=NUM_WARPS)


def chunk_bwd(grad_o, grad_ht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size,
              lag_window, lag_sinks, dq, dk, dv, dbeta, dg, dh0) -> None:
    """Run the chunked (gated) delta rule backward, writing the gradients in place.

    Arguments are validated by the op; the kernels assume them valid.

    Args:
        grad_o: ``[B, T, HS, V]``, last dim contiguous; grad_ht: fp32 contiguous ``[N, HS, K, V]``.
        q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window,
            lag_sinks: as ``triton_chunk.chunk_fwd``.
        dq, dk, dv: preallocated contiguous, shaped and typed like q, k, v.
        dbeta, dg: preallocated fp32 contiguous ``[B, T, HS]`` (dg None without g).
        dh0: preallocated fp32 contiguous ``[N, HS, K, V]``: the gradient w.r.t. the initial
            state (w.r.t. zeros when none is given).
    """
    B, T, HQ, K = q.shape
    HK, HV, V = k.shape[2], v.shape[2], v.shape[3]
    HS = beta.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    C, W, S = chunk_size, lag_window, lag_sinks
    slots, first, A, h_start, delta = chunk_fwd_states(q, k, v, g, beta, initial_state, cu_seqlens, use_qk_l2norm, C, W, S,
                                                None)
    NS = slots.shape[0]
    # Under lag, rows that no chunk covers read or feed no memory: their gradients are 0.
    alloc = torch.zeros if W else torch.empty
    dq_part = alloc(B, T, HS, K, dtype=torch.float32, device=q.device)  # [B, T, HS, K]
    dk_part = alloc(B, T, HS, K, dtype=torch.float32, device=q.device)  # [B, T, HS, K]
    dv_part = alloc(B, T, HS, V, dtype=torch.float32, device=q.device)  # [B, T, HS, V]
    if W:
        dbeta.zero_()
        if dg is not None:
            dg.zero_()
    R = q.new_empty(NS, HS, C, V, dtype=torch.float32)  # [NS, HS, C, V]
    dS_end = q.new_empty(NS, HS, K, V, dtype=torch.float32)  # [NS, HS, K, V]
    stride_g = (0, 0, 0) if g is None else g.stride()
    strides = (*q.stride()[:3], *k.stride()[:3], *grad_o.stride()[:3], *stride_g, *beta.stride())
    flags = dict(USE_G=g is not None, IS_VARLEN=cu_seqlens is not None, num_warps=NUM_WARPS)
    state_bk, bk, bv = STATE_BK, min(BK, block_k(K)), BV
    if whole_tiles(q):  # the interpreter (``triton_chunk.whole_tiles``)
        state_bk, bk, bv = block_k(K), block_k(K), block_k(V)
    sums = q.new_empty(NS, HS, triton.cdiv(K, bk), SUMS.value, C, dtype=torch.float32)  # [NS, HS, NK, 4, C]
    dtt = q.new_empty(NS, HS, 2, C, C, dtype=torch.float32)  # [NS, HS, 2, C, C]
    norms = q.new_empty(NS, HS, 2, C, dtype=torch.float32)  # [NS, HS, 2, C]
    with _guard(q):
        if N * HS:
            chunk_state_bwd_kernel[(N * HS, triton.cdiv(V, bv))](
                q, k, grad_o, g, beta, A, grad_ht, R, dS_end, dh0, first, cu_seqlens,
                T, HS, HQ, HK, K, V, W, S,
                *strides,
                scale,
                BT=C, BK=state_bk, BV=bv, USE_QK_L2NORM=use_qk_l2norm, **flags,
                INT64=needs_int64(q, k, grad_o, g, beta, A, grad_ht, R, dS_end, dh0))
        if NS * HS:
            chunk_grad_state_kernel[(NS, HS, triton.cdiv(K, bk))](
                q, k, grad_o, g, beta, h_start, delta, R, dS_end, dq_part, dk_part, sums, slots, cu_seqlens,
                T, HS, HQ, HK, K, V, W, S,
                *strides,
                scale,
                BT=C, BK=bk, BV=bv, **flags,
                INT64=needs_int64(q, k, grad_o, g, beta, h_start, delta, R, dS_end, dq_part, dk_part, sums))
            chunk_grad_kernel[(NS, HS)](
                q, k, v, grad_o, g, beta, delta, R, sums, dv_part, dbeta, dg, dtt, norms, slots, cu_seqlens,
                T, HS, HQ, HK, HV, K, V, W, S,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_o.stride()[:3], *stride_g, *beta.stride(),
                scale,
                BT=C, BK=bk, BV=bv, USE_QK_L2NORM=use_qk_l2norm, **flags,
                INT64=needs_int64(q, k, v, grad_o, g, beta, delta, R, sums, dv_part, dbeta, dg, dtt, norms))
            chunk_grad_intra_kernel[(NS, HS, triton.cdiv(K, bk))](
                q, k, dtt, norms, dq_part, dk_part, slots, cu_seqlens,
                T, HS, HQ, HK, K, W, S,
                *q.stride()[:3], *k.stride()[:3],
                BT=C, BK=bk, IS_VARLEN=cu_seqlens is not None, INT64=needs_int64(q, k, dtt, norms, dq_part, dk_part),
                num_warps=NUM_WARPS)
        _reduce(q, dq_part, dq, use_qk_l2norm)
        _reduce(k, dk_part, dk, use_qk_l2norm)
        _reduce(v, dv_part, dv, False)


def _aot_cases():
    """The reverse pass in bf16 and fp32 with every option on (K and V are loop counts: one case
    serves every head dim) and the reduction at its largest tile (K or V = 256)."""
    cases = []
    for dtype in ("bf16", "fp32"):
        # fp32 on sm_90: ptxas holds the reverse pass to 128 registers and spills 2 words; recorded.
        cases += [aot_case(chunk_state_bwd_kernel, dtype, full=True, BT=64, BK=STATE_BK, BV=BV,
                           must_not_spill=dtype != "fp32"),
                  aot_case(chunk_grad_reduce_kernel, dtype, full=True, BR=BR, BD=256)]
    return cases


AOT_CASES = _aot_cases()
