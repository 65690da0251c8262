"""The AHN memory's decode step in Triton: fold the token leaving the window into the state, read it.

One program per (sequence, state head), a 1-D grid of B·HS. It reads the
position from ``cache_seqlens`` on the device (no host sync, fixed grid:
CUDA-graph capturable). If token e = p - W >= S leaves the window, the program
reads its k, v from slot S + (e - S) mod W of the cache and its arrival-time
gates from ring index (p - S) mod W, L2-normalises k and q in fp32 and walks
the state's V columns in tiles of BV (every rule acts on each column of the
[K, V] state independently, so a column tile is exact), folding, storing and
reading out each tile. Rows that evict nothing write o = 0 and leave the
state untouched. Last, if p >= S, it stores the new token's gates into the same
ring index; a barrier first makes every thread's read of the old gates
complete (the store may come from another warp).

The program owns all of its head's V columns: split over V, another program
of the same head could overwrite the gates before this one read them.

Tiles for H100/H200, not measured (no GPU was available to tune): BK =
next_pow2(K) >= 16 holds a whole state column so that Sᵀk and Sᵀq̂ are one
reduction; BV = 32 columns per step with 4 warps keeps the [BK, BV] fp32 tile at
BK/4 registers per thread (64 at K = 256). ptxas (sm_80 / sm_90), bf16: 128 / 130
registers for the gated rule at K = V = 128, 210 / 209 for SSD at K = V = 256, no spills.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..swa.triton_fwd import aot_case, device_guard
from .._index import needs_int64
from ..triton_aot import AOTCase

BV = 32
NUM_WARPS = 4
MIN_BK = 16
RULES = {"delta": 0, "gated_delta": 1, "ssd": 2}
L2NORM_EPS = tl.constexpr(1e-6)


@triton.jit
def ahn_evict_update_kernel(
    # pointers
    state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, A, o,
    # sizes
    HS, HQ, HK, K, V, W, S, NG,
    # strides (elements); the last dim of state, q, k_cache, v_cache is contiguous
    stride_sb, stride_sh, stride_sk,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gw, stride_gh, stride_gn,
    stride_nb, stride_nh, stride_nn,
    stride_a,
    # meta
    scale,
    BK: tl.constexpr,
    BV: tl.constexpr,
    RULE: tl.constexpr,  # 0 delta, 1 gated delta, 2 ssd
    INT64: tl.constexpr,
):
    i_b = (tl.program_id(0) // HS).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(0) % HS
    pos = tl.load(cache_seqlens + i_b)
    ring = tl.where(pos >= S, (pos - S) % W, 0)  # C-style % is negative for pos < S; unused there
    o_n = tl.arange(0, 2)  # at most two gates per rule
    m_n = o_n < NG
    p_g = gates + i_b * stride_gb + ring * stride_gw + i_h * stride_gh + o_n * stride_gn
    o_v = tl.arange(0, BV)
    p_o = o + (i_b * HS + i_h) * V

    if pos - W >= S:
        b_g = tl.load(p_g, mask=m_n, other=0.0)  # this token's gates, read before the overwrite below
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        i_hq = i_h // (HS // HQ)
        i_hk = i_h // (HS // HK)
        b_q = tl.load(q + i_b * stride_qb + i_hq * stride_qh + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + L2NORM_EPS)
        slot = S + ring
        b_k = tl.load(k_cache + i_b * stride_kb + slot * stride_kt + i_hk * stride_kh + o_k, mask=m_k,
                      other=0.0).to(tl.float32)
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + L2NORM_EPS)
        p_v = v_cache + i_b * stride_vb + slot * stride_vt + i_hk * stride_vh
        p_s = state + i_b * stride_sb + i_h * stride_sh
        first = tl.sum(tl.where(o_n == 0, b_g, 0.0))  # β (delta rules) or dt (ssd)
        if RULE == 1:
            decay = tl.exp(tl.sum(tl.where(o_n == 1, b_g, 0.0)))
        if RULE == 2:
            decay = tl.exp(first * tl.load(A + i_h * stride_a))
        for v0 in range(0, V, BV):
            m_v = v0 + o_v < V
            m_h = m_k[:, None] & m_v[None, :]
            p_h = p_s + o_k[:, None] * stride_sk + v0 + o_v[None, :]
            b_h = tl.load(p_h, mask=m_h, other=0.0)  # [BK, BV] fp32; padding stays 0
            b_v = tl.load(p_v + v0 + o_v, mask=m_v, other=0.0).to(tl.float32)
            if RULE == 2:  # S' = e^(dt A) S + dt k vᵀ
                b_h = decay * b_h + (first * b_k)[:, None] * b_v[None, :]
            else:  # S' = D + β k (v - Dᵀk)ᵀ with D = S or e^g S
                if RULE == 1:
                    b_h = decay * b_h
                b_u = first * (b_v - tl.sum(b_h * b_k[:, None], 0))
                b_h += b_k[:, None] * b_u[None, :]
            tl.store(p_h, b_h, mask=m_h)
            b_o = scale * tl.sum(b_h * b_q[:, None], 0)
            tl.store(p_o + v0 + o_v, b_o.to(o.dtype.element_ty), mask=m_v)  # the one downcast of o
    else:  # empty memory: o = 0, state untouched
        for v0 in range(0, V, BV):
            tl.store(p_o + v0 + o_v, tl.zeros([BV], tl.float32).to(o.dtype.element_ty), mask=v0 + o_v < V)

    if pos >= S:
        tl.debug_barrier()  # every warp's read of the old gates precedes the overwrite
        b_new = tl.load(gates_new + i_b * stride_nb + i_h * stride_nh + o_n * stride_nn, mask=m_n)
        tl.store(p_g, b_new, mask=m_n)


def _block_k(K: int) -> int:
    return max(MIN_BK, triton.next_power_of_2(K))


def ahn_evict_update(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size, num_sinks, rule,
                     scale, A, o) -> None:
    """Run one memory decode step, writing ``o``, ``state`` and ``gates`` in place. Validated by the op.

    Args:
        state: [B, HS, K, V] fp32, last dim contiguous, mutated.
        q: [B, 1, HQ, K]; k_cache: [B, S + W, HK, K]; v_cache: [B, S + W, HK, V]; last dim contiguous.
        gates: [B, W, HS, n_gates] fp32, mutated; gates_new: [B, HS, n_gates] fp32; any strides.
        cache_seqlens: [B] int32, the new token's position. rule: "delta", "gated_delta" or "ssd".
        A: [HS] fp32 (ssd) or None.
        o: preallocated contiguous [B, 1, HS, V] in q's dtype.
    """
    B, HS, K, V = state.shape
    if B * HS == 0:
        return
    with device_guard(q):
        ahn_evict_update_kernel[(B * HS,)](
            state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, A, o,
            HS, q.shape[2], k_cache.shape[2], K, V, window_size, num_sinks, gates.shape[3],
            *state.stride()[:3], q.stride(0), q.stride(2), *k_cache.stride()[:3], *v_cache.stride()[:3],
            *gates.stride(), *gates_new.stride(), 0 if A is None else A.stride(0),
            scale,
            BK=_block_k(K), BV=BV, RULE=RULES[rule],
            INT64=needs_int64(state, q, k_cache, v_cache, gates, gates_new, A, o),
            num_warps=NUM_WARPS,
        )


def _evict_case(dtype: str, rule: str, K: int, V: int, int64: bool = False) -> AOTCase:
    constexprs = dict(BK=_block_k(K), BV=BV, RULE=RULES[rule], INT64=int64)
    if rule != "ssd":
        constexprs["A"] = None
    return aot_case(ahn_evict_update_kernel, constexprs, NUM_WARPS, dtype,
                    f"{rule} K={K} V={V}{' int64' if int64 else ''}", aligned=K % 16 == 0 and V % 16 == 0)


# The gated rule at the common K = V = 128 (with 64-bit offsets too) and SSD at the largest state,
# K = V = 256.
AOT_CASES = [_evict_case("bf16", "gated_delta", 128, 128), _evict_case("bf16", "gated_delta", 128, 128, int64=True),
             _evict_case("bf16", "ssd", 256, 256)]
