"""Chunked delta rule and gated delta rule forward, in Triton (the backward is ``triton_chunk_bwd.py``).

The math of ``reference.chunked``, per chunk of C = BT memory steps of one state
head, with G the in-chunk prefix sum of g (fp32), Γ_ij = exp(G_i - G_j) (i >= j),
L = strict_lower(diag(β) K Kᵀ ⊙ Γ), A = (I + L)^-1 and S_0 the state at the chunk start:

    Δ   = A diag(β) (V - diag(exp G) K S_0)
    O   = scale · (diag(exp G) Q S_0 + (Q Kᵀ ⊙ Γ) Δ)
    S_C = exp(G_C) S_0 + (diag(exp(G_C - G)) K)ᵀ Δ

Three stages, each a kernel:
1. ``chunk_ut_kernel`` (chunk x k head, ``triton_chunk_ut.py``): K Kᵀ once per k head, then
   per state head of the group A by block forward substitution in 16 x 16 blocks, fp32, to scratch.
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
for fp32 inputs every product is IEEE fp32 (tf32 would miss the 1e-5 bar), the UT
inverse included.

Tiles for H100/H200, untuned (no GPU was available to measure): BT = C (64 by
default); K in slices of 32 (16 for fp32 inputs: IEEE products run on the FMA units);
V tiles of 32 in the state pass and 64 in the readout (16 and 16 for fp32); 8 warps.
The state pass keeps S in h_start (L2) rather than in registers, read and written per
K slice, so no variant holds a whole [K, BV] state. The readout takes Q Kᵀ and Q S_0 in
two passes over the K slices, so that no more than two [BT, BK] input tiles are live.
On CPU tensors (the Triton interpreter: tests) the launchers take whole tiles: ``whole_tiles``.

Registers / spill words / shared memory per stage (ptxas via ``python -m ahn_kernels.triton_aot``,
every option on, C = 64, the dtype's tiles, 32-bit offsets; K is a loop count, so any K <= 256):

    stage        dtype   K, V multiples of 16       odd K, V (60, 100)
                         sm_80        | sm_90        sm_80        | sm_90
    UT           bf16    206/0/16K    | 205/0/16K    195/0/16K    | 210/0/16K
    UT           fp32    171/0/16K    | 188/0/16K    176/0/16K    | 190/0/16K
    state pass   bf16    184/0/24K    | 199/0/24K    244/0/24K    | 255/0/24K
    state pass   fp32    240/0/20K    | 197/0/20K    243/0/20K    | 227/0/20K
    readout      bf16    127/0/24K    | 124/0/48K    209/0/20K    | 170/0/44K
    readout      fp32    168/0/16K    | 168/0/16K    186/0/16K    | 192/0/16K

fp16 is bf16's to the register. Every stage x dtype x C in {16, 32, 64} x options all on / all
off x aligned / odd was swept once (``triton_aot.compile_case``, 216 compiles): no spill, at
most 240 registers (C = 64), 166 (C = 32), 168 (C = 16), before ``scan_tiles``' direct decays
(the table is after them). The AOT cases keep the corners.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._index import needs_int64
from ..scan_tiles import chunk_at, chunk_decays, chunk_slots, dot_f32, dot_in, rest_sums, sequence

# aot_case is the backward's (triton_chunk_bwd imports the forward's helpers from here).
from .triton_chunk_ut import (
    L2NORM_EPS,
    NUM_WARPS,
    TILES,
    _load_gate,
    _load_rows,
    aot_case,
    aot_corners,
    chunk_ut_kernel,
)

MIN_BK = 16  # tl.dot needs tiles of at least 16


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
    INT64: tl.constexpr,
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
    i_b, bos, M = sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    row_kv = bos + S
    i_hk = i_h // (HS // HK)
    i_hv = i_h // (HS // HV)
    DT: tl.constexpr = k.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    NT = tl.cdiv(M, BT)
    first = tl.load(first_slot + i_n).to(tl.int64)  # int64 always: int32 spilled 2 words (fp32, C = 32, sm_90)
    p_h = h_start + (first * HS + i_h) * K * V  # S_0 of the current chunk
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_h = (o_k[:, None] < K) & m_v[None, :]
        off_h = o_k[:, None] * V + o_v[None, :]
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            b_h += tl.load(h0 + i_nh.to(tl.int64 if INT64 else tl.int32) * K * V + off_h, mask=m_h, other=0.0)
        # A sequence without chunks owns no slot: its first slot is the next sequence's.
        tl.store(p_h + off_h, b_h, mask=(o_k[:, None] < tl.where(NT > 0, K, 0)) & m_v[None, :])
        if STORE_HT:
            tl.store(ht + i_nh.to(tl.int64 if INT64 else tl.int32) * K * V + off_h, b_h, mask=(o_k[:, None] < tl.where(NT == 0, K, 0)) & m_v[None, :])

    for i_t in range(0, NT):
        tl.debug_barrier()  # this chunk's S_0, written by other threads, is visible
        # K S_0 and the squared key norms, over K slices.
        # The chunk's key rows, for every K slice of both passes (no per-slice row arithmetic).
        o_r = i_t * BT + o_t
        p_k = k + i_b * stride_kb + (row_kv + o_r[:, None]) * stride_kt + i_hk * stride_kh
        m_r = o_r[:, None] < M
        b_ks = tl.zeros([BT, BV], dtype=tl.float32)
        b_ss = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_k = tl.load(p_k + o_k[None, :], mask=m_r & (o_k[None, :] < K), other=0.0).to(tl.float32)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0.0)
            b_ks += dot_f32(b_k, b_h, DT)
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
        b_d = dot_f32(b_A, b_rhs, DT)
        tl.store(delta + (i_s * HS + i_h) * BT * V + o_t[:, None] * V + o_v[None, :], b_d, mask=m_v[None, :])
        # S_C = exp(G_C) S_0 + (diag(r e) K)ᵀ Δ into the next chunk's S_0, or ht after the last chunk.
        b_ke = b_r * tl.exp(rest_sums(b_g))
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_h = (o_k[:, None] < K) & m_v[None, :]
            off_h = o_k[:, None] * V + o_v[None, :]
            b_k = tl.load(p_k + o_k[None, :], mask=m_r & (o_k[None, :] < K), other=0.0).to(tl.float32)
            b_h = tl.exp(g_last) * tl.load(p_h + off_h, mask=m_h, other=0.0)
            b_h += dot_f32(tl.trans(b_k * b_ke[:, None]), b_d, DT)
            tl.store(p_h + HS * K * V + off_h, b_h, mask=(o_k[:, None] < tl.where(i_t < NT - 1, K, 0)) & m_v[None, :])
            if STORE_HT:
                tl.store(ht + i_nh.to(tl.int64 if INT64 else tl.int32) * K * V + off_h, b_h, mask=(o_k[:, None] < tl.where(i_t == NT - 1, K, 0)) & m_v[None, :])
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
    INT64: tl.constexpr,
):
    """o = scale · (diag(exp G) Q S_0 + (Q Kᵀ ⊙ Γ) Δ) for one chunk, state head and V tile; o [B, T, HS, V]."""
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    i_n, i_t, i_b, bos, M = chunk_at(slots, i_s, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:
        return
    i_hq = i_h // (HS // HQ)
    i_hk = i_h // (HS // HK)
    DT: tl.constexpr = q.dtype.element_ty

    if USE_G:
        b_g = _load_gate(g, i_b, bos + S, i_h, M, stride_gb, stride_gt, stride_gh, i_t, BT)
    else:
        b_g = tl.zeros([BT], dtype=tl.float32)
    b_G, b_gamma, _, _ = chunk_decays(b_g, BT)

    i_s64 = i_s.to(tl.int64 if INT64 else tl.int32)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # Q Kᵀ from the raw inputs (exact products) over K slices, the norms applied after.
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    b_sq = tl.zeros([BT], dtype=tl.float32)
    b_sk = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_q = _load_rows(q, i_b, bos + S + W, i_hq, M, K, stride_qb, stride_qt, stride_qh, i_t, i_k * BK, BT, BK)
        b_k = _load_rows(k, i_b, bos + S, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, i_k * BK, BT, BK)
        b_qk += dot_in(b_q, tl.trans(b_k), DT)
        b_sq += tl.sum(b_q * b_q, 1)
        b_sk += tl.sum(b_k * b_k, 1)
    if USE_QK_L2NORM:
        b_rq = tl.rsqrt(b_sq + L2NORM_EPS)
        b_qk = b_qk * b_rq[:, None] * tl.rsqrt(b_sk + L2NORM_EPS)[None, :]
    else:
        b_rq = tl.full([BT], 1.0, dtype=tl.float32)
    b_d = tl.load(delta + (i_s64 * HS + i_h) * BT * V + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
    b_o = dot_f32(b_qk * b_gamma, b_d, DT)
    # Q S_0 in a second pass over the K slices (q again, from L1/L2): one loop for both products
    # holds a third [BT, BK] tile and a second accumulator, and spilled for odd head dims
    # (ptxas, bf16, C = 64, BK = 64: 104 / 130 words at sm_80 / sm_90).
    b_qh = tl.zeros([BT, BV], dtype=tl.float32)
    p_h = h_start + (i_s64 * HS + i_h) * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_q = _load_rows(q, i_b, bos + S + W, i_hq, M, K, stride_qb, stride_qt, stride_qh, i_t, i_k * BK, BT, BK)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0.0)
        b_qh += dot_f32(b_q, b_h, DT)
    b_o = scale * ((b_rq * tl.exp(b_G))[:, None] * b_qh + b_o)
    o_r = i_t * BT + o_t
    p_o = o + ((i_b * T + bos + S + W + o_r[:, None]) * HS + i_h) * V + o_v[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=(o_r[:, None] < M) & m_v[None, :])  # the one downcast of o


def block_k(K: int) -> int:
    return max(MIN_BK, triton.next_power_of_2(K))


_gpu_tiles_on_cpu = False


@contextlib.contextmanager
def gpu_tiles():
    """Within it, the launchers (forward and backward) take the GPU's tiles on CPU tensors too."""
    global _gpu_tiles_on_cpu
    before, _gpu_tiles_on_cpu = _gpu_tiles_on_cpu, True
    try:
        yield
    finally:
        _gpu_tiles_on_cpu = before


