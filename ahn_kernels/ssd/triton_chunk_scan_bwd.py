"""SSD chunked scan backward in Triton: recompute the forward's stages, then the gradients per chunk.

Per chunk (chunk-local i, j; a = the prefix sums of dt A; E_ij = exp(a_i - a_j) for
j <= i; te_j = exp(a_last - a_j); xdt_j = dt_j x_j; dy the gradient of the memory
readout, dS the chunk state's gradient, h_in the entering state):

    dxdt_j = sum_{i >= j} (C_i . B_j) E_ij dy_i + te_j dS B_j            ssd_bwd_dx_kernel
    dB_j   = sum_{i >= j} E_ij (dy_i . xdt_j) C_i + te_j dSᵀ xdt_j        ssd_bwd_dbc_kernel, FOR_B
    dC_i   = sum_{j <= i} E_ij (dy_i . xdt_j) B_j + exp(a_i) h_inᵀ dy_i   ssd_bwd_dbc_kernel, not FOR_B

The gradient of the log decay dt_k A of slot k sums each term that crosses slot k
(``ssd_bwd_dda_kernel``, with ``scan_tiles.crossing_sums``):

    dda_k = sum_{i >= k > j} (dy_i . xdt_j) (C_i . B_j) E_ij       the rectangle of the chunk's pairs
          + sum_{i >= k} exp(a_i) dy_i . (C_i h_inᵀ)                readouts of the entering state
          + sum_{j < k} te_j xdt_j . (dS B_j)                        keys into the chunk state
          + exp(a_last) dS . h_in                                   the entering state passed on

Not the shorter dy_k . y_k - xdt_k . dxdt_k summed from the chunk's end (every readout
carries exp(a_i), every key exp(-a_j)): there the pairs on one side of k cancel, and
their fp32 rounding, O(1) from the diagonal i = j already, swamps a gradient that strong
decays make tiny (dt A of -20 .. -200 per token gave dA relative errors of 1e9).

Order: stages 1-3 forwards (``triton_chunk_state``, the forward's own kernels), the
pre-gate output where z needs it (``triton_chunk_scan``'s kernel without silu(z)),
dh_in (the chunk state kernel FROM_START on dy and C), the state pass in REVERSE (dS
and d initial state), then the three kernels above. dB and dC are per head; heads
sharing a group, and the rectangle's row blocks, are summed in a fixed order, no
atomics, so the backward is deterministic. The per-token elementwise parts (z, D, the
dt chain, the gathers between rows and chunk slots) are PyTorch ops on contiguous
copies of the inputs: torch rounds sigmoid and softplus differently on strided and
contiguous tensors (scalar and vector paths), and gradients must not depend on the
caller's layout (DESIGN §4).

Tiles (H100/H200, untuned: no GPU was available): BM = BP = BN = 32, 8 warps (dda:
P and N_state in slices of 16); dots as in ``triton_chunk_state`` (fp32 operands,
tf32x3). Register counts from ptxas (sm_80/sm_90, ``python -m ahn_kernels.triton_aot``):
dx 226-245, dB/dC 172-247, dda 175-208, no spills (at 4 warps the dC kernel spilled at
sm_90; dda with 32-wide slices spilled at both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._index import needs_int64
from ..scan_tiles import chunk_at, crossing_sums, exclusive_cumsum
from . import triton_chunk_scan as scan
from . import triton_chunk_state as cs
from .triton_chunk_state import block_decays, end_decays

BM, BP, BN = 32, 32, 32
BK_DDA = 16  # the dda kernel's P and N_state slices: 32 spilled (ptxas, sm_80 and sm_90)
NUM_WARPS = 8


@triton.jit
def ssd_bwd_dx_kernel(
    # pointers
    B, C, dy, dt_out, A, dstates, cu_seqlens, slots, dxdt,
    # sizes
    T, H, G, P, NS, W, S,
    # strides
    stride_Bb, stride_Bt, stride_Bg,
    stride_Cb, stride_Ct, stride_Cg,
    stride_dyb, stride_dyt, stride_dyh,
    # meta
    L: tl.constexpr,
    BM: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(1)
    i_jp = tl.program_id(2)
    i_n, k, i_b, bos, M = chunk_at(slots, i_c, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:  # slot past the last chunk (the grid is an upper bound under varlen)
        return
    n_ptiles = tl.cdiv(P, BP)
    i_jb = i_jp // n_ptiles
    if k * L + i_jb * BM >= M:  # padding slots only: their zeros are already there
        return
    i_g = i_h // (H // G)
    o_j = i_jb * BM + tl.arange(0, BM)
    o_p = (i_jp % n_ptiles) * BP + tl.arange(0, BP)
    m_j = k * L + o_j < M
    m_p = o_p < P
    r0 = bos + S + k * L
    base_a = (i_c * H + i_h) * L
    p_B = B + i_b * stride_Bb + i_g * stride_Bg + r0 * stride_Bt + o_j[:, None] * stride_Bt
    p_C = C + i_b * stride_Cb + i_g * stride_Cg + (r0 + W) * stride_Ct
    p_dy = dy + i_b * stride_dyb + i_h * stride_dyh + (r0 + W) * stride_dyt
    b_A = tl.load(A + i_h)

    # te_j dS B_j, dS [P, N_state] read as [BN, BP]
    b_acc = tl.zeros([BM, BP], dtype=tl.float32)
    p_s = dstates + (i_c * H + i_h) * P * NS + o_p[None, :] * NS
    for n0 in range(0, NS, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < NS
        b_b = tl.load(p_B + o_n[None, :], mask=m_j[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        b_s = tl.load(p_s + o_n[:, None], mask=m_n[:, None] & m_p[None, :], other=0.0)
        b_acc += tl.dot(b_b, b_s, input_precision="tf32x3")
    b_acc *= end_decays(dt_out, base_a, b_A, i_jb * BM, L, BM)[:, None]

    # sum over row blocks i >= j of (B_j . C_i) E_ij dy_i
    for i0 in range(i_jb * BM, tl.minimum(L, M - k * L), BM):
        o_i = i0 + tl.arange(0, BM)
        m_i = k * L + o_i < M
        b_bc = tl.zeros([BM, BM], dtype=tl.float32)
        for n0 in range(0, NS, BN):
            o_n = n0 + tl.arange(0, BN)
            m_n = o_n < NS
            b_b = tl.load(p_B + o_n[None, :], mask=m_j[:, None] & m_n[None, :], other=0.0).to(tl.float32)
            b_c = tl.load(p_C + o_i[None, :] * stride_Ct + o_n[:, None], mask=m_n[:, None] & m_i[None, :],
                          other=0.0).to(tl.float32)
            b_bc += tl.dot(b_b, b_c, input_precision="tf32x3")
        b_w = b_bc * tl.trans(block_decays(dt_out, base_a, b_A, i0, i_jb * BM, L, BM, BM))
        b_dy = tl.load(p_dy + o_i[:, None] * stride_dyt + o_p[None, :], mask=m_i[:, None] & m_p[None, :], other=0.0)
        b_acc += tl.dot(b_w, b_dy, input_precision="tf32x3")
    p_out = dxdt + ((i_c * L + o_j[:, None]) * H + i_h) * P + o_p[None, :]
    tl.store(p_out, b_acc, mask=m_p[None, :] & (o_j[:, None] < L))


@triton.jit
def ssd_bwd_dbc_kernel(
    # pointers
    x, B, C, dy, dt_out, A, dA_cs, h_in, dstates, cu_seqlens, slots, dbc,
    # sizes
    T, H, G, P, NS, W, S,
    # strides
    stride_xb, stride_xt, stride_xh,
    stride_Bb, stride_Bt, stride_Bg,
    stride_Cb, stride_Ct, stride_Cg,
    stride_dyb, stride_dyt, stride_dyh,
    # meta
    L: tl.constexpr,
    BM: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    FOR_B: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    """dB (FOR_B: block rows are j, the others i >= j) or dC (block rows are i, the others j <= i), per head."""
    i_c = tl.program_id(0).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(1)
    i_rn = tl.program_id(2)
    i_n, k, i_b, bos, M = chunk_at(slots, i_c, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:  # slot past the last chunk (the grid is an upper bound under varlen)
        return
    n_ntiles = tl.cdiv(NS, BN)
    i_rb = i_rn // n_ntiles
    if k * L + i_rb * BM >= M:  # padding slots only: their zeros are already there
        return
    i_g = i_h // (H // G)
    o_r = i_rb * BM + tl.arange(0, BM)
    o_n = (i_rn % n_ntiles) * BN + tl.arange(0, BN)
    m_r = k * L + o_r < M
    m_n = o_n < NS
    r0 = bos + S + k * L
    base_a = (i_c * H + i_h) * L
    p_x = x + i_b * stride_xb + i_h * stride_xh + r0 * stride_xt
    p_dy = dy + i_b * stride_dyb + i_h * stride_dyh + (r0 + W) * stride_dyt
    b_A = tl.load(A + i_h)
    if FOR_B:  # own rows read x (kv rows), the others dy and C (output rows)
        p_own, stride_own = p_x, stride_xt
        p_other, stride_other = p_dy, stride_dyt
        p_V = C + i_b * stride_Cb + i_g * stride_Cg + (r0 + W) * stride_Ct
        stride_V = stride_Ct
        p_S = dstates + (i_c * H + i_h) * P * NS
        b_wr = end_decays(dt_out, base_a, b_A, i_rb * BM, L, BM) * tl.load(dt_out + base_a + o_r)  # te_j dt_j
        lo = i_rb * BM
        hi = tl.minimum(L, M - k * L)
    else:
        p_own, stride_own = p_dy, stride_dyt
        p_other, stride_other = p_x, stride_xt
        p_V = B + i_b * stride_Bb + i_g * stride_Bg + r0 * stride_Bt
        stride_V = stride_Bt
        p_S = h_in + (i_c * H + i_h) * P * NS
        b_wr = tl.exp(tl.load(dA_cs + base_a + o_r))
        lo = 0
        hi = (i_rb + 1) * BM

    # inter-chunk: w_r u_r S, S [P, N_state]
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for p0 in range(0, P, BP):
        o_p = p0 + tl.arange(0, BP)
        m_p = o_p < P
        b_u = tl.load(p_own + o_r[:, None] * stride_own + o_p[None, :], mask=m_r[:, None] & m_p[None, :],
                      other=0.0).to(tl.float32)
        b_s = tl.load(p_S + o_p[:, None] * NS + o_n[None, :], mask=m_p[:, None] & m_n[None, :], other=0.0)
        b_acc += tl.dot(b_u, b_s, input_precision="tf32x3")
    b_acc *= b_wr[:, None]

    # intra-chunk: E (dy . xdt) V over the other blocks
    for o0 in range(lo, hi, BM):
        o_o = o0 + tl.arange(0, BM)
        m_o = k * L + o_o < M
        b_g = tl.zeros([BM, BM], dtype=tl.float32)
        for p0 in range(0, P, BP):
            o_p = p0 + tl.arange(0, BP)
            m_p = o_p < P
            b_u = tl.load(p_own + o_r[:, None] * stride_own + o_p[None, :], mask=m_r[:, None] & m_p[None, :],
                          other=0.0).to(tl.float32)
            b_v = tl.load(p_other + o_o[None, :] * stride_other + o_p[:, None], mask=m_p[:, None] & m_o[None, :],
                          other=0.0).to(tl.float32)
            b_g += tl.dot(b_u, b_v, input_precision="tf32x3")
        if FOR_B:
            b_g *= tl.load(dt_out + base_a + o_r)[:, None]
            b_g *= tl.trans(block_decays(dt_out, base_a, b_A, o0, i_rb * BM, L, BM, BM))
        else:
            b_g *= tl.load(dt_out + base_a + o_o)[None, :]  # 0 at padding slots
            b_g *= block_decays(dt_out, base_a, b_A, i_rb * BM, o0, L, BM, BM)
        b_vo = tl.load(p_V + o_o[:, None] * stride_V + o_n[None, :], mask=m_o[:, None] & m_n[None, :],
                       other=0.0).to(tl.float32)
        b_acc += tl.dot(b_g, b_vo, input_precision="tf32x3")
    p_out = dbc + ((i_c * L + o_r[:, None]) * H + i_h) * NS + o_n[None, :]
    tl.store(p_out, b_acc, mask=m_n[None, :] & (o_r[:, None] < L))


@triton.jit
def _state_dots(p_v, stride_v, p_u, stride_u, state, o_i, m_i, P, NS, BM: tl.constexpr, BP: tl.constexpr,
                BN: tl.constexpr):
    """u_i . (v_i Sᵀ) for the BM rows o_i: v [BM, N_state] and u [BM, P] rows, S [P, N_state] fp32 contiguous."""
    b_out = tl.zeros([BM], dtype=tl.float32)
    for p0 in range(0, P, BP):
        o_p = p0 + tl.arange(0, BP)
        m_p = o_p < P
        b_vs = tl.zeros([BM, BP], dtype=tl.float32)
        for n0 in range(0, NS, BN):  # S read as [BN, BP]
            o_n = n0 + tl.arange(0, BN)
            m_n = o_n < NS
            b_v = tl.load(p_v + o_i[:, None] * stride_v + o_n[None, :], mask=m_i[:, None] & m_n[None, :],
                          other=0.0).to(tl.float32)
            b_s = tl.load(state + o_p[None, :] * NS + o_n[:, None], mask=m_n[:, None] & m_p[None, :], other=0.0)
            b_vs += tl.dot(b_v, b_s, input_precision="tf32x3")
        b_u = tl.load(p_u + o_i[:, None] * stride_u + o_p[None, :], mask=m_i[:, None] & m_p[None, :],
                      other=0.0).to(tl.float32)
        b_out += tl.sum(b_u * b_vs, 1)
    return b_out


@triton.jit
def ssd_bwd_dda_kernel(
    # pointers
    x, B, C, dy, dt_out, A, dA_cs, h_in, dstates, cu_seqlens, slots, dda,
    # sizes
    T, H, G, P, NS, W, S,
    # strides
    stride_xb, stride_xt, stride_xh,
    stride_Bb, stride_Bt, stride_Bg,
    stride_Cb, stride_Ct, stride_Cg,
    stride_dyb, stride_dyt, stride_dyh,
    # meta
    L: tl.constexpr,
    BM: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    """The terms of dda (module docstring) that row block i_m holds as readouts (rows i) and keys (rows j),
    for every slot k of the chunk: dda[c, h, i_m, :]; the driver sums the row blocks."""
    i_c = tl.program_id(0).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(1)
    i_m = tl.program_id(2)
    i_n, k, i_b, bos, M = chunk_at(slots, i_c, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:  # slot past the last chunk (the grid is an upper bound under varlen)
        return
    if k * L + i_m * BM >= M:  # padding positions only: their zeros are already there
        return
    i_g = i_h // (H // G)
    o_b = tl.arange(0, BM)
    o_i = i_m * BM + o_b
    m_i = k * L + o_i < M
    r0 = bos + S + k * L
    base_a = (i_c * H + i_h) * L
    base_s = (i_c * H + i_h) * P * NS
    p_x = x + i_b * stride_xb + i_h * stride_xh + r0 * stride_xt
    p_B = B + i_b * stride_Bb + i_g * stride_Bg + r0 * stride_Bt
    p_C = C + i_b * stride_Cb + i_g * stride_Cg + (r0 + W) * stride_Ct
    p_dy = dy + i_b * stride_dyb + i_h * stride_dyh + (r0 + W) * stride_dyt
    b_A = tl.load(A + i_h)
    # row i as a key: te_i xdt_i . (dS B_i), its share of the chunk state, reaching every k > i
    b_key = _state_dots(p_B, stride_Bt, p_x, stride_xt, dstates + base_s, o_i, m_i, P, NS, BM, BP, BN)
    b_key *= end_decays(dt_out, base_a, b_A, i_m * BM, L, BM) * tl.load(dt_out + base_a + o_i)
    b_keys_in = exclusive_cumsum(b_key, False)  # [BM]: for this block's k
    b_keys = tl.sum(b_key, 0)  # for the blocks after it
    # row i as a readout: carry_i = sum over the columns j < k seen so far (the entering state's
    # readout exp(a_i) dy_i . (C_i h_inᵀ) first, which reaches every k <= i)
    b_carry = tl.exp(tl.load(dA_cs + base_a + o_i)) * _state_dots(p_C, stride_Ct, p_dy, stride_dyt, h_in + base_s,
                                                                  o_i, m_i, P, NS, BM, BP, BN)

    p_out = dda + ((i_c * H + i_h) * tl.num_programs(2) + i_m) * L
    for j0 in range(0, (i_m + 1) * BM, BM):
        o_k = j0 + o_b  # the block's columns j, and its slots k
        m_k = k * L + o_k < M
        b_cb = tl.zeros([BM, BM], dtype=tl.float32)
        for n0 in range(0, NS, BN):
            o_n = n0 + tl.arange(0, BN)
            m_n = o_n < NS
            b_c = tl.load(p_C + o_i[:, None] * stride_Ct + o_n[None, :], mask=m_i[:, None] & m_n[None, :],
                          other=0.0).to(tl.float32)
            b_b = tl.load(p_B + o_k[None, :] * stride_Bt + o_n[:, None], mask=m_n[:, None] & m_k[None, :],
                          other=0.0).to(tl.float32)
            b_cb += tl.dot(b_c, b_b, input_precision="tf32x3")
        b_dyx = tl.zeros([BM, BM], dtype=tl.float32)
        for p0 in range(0, P, BP):
            o_p = p0 + tl.arange(0, BP)
            m_p = o_p < P
            b_dy = tl.load(p_dy + o_i[:, None] * stride_dyt + o_p[None, :], mask=m_i[:, None] & m_p[None, :],
                           other=0.0)
            b_x = tl.load(p_x + o_k[None, :] * stride_xt + o_p[:, None], mask=m_p[:, None] & m_k[None, :],
                          other=0.0).to(tl.float32)
            b_dyx += tl.dot(b_dy, b_x, input_precision="tf32x3")
        b_w = b_cb * b_dyx * block_decays(dt_out, base_a, b_A, i_m * BM, j0, L, BM, BM)
        b_w *= tl.load(dt_out + base_a + o_k)[None, :]
        b_v, b_carry = crossing_sums(b_w, b_carry, o_i, o_k, j0 == i_m * BM)
        if j0 == i_m * BM:
            b_v += b_keys_in
        tl.store(p_out + o_k, b_v)
    for j0 in range((i_m + 1) * BM, L, BM):
        tl.store(p_out + j0 + o_b, tl.zeros([BM], dtype=tl.float32) + b_keys)


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------
def _slot_rows(lay, Bsz, device):
    """The flat row ([B * T]) each chunk position reads x, dt, B from, and the row it is read out at; B * T
    (a zero row) for padding. Both [NC * L] int64, built on the device from the slot table."""
    rows = Bsz * lay.T
    seq = lay.slots[:, :1].long()  # [NC, 1]; -1 past the last chunk
    n = seq.clamp(min=0)  # [NC, 1]
    m = lay.slots[:, 1:].long() * lay.L + torch.arange(lay.L, device=device)[None, :]  # [NC, L]
    if lay.cu is None:
        bos = n * lay.T
        M = max(0, lay.T - lay.W - lay.S)
    else:
        bos = lay.cu[n]
        M = (lay.cu[n + 1] - bos - lay.W - lay.S).clamp(min=0)
    kv = bos + lay.S + m
    valid = (seq >= 0) & (m < M)
    return (torch.where(valid, kv, rows).reshape(-1), torch.where(valid, kv + lay.W, rows).reshape(-1))


def _gather(t, idx):
    """Rows idx of t [B, T, ...] flattened to [B * T, ...], with row B * T reading zeros: [len(idx), ...]."""
    flat = t.reshape(-1, *t.shape[2:])
    return torch.cat([flat, flat.new_zeros(1, *t.shape[2:])])[idx]


def _scatter(g, idx, shape):
    """The rows of g [len(idx), ...] written to rows idx of a zero [B, T, ...] (each real row named at most once)."""
    flat = g.new_zeros(shape[0] * shape[1] + 1, *shape[2:])  # [B * T + 1, ...]; the last row takes the padding
    flat.index_copy_(0, idx, g)
    return flat[:-1].view(shape)


def ssd_chunk_scan_bwd(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, h0, cu_seqlens, dt_softplus, dt_min,
                       dt_max, lag_window, lag_sinks):
    """The gradients of ``triton_chunk_scan.ssd_chunk_scan_fwd``: dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0.

    Inputs as the forward's (gates fp32, h0 fp32 contiguous or None, cu_seqlens int64 or None);
    dout [B, T, H, P], dfinal [N, H, P, N_state]. Each gradient comes in its input's dtype (the
    gates' in fp32), None for an absent D, z or dt_bias; dh0 [N, H, P, N_state] fp32.
    """
    # what the torch ops below read, in one layout whatever the caller's (module docstring)
    dout, x, dt, D, z = (None if t is None else t.contiguous() for t in (dout, x, dt, D, z))
    Bsz, T, H, P = x.shape
    G, NS = B.shape[2:]
    lay = cs.Layout(x, cu_seqlens, chunk_size, lag_window, lag_sinks)
    final = x.new_empty(lay.N, H, P, NS, dtype=torch.float32)  # [N, H, P, N_state]; recomputed, unused
    dt_out, dA_cs, h_in = cs.chunk_states(x, dt, A, B, dt_bias, h0, dt_softplus, dt_min, dt_max, lay, final)

    xf = x.float()
    dy = dout.float()
    dz = dD = None
    if z is not None:  # out = y silu(z), y the pre-gate output (D x included)
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # [B, T, H, P]
        scan.chunk_scan(x, B, C, D, z, dt_out, A, dA_cs, h_in, lay, y, gate=False)
        zf = z.float()
        sig = torch.sigmoid(zf)
        dz = (dy * y * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dy = dy * zf * sig
    dx = torch.zeros_like(xf)  # [B, T, H, P]
    if D is not None:
        dx = dy * (D[:, None] if D.dim() == 1 else D)
        dD = (dy * xf).sum((0, 1, 3) if D.dim() == 1 else (0, 1))

    dstates = cs.chunk_state(dy, C, dt_out, A, dA_cs, lay, from_start=True)  # [NC, H, P, N_state]: d h_in
    dh0 = torch.empty_like(final)  # [N, H, P, N_state]
    cs.state_pass(dstates, dA_cs, dfinal.float().contiguous(), lay, dh0, reverse=True)  # dstates: d h_out

    L = lay.L
    bm = min(BM, L)
    n_blocks = L // bm
    # zeros: the kernels skip blocks of padding slots, which the sums below still read
    dxdt = x.new_zeros(lay.NC * L, H, P, dtype=torch.float32)  # [NC * L, H, P]
    dBh = x.new_zeros(lay.NC * L, H, NS, dtype=torch.float32)  # [NC * L, H, N_state], per head
    dCh = torch.zeros_like(dBh)  # [NC * L, H, N_state]
    dda = x.new_zeros(lay.NC, H, n_blocks, L, dtype=torch.float32)  # [NC, H, L / BM, L]: per row block
    if lay.NC * H:
        meta = dict(L=L, BM=bm, BP=BP, BN=BN, IS_VARLEN=lay.cu is not None, num_warps=NUM_WARPS)
        sizes = (T, H, G, P, NS, lay.W, lay.S)
        strides = (*B.stride()[:3], *C.stride()[:3], *dy.stride()[:3])
        ssd_bwd_dx_kernel[(lay.NC, H, n_blocks * triton.cdiv(P, BP))](
            B, C, dy, dt_out, A, dstates, *lay.args(), dxdt, *sizes, *strides, **meta,
            INT64=needs_int64(B, C, dy, dt_out, dstates, dxdt))
        for for_b, out in ((True, dBh), (False, dCh)):
            ssd_bwd_dbc_kernel[(lay.NC, H, n_blocks * triton.cdiv(NS, BN))](
                x, B, C, dy, dt_out, A, dA_cs, h_in, dstates, *lay.args(), out, *sizes, *x.stride()[:3], *strides,
                FOR_B=for_b, **meta, INT64=needs_int64(x, B, C, dy, dt_out, dA_cs, h_in, dstates, out))
        ssd_bwd_dda_kernel[(lay.NC, H, n_blocks)](
            x, B, C, dy, dt_out, A, dA_cs, h_in, dstates, *lay.args(), dda, *sizes, *x.stride()[:3], *strides,
            **dict(meta, BP=BK_DDA, BN=BK_DDA), INT64=needs_int64(x, B, C, dy, dt_out, dA_cs, h_in, dstates, dda))

    kv, q = _slot_rows(lay, Bsz, x.device)
    dt_slot = dt_out.transpose(1, 2).reshape(-1, H)  # [NC * L, H]
    ddt_x = (dxdt * _gather(xf, kv)).sum(-1)  # [NC * L, H]: dxdt . x
    # d(dt A) of each slot: the row blocks' terms and the entering state passed on (module docstring)
    passed = torch.exp(dA_cs[:, :, -1]) * (dstates * h_in).sum((-2, -1))  # [NC, H]
    ddA = (dda.sum(2) + passed[..., None]).transpose(1, 2).reshape(-1, H)  # [NC * L, H]
    dA = (ddA * dt_slot).sum(0)
    ddt_rows = _scatter(ddA * A + ddt_x, kv, (Bsz, T, H))
    dx = dx + _scatter((dxdt * dt_slot[..., None]).reshape(-1, H, P), kv, (Bsz, T, H, P))
    R = H // G
    dB = _scatter(dBh.view(-1, G, R, NS).sum(2), kv, (Bsz, T, G, NS))  # heads of a group summed in order
    dC = _scatter(dCh.view(-1, G, R, NS).sum(2), q, (Bsz, T, G, NS))

    # the dt chain (torch's conventions: clamp passes its bounds, softplus is linear above 20)
    pre = dt if dt_bias is None else dt + dt_bias
    act = F.softplus(pre, threshold=20.0) if dt_softplus else pre
    ddt = ddt_rows * ((act >= dt_min) & (act <= dt_max))
    if dt_softplus:
        ddt = ddt * torch.where(pre > 20.0, 1.0, torch.sigmoid(pre))
    ddt_bias = None if dt_bias is None else ddt.sum((0, 1))
    return dx.to(x.dtype), ddt, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, ddt_bias, dh0


# ----------------------------------------------------------------------------
# ahead-of-time cases (python -m ahn_kernels.triton_aot)
# ----------------------------------------------------------------------------
def _dx_case(dtype, L, varlen):
    ptrs, absent = cs.maps(varlen)
    ptrs.update(B=f"*{dtype}", C=f"*{dtype}", dy="*fp32", dt_out="*fp32", A="*fp32", dstates="*fp32", dxdt="*fp32")
    return cs.aot_case(f"{dtype} L={L}{' varlen' if varlen else ''}", ssd_bwd_dx_kernel, ptrs,
                       dict(absent, L=L, BM=min(BM, L), BP=BP, BN=BN, IS_VARLEN=varlen), num_warps=NUM_WARPS)


def _dbc_case(dtype, L, for_b, varlen):
    ptrs, absent = cs.maps(varlen)
    ptrs.update(x=f"*{dtype}", B=f"*{dtype}", C=f"*{dtype}", dy="*fp32", dt_out="*fp32", A="*fp32", dA_cs="*fp32",
                h_in="*fp32", dstates="*fp32", dbc="*fp32")
    return cs.aot_case(f"{dtype} L={L} {'dB' if for_b else 'dC'}{' varlen' if varlen else ''}", ssd_bwd_dbc_kernel,
                       ptrs, dict(absent, L=L, BM=min(BM, L), BP=BP, BN=BN, FOR_B=for_b, IS_VARLEN=varlen),
                       num_warps=NUM_WARPS)


def _dda_case(dtype, L, varlen):
    ptrs, absent = cs.maps(varlen)
    ptrs.update(x=f"*{dtype}", B=f"*{dtype}", C=f"*{dtype}", dy="*fp32", dt_out="*fp32", A="*fp32", dA_cs="*fp32",
                h_in="*fp32", dstates="*fp32", dda="*fp32")
    return cs.aot_case(f"{dtype} L={L}{' varlen' if varlen else ''}", ssd_bwd_dda_kernel, ptrs,
                       dict(absent, L=L, BM=min(BM, L), BP=BK_DDA, BN=BK_DDA, IS_VARLEN=varlen),
                       num_warps=NUM_WARPS)


AOT_CASES = [
    _dx_case("bf16", 256, True), _dx_case("fp32", 64, False),
    _dbc_case("bf16", 256, True, True), _dbc_case("bf16", 256, False, True), _dbc_case("fp32", 64, True, False),
    _dda_case("bf16", 256, True), _dda_case("fp32", 64, False), cs.int64_case(_dx_case("bf16", 256, True)),
]
