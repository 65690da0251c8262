"""SSD chunked scan forward in Triton: the chunk output stage, the rows without memory, and the driver.

With the entering states from ``triton_chunk_state`` (stages 1-3), stage 4 reads each
chunk's rows out (``ssd_chunk_scan_kernel``, one program per chunk, head, BM rows and
BP columns of P):

    y_i = exp(a_i) C_i h_inᵀ + sum_{j <= i} (C_i . B_j) exp(a_i - a_j) dt_j x_j

then the per-token epilogue y = (y + D x_i) · silu(z_i) at the row's own x and z.
Under ``lag`` the first S + W rows of a sequence have an empty memory; they get the
epilogue alone (``ssd_empty_rows_kernel``, one program per BM rows and head; a varlen
row finds its sequence by binary search over cu_seqlens, so nothing syncs).

Tiles (H100/H200, untuned: no GPU was available): BM = 32 rows, BP = 64, BN = 32
(N_state is walked in BN slices), 8 warps; the j loop runs over BM blocks up to the
diagonal. Dots as in ``triton_chunk_state`` (fp32 operands, tf32x3). Register counts
from ptxas (sm_80/sm_90): chunk scan 220-246, empty rows 29-46, no spills; BM = 64
spilled at 4 and 8 warps.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .._index import needs_int64
from ..scan_tiles import chunk_at
from . import triton_chunk_state as cs
from .triton_chunk_state import block_decays

BM, BP, BN = 32, 64, 32
BM_EMPTY = 16
NUM_WARPS = 8


@triton.jit
def epilogue(b_y, x, z, D, base_x, base_z, off_x, off_z, o_p, m_rows, m_p, i_h, D_sh, D_sp,
             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GATE: tl.constexpr):
    """(y + D x) · silu(z) for the rows at element offsets base + off [BM] of x / z (z may be absent)."""
    m = m_rows[:, None] & m_p[None, :]
    if HAS_D:
        b_x = tl.load(x + base_x + off_x[:, None] + o_p[None, :], mask=m, other=0.0).to(tl.float32)
        b_y += b_x * tl.load(D + i_h * D_sh + o_p * D_sp, mask=m_p, other=0.0)[None, :]
    if HAS_Z and GATE:
        b_z = tl.load(z + base_z + off_z[:, None] + o_p[None, :], mask=m, other=0.0).to(tl.float32)
        b_y *= b_z * tl.sigmoid(b_z)
    return b_y


@triton.jit
def ssd_chunk_scan_kernel(
    # pointers
    x, B, C, D, z, dt_out, A, dA_cs, h_in, cu_seqlens, slots, out,
    # sizes
    T, H, G, P, NS, W, S,
    # strides
    stride_xb, stride_xt, stride_xh,
    stride_Bb, stride_Bt, stride_Bg,
    stride_Cb, stride_Ct, stride_Cg,
    stride_zb, stride_zt, stride_zh,
    stride_ob, stride_ot, stride_oh,
    D_sh, D_sp,
    # meta
    L: tl.constexpr,
    BM: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    GATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(1)
    i_mp = tl.program_id(2)
    i_n, k, i_b, bos, M = chunk_at(slots, i_c, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:  # slot past the last chunk (the grid is an upper bound under varlen)
        return
    n_ptiles = tl.cdiv(P, BP)
    i_m = i_mp // n_ptiles
    if k * L + i_m * BM >= M:
        return
    i_g = i_h // (H // G)
    o_i = i_m * BM + tl.arange(0, BM)  # chunk-local rows of this block
    o_p = (i_mp % n_ptiles) * BP + tl.arange(0, BP)
    m_i = k * L + o_i < M
    m_p = o_p < P
    # base pointers (offsets INT64-wide) at the chunk's first kv row (x, B) and first output row (C, z, out, x of
    # the epilogue); the offsets within a chunk fit in int32
    r0 = bos + S + k * L
    base_a = (i_c * H + i_h) * L
    b_ai = tl.load(dA_cs + base_a + o_i)
    b_A = tl.load(A + i_h)
    p_C = C + i_b * stride_Cb + i_g * stride_Cg + (r0 + W) * stride_Ct + o_i[:, None] * stride_Ct
    p_B = B + i_b * stride_Bb + i_g * stride_Bg + r0 * stride_Bt
    p_x = x + i_b * stride_xb + i_h * stride_xh + r0 * stride_xt

    # inter-chunk: exp(a_i) C_i h_inᵀ, h_in [P, N_state] read as [BN, BP]
    b_y = tl.zeros([BM, BP], dtype=tl.float32)
    p_h = h_in + (i_c * H + i_h) * P * NS + o_p[None, :] * NS
    for n0 in range(0, NS, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < NS
        b_c = tl.load(p_C + o_n[None, :], mask=m_i[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        b_h = tl.load(p_h + o_n[:, None], mask=m_n[:, None] & m_p[None, :], other=0.0)
        b_y += tl.dot(b_c, b_h, input_precision="tf32x3")
    b_y *= tl.exp(b_ai)[:, None]

    # intra-chunk: blocks of BM columns j up to the diagonal block
    for j0 in range(0, (i_m + 1) * BM, BM):
        o_j = j0 + tl.arange(0, BM)
        m_j = k * L + o_j < M
        b_cb = tl.zeros([BM, BM], dtype=tl.float32)
        for n0 in range(0, NS, BN):
            o_n = n0 + tl.arange(0, BN)
            m_n = o_n < NS
            b_c = tl.load(p_C + o_n[None, :], mask=m_i[:, None] & m_n[None, :], other=0.0).to(tl.float32)
            b_b = tl.load(p_B + o_j[None, :] * stride_Bt + o_n[:, None], mask=m_n[:, None] & m_j[None, :],
                          other=0.0).to(tl.float32)
            b_cb += tl.dot(b_c, b_b, input_precision="tf32x3")
        b_dtj = tl.load(dt_out + base_a + o_j)  # 0 at padding slots
        b_w = b_cb * block_decays(dt_out, base_a, b_A, i_m * BM, j0, L, BM, BM) * b_dtj[None, :]
        b_xj = tl.load(p_x + o_j[:, None] * stride_xt + o_p[None, :], mask=m_j[:, None] & m_p[None, :],
                       other=0.0).to(tl.float32)
        b_y += tl.dot(b_w, b_xj, input_precision="tf32x3")

    b_y = epilogue(b_y, x, z, D, i_b * stride_xb + i_h * stride_xh + (r0 + W) * stride_xt,
                   i_b * stride_zb + i_h * stride_zh + (r0 + W) * stride_zt, o_i * stride_xt, o_i * stride_zt,
                   o_p, m_i, m_p, i_h, D_sh, D_sp, HAS_D, HAS_Z, GATE)
    p_o = out + i_b * stride_ob + i_h * stride_oh + (r0 + W) * stride_ot + o_i[:, None] * stride_ot + o_p[None, :]
    tl.store(p_o, b_y.to(out.dtype.element_ty), mask=m_i[:, None] & m_p[None, :])  # the one downcast of out


@triton.jit
def ssd_empty_rows_kernel(
    # pointers
    x, D, z, cu_seqlens, out,
    # sizes
    T, H, P, N, LAG, SEARCH_STEPS,
    # strides
    stride_xb, stride_xt, stride_xh,
    stride_zb, stride_zt, stride_zh,
    stride_ob, stride_ot, stride_oh,
    D_sh, D_sp,
    # meta
    BM: tl.constexpr,
    BP: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    GATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(1)
    i_p = tl.program_id(2)
    o_r = i_r * BM + tl.arange(0, BM)  # rows of the flat [B * T] axis
    if IS_VARLEN:
        # the last sequence n with cu_seqlens[n] <= row (empty sequences are skipped that way)
        lo = tl.zeros([BM], dtype=tl.int64 if INT64 else tl.int32)
        hi = tl.zeros([BM], dtype=tl.int64 if INT64 else tl.int32) + N - 1
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi + 1) // 2
            below = tl.load(cu_seqlens + mid) <= o_r
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid - 1)
        pos = o_r - tl.load(cu_seqlens + lo)
        o_b = o_r * 0
        o_t = o_r
        m_r = o_r < T
    else:
        pos = o_r % T
        o_b = o_r // T
        o_t = pos
        m_r = o_r < N * T
    m_r = m_r & (pos < LAG)
    if tl.max(m_r.to(tl.int32), 0) == 0:
        return
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < P
    b_y = epilogue(tl.zeros([BM, BP], dtype=tl.float32), x, z, D, i_h * stride_xh, i_h * stride_zh,
                   o_b * stride_xb + o_t * stride_xt, o_b * stride_zb + o_t * stride_zt, o_p, m_r, m_p, i_h, D_sh, D_sp,
                   HAS_D, HAS_Z, GATE)
    p_o = out + o_b[:, None] * stride_ob + i_h * stride_oh + o_t[:, None] * stride_ot + o_p[None, :]
    tl.store(p_o, b_y.to(out.dtype.element_ty), mask=m_r[:, None] & m_p[None, :])


def _D_strides(D):
    """D [H] or [H, P] as the kernels index it, D[h * D_sh + p * D_sp]: [H] repeats over P."""
    if D is None:
        return 0, 0
    return (D.stride(0), 0) if D.dim() == 1 else tuple(D.stride())


def chunk_scan(x, B, C, D, z, dt_out, A, dA_cs, h_in, lay, out, gate=True):
    """Stage 4 and the rows without memory: write every row of ``out`` [B, T, H, P] (any dtype, last dim contiguous).

    ``gate`` False leaves out silu(z) (the backward's recomputation of the pre-gate output).
    """
    Bsz, T, H, P = x.shape
    G, NS = B.shape[2:]
    D_sh, D_sp = _D_strides(D)
    z_strides = (0, 0, 0) if z is None else z.stride()[:3]
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, GATE=gate, IS_VARLEN=lay.cu is not None)
    if lay.NC * H:
        bm = min(BM, lay.L)
        grid = (lay.NC, H, triton.cdiv(lay.L, bm) * triton.cdiv(P, BP))
        ssd_chunk_scan_kernel[grid](
            x, B, C, D, z, dt_out, A, dA_cs, h_in, *lay.args(), out,
            T, H, G, P, NS, lay.W, lay.S,
            *x.stride()[:3], *B.stride()[:3], *C.stride()[:3], *z_strides, *out.stride()[:3], D_sh, D_sp,
            L=lay.L, BM=bm, BP=BP, BN=BN, **flags, INT64=needs_int64(x, B, C, D, z, dt_out, dA_cs, h_in, out),
            num_warps=NUM_WARPS,
        )
    lag = lay.W + lay.S
    if lag and Bsz * T * H:
        steps = max(1, math.ceil(math.log2(max(lay.N, 1))) + 1)
        grid = (triton.cdiv(Bsz * T, BM_EMPTY), H, triton.cdiv(P, BP))
        ssd_empty_rows_kernel[grid](
            x, D, z, lay.cu, out, T, H, P, lay.N, lag, steps,
            *x.stride()[:3], *z_strides, *out.stride()[:3], D_sh, D_sp,
            BM=BM_EMPTY, BP=BP, **flags, INT64=needs_int64(x, D, z, out), num_warps=NUM_WARPS,
        )


def ssd_chunk_scan_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min,
                       dt_max, lag_window, lag_sinks, out, final_states):
    """Run the chunked scan, writing ``out`` [B, T, H, P] and ``final_states`` [N, H, P, N_state] fp32 in place.

    Arguments are validated by the op; gates (dt [B, T, H], A, D, dt_bias) arrive fp32,
    initial_states fp32 contiguous or None, cu_seqlens int64 or None; x, B, C, z last
    dim contiguous with any other strides.
    """
    lay = cs.Layout(x, cu_seqlens, chunk_size, lag_window, lag_sinks)
    dt_out, dA_cs, h_in = cs.chunk_states(x, dt, A, B, dt_bias, initial_states, dt_softplus, dt_min, dt_max, lay,
                                          final_states)
    chunk_scan(x, B, C, D, z, dt_out, A, dA_cs, h_in, lay, out)


# ----------------------------------------------------------------------------
# ahead-of-time cases (python -m ahn_kernels.triton_aot)
# ----------------------------------------------------------------------------
def _scan_case(dtype, L, full, gate=True):
    """``full``: D [H, P], z, varlen; ``gate`` False: the backward's fp32 pre-gate output."""
    ptrs = {n: f"*{dtype}" for n in ("x", "B", "C")}
    ptrs.update(dt_out="*fp32", A="*fp32", dA_cs="*fp32", h_in="*fp32", slots="*i32",
                out=f"*{dtype}" if gate else "*fp32")
    absent = {}
    if full:
        ptrs.update(D="*fp32", z=f"*{dtype}", cu_seqlens="*i64")
    else:
        absent = {"D": None, "z": None, "cu_seqlens": None}
    label = f"{dtype} L={L}{' D z varlen' if full else ''}{'' if gate else ' pre-gate (bwd)'}"
    return cs.aot_case(label, ssd_chunk_scan_kernel, ptrs,
                       dict(absent, L=L, BM=min(BM, L), BP=BP, BN=BN, HAS_D=full, HAS_Z=full, GATE=gate,
                            IS_VARLEN=full), num_warps=NUM_WARPS)


def _empty_case(dtype, varlen):
    ptrs = {"x": f"*{dtype}", "D": "*fp32", "z": f"*{dtype}", "out": f"*{dtype}"}
    ptrs.update({"cu_seqlens": "*i64"} if varlen else {})
    return cs.aot_case(f"{dtype}{' varlen' if varlen else ''}", ssd_empty_rows_kernel, ptrs,
                       dict({} if varlen else {"cu_seqlens": None}, BM=BM_EMPTY, BP=BP, HAS_D=True, HAS_Z=True,
                            GATE=True, IS_VARLEN=varlen), num_warps=NUM_WARPS)


AOT_CASES = [
    _scan_case("bf16", 256, True), _scan_case("bf16", 64, False), _scan_case("fp32", 256, True),
    cs.int64_case(_scan_case("bf16", 256, True)),
    _scan_case("fp16", 64, True, gate=False), _empty_case("bf16", True), _empty_case("fp32", False),
]
