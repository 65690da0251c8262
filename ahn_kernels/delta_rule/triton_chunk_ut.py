"""Stage 1 of the chunked delta rule forward in Triton: the UT transform A = (I + L)^-1 per chunk,
and the tile helpers every stage of this op shares (token-row loads, sequence bounds, AOT cases;
products and gate decays are ``scan_tiles``'s, shared with the SSD). Notation of ``triton_chunk.py``.

``chunk_ut_kernel`` (chunk x k head) forms K Kᵀ once per k head (AHN's grouped k/v and fla's
grouped values share k over several state heads), then per state head of the group
L = strict_lower(diag(β) K Kᵀ ⊙ Γ) and its unit lower inverse, fp32, into A [slots, HS, C, C].
L goes through A itself (global, L2-resident) so that the inverse can read it back in 16 x 16
blocks: block forward substitution, X_ii = (I + L_ii)^-1 by rows, then
X_ij = -X_ii Σ_{j<=m<i} L_im X_mj. Every product of the inverse is then a 16 x 16 x 16 one, so
fp32 inputs take all of it in IEEE fp32 on the FMA units without holding a 64-wide operand
(the former [C, C] tf32 inverse with an IEEE Newton step spilled 114 / 160 words at C = 64,
ptxas sm_80 / sm_90) and need no refinement; 16-bit inputs take it in tf32.

Registers / spills / shared memory: the table in ``triton_chunk.py``'s docstring (UT at
C = 64: 170-218 registers, no spill, 16 KB, every dtype, at sm_80 and sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..scan_tiles import chunk_at, dot_f32, dot_in, pair_decays
from ..triton_aot import AOTCase

NUM_WARPS = 8
# (K slice of the forward's products, V tile of the state pass, V tile of the readout) per input
# dtype: fp32 inputs multiply in IEEE fp32 on the FMA units, which needs smaller tiles to fit.
# K slices of 64 (16-bit) / 32 (fp32) spilled in the state pass and the readout for odd head
# dims or at C = 32 (ptxas: 2-130 words); the halves fit every variant (module docstring table).
TILES = {torch.float32: (16, 16, 16), torch.float16: (32, 32, 64), torch.bfloat16: (32, 32, 64)}
L2NORM_EPS = tl.constexpr(1e-6)
BB = tl.constexpr(16)  # block of the UT inverse: the smallest tile tl.dot takes


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
def _block(p_A, i, j, BT: tl.constexpr):
    """Offsets of the 16 x 16 block (i, j) of a row-major [BT, BT] tile at p_A."""
    o_b = tl.arange(0, BB)
    return p_A + (i * BB + o_b[:, None]) * BT + j * BB + o_b[None, :]


@triton.jit
def _unit_lower_inverse(p_A, BT: tl.constexpr, DT: tl.constexpr):
    """(I + L)^-1 in place of the strictly lower L [BT, BT] (BT in 16, 32, 64) at p_A, fp32.

    Block forward substitution in 16 x 16 blocks X_ij. The diagonal ones, X_ii = (I + L_ii)^-1,
    side by side (independent chains for the scheduler) by rows: row r becomes
    e_r - Σ_{j<r} L_rj X_j once rows j < r are final. Then X_ij = -X_ii Σ_{j<=m<i} L_im X_mj.
    Blocks above the diagonal are left as they are (L's zeros). Every block is read before
    any is written; the caller makes L visible to all threads first.
    """
    o_b = tl.arange(0, BB)
    b_I = tl.where(o_b[:, None] == o_b[None, :], 1.0, 0.0)
    b_L00 = tl.load(_block(p_A, 0, 0, BT))
    b_X00 = b_I
    if BT > BB:
        b_L11 = tl.load(_block(p_A, 1, 1, BT))
        b_X11 = b_I
    if BT > 2 * BB:
        b_L22 = tl.load(_block(p_A, 2, 2, BT))
        b_L33 = tl.load(_block(p_A, 3, 3, BT))
        b_X22 = b_I
        b_X33 = b_I
    for r in range(1, BB):
        m_r = (o_b == r)[:, None]
        b_X00 = tl.where(m_r, b_I - dot_f32(b_L00, b_X00, DT), b_X00)
        if BT > BB:
            b_X11 = tl.where(m_r, b_I - dot_f32(b_L11, b_X11, DT), b_X11)
        if BT > 2 * BB:
            b_X22 = tl.where(m_r, b_I - dot_f32(b_L22, b_X22, DT), b_X22)
            b_X33 = tl.where(m_r, b_I - dot_f32(b_L33, b_X33, DT), b_X33)
    if BT > BB:
        b_X10 = -dot_f32(b_X11, dot_f32(tl.load(_block(p_A, 1, 0, BT)), b_X00, DT), DT)
    if BT > 2 * BB:
        b_L21 = tl.load(_block(p_A, 2, 1, BT))
        b_X21 = -dot_f32(b_X22, dot_f32(b_L21, b_X11, DT), DT)
        b_X20 = -dot_f32(b_X22, dot_f32(tl.load(_block(p_A, 2, 0, BT)), b_X00, DT) +
                          dot_f32(b_L21, b_X10, DT), DT)
        b_L31 = tl.load(_block(p_A, 3, 1, BT))
        b_L32 = tl.load(_block(p_A, 3, 2, BT))
        b_X32 = -dot_f32(b_X33, dot_f32(b_L32, b_X22, DT), DT)
        b_X31 = -dot_f32(b_X33, dot_f32(b_L31, b_X11, DT) + dot_f32(b_L32, b_X21, DT), DT)
        b_X30 = -dot_f32(b_X33, dot_f32(tl.load(_block(p_A, 3, 0, BT)), b_X00, DT) +
                          dot_f32(b_L31, b_X10, DT) + dot_f32(b_L32, b_X20, DT), DT)
    tl.debug_barrier()  # no thread overwrites a block of L another thread has yet to read
    tl.store(_block(p_A, 0, 0, BT), b_X00)
    if BT > BB:
        tl.store(_block(p_A, 1, 1, BT), b_X11)
        tl.store(_block(p_A, 1, 0, BT), b_X10)
    if BT > 2 * BB:
        tl.store(_block(p_A, 2, 2, BT), b_X22)
        tl.store(_block(p_A, 2, 1, BT), b_X21)
        tl.store(_block(p_A, 2, 0, BT), b_X20)
        tl.store(_block(p_A, 3, 3, BT), b_X33)
        tl.store(_block(p_A, 3, 2, BT), b_X32)
        tl.store(_block(p_A, 3, 1, BT), b_X31)
        tl.store(_block(p_A, 3, 0, BT), b_X30)


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
    INT64: tl.constexpr,
):
    """A = (I + strict_lower(diag(β) K Kᵀ ⊙ Γ))^-1 per chunk and state head, fp32, into A [slots, HS, BT, BT]."""
    i_s = tl.program_id(0)
    i_hk = tl.program_id(1)
    i_n, i_t, i_b, bos, M = chunk_at(slots, i_s, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:  # slot past the last chunk (the grid is an upper bound under varlen)
        return
    row_kv = bos + S
    DT: tl.constexpr = k.dtype.element_ty

    # K Kᵀ over K slices, with the squared row norms for the in-kernel l2 norm.
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_ss = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_k = _load_rows(k, i_b, row_kv, i_hk, M, K, stride_kb, stride_kt, stride_kh, i_t, i_k * BK, BT, BK)
        b_kk += dot_in(b_k, tl.trans(b_k), DT)
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
        b_gamma = pair_decays(b_g, b_g, 0.0, o_t, o_t, True)
        p_A = A + (i_s.to(tl.int64 if INT64 else tl.int32) * HS + i_h) * BT * BT
        tl.store(p_A + o_t[:, None] * BT + o_t[None, :], tl.where(m_strict, b_beta[:, None] * b_kk * b_gamma, 0.0))
        tl.debug_barrier()  # L, written in one layout, is read back in blocks by other threads
        _unit_lower_inverse(p_A, BT, DT)


_SIZES = {"T", "HS", "HQ", "HK", "HV", "K", "V", "W", "S", "H", "G", "D", "n_rows"}
_INPUT_DTYPE = {"q", "k", "v", "o", "do", "x", "dx"}  # pointers in the activation dtype; others fp32 but below
_INT32 = {"slots", "first_slot"}


def aot_case(kernel, dtype: str, *, full: bool, aligned: bool = True, must_not_spill: bool = True,
             **constexprs) -> AOTCase:
    """One compiled variant of a kernel of this stem as its launcher specialises it.

    ``full`` turns gating, l2 norm, h0, the final state and varlen on together (else all off,
    with the optional pointers absent); 32-bit offsets unless ``constexprs`` sets INT64. ``aligned``: head dims multiples of 16 with contiguous
    gates (every pointer, K, V and the q/k/v strides divisible by 16, unit gate head strides);
    otherwise only the pointers are aligned, as for K = V = 60.
    """
    flags = {"USE_G": full, "USE_QK_L2NORM": full, "USE_H0": full, "STORE_HT": full, "IS_VARLEN": full, "INT64": False}
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
    label += ", int64" if cx.get("INT64") else ""
    return AOTCase(label, kernel, types, cx, NUM_WARPS, divisible=tuple(divisible), must_not_spill=must_not_spill)


AOT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def aot_corners(kernel, tiles) -> list:
    """The variants of one forward stage the AOT check compiles, few since CI compiles each for
    two capabilities: bf16 and fp32 at C = 64 (the largest tiles) with every option on, head dims
    aligned and odd; fp32 (its IEEE products are the tightest fit) at C = 32 with every option
    off. fp16 compiles to bf16's registers and C = 16 to far fewer (the sweep in
    ``triton_chunk.py``'s docstring). ``tiles(torch dtype)``: the stage's tiles as its launcher picks them."""
    cases = [aot_case(kernel, dtype, full=True, aligned=aligned, BT=64, **tiles(AOT_DTYPES[dtype]))
             for dtype in ("bf16", "fp32") for aligned in (True, False)]
    return cases + [aot_case(kernel, "fp32", full=False, BT=32, **tiles(torch.float32))]


AOT_CASES = aot_corners(chunk_ut_kernel, lambda dtype: dict(BK=TILES[dtype][0]))
