"""Chunked delta rule and gated delta rule backward, in Triton, by recomputation.

The math of ``reference.chunked_bwd`` with W and U eliminated (as in the CPU backward,
``csrc/delta_rule/chunk_bwd_cpu.cpp``). Notation of ``triton_chunk.py``; per chunk, with
dS the gradient of the chunk's end state and e = exp(G_C - G):

    dΔ   = scale · (Q Kᵀ ⊙ Γ)ᵀ dO + diag(e) K dS,      R = Aᵀ dΔ
    dS_0 = exp(G_C) dS + scale · (diag(exp G) Q)ᵀ dO - (diag(β exp G) K)ᵀ R
    dQ   = scale · diag(exp G) dO S_0ᵀ + (scale · dO Δᵀ ⊙ Γ) K
    dK   = diag(e) Δ dSᵀ + (scale · dO Δᵀ ⊙ Γ)ᵀ Q - diag(β exp G) R S_0ᵀ + (M + Mᵀ) K,
           M = strict_lower(-R Δᵀ) ⊙ diag(β) Γ
    dV   = diag(β) R;  dβ, dG: row sums of the same products; dg = reverse in-chunk cumsum of dG.

Stages (the forward's stages 1 and 2 first recompute A, S_0 and Δ; the per-chunk
states are transient scratch, K·V/C floats per token and head):
1. ``chunk_state_bwd_kernel`` (sequence x state head x V tile): the reverse pass over
   chunks with dS in fp32 registers; stores R and dS per chunk, and dh0.
2. ``chunk_grad_kernel`` (chunk x k head): K̂ K̂ᵀ once per k head, then per state head of
   the group every gradient above; dk sums over the group in registers (fixed order).
   dq and dv go per state head to fp32 scratch, dβ and dg straight to their outputs.
3. ``chunk_grad_reduce_kernel`` (token block x head): sums the dq / dv scratch over each
   group in head order (deterministic, no atomics), applies the l2-norm backward
   dx = r dy - r³ x (x · dy), and casts once at the store.

Tiles for H100/H200, untuned (no GPU to measure): BT = C, BK = next_pow2(K) whole,
BV = 32 in both passes; 8 warps. NOT yet fit for every K on a GPU: both passes hold
whole-K tiles and spill (ptxas, sm_80 / sm_90, bf16: reverse pass 6 / 36 words at
K = 64, 88 / 156 at 128; gradient stage 1,756 / 222 at 64, 3,914 / 460 at 128), and at
K = 256 they ask 296-377 KB of shared memory, more than an H100 SM has (228 KB; the
reverse pass at K = 128 asks 173 KB, past an A100's 164 KB). The fix is the forward's:
K slices with the state gradient in memory (dS_end already holds it per chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_chunk import (
    L2NORM_EPS,
    NUM_WARPS,
    _decays,
    _dot_f32,
    _dot_in,
    _guard,
    _inv_norm,
    _l2norm_rows,
    _load_gate,
    _load_rows,
    _sequence,
    aot_case,
    block_k,
    chunk_fwd_states,
)

BV = 32
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
):
    """The chunks of one sequence in reverse: R -> R [slots, HS, BT, V], dS -> dS_end [slots, HS, K, V], dh0."""
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // HS
    i_h = i_nh % HS
    i_b, bos, M = _sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN)
    i_hq = i_h // (HS // HQ)
    i_hk = i_h // (HS // HK)
    DT: tl.constexpr = q.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_h = (o_k[:, None] < K) & m_v[None, :]
    off_h = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.load(dht + i_nh.to(tl.int64) * K * V + off_h, mask=m_h, other=0.0)

    first = tl.load(first_slot + i_n).to(tl.int64)
    NT = tl.cdiv(M, BT)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        i_s = first + i_t
        tl.store(dS_end + (i_s * HS + i_h) * K * V + off_h, b_dh, mask=m_h)
        b_q = _load_rows(q, i_b, bos + S + W, i_hq, M, K, stride_qb, stride_qt, stride_qh, i_t, 0, BT, BK)
        b_k = _load_rows(k, i_b, bos + S, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, 0, BT, BK)
        b_do = _load_rows(do, i_b, bos + S + W, i_h, M, V, stride_dob, stride_dot, stride_doh, i_t, i_v * BV, BT, BV)
        b_beta = _load_gate(beta, i_b, bos + S, i_h, M, stride_betab, stride_betat, stride_betah, i_t, BT)
        if USE_G:
            b_g = _load_gate(g, i_b, bos + S, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
        else:
            b_g = tl.zeros([BT], dtype=tl.float32)
        b_G, b_gamma, g_last = _decays(b_g, BT)
        b_rq = _inv_norm(b_q, USE_QK_L2NORM)
        b_rk = _inv_norm(b_k, USE_QK_L2NORM)
        b_qk = _dot_in(b_q, tl.trans(b_k), DT) * b_rq[:, None] * b_rk[None, :] * b_gamma
        b_k = b_k * b_rk[:, None]
        b_ddelta = scale * _dot_f32(tl.trans(b_qk), b_do, DT) + _dot_f32(b_k * tl.exp(g_last - b_G)[:, None], b_dh, DT)
        b_A = tl.load(A + (i_s * HS + i_h) * BT * BT + o_t[:, None] * BT + o_t[None, :])
        b_R = _dot_f32(tl.trans(b_A), b_ddelta, DT)
        tl.store(R + (i_s * HS + i_h) * BT * V + o_t[:, None] * V + o_v[None, :], b_R, mask=m_v[None, :])
        b_qe = b_q * (b_rq * tl.exp(b_G) * scale)[:, None]
        b_ke = b_k * (b_beta * tl.exp(b_G))[:, None]
        b_dh = tl.exp(g_last) * b_dh + _dot_f32(tl.trans(b_qe), b_do, DT) - _dot_f32(tl.trans(b_ke), b_R, DT)

    tl.store(dh0 + i_nh.to(tl.int64) * K * V + off_h, b_dh, mask=m_h)


@triton.jit
def chunk_grad_kernel(
    # pointers
    q, k, v, do, g, beta, h_start, delta, R, dS_end, dq_part, dk_part, dv_part, dbeta, dg, slots, cu_seqlens,
    # sizes
    T, HS, HQ, HK, HV, K, V, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
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
):
    """Every gradient of one chunk for the state heads of k head i_hk (see the module docstring).

    dq_part [B, T, HS, K], dv_part [B, T, HS, V]: per state head; dk_part [B, T, HK, K]: summed
    over the group; all w.r.t. the normalised q̂, k̂ and fp32. dbeta, dg: [B, T, HS] fp32.
    """
    i_s = tl.program_id(0)
    i_hk = tl.program_id(1)
    i_n = tl.load(slots + 2 * i_s)
    if i_n < 0:
        return
    i_t = tl.load(slots + 2 * i_s + 1)
    i_b, bos, M = _sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN)
    DT: tl.constexpr = q.dtype.element_ty
    i_s64 = i_s.to(tl.int64)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_r = i_t * BT + o_t
    m_r = o_r < M
    row_kv = bos + S + o_r  # [BT] int64
    row_q = row_kv + W
    m_lower = o_t[:, None] >= o_t[None, :]
    m_strict = o_t[:, None] > o_t[None, :]

    b_k = _load_rows(k, i_b, bos + S, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, 0, BT, BK)
    b_rk = _inv_norm(b_k, USE_QK_L2NORM)
    b_kk = _dot_in(b_k, tl.trans(b_k), DT) * b_rk[:, None] * b_rk[None, :]
    b_k = b_k * b_rk[:, None]
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    G_K = HS // HK
    for i_g in range(0, G_K):
        i_h = i_hk * G_K + i_g
        i_hq = i_h // (HS // HQ)
        i_hv = i_h // (HS // HV)
        b_q = _l2norm_rows(_load_rows(q, i_b, bos + S + W, i_hq, M, K, stride_qb, stride_qt, stride_qh, i_t, 0, BT,
                                      BK), USE_QK_L2NORM)
        b_beta = _load_gate(beta, i_b, bos + S, i_h, M, stride_betab, stride_betat, stride_betah, i_t, BT)
        if USE_G:
            b_g = _load_gate(g, i_b, bos + S, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
        else:
            b_g = tl.zeros([BT], dtype=tl.float32)
        b_G, b_gamma, g_last = _decays(b_g, BT)
        b_eG = tl.exp(b_G)
        b_e = tl.exp(g_last - b_G)

        # Products over V, one V tile at a time.
        b_dqg = tl.zeros([BT, BK], dtype=tl.float32)  # dO S_0ᵀ
        b_dke = tl.zeros([BT, BK], dtype=tl.float32)  # Δ dSᵀ
        b_rs = tl.zeros([BT, BK], dtype=tl.float32)  # R S_0ᵀ
        b_dod = tl.zeros([BT, BT], dtype=tl.float32)  # dO Δᵀ
        b_rd = tl.zeros([BT, BT], dtype=tl.float32)  # R Δᵀ
        b_rv = tl.zeros([BT], dtype=tl.float32)  # Σ_v R ⊙ V
        b_dgain = tl.zeros([BK], dtype=tl.float32)  # Σ_v dS ⊙ S_0, per K row
        base_h = (i_s64 * HS + i_h) * K * V
        base_d = (i_s64 * HS + i_h) * BT * V
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_h = (o_k[:, None] < K) & m_v[None, :]
            b_h = tl.load(h_start + base_h + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.0)
            b_dh = tl.load(dS_end + base_h + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.0)
            b_d = tl.load(delta + base_d + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
            b_R = tl.load(R + base_d + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
            b_do = _load_rows(do, i_b, bos + S + W, i_h, M, V, stride_dob, stride_dot, stride_doh, i_t, i_v * BV,
                              BT, BV)
            b_v = _load_rows(v, i_b, bos + S, i_hv, M, V, stride_vb, stride_vt, stride_vh, i_t, i_v * BV, BT, BV)
            b_dqg += _dot_f32(b_do, tl.trans(b_h), DT)
            b_dke += _dot_f32(b_d, tl.trans(b_dh), DT)
            b_rs += _dot_f32(b_R, tl.trans(b_h), DT)
            b_dod += _dot_f32(b_do, tl.trans(b_d), DT)
            b_rd += _dot_f32(b_R, tl.trans(b_d), DT)
            b_rv += tl.sum(b_R * b_v, 1)
            b_dgain += tl.sum(b_dh * b_h, 1)
            tl.store(dv_part + ((i_b * T + row_kv[:, None]) * HS + i_h) * V + o_v[None, :], b_beta[:, None] * b_R,
                     mask=m_r[:, None] & m_v[None, :])

        b_dqg = scale * b_dqg
        b_dattn = tl.where(m_lower, scale * b_dod * b_gamma, 0.0)  # w.r.t. Q̂ K̂ᵀ
        b_dL = tl.where(m_strict, -b_rd, 0.0)
        b_dkk = b_dL * b_beta[:, None] * b_gamma  # w.r.t. K̂ K̂ᵀ
        b_dq = b_dqg * b_eG[:, None] + _dot_f32(b_dattn, b_k, DT)
        tl.store(dq_part + ((i_b * T + row_q[:, None]) * HS + i_h) * K + o_k[None, :], b_dq,
                 mask=m_r[:, None] & (o_k[None, :] < K))
        b_dk += (b_dke * b_e[:, None] + _dot_f32(tl.trans(b_dattn), b_q, DT) - (b_beta * b_eG)[:, None] * b_rs
                 + _dot_f32(b_dkk + tl.trans(b_dkk), b_k, DT))
        b_db = -b_eG * tl.sum(b_rs * b_k, 1) + b_rv + tl.sum(b_dL * b_kk * b_gamma, 1)
        tl.store(dbeta + (i_b * T + row_kv) * HS + i_h, b_db, mask=m_r)
        if USE_G:
            # Through G = cumsum(g): Γ_ij = exp(G_i - G_j), exp(G), e = exp(G_C - G) and exp(G_C).
            b_qk = _dot_f32(b_q, tl.trans(b_k), DT)
            b_dE = b_dattn * b_qk + b_dkk * b_kk
            b_dend = tl.sum(b_dke * b_k, 1) * b_e
            b_dG = (tl.sum(b_dqg * b_q - b_beta[:, None] * b_rs * b_k, 1) * b_eG - b_dend
                    + tl.sum(b_dE, 1) - tl.sum(b_dE, 0))
            b_dG += tl.where(o_t == BT - 1, tl.sum(b_dend, 0) + tl.sum(b_dgain, 0) * tl.exp(g_last), 0.0)
            b_dg = tl.sum(b_dG, 0) - tl.cumsum(b_dG, axis=0) + b_dG  # dg_i = Σ_{j >= i} dG_j
            tl.store(dg + (i_b * T + row_kv) * HS + i_h, b_dg, mask=m_r)
    tl.store(dk_part + ((i_b * T + row_kv[:, None]) * HK + i_hk) * K + o_k[None, :], b_dk,
             mask=m_r[:, None] & (o_k[None, :] < K))


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
):
    """dx[b, t, h] = l2norm_bwd(x[b, t, h], Σ_{j<G} part[b, t, h·G + j]); part [B, T, H·G, D] fp32."""
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)  # flattened b·T + t
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
        BR=BR, BD=block_k(D), USE_QK_L2NORM=use_qk_l2norm, num_warps=NUM_WARPS)


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
    dk_part = alloc(B, T, HK, K, dtype=torch.float32, device=q.device)  # [B, T, HK, K]
    dv_part = alloc(B, T, HS, V, dtype=torch.float32, device=q.device)  # [B, T, HS, V]
    if W:
        dbeta.zero_()
        if dg is not None:
            dg.zero_()
    R = q.new_empty(NS, HS, C, V, dtype=torch.float32)  # [NS, HS, C, V]
    dS_end = q.new_empty(NS, HS, K, V, dtype=torch.float32)  # [NS, HS, K, V]
    stride_g = (0, 0, 0) if g is None else g.stride()
    flags = dict(USE_G=g is not None, USE_QK_L2NORM=use_qk_l2norm, IS_VARLEN=cu_seqlens is not None)
    with _guard(q):
        if N * HS:
            chunk_state_bwd_kernel[(N * HS, triton.cdiv(V, BV))](
                q, k, grad_o, g, beta, A, grad_ht, R, dS_end, dh0, first, cu_seqlens,
                T, HS, HQ, HK, K, V, W, S,
                *q.stride()[:3], *k.stride()[:3], *grad_o.stride()[:3], *stride_g, *beta.stride(),
                scale,
                BT=C, BK=block_k(K), BV=BV, **flags, num_warps=NUM_WARPS)
        if NS * HS:
            chunk_grad_kernel[(NS, HK)](
                q, k, v, grad_o, g, beta, h_start, delta, R, dS_end, dq_part, dk_part, dv_part, dbeta, dg, slots,
                cu_seqlens,
                T, HS, HQ, HK, HV, K, V, W, S,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_o.stride()[:3], *stride_g, *beta.stride(),
                scale,
                BT=C, BK=block_k(K), BV=BV, **flags, num_warps=NUM_WARPS)
        _reduce(q, dq_part, dq, use_qk_l2norm)
        _reduce(k, dk_part, dk, use_qk_l2norm)
        _reduce(v, dv_part, dv, False)


# The two passes and the reduction in bf16 with every option on, at K = 128. The passes hold
# whole-K tiles and spill (see the module docstring): recorded, not failed.
AOT_CASES = [aot_case(chunk_state_bwd_kernel, "bf16", full=True, BT=64, BK=128, BV=BV, must_not_spill=False),
             aot_case(chunk_grad_kernel, "bf16", full=True, BT=64, BK=128, BV=BV, must_not_spill=False),
             aot_case(chunk_grad_reduce_kernel, "bf16", full=True, BR=BR, BD=128)]