def whole_tiles(x) -> bool:
    """Whether the launchers (forward and backward) take all of K per slice and all of V per tile.

    True for CPU tensors, outside ``gpu_tiles()``: there the kernels run under the Triton
    interpreter, whose cost is one numpy call per tile op whatever the tile's size (some 10 ms per
    helper call), and one iteration of every slice loop makes the tests 5-10x faster. The tests
    run their cases of many slices and tiles (K = V = 256, the red zones at odd head dims) in
    ``gpu_tiles()``, so that the loops and the masks of partial slices stay covered as the GPU
    runs them. On CUDA the tiles are always those of the module docstring (its ptxas table).
    """
    return x.device.type == "cpu" and not _gpu_tiles_on_cpu


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
    if whole_tiles(q):
        BK, bv = block_k(K), block_k(V)
    with _guard(q):
        if NS * HS:
            chunk_ut_kernel[(NS, HK)](
                k, g, beta, A, slots, cu_seqlens,
                T, HS, HK, K, W, S,
                *k.stride()[:3], *stride_g, *beta.stride(),
                BT=C, BK=BK, **flags, INT64=needs_int64(k, g, beta, A), num_warps=NUM_WARPS)
        if N * HS:
            chunk_state_kernel[(N * HS, triton.cdiv(V, bv))](
                k, v, g, beta, A, initial_state, h_start, delta, final_state, first, cu_seqlens,
                T, HS, HK, HV, K, V, W, S,
                *k.stride()[:3], *v.stride()[:3], *stride_g, *beta.stride(),
                BT=C, BK=BK, BV=bv, USE_H0=initial_state is not None,
                STORE_HT=final_state is not None, **flags,
                INT64=needs_int64(k, v, g, beta, A, initial_state, h_start, delta, final_state), num_warps=NUM_WARPS)
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
    BK = min(bk, block_k(K))
    if whole_tiles(q):
        BK, bv = block_k(K), block_k(V)
    with _guard(q):
        chunk_out_kernel[(NS, HS, triton.cdiv(V, bv))](
            q, k, g, h_start, delta, o, slots, cu_seqlens,
            T, HS, HQ, HK, K, V, lag_window, lag_sinks,
            *q.stride()[:3], *k.stride()[:3], *stride_g,
            scale,
            BT=chunk_size, BK=BK, BV=bv, USE_G=g is not None, USE_QK_L2NORM=use_qk_l2norm,
            IS_VARLEN=cu_seqlens is not None, INT64=needs_int64(q, k, g, h_start, delta, o), num_warps=NUM_WARPS)


AOT_CASES = [*aot_corners(chunk_state_kernel, lambda dtype: dict(BK=TILES[dtype][0], BV=TILES[dtype][1])),
             *aot_corners(chunk_out_kernel, lambda dtype: dict(BK=TILES[dtype][0], BV=TILES[dtype][2])),
             # 64-bit offsets, the heaviest corner of the output stage
             aot_case(chunk_out_kernel, "bf16", full=True, BT=64, BK=TILES[torch.bfloat16][0],
                      BV=TILES[torch.bfloat16][2], INT64=True)]
