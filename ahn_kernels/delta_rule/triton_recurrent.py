"""Token-serial (fused recurrent) delta rule and gated delta rule forward, in Triton.

One program owns a BK x BV tile of one state head of one sequence (grid:
N·HS on axis 0, V tiles on axis 1) and walks that sequence token by token with
the fp32 state in registers; only the outputs and the final state go to global
memory. This is the decode and short-prefill path (DESIGN §2); long prefill
belongs to the chunked kernels.

Tile choice for H100/H200, not measured (no GPU was available to tune); the
register counts below are ptxas's, from ``python -m ahn_kernels.triton_aot``:
- ``BK = next_pow2(K)`` (at least 16): ``Sᵀ k`` and ``Sᵀ q`` are then one
  in-register reduction over K, with no traffic between programs.
- ``BV = 8``, ``num_warps = 1``: the state costs BK·BV/32 fp32 registers per
  thread (64 at K = 256). Compiled for sm_80/sm_90: 96 registers at
  K = V = 128, 197-238 at K = 256, no spills at any BK. One warp keeps the
  per-token reductions inside a warp (shuffles, no shared-memory barrier), and
  the small tile gives N·HS·V/8 programs, enough to spread a decode batch of
  a few sequences over 132 SMs. The price is that every V tile re-reads q_t
  and k_t (K elements each, served from L2). flash-linear-attention ships the
  same BV = 8, num_warps = 1 choice for this kernel. A fixed BV also keeps the
  number of compiled variants (and AOT cases) small.
- The registers hold the state as [BV, BK] (memory keeps [K, V]). With h0 or
  ht present the layout follows their loads and the orientation makes no
  difference; without them, Triton's default layout then spreads threads
  along K and the BK = 256 kernel needs 125 registers instead of 165.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..triton_aot import AOTCase

BV = 8
NUM_WARPS = 1
MIN_BK = 16  # K < 16 is no real head dim: one masked variant serves them all
# tl.constexpr: a @triton.jit body may read only constexpr globals.
L2NORM_EPS = tl.constexpr(1e-6)


@triton.jit
def fused_recurrent_fwd_kernel(
    # pointers
    q, k, v, g, beta, h0, o, ht, cu_seqlens,
    # sizes
    T, HS, HQ, HK, HV, K, V,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_betab, stride_betat, stride_betah,
    # meta
    scale,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # Axis 0 carries N·HS, which may pass 65,535 (the limit of axes 1 and 2).
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // HS
    i_h = i_nh % HS
    if IS_VARLEN:
        i_b = 0
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T_seq = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        i_b = i_n.to(tl.int64)
        bos = 0
        T_seq = T
    i_hq = i_h // (HS // HQ)
    i_hk = i_h // (HS // HK)
    i_hv = i_h // (HS // HV)

    # Base offsets in int64 (i_b, bos are int64): B·T·H·D may pass 2^31. The
    # per-token steps below are single strides, which fit in int32. Always int64, unlike the
    # other kernels (ahn_kernels/_index.py): these offsets are a few scalars, and int32 ones cost
    # registers here (ptxas, bf16 varlen: +11 / +7 at BK = 128, 40 words spilled at BK = 256 with
    # odd K, V on sm_80).
    p_q = q + i_b * stride_qb + bos * stride_qt + i_hq * stride_qh
    p_k = k + i_b * stride_kb + bos * stride_kt + i_hk * stride_kh
    p_v = v + i_b * stride_vb + bos * stride_vt + i_hv * stride_vh
    p_beta = beta + i_b * stride_betab + bos * stride_betat + i_h * stride_betah
    if USE_G:
        p_g = g + i_b * stride_gb + bos * stride_gt + i_h * stride_gh
    p_o = o + ((i_b * T + bos) * HS + i_h) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_v[:, None] & m_k[None, :]
    # [K, V] in memory ([N, HS, K, V]), [BV, BK] in registers (module docstring).
    # Entries past K or V stay 0, so they never leak into the reductions.
    base_h = i_nh.to(tl.int64) * K * V

    b_h = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + base_h + o_k[None, :] * V + o_v[:, None], mask=m_h, other=0.0)

    for _ in range(0, T_seq):
        b_q = tl.load(p_q + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(p_k + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(p_beta)
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + L2NORM_EPS)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + L2NORM_EPS)
        b_q = b_q * scale
        if USE_G:
            b_h *= tl.exp(tl.load(p_g))
            p_g += stride_gt
        # delta rule: u = beta (v - Sᵀ k); S += k uᵀ
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[None, :], 1))
        b_h += b_u[:, None] * b_k[None, :]
        b_o = tl.sum(b_h * b_q[None, :], 1)
        tl.store(p_o + o_v, b_o.to(p_o.dtype.element_ty), mask=m_v)  # the one downcast of o

        p_q += stride_qt
        p_k += stride_kt
        p_v += stride_vt
        p_beta += stride_betat
        p_o += HS * V

    if STORE_HT:
        tl.store(ht + base_h + o_k[None, :] * V + o_v[:, None], b_h, mask=m_h)


def _block_k(K: int) -> int:
    return max(MIN_BK, triton.next_power_of_2(K))


def fused_recurrent_fwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, o, final_state) -> None:
    """Run the token-serial (gated) delta rule forward, writing ``o`` and ``final_state`` in place.

    Arguments are validated by the op; the kernel assumes them valid.

    Args:
        q: ``[B, T, HQ, K]`` fp32/fp16/bf16, last dim contiguous, any other strides.
        k: ``[B, T, HK, K]``, same dtype rules.
        v: ``[B, T, HV, V]``, same dtype rules.
        g: ``None`` (DeltaNet) or fp32 ``[B, T, HS]`` log-decay, any strides.
        beta: fp32 ``[B, T, HS]``, any strides.
        scale: readout scale (``K ** -0.5`` by default at the op).
        initial_state: ``None`` or fp32 contiguous ``[N, HS, K, V]``.
        cu_seqlens: ``None`` or int64 ``[N + 1]``; then ``B == 1``.
        use_qk_l2norm: normalise q and k per token (eps 1e-6) inside the kernel.
        o: preallocated contiguous ``[B, T, HS, V]`` in q's dtype.
        final_state: ``None`` or preallocated fp32 contiguous ``[N, HS, K, V]``.
    """
    B, T, HQ, K = q.shape
    HK = k.shape[2]
    HV, V = v.shape[2], v.shape[3]
    HS = max(HQ, HK, HV)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if N * HS == 0:
        return
    stride_g = (0, 0, 0) if g is None else g.stride()
    grid = (N * HS, triton.cdiv(V, BV))
    # Triton launches on the current CUDA device; make it the tensors' device.
    guard = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        fused_recurrent_fwd_kernel[grid](
            q, k, v, g, beta, initial_state, o, final_state, cu_seqlens,
            T, HS, HQ, HK, HV, K, V,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *stride_g, *beta.stride(),
            scale,
            BK=_block_k(K),
            BV=BV,
            USE_G=g is not None,
            USE_QK_L2NORM=use_qk_l2norm,
            USE_H0=initial_state is not None,
            STORE_HT=final_state is not None,
            IS_VARLEN=cu_seqlens is not None,
            num_warps=NUM_WARPS,
        )


_SIZES = ("T", "HS", "HQ", "HK", "HV", "K", "V")


def _aot_case(dtype: str, BK: int, gated: bool, full: bool, aligned: bool) -> AOTCase:
    """One compiled variant as the launcher would specialise it.

    ``full`` turns on l2norm, initial state, final state and varlen together.
    ``aligned`` is the common case of head dims that are multiples of 16 (every
    pointer, K, V and the q/k/v strides divisible by 16) with contiguous gates
    (unit head stride, which Triton turns into a constant); otherwise only the
    pointers are aligned, as for K = V = 60.
    """
    optional = {"g": gated, "h0": full, "ht": full, "cu_seqlens": full}
    types = {name: f"*{dtype}" for name in ("q", "k", "v", "o")}
    types["beta"] = "*fp32"
    types.update({name: ("*i64" if name == "cu_seqlens" else "*fp32") for name, on in optional.items() if on})
    constexprs = {name: None for name, on in optional.items() if not on}
    unit = set()  # gate head strides of 1, which Triton's launcher turns into constants
    if aligned:
        unit = {"stride_betah", "stride_gh"} if gated else {"stride_betah"}
    for name in fused_recurrent_fwd_kernel.arg_names:
        if name.startswith("stride_") or name in _SIZES:
            if name in unit:
                constexprs[name] = 1
            else:
                types[name] = "i32"
    types["scale"] = "fp32"
    constexprs.update(BK=BK, BV=BV, USE_G=gated, USE_QK_L2NORM=full, USE_H0=full, STORE_HT=full, IS_VARLEN=full)
    divisible = [name for name, t in types.items() if t.startswith("*")]
    if not gated:  # the launcher passes 0 for g's strides
        divisible += ["stride_gb", "stride_gt", "stride_gh"]
    if aligned:
        divisible += ["K", "V"] + [f"stride_{x}{a}" for x in "qkv" for a in "bth"]
    label = f"{dtype}{' gated' if gated else ''}{' all-options' if full else ''}"
    label += ", K,V%16" if aligned else ", odd K,V"
    return AOTCase(label, fused_recurrent_fwd_kernel, types, constexprs, NUM_WARPS, divisible=tuple(divisible))


# Every BK the launcher picks, in the heaviest variant (gated, every option on)
# for bf16 with aligned and with odd head dims; then the other input dtypes and
# the lightest variant at the largest tile.
AOT_CASES = [_aot_case("bf16", BK, gated=True, full=True, aligned=True) for BK in (16, 32, 64, 128, 256)] + [
    _aot_case("bf16", BK, gated=True, full=True, aligned=False) for BK in (64, 256)] + [
    _aot_case("fp16", 128, gated=True, full=True, aligned=True),
    _aot_case("fp32", 256, gated=True, full=True, aligned=True),
    _aot_case("fp32", 256, gated=False, full=False, aligned=True),
]
