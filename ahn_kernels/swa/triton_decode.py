"""One decode step of sliding-window attention over the AHN ring-buffer cache, in Triton.

One program per (sequence, KV head), a 1-D grid of B·HK. It reads the new
token's position from ``cache_seqlens`` on the device (no host sync, fixed
grid: CUDA-graph capturable), attends the G query heads of its KV head over
the valid slots (slot <= p: the sinks and the last W non-sink tokens, in ring
order, which softmax does not mind) with the new token's k/v substituted in
registers for the slot it takes, and stores k_new/v_new into that slot. The
program never reads back what it wrote, so no barrier orders the store
against the loads; the token that leaves the window must be folded into the
memory (``ahn_evict_update``) before this kernel runs, which stream order
guarantees.

Tiles for H100/H200, not measured (no GPU was available to tune): the G query
heads are rows of one ``tl.dot`` tile padded to 16 (its minimum M); BD =
next_pow2(D) >= 16; BN = 8 KiB of keys per step (64 slots at bf16 D = 64, 16 at
D = 256), 4 warps (8 when a key row passes 512 bytes). ptxas (sm_80 / sm_90), bf16:
156 / 126 registers at D = 128, G = 8; 188 / 204 at D = 256, G = 4; no spills. fp32 at
D = 256 (tf32x3 products) spills 4 / 6 words. Decode is bound by reading the cache,
and B·HK programs may leave SMs idle at small batch (no split over the window here).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._index import needs_int64
from ..triton_aot import AOTCase
from .triton_fwd import ESIZE, LOG2E, aot_case, block_d, device_guard, dot

MIN_ROWS = 16  # tl.dot's minimum M


@triton.jit
def swa_decode_kernel(
    # pointers
    q, k_cache, v_cache, k_new, v_new, cache_seqlens, o,
    # sizes
    HQ, HK, D, W, S,
    # strides (elements); the last dim is contiguous
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_knb, stride_knh,
    stride_vnb, stride_vnh,
    # meta
    scale,
    BG: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    INT64: tl.constexpr,
):
    i_b = (tl.program_id(0) // HK).to(tl.int64 if INT64 else tl.int32)
    i_hk = tl.program_id(0) % HK
    G = HQ // HK
    pos = tl.load(cache_seqlens + i_b)
    slot = tl.where(pos < S, pos, S + (pos - S) % W)  # (pos - S) % W only taken for pos >= S
    n_valid = tl.minimum(pos + 1, S + W)  # slots [0, n_valid) hold tokens <= pos

    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_q = m_g[:, None] & m_d[None, :]
    b_q = tl.load(q + i_b * stride_qb + (i_hk * G + o_g[:, None]) * stride_qh + o_d[None, :], mask=m_q, other=0.0)
    p_kn = k_new + i_b * stride_knb + i_hk * stride_knh + o_d
    p_vn = v_new + i_b * stride_vnb + i_hk * stride_vnh + o_d
    b_kn = tl.load(p_kn, mask=m_d, other=0.0)
    b_vn = tl.load(p_vn, mask=m_d, other=0.0)
    p_k = k_cache + i_b * stride_kb + i_hk * stride_kh
    p_v = v_cache + i_b * stride_vb + i_hk * stride_vh
    qk_scale = scale * LOG2E

    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    for j0 in range(0, n_valid, BN):
        o_j = j0 + tl.arange(0, BN)
        m_j = o_j < n_valid
        # Slots past n_valid were never written (they may hold NaN): load them as 0.
        b_kt = tl.load(p_k + o_j[None, :] * stride_kt + o_d[:, None], mask=m_d[:, None] & m_j[None, :], other=0.0)
        b_kt = tl.where(o_j[None, :] == slot, b_kn[:, None], b_kt)
        b_s = dot(b_q, b_kt) * qk_scale  # [BG, BN], log2 units
        b_s = tl.where(m_j[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))  # finite: slot 0 (<= pos) is in the first block
        b_p = tl.exp2(b_s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        b_v = tl.load(p_v + o_j[:, None] * stride_vt + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.0)
        b_v = tl.where(o_j[:, None] == slot, b_vn[None, :], b_v)
        acc = acc * alpha[:, None] + dot(b_p.to(b_v.dtype), b_v)
        m_i = m_new

    tl.store(p_k + slot * stride_kt + o_d, b_kn, mask=m_d)
    tl.store(p_v + slot * stride_vt + o_d, b_vn, mask=m_d)
    b_o = acc / l_i[:, None]
    tl.store(o + (i_b * HQ + i_hk * G + o_g[:, None]) * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_q)


def _rows(G: int) -> int:
    return max(MIN_ROWS, triton.next_power_of_2(G))


def _slots(D: int, esize: int) -> int:
    return max(16, 8192 // (max(64, block_d(D)) * esize))


def _warps(D: int, esize: int) -> int:
    return 8 if block_d(D) * esize > 512 else 4


def swa_decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks, scale, o) -> None:
    """Run one decode step, writing ``o`` and the new token's cache slot in place. Validated by the op.

    Args:
        q: [B, 1, HQ, D]; k_new, v_new: [B, 1, HK, D]; k_cache, v_cache: [B, S + W, HK, D] (mutated);
            all in one dtype, last dim contiguous, any other strides.
        cache_seqlens: [B] int32, the new token's position. window_size: W. num_sinks: S.
        o: preallocated contiguous [B, 1, HQ, D] in q's dtype.
    """
    B, _, HQ, D = q.shape
    HK = k_cache.shape[2]
    if B * HK == 0:
        return
    with device_guard(q):
        swa_decode_kernel[(B * HK,)](
            q, k_cache, v_cache, k_new, v_new, cache_seqlens, o,
            HQ, HK, D, window_size, num_sinks,
            q.stride(0), q.stride(2),
            *k_cache.stride()[:3], *v_cache.stride()[:3],
            k_new.stride(0), k_new.stride(2), v_new.stride(0), v_new.stride(2),
            scale,
            BG=_rows(HQ // HK), BN=_slots(D, q.element_size()), BD=block_d(D),
            INT64=needs_int64(q, k_cache, v_cache, k_new, v_new, o),
            num_warps=_warps(D, q.element_size()),
        )


def _decode_case(dtype: str, D: int, G: int, int64: bool = False) -> AOTCase:
    return aot_case(swa_decode_kernel, dict(BG=_rows(G), BN=_slots(D, ESIZE[dtype]), BD=block_d(D), INT64=int64),
                    _warps(D, ESIZE[dtype]), dtype, f"D={D} G={G}{' int64' if int64 else ''}", aligned=D % 16 == 0)


AOT_CASES = [_decode_case("bf16", D, G) for D, G in ((128, 8), (256, 4))] + [_decode_case("bf16", 128, 8, int64=True)]
