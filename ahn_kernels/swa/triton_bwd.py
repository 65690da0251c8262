"""Sliding-window attention with sinks, backward in Triton (flash-attention-2 style, from the saved lse).

With s the scaled scores and P = exp(s - lse) recomputed per tile:
dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - delta), dK = scale dSᵀ Q, dQ = scale dS K,
where delta = rowsum(dO ∘ O) - dlse folds the lse gradient in. Three kernels,
none with atomics, so the result is deterministic:

- ``swa_bwd_preprocess_kernel``: delta [B, HQ, T] fp32, one program per BR rows.
- ``swa_bwd_dkdv_kernel``: one program per key block of BN keys, KV head and
  sequence; it holds k, v, dk, dv and visits the query tiles that can see its
  keys: all later queries if the block holds a sink, else queries up to
  ``j1 - 1 + W``. Its tiles pack the G query heads of the KV head (as the
  forward), so the sum over the group happens inside the products.
- ``swa_bwd_dq_kernel``: one program per query tile, visiting the same key
  blocks as the forward (sinks left of the span, then the span).

Tiles for H100/H200, not measured (no GPU was available to tune); ``BWD_TILES`` by BD
and element size, both kernels alike. ptxas (sm_80 / sm_90), bf16: dk/dv 191 / 188
registers at D = 128 with G = 8 packed (BM = 32 rows, BN = 64 keys, 8 warps), 187 / 192 at
D = 256 (32 x 32); dq 126 / 128 and, at D = 256, 128 registers with 2 / 4 words spilled.
fp32 (tf32x3 products, as the forward) spills: at D = 100, G = 2 (BM = BN = 32), 90 / 70
words for dk/dv and 90 / 40 for dq, so AOT_CASES leave it out; tuning it on a GPU is
open. bf16/fp16 products round P and dS to the input dtype, as flash-attention does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._index import needs_int64
from ..triton_aot import AOTCase
from .triton_fwd import (
    ESIZE,
    LOG2E,
    aot_case,
    block_d,
    device_guard,
    dot,
    locate,
    query_blocks,
    query_rows,
    visible,
    window_arg,
)

BR = 64  # rows of the preprocess kernel


# (max(BD, 64), bytes per input element) -> (BM query rows, BN keys, num_warps) of both gradient
# kernels, sized by compiling AOT_CASES for sm_80 and sm_90 (module docstring).
BWD_TILES = {(64, 2): (64, 64, 8), (128, 2): (32, 64, 8), (256, 2): (32, 32, 8),
             (64, 4): (32, 64, 4), (128, 4): (32, 32, 8), (256, 4): (16, 32, 8)}


def bwd_config(D: int, G: int, esize: int) -> tuple[int, int, int, int]:
    """(BT query tokens, GP heads per row group, BN keys, num_warps) of both gradient kernels."""
    GP = triton.next_power_of_2(G)
    BM, BN, num_warps = BWD_TILES[max(64, block_d(D)), esize]
    BM = max(BM, GP)
    return BM // GP, GP, BN, num_warps


@triton.jit
def swa_bwd_preprocess_kernel(
    o, do, dlse, delta,
    ROWS, T, HQ, D,
    stride_dob, stride_dot, stride_doh,
    BR: tl.constexpr,
    BD: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    INT64: tl.constexpr,
):
    """delta[b, h, t] = Σ_d dO·O - dlse over rows (b, t, h) of [B, T, HQ]."""
    rows = tl.program_id(0).to(tl.int64 if INT64 else tl.int32) * BR + tl.arange(0, BR)
    m_r = rows < ROWS
    i_h = rows % HQ
    i_t = (rows // HQ) % T
    i_b = rows // HQ // T
    o_d = tl.arange(0, BD)
    m = m_r[:, None] & (o_d < D)[None, :]
    b_o = tl.load(o + rows[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    p_do = do + i_b * stride_dob + i_t * stride_dot + i_h * stride_doh
    b_do = tl.load(p_do[:, None] + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    p_delta = (i_b * HQ + i_h) * T + i_t
    if HAS_DLSE:
        b_delta -= tl.load(dlse + p_delta, mask=m_r, other=0.0)
    tl.store(delta + p_delta, b_delta, mask=m_r)


@triton.jit
def _load_rows(q, do, lse, delta, i_b, bos, r_t, r_h, m_r, o_d, m_d, T, HQ,
               stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh):
    """q, dO [rows, BD] and lse (in log2 units), delta [rows] of a packed query tile; 0 on invalid rows."""
    m = m_r[:, None] & m_d[None, :]
    p_q = q + i_b * stride_qb + (bos + r_t) * stride_qt + r_h * stride_qh
    p_do = do + i_b * stride_dob + (bos + r_t) * stride_dot + r_h * stride_doh
    b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m, other=0.0)
    b_do = tl.load(p_do[:, None] + o_d[None, :], mask=m, other=0.0)
    p_l = (i_b * HQ + r_h) * T + bos + r_t
    b_lse = tl.load(lse + p_l, mask=m_r, other=0.0) * LOG2E
    b_delta = tl.load(delta + p_l, mask=m_r, other=0.0)
    return b_q, b_do, b_lse, b_delta


@triton.jit
def swa_bwd_dkdv_kernel(
    # pointers
    q, k, v, do, lse, delta, dk, dv, cu_seqlens, blocks,
    # sizes
    T, HQ, HK, D, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    # meta
    scale,
    BT: tl.constexpr,
    GP: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    i_hk = tl.program_id(0) % HK
    i_b, bos, T_seq, i_j = locate(tl.program_id(0) // HK, cu_seqlens, blocks, T, BN, IS_VARLEN, INT64)
    if i_j < 0:
        return
    G = HQ // HK
    j0 = i_j * BN
    j1 = tl.minimum(j0 + BN, T_seq)
    o_j = j0 + tl.arange(0, BN)
    m_j = o_j < j1
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_kv = m_j[:, None] & m_d[None, :]
    p_k = k + i_b * stride_kb + (bos + o_j[:, None]) * stride_kt + i_hk * stride_kh + o_d[None, :]
    p_v = v + i_b * stride_vb + (bos + o_j[:, None]) * stride_vt + i_hk * stride_vh + o_d[None, :]
    b_k = tl.load(p_k, mask=m_kv, other=0.0)  # [BN, BD]
    b_v = tl.load(p_v, mask=m_kv, other=0.0)  # [BN, BD]
    qk_scale = scale * LOG2E
    b_dk = tl.zeros([BN, BD], tl.float32)
    b_dv = tl.zeros([BN, BD], tl.float32)

    # Queries that see a key of [j0, j1): all later ones if the block holds a sink, else up to j1 - 1 + W.
    q_hi = tl.where(j0 < S, T_seq, tl.minimum(T_seq, j1 - 1 + W))
    for i0 in range(j0, q_hi, BT):
        r_t, r_h, m_r = query_rows(i0, i_hk, G, T_seq, BT, GP)
        b_q, b_do, b_lse, b_delta = _load_rows(q, do, lse, delta, i_b, bos, r_t, r_h, m_r, o_d, m_d, T, HQ,
                                               stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh)
        # Transposed tiles [BN, rows]: the products below then need no transpose of their results.
        b_st = dot(b_k, tl.trans(b_q)) * qk_scale
        m_vis = visible(r_t[None, :], o_j[:, None], j1, W, S) & m_r[None, :]
        b_pt = tl.where(m_vis, tl.exp2(b_st - b_lse[None, :]), 0.0)
        b_dv += dot(b_pt.to(b_do.dtype), b_do)
        b_dpt = dot(b_v, tl.trans(b_do))
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += dot(b_dst.to(b_q.dtype), b_q)

    p_out = ((i_b * T + bos + o_j[:, None]) * HK + i_hk) * D + o_d[None, :]
    tl.store(dk + p_out, (b_dk * scale).to(dk.dtype.element_ty), mask=m_kv)
    tl.store(dv + p_out, b_dv.to(dv.dtype.element_ty), mask=m_kv)


@triton.jit
def _dq_block(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, r_t, o_d, m_d, j0, j_end, W, S, stride_kt, stride_vt,
              qk_scale, BN: tl.constexpr):
    """dS K of one key block [j0, j0 + BN) ∩ [0, j_end) into dq (unscaled)."""
    o_j = j0 + tl.arange(0, BN)
    m_kv = o_j[:, None] < j_end
    m_kv = m_kv & m_d[None, :]
    b_k = tl.load(p_k + o_j[:, None] * stride_kt + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    b_v = tl.load(p_v + o_j[:, None] * stride_vt + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    b_s = dot(b_q, tl.trans(b_k)) * qk_scale
    b_p = tl.where(visible(r_t[:, None], o_j[None, :], j_end, W, S), tl.exp2(b_s - b_lse[:, None]), 0.0)
    b_dp = dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + dot(b_ds.to(b_k.dtype), b_k)


@triton.jit
def swa_bwd_dq_kernel(
    # pointers
    q, k, v, do, lse, delta, dq, cu_seqlens, blocks,
    # sizes
    T, HQ, HK, D, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    # meta
    scale,
    BT: tl.constexpr,
    GP: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    i_hk = tl.program_id(0) % HK
    i_b, bos, T_seq, i_t = locate(tl.program_id(0) // HK, cu_seqlens, blocks, T, BT, IS_VARLEN, INT64)
    if i_t < 0:
        return
    G = HQ // HK
    i0 = i_t * BT
    i1 = tl.minimum(i0 + BT, T_seq)
    r_t, r_h, m_r = query_rows(i0, i_hk, G, T_seq, BT, GP)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q, b_do, b_lse, b_delta = _load_rows(q, do, lse, delta, i_b, bos, r_t, r_h, m_r, o_d, m_d, T, HQ,
                                           stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh)
    p_k = k + i_b * stride_kb + bos * stride_kt + i_hk * stride_kh
    p_v = v + i_b * stride_vb + bos * stride_vt + i_hk * stride_vh
    qk_scale = scale * LOG2E
    b_dq = tl.zeros([BT * GP, BD], tl.float32)
    lo = tl.maximum(i0 - W + 1, 0)
    sink_hi = tl.minimum(S, lo)
    for j0 in range(0, sink_hi, BN):
        b_dq = _dq_block(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, r_t, o_d, m_d, j0, sink_hi, W, S,
                         stride_kt, stride_vt, qk_scale, BN)
    for j0 in range(lo, i1, BN):
        b_dq = _dq_block(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, r_t, o_d, m_d, j0, i1, W, S,
                         stride_kt, stride_vt, qk_scale, BN)
    p_dq = dq + ((i_b * T + bos + r_t) * HQ + r_h) * D
    tl.store(p_dq[:, None] + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_r[:, None] & m_d[None, :])


def swa_bwd(do, dlse, q, k, v, o, lse, window_size, num_sinks, scale, cu_seqlens):
    """Gradients (dq [B, T, HQ, D], dk, dv [B, T, HK, D], contiguous, in the inputs' dtypes).

    Args:
        do: [B, T, HQ, D] in o's dtype, any strides; dlse: [B, HQ, T] or None.
        q, k, v, o, lse, window_size, num_sinks, scale, cu_seqlens: as the forward took and returned them.
    """
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()  # e.g. an expanded gradient of o.sum()
    dq = q.new_empty(B, T, HQ, D)  # [B, T, HQ, D]
    dk = k.new_empty(B, T, HK, D)  # [B, T, HK, D]
    dv = v.new_empty(B, T, HK, D)  # [B, T, HK, D]
    if B * T * HQ == 0:
        return dq, dk, dv
    delta = q.new_empty(B, HQ, T, dtype=torch.float32)  # [B, HQ, T]
    dlse = None if dlse is None else dlse.float().contiguous()  # [B, HQ, T]
    BD = block_d(D)
    W = window_arg(window_size, T)
    BT, GP, BN, num_warps = bwd_config(D, HQ // HK, q.element_size())
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    int64 = needs_int64(q, k, v, do, lse, delta, dq, dk, dv)  # both gradient kernels
    with device_guard(q):
        swa_bwd_preprocess_kernel[(triton.cdiv(B * T * HQ, BR),)](
            o, do, dlse, delta, B * T * HQ, T, HQ, D, *do.stride()[:3],
            BR=BR, BD=BD, HAS_DLSE=dlse is not None, INT64=needs_int64(o, do, dlse, delta))
        key_blocks, n_keys = query_blocks(cu_seqlens, B, T, BN)
        swa_bwd_dkdv_kernel[(n_keys * HK,)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens, key_blocks,
            T, HQ, HK, D, W, num_sinks, *strides, scale,
            BT=BT, GP=GP, BN=BN, BD=BD, IS_VARLEN=cu_seqlens is not None, INT64=int64, num_warps=num_warps)
        q_blocks, n_queries = query_blocks(cu_seqlens, B, T, BT)
        swa_bwd_dq_kernel[(n_queries * HK,)](
            q, k, v, do, lse, delta, dq, cu_seqlens, q_blocks,
            T, HQ, HK, D, W, num_sinks, *strides, scale,
            BT=BT, GP=GP, BN=BN, BD=BD, IS_VARLEN=cu_seqlens is not None, INT64=int64, num_warps=num_warps)
    return dq, dk, dv


def _bwd_case(kernel, dtype: str, D: int, G: int, varlen: bool, must_not_spill: bool = True,
              int64: bool = False) -> AOTCase:
    BT, GP, BN, num_warps = bwd_config(D, G, ESIZE[dtype])
    tiles = dict(BT=BT, GP=GP, BN=BN, BD=block_d(D), IS_VARLEN=varlen, INT64=int64)
    if not varlen:
        tiles.update(cu_seqlens=None, blocks=None)
    label = f"D={D} G={G}{' varlen' if varlen else ''}{' int64' if int64 else ''}"
    return aot_case(kernel, tiles, num_warps, dtype, label, aligned=D % 16 == 0, must_not_spill=must_not_spill)


# Both gradient kernels in bf16 at the GQA-packed D = 128 with varlen (with 64-bit offsets too), and
# at BD = 256 (dq spills 2 / 4 words there: the backward is held to compiling, the forward to not
# spilling); the preprocess. fp32 is left out: its tf32x3 products spill (module docstring).
AOT_CASES = [_bwd_case(kernel, "bf16", D, G, varlen, must_not_spill=kernel is swa_bwd_dkdv_kernel or D < 256,
                       int64=int64)
             for kernel in (swa_bwd_dkdv_kernel, swa_bwd_dq_kernel)
             for D, G, varlen, int64 in ((128, 8, True, False), (128, 8, True, True), (256, 1, False, False))
             ] + [aot_case(swa_bwd_preprocess_kernel, dict(BR=BR, BD=128, HAS_DLSE=True, INT64=False), 4, "bf16",
                           "D=128 dlse")]
