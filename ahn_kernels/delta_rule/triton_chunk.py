"""Chunked delta rule and gated delta rule forward, in Triton (the backward is ``triton_chunk_bwd.py``).

The math of ``reference.chunked``, per chunk of C = BT memory steps of one state
head, with G the in-chunk prefix sum of g (fp32), Γ_ij = exp(G_i - G_j) (i >= j),
L = strict_lower(diag(β) K Kᵀ ⊙ Γ), A = (I + L)^-1 and S_0 the state at the chunk start:

    Δ   = A diag(β) (V - diag(exp G) K S_0)
    O   = scale · (diag(exp G) Q S_0 + (Q Kᵀ ⊙ Γ) Δ)
    S_C = exp(G_C) S_0 + (diag(exp(G_C - G)) K)ᵀ Δ

Three stages, each a kernel:
1. ``chunk_ut_kernel`` (chunk x k head): K Kᵀ once per k head (AHN's grouped k/v and
   fla's grouped values both share k over several state heads), then per state head
   of the group the gate prefix sums and A (16 x 16 blocks), fp32, to scratch.
2. ``chunk_state_kernel`` (sequence x state head x V tile): the sequential pass over
   the sequence's chunks with the fp32 state; stores S_0 and Δ per chunk.
3. ``chunk_out_kernel`` (chunk x state head x V tile): the readout, both terms.

Chunks are numbered per sequence into "slots" (``chunk_slots``): slot-indexed
scratch (A, S_0, Δ) needs no token arithmetic. Varlen and ``lag=(W, S)`` are index
arithmetic on the full-length inputs: memory step i of a sequence starting at
``bos`` absorbs row ``bos + S + i`` and is read by row ``bos + S + W + i``; rows
without memory are zeroed by the launcher (only under lag). Padded steps past a
sequence's end load β = g = 0 and k = v = q = 0, which changes nothing.

Precision: gates, prefix sums, A, S_0, Δ and every accumulator are fp32. ``tl.dot``
multiplies raw 16-bit inputs as they are (q Kᵀ, K Kᵀ: exact products, the l2 norms
applied after as row / column scales) and computed fp32 tiles (S_0, Δ, A) in tf32;
for fp32 inputs every product is IEEE fp32 (tf32 would miss the 1e-5 bar). The UT
inverse is tf32 plus, for fp32 inputs, one IEEE Newton step.

Tiles for H100/H200, untuned (no GPU was available to measure): BT = C (64 by
default); K in slices of 64 (32 for fp32 inputs: IEEE products run on the FMA
units); V tiles of 32 in the state pass and 64 in the readout (16 and 16 for fp32);
8 warps. The state pass keeps S in h_start (L2) rather than in registers, read and
written per K slice, so no variant holds a whole [K, BV] state. The diagonal blocks of
the UT inverse take a 15-step row loop of [C, C] products (fla inverts 16 x 16 blocks
by substitution on the small tiles: a candidate once it can be measured).

Registers and spills (ptxas via ``python -m ahn_kernels.triton_aot``, sm_80 / sm_90, every
option on): bf16 UT 209 / 211, state pass 176 / 217, readout 209 / 212, no spills, at
any K (the slices make K a loop count); fp16 alike; fp32 state pass 223 / 203,
readout 128 / 124, no spills. The one spill: the fp32 UT stage at C = 64 (114 / 160
words, its Newton step), which runs once per chunk off the sequential path.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..triton_aot import AOTCase

NUM_WARPS = 8
MIN_BK = 16  # tl.dot needs tiles of at least 16
# (K slice of the forward's products, V tile of the state pass, V tile of the readout) per input
# dtype: fp32 inputs multiply in IEEE fp32 on the FMA units, which needs smaller tiles to fit.
TILES = {torch.float32: (32, 16, 16), torch.float16: (64, 32, 64), torch.bfloat16: (64, 32, 64)}
L2NORM_EPS = tl.constexpr(1e-6)
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot_in(a, b, DT: tl.constexpr):
    """a @ b of raw input tiles (values of dtype DT held in fp32), fp32 accumulation.

    16-bit operands go to the tensor cores as they are: their products are exact in fp32.
    """
    if DT == tl.float32:
        return _dot_f32(a, b, DT)
    elif INTERPRETED:
        # Triton 3.9's interpreter multiplies bf16 tiles wrongly (measured: an error of 2e10 on
        # a 16 x 16 product of N(0, 1) entries); the fp32 values are the same numbers.
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _dot_tf32(a, b):
    """a @ b in tf32 on the tensor cores; the interpreter, which has no tf32, truncates the
    operands to its 10 mantissa bits (at least the hardware's rounding error) and multiplies in fp32."""
    if INTERPRETED:
        a = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        b = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _dot_f32(a, b, DT: tl.constexpr):
    """a @ b of computed fp32 tiles (states, Δ, A): IEEE fp32 for fp32 inputs, tf32 for 16-bit ones.

    Rounding them to bf16 instead costs 4x the bf16 output bar (measured 1.2e-2 vs 3e-3 relative
    RMSE of o at T = 130, K = 60, V = 100). tf32x3 would be fp32-like on the tensor cores but
    spills (ptxas, sm_90: 1,642 words for one [32, 256] x [256, 32] product; IEEE: none).
    """
    if DT == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return _dot_tf32(a, b)


@triton.jit
def _sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN: tl.constexpr):
    """(batch index, first row, memory steps) of sequence i_n, int64 (B·T·H·D may pass 2^31)."""
    if IS_VARLEN:
        i_b = tl.zeros([], dtype=tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        n_rows = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        i_b = i_n.to(tl.int64)
        bos = tl.zeros([], dtype=tl.int64)
        n_rows = tl.zeros([], dtype=tl.int64) + T
    return i_b, bos, tl.maximum(n_rows - W - S, 0)


@triton.jit
def _load_rows(x, i_b, row0, i_h, M, D, stride_b, stride_t, stride_h, i_t, col0,
               BT: tl.constexpr, BD: tl.constexpr):
    """fp32 [BT, BD] tile of x[i_b, row0 + i_t·BT + r, i_h, col0 + c], zero past M rows / D columns."""
    o_r = i_t * BT + tl.arange(0, BT)
    o_c = col0 + tl.arange(0, BD)
    p = x + i_b * stride_b + (row0 + o_r[:, None]) * stride_t + i_h * stride_h + o_c[None, :]
    return tl.load(p, mask=(o_r[:, None] < M) & (o_c[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _load_gate(x, i_b, row0, i_h, M, stride_b, stride_t, stride_h, i_t, BT: tl.constexpr):
    """fp32 [BT] of x[i_b, row0 + i_t·BT + r, i_h], zero past M rows."""
    o_r = i_t * BT + tl.arange(0, BT)
    return tl.load(x + i_b * stride_b + (row0 + o_r) * stride_t + i_h * stride_h, mask=o_r < M, other=0.0)


@triton.jit
def _inv_norm(b_x, USE_QK_L2NORM: tl.constexpr):
    """[BT] 1 / ‖x_t‖ (eps 1e-6) of the rows of b_x, or ones without the in-kernel l2 norm."""
    if USE_QK_L2NORM:
        return tl.rsqrt(tl.sum(b_x * b_x, 1) + L2NORM_EPS)
    else:
        return tl.full([b_x.shape[0]], 1.0, dtype=tl.float32)


@triton.jit
def _l2norm_rows(b_x, USE_QK_L2NORM: tl.constexpr):
    if USE_QK_L2NORM:
        b_x = b_x * _inv_norm(b_x, USE_QK_L2NORM)[:, None]
    return b_x


@triton.jit
def _decays(b_g, BT: tl.constexpr):
    """From g [BT]: G (in-chunk prefix sum), Γ [BT, BT] (0 above the diagonal), G_C.

    exp of a difference <= 0 only: strong decays underflow to 0, never 0·inf.
    """
    b_G = tl.cumsum(b_g, axis=0)
    o_t = tl.arange(0, BT)
    b_gamma = tl.exp(tl.where(o_t[:, None] >= o_t[None, :], b_G[:, None] - b_G[None, :], float("-inf")))
    return b_G, b_gamma, tl.sum(b_g, axis=0)


@triton.jit
def _unit_lower_inverse(b_L, BT: tl.constexpr, DT: tl.constexpr):
    """(I + L)^-1 for strictly lower L [BT, BT], fp32, in 16 x 16 blocks.

    The diagonal blocks by forward substitution, all blocks at once, one row each step:
    D_r = e_r - Σ_{j<r} L_rj D_j within the block. Then with N = D L_off (L_off: the
    blocks below the diagonal; N is strictly block-lower, so N^4 = 0 for BT <= 64),
    (I + L)^-1 = (I + N)^-1 D = (I - N)(I + N²) D: no truncation, only products
    that block forward substitution forms too. Products in tf32; for fp32 inputs one
    Newton step in IEEE fp32, X += X (I - (I + L) X), squares tf32's error (IEEE products
    throughout spill: ptxas, sm_90, 324 words).
    """
    o_t = tl.arange(0, BT)
    m_diag = (o_t[:, None] // 16) == (o_t[None, :] // 16)
    b_Ld = tl.where(m_diag, b_L, 0.0)
    b_I = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    b_D = b_I
    for i in range(1, 16):  # rows of D before row r are final when r is updated
        b_D = tl.where((o_t % 16 == i)[:, None], b_I - _dot_tf32(b_Ld, b_D), b_D)
    if BT > 16:
        b_N = _dot_tf32(b_D, tl.where(m_diag, 0.0, b_L))
        b_N2D = b_D + _dot_tf32(_dot_tf32(b_N, b_N), b_D)
        b_D = b_N2D - _dot_tf32(b_N, b_N2D)
    if DT == tl.float32:
        b_R = b_I - b_D - tl.dot(b_L, b_D, input_precision="ieee")
        b_D = b_D + tl.dot(b_D, b_R, input_precision="ieee")
    return b_D


@triton.jit
def chunk_ut_kernel(
    # pointers
    k, g, beta, A, slots, cu_seqlens,
    # sizes
    T, HS, HK, K, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_kb, stride_kt, stride_kh,
    stride_gb, stride_gt, stride_gh,
    stride_betab, stride_betat, stride_betah,
    # meta
    BT: tl.constexpr,
    BK: tl.constexpr,
    USE_G: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """A = (I + strict_lower(diag(β) K Kᵀ ⊙ Γ))^-1 per chunk and state head, fp32, into A [slots, HS, BT, BT]."""
    i_s = tl.program_id(0)
    i_hk = tl.program_id(1)
    i_n = tl.load(slots + 2 * i_s)
    if i_n < 0:  # slot past the last chunk (the grid is an upper bound under varlen)
        return
    i_t = tl.load(slots + 2 * i_s + 1)
    i_b, bos, M = _sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN)
    row_kv = bos + S
    DT: tl.constexpr = k.dtype.element_ty

    # K Kᵀ over K slices, with the squared row norms for the in-kernel l2 norm.
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_ss = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_k = _load_rows(k, i_b, row_kv, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, i_k * BK, BT, BK)
        b_kk += _dot_in(b_k, tl.trans(b_k), DT)
        b_ss += tl.sum(b_k * b_k, 1)
    if USE_QK_L2NORM:
        b_r = tl.rsqrt(b_ss + L2NORM_EPS)
        b_kk = b_kk * b_r[:, None] * b_r[None, :]

    o_t = tl.arange(0, BT)
    m_strict = o_t[:, None] > o_t[None, :]
    G_K = HS // HK
    for i_g in range(0, G_K):
        i_h = i_hk * G_K + i_g
        b_beta = _load_gate(beta, i_b, row_kv, i_h, M, stride_betab, stride_betat, stride_betah, i_t, BT)
        if USE_G:
            b_g = _load_gate(g, i_b, row_kv, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
        else:
            b_g = tl.zeros([BT], dtype=tl.float32)
        _, b_gamma, _ = _decays(b_g, BT)
        b_L = tl.where(m_strict, b_beta[:, None] * b_kk * b_gamma, 0.0)
        b_A = _unit_lower_inverse(b_L, BT, DT)
        p_A = A + (i_s.to(tl.int64) * HS + i_h) * BT * BT
        tl.store(p_A + o_t[:, None] * BT + o_t[None, :], b_A)


@triton.jit
def chunk_state_kernel(
    # pointers
    k, v, g, beta, A, h0, h_start, delta, ht, first_slot, cu_seqlens,
    # sizes
    T, HS, HK, HV, K, V, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_betab, stride_betat, stride_betah,
    # meta
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The chunks of one sequence in order: S_0 -> h_start, Δ -> delta (both [slots, HS, ., V]), final state -> ht.

    The state lives in h_start (each chunk's S_0 is stored anyway, and stays in L2), read and
    written in [BK, BV] slices: a whole [K, BV] fp32 state and a [BT, K] key tile in registers
    spill at K >= 128 (ptxas, sm_90: 40 words at K = 128, 166 at K = 256).
    """
    # Axis 0 carries N·HS, which may pass 65,535 (the limit of axes 1 and 2).
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // HS
    i_h = i_nh % HS
    i_b, bos, M = _sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN)
    row_kv = bos + S
    i_hk = i_h // (HS // HK)
    i_hv = i_h // (HS // HV)
    DT: tl.constexpr = k.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    NT = tl.cdiv(M, BT)
    first = tl.load(first_slot + i_n).to(tl.int64)
    p_h = h_start + (first * HS + i_h) * K * V  # S_0 of the current chunk
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_h = (o_k[:, None] < K) & m_v[None, :]
        off_h = o_k[:, None] * V + o_v[None, :]
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + off_h, mask=m_h, other=0.0)
        # A sequence without chunks owns no slot: its first slot is the next sequence's.
        tl.store(p_h + off_h, b_h, mask=(o_k[:, None] < tl.where(NT > 0, K, 0)) & m_v[None, :])
        if STORE_HT:
            tl.store(ht + i_nh.to(tl.int64) * K * V + off_h, b_h, mask=(o_k[:, None] < tl.where(NT == 0, K, 0)) & m_v[None, :])

    for i_t in range(0, NT):
        tl.debug_barrier()  # this chunk's S_0, written by other threads, is visible
        # K S_0 and the squared key norms, over K slices.
        b_ks = tl.zeros([BT, BV], dtype=tl.float32)
        b_ss = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_k = _load_rows(k, i_b, row_kv, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, i_k * BK, BT, BK)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0.0)
            b_ks += _dot_f32(b_k, b_h, DT)
            b_ss += tl.sum(b_k * b_k, 1)
        if USE_QK_L2NORM:
            b_r = tl.rsqrt(b_ss + L2NORM_EPS)
        else:
            b_r = tl.full([BT], 1.0, dtype=tl.float32)
        b_v = _load_rows(v, i_b, row_kv, i_hv, M, V, stride_vb, stride_vt, stride_vh, i_t, i_v * BV, BT, BV)
        b_beta = _load_gate(beta, i_b, row_kv, i_h, M, stride_betab, stride_betat, stride_betah, i_t, BT)
        if USE_G:
            b_g = _load_gate(g, i_b, row_kv, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
        else:
            b_g = tl.zeros([BT], dtype=tl.float32)
        b_G = tl.cumsum(b_g, axis=0)
        g_last = tl.sum(b_g, axis=0)
        i_s = first + i_t
        b_A = tl.load(A + (i_s * HS + i_h) * BT * BT + o_t[:, None] * BT + o_t[None, :])
        b_rhs = b_beta[:, None] * (b_v - (b_r * tl.exp(b_G))[:, None] * b_ks)
        b_d = _dot_f32(b_A, b_rhs, DT)
        tl.store(delta + (i_s * HS + i_h) * BT * V + o_t[:, None] * V + o_v[None, :], b_d, mask=m_v[None, :])
        # S_C = exp(G_C) S_0 + (diag(r e) K)ᵀ Δ into the next chunk's S_0, or ht after the last chunk.
        b_ke = b_r * tl.exp(g_last - b_G)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_h = (o_k[:, None] < K) & m_v[None, :]
            off_h = o_k[:, None] * V + o_v[None, :]
            b_k = _load_rows(k, i_b, row_kv, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, i_k * BK, BT, BK)
            b_h = tl.exp(g_last) * tl.load(p_h + off_h, mask=m_h, other=0.0)
            b_h += _dot_f32(tl.trans(b_k * b_ke[:, None]), b_d, DT)
            tl.store(p_h + HS * K * V + off_h, b_h, mask=(o_k[:, None] < tl.where(i_t < NT - 1, K, 0)) & m_v[None, :])
            if STORE_HT:
                tl.store(ht + i_nh.to(tl.int64) * K * V + off_h, b_h, mask=(o_k[:, None] < tl.where(i_t == NT - 1, K, 0)) & m_v[None, :])
        p_h += HS * K * V


@triton.jit
def chunk_out_kernel(
    # pointers
    q, k, g, h_start, delta, o, slots, cu_seqlens,
    # sizes
    T, HS, HQ, HK, K, V, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_gb, stride_gt, stride_gh,
    # meta
    scale,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """o = scale · (diag(exp G) Q S_0 + (Q Kᵀ ⊙ Γ) Δ) for one chunk, state head and V tile; o [B, T, HS, V]."""
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    i_n = tl.load(slots + 2 * i_s)
    if i_n < 0:
        return
    i_t = tl.load(slots + 2 * i_s + 1)
    i_b, bos, M = _sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN)
    i_hq = i_h // (HS // HQ)
    i_hk = i_h // (HS // HK)
    DT: tl.constexpr = q.dtype.element_ty

    if USE_G:
        b_g = _load_gate(g, i_b, bos + S, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
    else:
        b_g = tl.zeros([BT], dtype=tl.float32)
    b_G, b_gamma, _ = _decays(b_g, BT)

    i_s64 = i_s.to(tl.int64)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # Q Kᵀ from the raw inputs (exact products) and Q S_0, over K slices; the norms applied after.
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    b_qh = tl.zeros([BT, BV], dtype=tl.float32)
    b_sq = tl.zeros([BT], dtype=tl.float32)
    b_sk = tl.zeros([BT], dtype=tl.float32)
    p_h = h_start + (i_s64 * HS + i_h) * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_q = _load_rows(q, i_b, bos + S + W, i_hq, M, K, stride_qb, stride_qt, stride_qh, i_t, i_k * BK, BT, BK)
        b_k = _load_rows(k, i_b, bos + S, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, i_k * BK, BT, BK)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0.0)
        b_qk += _dot_in(b_q, tl.trans(b_k), DT)
        b_qh += _dot_f32(b_q, b_h, DT)
        b_sq += tl.sum(b_q * b_q, 1)
        b_sk += tl.sum(b_k * b_k, 1)
    if USE_QK_L2NORM:
        b_rq = tl.rsqrt(b_sq + L2NORM_EPS)
        b_qk = b_qk * b_rq[:, None] * tl.rsqrt(b_sk + L2NORM_EPS)[None, :]
    else:
        b_rq = tl.full([BT], 1.0, dtype=tl.float32)
    b_d = tl.load(delta + (i_s64 * HS + i_h) * BT * V + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
    b_o = scale * ((b_rq * tl.exp(b_G))[:, None] * b_qh + _dot_f32(b_qk * b_gamma, b_d, DT))
    o_r = i_t * BT + o_t
    p_o = o + ((i_b * T + bos + S + W + o_r[:, None]) * HS + i_h) * V + o_v[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=(o_r[:, None] < M) & m_v[None, :])  # the one downcast of o


def block_k(K: int) -> int:
    return max(MIN_BK, triton.next_power_of_2(K))


def chunk_slots(cu_seqlens, B: int, T: int, C: int, W: int, S: int, device):
    """Number the chunks of every sequence, on the device (no host sync).

    Returns ``(slots, first_slot)``: slots [NS, 2] int32 holds (sequence, chunk in sequence)
    per slot, (-1, 0) past the last one; first_slot [N] int32 is each sequence's first slot.
    NS is exact for equal-length batches and the bound cdiv(T, C) + N under varlen.
    """
    if cu_seqlens is None:
        steps = torch.full((B,), max(T - W - S, 0), dtype=torch.int64, device=device)  # [N]
        n_slots = B * triton.cdiv(max(T - W - S, 0), C)
    else:
        steps = (cu_seqlens[1:] - cu_seqlens[:-1] - W - S).clamp(min=0)  # [N]
        n_slots = triton.cdiv(T, C) + steps.shape[0]
    chunks = (steps + C - 1) // C  # [N]
    ends = chunks.cumsum(0)  # [N]
    slot = torch.arange(n_slots, device=device)  # [NS]
    seq = torch.searchsorted(ends, slot, right=True)  # [NS]
    valid = seq < steps.shape[0]
    seq = seq.clamp(max=max(steps.shape[0] - 1, 0))
    table = torch.stack([torch.where(valid, seq, -1), torch.where(valid, slot - (ends - chunks)[seq], 0)], 1)
    return table.to(torch.int32).contiguous(), (ends - chunks).to(torch.int32)


def _guard(x):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def chunk_fwd_states(q, k, v, g, beta, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks,
                     final_state):
    """Stages 1 and 2: (slots, first_slot, A, h_start, delta); writes final_state if given.

    slots [NS, 2] and first_slot [N] int32 as ``chunk_slots``; A [NS, HS, C, C], h_start [NS, HS, K, V], delta [NS, HS, C, V], all fp32.
    """
    B, T, HQ, K = q.shape
    HK, HV, V = k.shape[2], v.shape[2], v.shape[3]
    HS = beta.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    C, W, S = chunk_size, lag_window, lag_sinks
    slots, first = chunk_slots(cu_seqlens, B, T, C, W, S, q.device)
    NS = slots.shape[0]
    A = q.new_empty(NS, HS, C, C, dtype=torch.float32)  # [NS, HS, C, C]
    h_start = q.new_empty(NS, HS, K, V, dtype=torch.float32)  # [NS, HS, K, V]
    delta = q.new_empty(NS, HS, C, V, dtype=torch.float32)  # [NS, HS, C, V]
    stride_g = (0, 0, 0) if g is None else g.stride()
    flags = dict(USE_G=g is not None, USE_QK_L2NORM=use_qk_l2norm, IS_VARLEN=cu_seqlens is not None)
    bk, bv, _ = TILES[q.dtype]
    BK = min(bk, block_k(K))
    with _guard(q):
        if NS * HS:
            chunk_ut_kernel[(NS, HK)](
                k, g, beta, A, slots, cu_seqlens,
                T, HS, HK, K, W, S,
                *k.stride()[:3], *stride_g, *beta.stride(),
                BT=C, BK=BK, **flags, num_warps=NUM_WARPS)
        if N * HS:
            chunk_state_kernel[(N * HS, triton.cdiv(V, bv))](
                k, v, g, beta, A, initial_state, h_start, delta, final_state, first, cu_seqlens,
                T, HS, HK, HV, K, V, W, S,
                *k.stride()[:3], *v.stride()[:3], *stride_g, *beta.stride(),
                BT=C, BK=BK, BV=bv, USE_H0=initial_state is not None,
                STORE_HT=final_state is not None, **flags, num_warps=NUM_WARPS)
    return slots, first, A, h_start, delta


def chunk_fwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks,
              o, final_state) -> None:
    """Run the chunked (gated) delta rule forward, writing ``o`` and ``final_state`` in place.

    Arguments are validated by the op; the kernels assume them valid.

    Args:
        q: ``[B, T, HQ, K]``; k: ``[B, T, HK, K]``; v: ``[B, T, HV, V]``: fp32/fp16/bf16, last dim
            contiguous, any other strides.
        g: ``None`` (DeltaNet) or fp32 ``[B, T, HS]`` log-decay; beta: fp32 ``[B, T, HS]``; any strides.
        scale: readout scale.
        initial_state: ``None`` or fp32 contiguous ``[N, HS, K, V]``.
        cu_seqlens: ``None`` or int64 ``[N + 1]``; then ``B == 1``.
        use_qk_l2norm: normalise q and k per token (eps 1e-6) inside the kernels.
        chunk_size: C in {16, 32, 64}; lag_window, lag_sinks: W, S (0, 0 without lag).
        o: preallocated contiguous ``[B, T, HS, V]`` in q's dtype.
        final_state: preallocated fp32 contiguous ``[N, HS, K, V]``.
    """
    B, T, HQ, K = q.shape
    HK, V, HS = k.shape[2], v.shape[3], beta.shape[-1]
    if lag_window:  # rows t - W < S read no memory; no chunk covers them
        o.zero_()
    slots, _, _, h_start, delta = chunk_fwd_states(q, k, v, g, beta, initial_state, cu_seqlens, use_qk_l2norm,
                                                chunk_size, lag_window, lag_sinks, final_state)
    NS = slots.shape[0]
    if NS * HS == 0:
        return
    stride_g = (0, 0, 0) if g is None else g.stride()
    bk, _, bv = TILES[q.dtype]
    with _guard(q):
        chunk_out_kernel[(NS, HS, triton.cdiv(V, bv))](
            q, k, g, h_start, delta, o, slots, cu_seqlens,
            T, HS, HQ, HK, K, V, lag_window, lag_sinks,
            *q.stride()[:3], *k.stride()[:3], *stride_g,
            scale,
            BT=chunk_size, BK=min(bk, block_k(K)), BV=bv, USE_G=g is not None, USE_QK_L2NORM=use_qk_l2norm,
            IS_VARLEN=cu_seqlens is not None, num_warps=NUM_WARPS)


_SIZES = {"T", "HS", "HQ", "HK", "HV", "K", "V", "W", "S", "H", "G", "D", "n_rows"}
_INPUT_DTYPE = {"q", "k", "v", "o", "do", "x", "dx"}  # pointers in the activation dtype; others fp32 but below
_INT32 = {"slots", "first_slot"}


def aot_case(kernel, dtype: str, *, full: bool, aligned: bool = True, must_not_spill: bool = True,
             **constexprs) -> AOTCase:
    """One compiled variant of a kernel of this stem as its launcher specialises it.

    ``full`` turns gating, l2 norm, h0, the final state and varlen on together (else all off,
    with the optional pointers absent). ``aligned``: head dims multiples of 16 with contiguous
    gates (every pointer, K, V and the q/k/v strides divisible by 16, unit gate head strides);
    otherwise only the pointers are aligned, as for K = V = 60.
    """
    flags = {"USE_G": full, "USE_QK_L2NORM": full, "USE_H0": full, "STORE_HT": full, "IS_VARLEN": full}
    absent = set() if full else {"g", "h0", "ht", "cu_seqlens"}
    types, cx, divisible = {}, {}, []
    for name in kernel.arg_names:
        if name in constexprs:
            cx[name] = constexprs[name]
        elif name in flags:
            cx[name] = flags[name]
        elif name in absent:
            cx[name] = None
        elif aligned and name in ("stride_betah", "stride_gh"):
            cx[name] = 1  # contiguous [B, T, HS] gates: Triton's launcher makes the unit stride a constant
        elif name.startswith("stride_") or name in _SIZES:
            types[name] = "i32"
            gate_stride = name.startswith(("stride_g", "stride_beta"))
            if (aligned and not gate_stride and name not in ("T", "W", "S", "n_rows")) or (
                    not full and name.startswith("stride_g")):  # the launcher passes 0 for g's strides
                divisible.append(name)
        elif name == "scale":
            types[name] = "fp32"
        else:
            types[name] = ("*i64" if name == "cu_seqlens" else "*i32" if name in _INT32 else
                           f"*{dtype}" if name in _INPUT_DTYPE else "*fp32")
            divisible.append(name)
    label = f"{dtype}{' all-options' if full else ''}{', K,V%16' if aligned else ', odd K,V'}"
    return AOTCase(label, kernel, types, cx, NUM_WARPS, divisible=tuple(divisible), must_not_spill=must_not_spill)


def _aot_cases():
    """Each stage in bf16 with every option on (the tiles of K >= 64; K is a loop count) and in
    fp32 (its smaller tiles); few cases, since CI compiles each for two capabilities."""
    cases = []
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        bk, bv_state, bv_out = TILES[torch_dtype]
        # fp32 at C = 64: the Newton step's two IEEE [64, 64] products spill (ptxas: ~150 words);
        # the UT stage is one pass over the inputs, off the sequential path.
        cases += [aot_case(chunk_ut_kernel, dtype, full=True, BT=64, BK=bk, must_not_spill=dtype != "fp32"),
                  aot_case(chunk_state_kernel, dtype, full=True, BT=64, BK=bk, BV=bv_state),
                  aot_case(chunk_out_kernel, dtype, full=True, BT=64, BK=bk, BV=bv_out)]
    return cases


AOT_CASES = _aot_cases()
