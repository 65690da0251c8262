"""Chunked delta rule backward, stage 2: every gradient of a chunk from the reverse pass's R and dS.

Three kernels, in this order (notation and formulas: ``triton_chunk_bwd.py``); all scratch is
fp32 and per state head, every sum runs in a fixed order (deterministic, no atomics):

1. ``chunk_grad_state_kernel`` (chunk x state head x K slice): the terms of dq and dk that
   read the states, products over V tiles, dq = scale · diag(exp G) dO S_0ᵀ and
   dk = diag(e) Δ dSᵀ - diag(β exp G) R S_0ᵀ, into the dq / dk scratch, and their row sums
   (for dβ and dG) per K slice.
2. ``chunk_grad_kernel`` (chunk x state head): dO Δᵀ, R Δᵀ, Q̂ K̂ᵀ and K̂ K̂ᵀ over V tiles and
   K slices; dv = diag(β) R, dβ and dg (adding 1's row sums in K-slice order); the gradients
   w.r.t. Q̂ K̂ᵀ and K̂ K̂ᵀ and the inverse norms to scratch.
3. ``chunk_grad_intra_kernel`` (chunk x state head x K slice): their terms of dq and dk,
   added to 1's.

Split so that no [C, C] tile is live while 1's three [C, BK] products accumulate, nor while 3
multiplies: as one kernel the products spill (ptxas, sm_80, bf16: 208 words at BK = 64,
BV = 32; 24 at BK = 32, BV = 16; fp32, 200 at BK = 32). The K-slice grids also give the GPU
K / BK times the programs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..scan_tiles import chunk_at, chunk_decays, crossing_sums, dot_f32, dot_in, exclusive_cumsum, rest_sums
from .triton_chunk import L2NORM_EPS, _load_gate, _load_rows, aot_case

# K slice of these kernels and V tile of every backward kernel, for every input dtype: the largest
# that compile without spills (aligned head dims) for fp32 (IEEE products on the FMA units) and
# 16-bit inputs alike on sm_80 and sm_90.
BK, BV = 32, 16
BJ = tl.constexpr(16)  # inner-dimension block of the [BT, BT] x [BT, BK] products
SUMS = tl.constexpr(4)  # row sums per chunk, state head and K slice that stage 1 hands to stage 2


@triton.jit
def chunk_grad_state_kernel(
    # pointers
    q, k, do, g, beta, h_start, delta, R, dS_end, dq_part, dk_part, sums, slots, cu_seqlens,
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
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    """dq, dk state terms of one chunk, state head and K slice into dq_part, dk_part [B, T, HS, K]
    (fp32, w.r.t. q̂, k̂); row sums with the raw q, k into sums [slots, HS, cdiv(K, BK), 4, BT]:
    Σ (R S_0ᵀ) ⊙ K, Σ scale (dO S_0ᵀ) ⊙ Q, Σ (Δ dSᵀ) ⊙ K, and Σ dS ⊙ S_0 in the last one's last
    column.
    """
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_k = tl.program_id(2)
    i_n, i_t, i_b, bos, M = chunk_at(slots, i_s, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:
        return
    i_hq = i_h // (HS // HQ)
    i_hk = i_h // (HS // HK)
    DT: tl.constexpr = q.dtype.element_ty
    i_s64 = i_s.to(tl.int64 if INT64 else tl.int32)

    o_t = tl.arange(0, BT)
    o_r = i_t * BT + o_t
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    base_h = (i_s64 * HS + i_h) * K * V
    base_d = (i_s64 * HS + i_h) * BT * V
    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)  # dO S_0ᵀ
    b_dke = tl.zeros([BT, BK], dtype=tl.float32)  # Δ dSᵀ
    b_rs = tl.zeros([BT, BK], dtype=tl.float32)  # R S_0ᵀ
    b_gain = tl.zeros([BV], dtype=tl.float32)  # Σ_k dS ⊙ S_0, per V column
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_h = m_k[:, None] & m_v[None, :]
        b_h = tl.load(h_start + base_h + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.0)
        b_dh = tl.load(dS_end + base_h + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.0)
        b_d = tl.load(delta + base_d + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_R = tl.load(R + base_d + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_do = _load_rows(do, i_b, bos + S + W, i_h, M, V, stride_dob, stride_dot, stride_doh, i_t, i_v * BV, BT, BV)
        b_dqg += dot_f32(b_do, tl.trans(b_h), DT)
        b_dke += dot_f32(b_d, tl.trans(b_dh), DT)
        b_rs += dot_f32(b_R, tl.trans(b_h), DT)
        b_gain += tl.sum(b_dh * b_h, 0)
    b_dqg = scale * b_dqg

    b_beta = _load_gate(beta, i_b, bos + S, i_h, M, stride_betab, stride_betat, stride_betah, i_t, BT)
    if USE_G:
        b_g = _load_gate(g, i_b, bos + S, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
    else:
        b_g = tl.zeros([BT], dtype=tl.float32)
    b_G = tl.cumsum(b_g, axis=0)
    b_eG = tl.exp(b_G)
    b_e = tl.exp(rest_sums(b_g))
    m_out = (o_r < M)[:, None] & m_k[None, :]
    row_kv = bos + S + o_r  # [BT], INT64-wide
    tl.store(dq_part + ((i_b * T + row_kv[:, None] + W) * HS + i_h) * K + o_k[None, :], b_dqg * b_eG[:, None],
             mask=m_out)
    tl.store(dk_part + ((i_b * T + row_kv[:, None]) * HS + i_h) * K + o_k[None, :],
             b_dke * b_e[:, None] - (b_beta * b_eG)[:, None] * b_rs, mask=m_out)

    b_q = _load_rows(q, i_b, bos + S + W, i_hq, M, K, stride_qb, stride_qt, stride_qh, i_t, i_k * BK, BT, BK)
    b_k = _load_rows(k, i_b, bos + S, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, i_k * BK, BT, BK)
    p_sums = sums + ((i_s64 * HS + i_h) * tl.num_programs(2) + i_k) * SUMS * BT + o_t
    tl.store(p_sums, tl.sum(b_rs * b_k, 1))
    tl.store(p_sums + BT, tl.sum(b_dqg * b_q, 1))
    tl.store(p_sums + 2 * BT, tl.sum(b_dke * b_k, 1))
    tl.store(p_sums + 3 * BT, tl.where(o_t == BT - 1, tl.sum(b_gain, 0), 0.0))


@triton.jit
def chunk_grad_kernel(
    # pointers
    q, k, v, do, g, beta, delta, R, sums, dv_part, dbeta, dg, dtt, norms, slots, cu_seqlens,
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
    INT64: tl.constexpr,
):
    """dv_part [B, T, HS, V], dbeta and dg [B, T, HS] of one chunk and state head (fp32); the
    gradients w.r.t. Q̂ K̂ᵀ (lower) and K̂ K̂ᵀ (symmetric) into dtt [slots, HS, 2, BT, BT] and the
    inverse norms r_q, r_k into norms [slots, HS, 2, BT], for ``chunk_grad_intra_kernel``."""
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n, i_t, i_b, bos, M = chunk_at(slots, i_s, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:
        return
    i_hq = i_h // (HS // HQ)
    i_hk = i_h // (HS // HK)
    i_hv = i_h // (HS // HV)
    DT: tl.constexpr = q.dtype.element_ty
    i_s64 = i_s.to(tl.int64 if INT64 else tl.int32)

    o_t = tl.arange(0, BT)
    o_r = i_t * BT + o_t
    m_r = o_r < M
    row_kv = bos + S + o_r  # [BT], INT64-wide

    # dO Δᵀ and R Δᵀ over V tiles, and dv = diag(β) R.
    b_beta = _load_gate(beta, i_b, bos + S, i_h, M, stride_betab, stride_betat, stride_betah, i_t, BT)
    b_dod = tl.zeros([BT, BT], dtype=tl.float32)
    b_rd = tl.zeros([BT, BT], dtype=tl.float32)
    b_rv = tl.zeros([BT], dtype=tl.float32)  # Σ_v R ⊙ V
    base_d = (i_s64 * HS + i_h) * BT * V
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_d = tl.load(delta + base_d + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_R = tl.load(R + base_d + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_do = _load_rows(do, i_b, bos + S + W, i_h, M, V, stride_dob, stride_dot, stride_doh, i_t, i_v * BV, BT, BV)
        b_v = _load_rows(v, i_b, bos + S, i_hv, M, V, stride_vb, stride_vt, stride_vh, i_t, i_v * BV, BT, BV)
        b_dod += dot_f32(b_do, tl.trans(b_d), DT)
        b_rd += dot_f32(b_R, tl.trans(b_d), DT)
        b_rv += tl.sum(b_R * b_v, 1)
        tl.store(dv_part + ((i_b * T + row_kv[:, None]) * HS + i_h) * V + o_v[None, :], b_beta[:, None] * b_R,
                 mask=m_r[:, None] & m_v[None, :])

    if USE_G:
        b_g = _load_gate(g, i_b, bos + S, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
    else:
        b_g = tl.zeros([BT], dtype=tl.float32)
    b_G, b_gamma, b_rest, g_last = chunk_decays(b_g, BT)
    b_dattn = tl.where(o_t[:, None] >= o_t[None, :], scale * b_dod * b_gamma, 0.0)  # w.r.t. Q̂ K̂ᵀ
    b_dLg = tl.where(o_t[:, None] > o_t[None, :], -b_rd * b_gamma, 0.0)  # w.r.t. K̂ K̂ᵀ: diag(β) dLg

    # Q Kᵀ and K Kᵀ over K slices from the raw inputs (exact products), the norms applied after;
    # after the V loop, so that four [BT, BT] tiles at most are live (ptxas, sm_80, bf16, odd K, V:
    # 68 words of spills with the other order).
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_sq = tl.zeros([BT], dtype=tl.float32)
    b_sk = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_q = _load_rows(q, i_b, bos + S + W, i_hq, M, K, stride_qb, stride_qt, stride_qh, i_t, i_k * BK, BT, BK)
        b_k = _load_rows(k, i_b, bos + S, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, i_k * BK, BT, BK)
        b_qk += dot_in(b_q, tl.trans(b_k), DT)
        b_kk += dot_in(b_k, tl.trans(b_k), DT)
        b_sq += tl.sum(b_q * b_q, 1)
        b_sk += tl.sum(b_k * b_k, 1)
    if USE_QK_L2NORM:
        b_rq = tl.rsqrt(b_sq + L2NORM_EPS)
        b_rk = tl.rsqrt(b_sk + L2NORM_EPS)
    else:
        b_rq = tl.full([BT], 1.0, dtype=tl.float32)
        b_rk = tl.full([BT], 1.0, dtype=tl.float32)
    b_E1 = b_dattn * b_qk * b_rq[:, None] * b_rk[None, :]
    b_E2 = b_dLg * b_kk * b_rk[:, None] * b_rk[None, :]

    # Stage 1's row sums, in K-slice order.
    b_rsk = tl.zeros([BT], dtype=tl.float32)  # Σ_k (R S_0ᵀ) ⊙ K̂
    b_dqq = tl.zeros([BT], dtype=tl.float32)  # Σ_k scale (dO S_0ᵀ) ⊙ Q̂
    b_dkek = tl.zeros([BT], dtype=tl.float32)  # Σ_k (Δ dSᵀ) ⊙ K̂
    b_gain = tl.zeros([BT], dtype=tl.float32)  # Σ dS ⊙ S_0 in the last column (0 elsewhere)
    NK = tl.cdiv(K, BK)
    p_sums = sums + (i_s64 * HS + i_h) * NK * SUMS * BT + o_t
    for i_k in range(0, NK):
        b_rsk += tl.load(p_sums + i_k * SUMS * BT)
        b_dqq += tl.load(p_sums + i_k * SUMS * BT + BT)
        b_dkek += tl.load(p_sums + i_k * SUMS * BT + 2 * BT)
        b_gain += tl.load(p_sums + i_k * SUMS * BT + 3 * BT)
    b_rsk *= b_rk
    b_dqq *= b_rq
    b_dkek *= b_rk

    b_eG = tl.exp(b_G)
    b_db = b_rv + tl.sum(b_E2, 1) - b_eG * b_rsk
    tl.store(dbeta + (i_b * T + row_kv) * HS + i_h, b_db, mask=m_r)
    if USE_G:
        # dg_k sums the terms whose decay spans step k (``scan_tiles.crossing_sums``): the pairs
        # i >= k > j through Γ_ij, the readouts i >= k of S_0 through exp(G_i), the keys j < k into
        # the end state through e_j = exp(G_C - G_j), and S_0 passed on through exp(G_C).
        b_dE = b_E1 + b_beta[:, None] * b_E2
        b_dg, _ = crossing_sums(b_dE, (b_dqq - b_beta * b_rsk) * b_eG, o_t, o_t, True)
        b_dg += exclusive_cumsum(b_dkek * tl.exp(b_rest), False) + tl.sum(b_gain, 0) * tl.exp(g_last)
        tl.store(dg + (i_b * T + row_kv) * HS + i_h, b_dg, mask=m_r)

    b_dkk = b_beta[:, None] * b_dLg
    p_tt = dtt + (i_s64 * HS + i_h) * 2 * BT * BT + o_t[:, None] * BT + o_t[None, :]
    tl.store(p_tt, b_dattn)
    tl.store(p_tt + BT * BT, b_dkk + tl.trans(b_dkk))
    p_norms = norms + (i_s64 * HS + i_h) * 2 * BT + o_t
    tl.store(p_norms, b_rq)
    tl.store(p_norms + BT, b_rk)


@triton.jit
def chunk_grad_intra_kernel(
    # pointers
    q, k, dtt, norms, dq_part, dk_part, slots, cu_seqlens,
    # sizes
    T, HS, HQ, HK, K, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    # meta
    BT: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    """dq_part += dA K̂ and dk_part += dAᵀ Q̂ + dB K̂ ([B, T, HS, K] fp32) for one chunk, state head and
    K slice, with dA, dB = dtt [slots, HS, 2, BT, BT] and r_q, r_k = norms [slots, HS, 2, BT]."""
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_k = tl.program_id(2)
    i_n, i_t, i_b, bos, M = chunk_at(slots, i_s, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:
        return
    i_hq = i_h // (HS // HQ)
    i_hk = i_h // (HS // HK)
    DT: tl.constexpr = q.dtype.element_ty
    i_s64 = i_s.to(tl.int64 if INT64 else tl.int32)

    o_t = tl.arange(0, BT)
    o_r = i_t * BT + o_t
    o_k = i_k * BK + tl.arange(0, BK)
    row_kv = bos + S + o_r  # [BT], INT64-wide
    m_out = (o_r < M)[:, None] & (o_k < K)[None, :]
    p_norms = norms + (i_s64 * HS + i_h) * 2 * BT
    p_tt = dtt + (i_s64 * HS + i_h) * 2 * BT * BT
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    # Over the inner dimension (tokens) in blocks of BJ: whole [BT, BT] operands spill (ptxas, fp32
    # inputs, FMA products: 392 / 166 words on sm_80 / sm_90 at BK = 32, 24 at BK = 16).
    for j in range(0, BT // BJ):
        o_j = j * BJ + tl.arange(0, BJ)
        b_q = _load_rows(q, i_b, bos + S + W, i_hq, M, K, stride_qb, stride_qt, stride_qh, i_t * (BT // BJ) + j,
                         i_k * BK, BJ, BK)
        b_k = _load_rows(k, i_b, bos + S, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t * (BT // BJ) + j,
                         i_k * BK, BJ, BK)
        b_q = b_q * tl.load(p_norms + o_j)[:, None]
        b_k = b_k * tl.load(p_norms + BT + o_j)[:, None]
        b_dA = tl.load(p_tt + o_t[:, None] * BT + o_j[None, :])  # [BT, BJ] columns of dA
        b_dAt = tl.load(p_tt + o_j[None, :] * BT + o_t[:, None])  # [BT, BJ] columns of dAᵀ
        b_dB = tl.load(p_tt + BT * BT + o_t[:, None] * BT + o_j[None, :])
        b_dq += dot_f32(b_dA, b_k, DT)
        b_dk += dot_f32(b_dAt, b_q, DT) + dot_f32(b_dB, b_k, DT)
    p_dq = dq_part + ((i_b * T + row_kv[:, None] + W) * HS + i_h) * K + o_k[None, :]
    tl.store(p_dq, tl.load(p_dq, mask=m_out, other=0.0) + b_dq, mask=m_out)
    p_dk = dk_part + ((i_b * T + row_kv[:, None]) * HS + i_h) * K + o_k[None, :]
    tl.store(p_dk, tl.load(p_dk, mask=m_out, other=0.0) + b_dk, mask=m_out)


def _aot_cases():
    """The three kernels in bf16 and fp32 with every option on (K and V are loop counts); the
    gradient kernel in bf16 with 64-bit offsets too."""
    cases = [aot_case(chunk_grad_kernel, "bf16", full=True, BT=64, BK=BK, BV=BV, INT64=True)]
    for dtype in ("bf16", "fp32"):
        cases += [aot_case(chunk_grad_state_kernel, dtype, full=True, BT=64, BK=BK, BV=BV),
                  aot_case(chunk_grad_kernel, dtype, full=True, BT=64, BK=BK, BV=BV),
                  aot_case(chunk_grad_intra_kernel, dtype, full=True, BT=64, BK=BK)]
    return cases


AOT_CASES = _aot_cases()
