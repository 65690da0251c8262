"""One SSD decode step in Triton (mamba's ``selective_state_update``), the state updated in place.

One program per (batch row, head, BP rows of P) holds its [BP, N_state] slice of the fp32
state in registers: s <- exp(dt A) s + dt x Bᵀ, out = (s C + D x) · silu(z). The slot
comes from ``state_batch_indices`` on the device, so nothing syncs and the step is CUDA
graph capturable. Rows must name distinct slots (the op documents it): two programs
writing one slot would race.

Tiles (H100/H200, untuned: no GPU was available): BN = next_pow2(N_state) (at least 16),
so s C is one in-register reduction, and BP = 2048 / BN rows (at most next_pow2(P)),
4 warps: 16 fp32 state registers per thread whatever N_state, and B·H·P/BP programs
(a decode batch of 8 at H = 16, P = 128, N_state = 128 gives 1,024). Register counts
from ptxas (sm_80/sm_90, ``python -m ahn_kernels.triton_aot``): 64-128, no spills.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._index import needs_int64
from .triton_chunk_state import aot_case, int64_case, on_device

STATE_TILE = 2048  # BP * BN
MIN_BLOCK = 16
NUM_WARPS = 4


@triton.jit
def ssd_state_update_kernel(
    # pointers
    state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out,
    # sizes
    H, G, P, NS,
    # strides (elements); every last dim is contiguous
    stride_sb, stride_sh, stride_sp,
    stride_xb, stride_xh,
    stride_dtb, stride_dth,
    stride_Bb, stride_Bg,
    stride_Cb, stride_Cg,
    stride_zb, stride_zh,
    stride_ob, stride_oh,
    D_sh, D_sp,
    # meta
    BP: tl.constexpr,
    BN: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    INT64: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(1)
    i_p = tl.program_id(2)
    i_g = i_h // (H // G)
    if HAS_INDICES:
        slot = tl.load(state_batch_indices + i_b).to(tl.int64 if INT64 else tl.int32)
    else:
        slot = i_b
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p = o_p < P
    m_n = o_n < NS
    m_s = m_p[:, None] & m_n[None, :]

    b_dt = tl.load(dt + i_b * stride_dtb + i_h * stride_dth).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(dt_bias + i_h)
    if DT_SOFTPLUS:  # threshold 20, as torch and mamba
        b_dt = tl.where(b_dt <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(b_dt, 20.0))), b_dt)
    b_x = tl.load(x + i_b * stride_xb + i_h * stride_xh + o_p, mask=m_p, other=0.0).to(tl.float32)
    b_B = tl.load(B + i_b * stride_Bb + i_g * stride_Bg + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(C + i_b * stride_Cb + i_g * stride_Cg + o_n, mask=m_n, other=0.0).to(tl.float32)

    p_s = state + slot * stride_sb + i_h * stride_sh + o_p[:, None] * stride_sp + o_n[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0)
    b_s = tl.exp(b_dt * tl.load(A + i_h)) * b_s + (b_dt * b_x)[:, None] * b_B[None, :]
    tl.store(p_s, b_s, mask=m_s)

    b_y = tl.sum(b_s * b_C[None, :], 1)
    if HAS_D:
        b_y += b_x * tl.load(D + i_h * D_sh + o_p * D_sp, mask=m_p, other=0.0)
    if HAS_Z:
        b_z = tl.load(z + i_b * stride_zb + i_h * stride_zh + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_y *= b_z * tl.sigmoid(b_z)
    tl.store(out + i_b * stride_ob + i_h * stride_oh + o_p, b_y.to(out.dtype.element_ty), mask=m_p)


def _blocks(P: int, NS: int) -> tuple[int, int]:
    BN = max(MIN_BLOCK, triton.next_power_of_2(NS))
    return min(max(1, STATE_TILE // BN), triton.next_power_of_2(P)), BN


def ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, out) -> None:
    """Run the decode step: ``state`` in place, ``out`` written. Arguments are validated by the op.

    Args:
        state: [N, H, P, N_state] fp32, last dim contiguous. x: [B, H, P] fp32/fp16/bf16.
        dt: [B, H] fp32. A: [H] fp32 contiguous. B, C: [B, G, N_state] in x's dtype.
        D: [H] or [H, P] fp32, or None. z: [B, H, P] or None. dt_bias: [H] fp32 contiguous, or None.
        state_batch_indices: [B] int32/int64 or None. out: [B, H, P] in x's dtype.
    """
    Bsz, H, P = x.shape
    G, NS = B.shape[1:]
    if Bsz * H == 0:
        return
    BP, BN = _blocks(P, NS)
    D_sh, D_sp = (0, 0) if D is None else ((D.stride(0), 0) if D.dim() == 1 else D.stride())
    z_strides = (0, 0) if z is None else z.stride()[:2]
    with on_device(x):
        ssd_state_update_kernel[(Bsz, H, triton.cdiv(P, BP))](
            state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out,
            H, G, P, NS,
            *state.stride()[:3], *x.stride()[:2], *dt.stride(), *B.stride()[:2], *C.stride()[:2], *z_strides,
            *out.stride()[:2], D_sh, D_sp,
            BP=BP, BN=BN, DT_SOFTPLUS=dt_softplus, HAS_DT_BIAS=dt_bias is not None, HAS_D=D is not None,
            HAS_Z=z is not None, HAS_INDICES=state_batch_indices is not None,
            INT64=needs_int64(state, x, dt, A, B, C, D, z, dt_bias, out), num_warps=NUM_WARPS,
        )


def _case(dtype: str, NS: int, P: int, full: bool):
    """``full``: D, z, dt_bias and state_batch_indices present."""
    ptrs = {"state": "*fp32", "x": f"*{dtype}", "dt": "*fp32", "A": "*fp32", "B": f"*{dtype}", "C": f"*{dtype}",
            "out": f"*{dtype}"}
    names = ("D", "z", "dt_bias", "state_batch_indices")
    if full:
        ptrs.update(D="*fp32", z=f"*{dtype}", dt_bias="*fp32", state_batch_indices="*i32")
    BP, BN = _blocks(P, NS)
    constexprs = {} if full else {n: None for n in names}
    constexprs.update(BP=BP, BN=BN, DT_SOFTPLUS=True, HAS_DT_BIAS=full, HAS_D=full, HAS_Z=full, HAS_INDICES=full)
    return aot_case(f"{dtype} N_state={NS}{' D z dt_bias indices' if full else ''}", ssd_state_update_kernel, ptrs,
                    constexprs, num_warps=NUM_WARPS)


# Every BN from 16 to 256 (the largest state tile per thread stays 16 registers), both dtype families.
AOT_CASES = [_case("bf16", NS, 64, True) for NS in (16, 64, 128, 256)] + [
    _case("fp32", 128, 128, True), _case("fp16", 128, 64, False), int64_case(_case("bf16", 128, 64, True))]
