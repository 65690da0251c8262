"""SSD chunk stages shared by the Triton forward and backward: chunk layout, dt + dA cumsum, chunk states, state pass.

The scan cuts every (lag-shifted) sequence into chunks of its own (``reference._layout``;
the slot table of ``scan_tiles.chunk_slots``, the delta rule's too): sequence n absorbs
M_n = max(0, L_n - W - S) tokens; absorbed token m reads x, dt, B at row bos + S + m and is
read out at row bos + S + W + m with that row's C. Chunk k of sequence n holds m in
[k L, k L + L); positions past M_n are padding (dt = 0: the state passes through).

Decays: exp(a_i) from the prefix sums; those of a pair, exp(a_i - a_j), and to the chunk's end,
exp(a_last - a_j), from the steps dt A they span (``block_decays``, ``end_decays``, on
``scan_tiles``'s pieces), never as a difference of prefix sums: after one step of dt A = -1e4
those sit near -1e4, and the fp32 difference of two of them is off by 6e-4.

Stages (one kernel each, every accumulator fp32):
1. ``ssd_chunk_cumsum_kernel``: dt = clamp(softplus(dt + dt_bias), dt_limit) and
   the inclusive prefix sum of dt A within each chunk, [NC, H, L] each.
2. ``ssd_chunk_state_kernel``: per chunk and head, sum_i w_i u_iᵀ v_i [P, N_state]:
   the forward's chunk end state (u = x, v = B, w = exp(a_last - a_i) dt_i) and the
   backward's gradient of the entering state (u = dy, v = C, w = exp(a_i)).
3. ``ssd_state_pass_kernel``: h <- exp(a_last) h + add over a sequence's chunks, storing
   the value entering each chunk in place of ``add``; forwards it turns chunk
   states into entering states, in REVERSE it turns the entering-state gradients
   into chunk-state gradients (one kernel, so the backward's recomputation and its
   reverse pass walk the chunks exactly as the forward does).

Tiles (H100/H200, untuned: no GPU was available to measure): chunk state BT = BP = BN
= 32, 4 warps; state pass 1024 elements, 4 warps. Register counts from ptxas
(``python -m ahn_kernels.triton_aot``, sm_80/sm_90): chunk state 145-189, state pass
32-48, cumsum 21-45, no spills. 64-wide tiles spilled (up to 1,500 words at sm_80).
Every dot reads fp32 operands with ``input_precision="tf32x3"``: three TF32 tensor-core
products, near-fp32 accuracy (plain TF32, about 1e-3 relative, misses DESIGN §4's
fp32 tolerance; "ieee" runs on the FMA units and spilled at 64-wide tiles).
Native bf16/fp16 dots for 16-bit inputs are the first thing to tune.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

from .._index import needs_int64
from ..scan_tiles import chunk_at, chunk_slots, pair_decays, rest_sums, sequence
from ..triton_aot import AOTCase

BT, BP, BN = 32, 32, 32
PASS_BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _steps_after(dt_out, base_a, b_A, lo, hi, L: tl.constexpr):
    """Σ_{lo <= m < hi} dt_m A over chunk-local slots, summed directly (``scan_tiles``)."""
    o_m = tl.arange(0, L)
    return tl.sum(tl.where((o_m >= lo) & (o_m < hi), tl.load(dt_out + base_a + o_m) * b_A, 0.0), 0)


@triton.jit
def block_decays(dt_out, base_a, b_A, i0, j0, L: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """E_ij = exp(Σ_{j < m <= i} dt_m A) [BI, BJ] for chunk-local rows i0 + [0, BI) and columns
    j0 + [0, BJ), j0 <= i0 (both blocks of one size, or the columns' block before the rows'),
    0 for j > i: ``scan_tiles.pair_decays`` on the chunk's steps dt A."""
    o_i = i0 + tl.arange(0, BI)
    o_j = j0 + tl.arange(0, BJ)
    b_gi = tl.load(dt_out + base_a + o_i) * b_A
    b_gj = tl.load(dt_out + base_a + o_j) * b_A
    return pair_decays(b_gi, b_gj, _steps_after(dt_out, base_a, b_A, j0 + BJ, i0, L), o_i, o_j, i0 == j0)


@triton.jit
def end_decays(dt_out, base_a, b_A, j0, L: tl.constexpr, BJ: tl.constexpr):
    """te_j = exp(Σ_{m > j} dt_m A) [BJ] for chunk-local slots j0 + [0, BJ): the decay to the chunk's end."""
    b_gj = tl.load(dt_out + base_a + j0 + tl.arange(0, BJ)) * b_A
    return tl.exp(rest_sums(b_gj) + _steps_after(dt_out, base_a, b_A, j0 + BJ, L, L))


@triton.jit
def ssd_chunk_cumsum_kernel(
    # pointers
    dt, A, dt_bias, cu_seqlens, slots, dt_out, dA_cs,
    # sizes
    T, H, W, S,
    # strides
    stride_dtb, stride_dtt, stride_dth,
    # meta
    dt_min, dt_max,
    L: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(1)
    i_n, k, i_b, bos, M = chunk_at(slots, i_c, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:  # slot past the last chunk (the grid is an upper bound under varlen)
        return
    o_i = tl.arange(0, L)
    m_i = k * L + o_i < M
    rows = bos + S + k * L + o_i
    b_dt = tl.load(dt + i_b * stride_dtb + rows * stride_dtt + i_h * stride_dth, mask=m_i, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(dt_bias + i_h)
    if DT_SOFTPLUS:  # threshold 20, as torch and mamba
        b_dt = tl.where(b_dt <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(b_dt, 20.0))), b_dt)
    b_dt = tl.minimum(tl.maximum(b_dt, dt_min), dt_max)
    b_dt = tl.where(m_i, b_dt, 0.0)  # padding: no decay, no input, even when dt_min > 0
    b_a = tl.cumsum(b_dt * tl.load(A + i_h), 0)
    base = (i_c * H + i_h) * L
    tl.store(dt_out + base + o_i, b_dt)
    tl.store(dA_cs + base + o_i, b_a)


@triton.jit
def ssd_chunk_state_kernel(
    # pointers
    u, v, dt, A, dA_cs, cu_seqlens, slots, out,
    # sizes
    T, H, G, P, NS, W, S, SHIFT,
    # strides of u [B, T, H, P] and v [B, T, G, N_state]
    stride_ub, stride_ut, stride_uh,
    stride_vb, stride_vt, stride_vg,
    # meta
    L: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    FROM_START: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    # the slot in int64 always: in int32 ptxas spilled 6 words (bf16, L = 256, varlen, sm_80)
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_pn = tl.program_id(2)
    i_n, k, i_b, bos, M = chunk_at(slots, i_c, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    if i_n < 0:  # slot past the last chunk (the grid is an upper bound under varlen)
        return
    n_ntiles = tl.cdiv(NS, BN)
    o_p = (i_pn // n_ntiles) * BP + tl.arange(0, BP)
    o_n = (i_pn % n_ntiles) * BN + tl.arange(0, BN)
    m_p = o_p < P
    m_n = o_n < NS
    base_a = (i_c * H + i_h) * L
    # base pointers (offsets INT64-wide) at the chunk's first row; the offsets within a chunk fit in int32
    r0 = bos + S + SHIFT + k * L
    p_u = u + i_b * stride_ub + i_h * stride_uh + r0 * stride_ut
    p_v = v + i_b * stride_vb + (i_h // (H // G)) * stride_vg + r0 * stride_vt
    b_A = tl.load(A + i_h)
    b_acc = tl.zeros([BP, BN], dtype=tl.float32)
    for i0 in range(0, tl.minimum(L, M - k * L), BT):
        o_i = i0 + tl.arange(0, BT)
        m_i = (k * L + o_i < M) & (o_i < L)
        b_u = tl.load(p_u + o_i[:, None] * stride_ut + o_p[None, :], mask=m_i[:, None] & m_p[None, :], other=0.0)
        b_v = tl.load(p_v + o_i[:, None] * stride_vt + o_n[None, :], mask=m_i[:, None] & m_n[None, :], other=0.0)
        if FROM_START:
            b_w = tl.exp(tl.load(dA_cs + base_a + o_i, mask=m_i, other=0.0))
        else:
            b_w = end_decays(dt, base_a, b_A, i0, L, BT) * tl.load(dt + base_a + o_i, mask=m_i, other=0.0)
        b_uw = b_u.to(tl.float32) * b_w[:, None]
        b_acc += tl.dot(tl.trans(b_uw), b_v.to(tl.float32), input_precision="tf32x3")
    p_out = out + (i_c * H + i_h) * P * NS + o_p[:, None] * NS + o_n[None, :]
    tl.store(p_out, b_acc, mask=m_p[:, None] & m_n[None, :])


@triton.jit
def ssd_state_pass_kernel(
    # pointers
    states, dA_cs, h0, final, cu_seqlens, first_slot,
    # sizes
    T, H, PN, W, S,
    # meta
    L: tl.constexpr,
    BLOCK: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_H0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INT64: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64 if INT64 else tl.int32)
    i_h = tl.program_id(1)
    i_t = tl.program_id(2)
    _, _, M = sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN, INT64)
    n_chunks = tl.cdiv(M, L)
    first = tl.load(first_slot + i_n).to(tl.int64 if INT64 else tl.int32)
    o = i_t * BLOCK + tl.arange(0, BLOCK)
    m = o < PN
    base_h = (i_n * H + i_h) * PN
    if HAS_H0:
        b_h = tl.load(h0 + base_h + o, mask=m, other=0.0)
    else:
        b_h = tl.zeros([BLOCK], dtype=tl.float32)
    for kk in range(n_chunks):
        if REVERSE:
            i_c = first + n_chunks - 1 - kk
        else:
            i_c = first + kk
        base = (i_c * H + i_h) * PN
        b_add = tl.load(states + base + o, mask=m, other=0.0)
        tl.store(states + base + o, b_h, mask=m)
        b_h = tl.exp(tl.load(dA_cs + (i_c * H + i_h) * L + L - 1)) * b_h + b_add
    tl.store(final + base_h + o, b_h, mask=m)


# ----------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------
def on_device(t):
    """Triton launches on the current CUDA device: make it the tensors' (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class Layout:
    """Where the chunks are: the slot table (``scan_tiles.chunk_slots``: NC slots, an upper bound
    under varlen), each sequence's first slot, and the lag."""

    def __init__(self, x, cu_seqlens, chunk_size, lag_window, lag_sinks):
        Bsz, T = x.shape[:2]
        self.T, self.L, self.W, self.S = T, chunk_size, lag_window, lag_sinks
        self.cu = cu_seqlens
        self.N = Bsz if cu_seqlens is None else cu_seqlens.shape[0] - 1
        # [NC, 2] (sequence, chunk in sequence) and [N], int32
        self.slots, self.first = chunk_slots(cu_seqlens, Bsz, T, chunk_size, lag_window, lag_sinks, x.device)
        self.NC = self.slots.shape[0]

    def args(self):
        return self.cu, self.slots

    def new(self, *shape, like):
        """An fp32 buffer over the chunk slots: zeros under varlen, whose slots past the last chunk no
        program writes (the backward reads every slot); uninitialised otherwise."""
        return (torch.zeros if self.cu is not None else torch.empty)(*shape, dtype=torch.float32, device=like.device)


def chunk_cumsum(dt, A, dt_bias, dt_softplus, dt_min, dt_max, lay):
    """dt processed and the per-chunk prefix sums of dt A: (dt_out, dA_cs), both [NC, H, L] fp32."""
    H = dt.shape[2]
    dt_out = lay.new(lay.NC, H, lay.L, like=dt)  # [NC, H, L]
    dA_cs = lay.new(lay.NC, H, lay.L, like=dt)  # [NC, H, L]
    if lay.NC * H:
        ssd_chunk_cumsum_kernel[(lay.NC, H)](
            dt, A, dt_bias, *lay.args(), dt_out, dA_cs,
            lay.T, H, lay.W, lay.S, *dt.stride(), dt_min, dt_max,
            L=lay.L, DT_SOFTPLUS=dt_softplus, HAS_DT_BIAS=dt_bias is not None, IS_VARLEN=lay.cu is not None,
            INT64=needs_int64(dt, A, dt_bias, dt_out, dA_cs),
        )
    return dt_out, dA_cs


def chunk_state(u, v, dt_out, A, dA_cs, lay, from_start):
    """sum_i w_i u_iᵀ v_i per chunk and head, [NC, H, P, N_state] fp32 (module docstring, stage 2)."""
    H, P = u.shape[2:]
    G, NS = v.shape[2:]
    out = lay.new(lay.NC, H, P, NS, like=u)  # [NC, H, P, N_state]
    if lay.NC * H:
        grid = (lay.NC, H, triton.cdiv(P, BP) * triton.cdiv(NS, BN))
        ssd_chunk_state_kernel[grid](
            u, v, dt_out, A, dA_cs, *lay.args(), out,
            lay.T, H, G, P, NS, lay.W, lay.S, lay.W if from_start else 0,
            *u.stride()[:3], *v.stride()[:3],
            L=lay.L, BT=min(BT, lay.L), BP=BP, BN=BN, FROM_START=from_start, IS_VARLEN=lay.cu is not None,
            INT64=needs_int64(u, v, dt_out, dA_cs, out),
            num_warps=NUM_WARPS,
        )
    return out


def state_pass(states, dA_cs, h0, lay, final, reverse=False):
    """Run stage 3 over ``states`` [NC, H, P, N_state] fp32 in place; the last h goes to ``final`` [N, H, P, N_state].

    Forwards ``states`` becomes the state entering each chunk and h0 is the initial
    state. In ``reverse`` ``states`` holds the entering states' gradients and becomes
    the chunk states' gradients, h0 is the final states' gradient, and ``final`` gets
    the initial states' gradient.
    """
    _, H, P, NS = states.shape
    if lay.N * H:
        ssd_state_pass_kernel[(lay.N, H, triton.cdiv(P * NS, PASS_BLOCK))](
            states, dA_cs, h0, final, lay.cu, lay.first,
            lay.T, H, P * NS, lay.W, lay.S,
            L=lay.L, BLOCK=PASS_BLOCK, REVERSE=reverse, HAS_H0=h0 is not None,
            IS_VARLEN=lay.cu is not None, INT64=needs_int64(states, dA_cs, h0, final), num_warps=NUM_WARPS,
        )


def chunk_states(x, dt, A, B, dt_bias, h0, dt_softplus, dt_min, dt_max, lay, final):
    """Stages 1-3 forwards, writing ``final`` [N, H, P, N_state].

    Returns dt_out, dA_cs [NC, H, L] and h_in [NC, H, P, N_state] (the state entering each chunk).
    """
    dt_out, dA_cs = chunk_cumsum(dt, A, dt_bias, dt_softplus, dt_min, dt_max, lay)
    h_in = chunk_state(x, B, dt_out, A, dA_cs, lay, from_start=False)
    state_pass(h_in, dA_cs, h0, lay, final)
    return dt_out, dA_cs, h_in


# ----------------------------------------------------------------------------
# ahead-of-time cases (python -m ahn_kernels.triton_aot)
# ----------------------------------------------------------------------------
def aot_case(label, kernel, pointers: dict, constexprs: dict, num_warps=NUM_WARPS, floats=("dt_min", "dt_max")):
    """A case in which ``pointers`` ({name: "*bf16"}) are present and 16-byte aligned, every other
    runtime argument is an i32 (fp32 if in ``floats``), and absent pointers are ``None`` in ``constexprs``;
    offsets are 32-bit (``int64_case`` makes them 64-bit)."""
    constexprs = {"INT64": False, **constexprs}
    types = dict(pointers)
    for name in kernel.arg_names:
        if name not in types and name not in constexprs:
            types[name] = "fp32" if name in floats else "i32"
    return AOTCase(label, kernel, types, constexprs, num_warps, divisible=tuple(pointers))


def int64_case(case: AOTCase) -> AOTCase:
    """``case`` with 64-bit offsets."""
    return dataclasses.replace(case, label=f"{case.label} int64", constexprs={**case.constexprs, "INT64": True})


def maps(varlen):
    """(pointers, absent pointers) of the chunk layout: the slot table, and cu_seqlens under varlen."""
    return ({"cu_seqlens": "*i64"} if varlen else {}) | {"slots": "*i32"}, {} if varlen else {"cu_seqlens": None}


def _cumsum_case(L, varlen):
    ptrs, absent = maps(varlen)
    ptrs.update({n: "*fp32" for n in ("dt", "A", "dt_bias", "dt_out", "dA_cs")})
    return aot_case(f"L={L}{' varlen' if varlen else ''}", ssd_chunk_cumsum_kernel, ptrs,
                    dict(absent, L=L, DT_SOFTPLUS=True, HAS_DT_BIAS=True, IS_VARLEN=varlen), num_warps=1)


def _state_case(dtype, L, from_start, varlen):
    ptrs, absent = maps(varlen)
    ptrs.update(u="*fp32" if from_start else f"*{dtype}", v=f"*{dtype}", dt="*fp32", A="*fp32", dA_cs="*fp32",
                out="*fp32")
    label = f"{dtype} L={L}{' from-start (bwd)' if from_start else ''}{' varlen' if varlen else ''}"
    return aot_case(label, ssd_chunk_state_kernel, ptrs,
                    dict(absent, L=L, BT=min(BT, L), BP=BP, BN=BN, FROM_START=from_start, IS_VARLEN=varlen))


def _pass_case(reverse, varlen):
    ptrs = {n: "*fp32" for n in ("states", "dA_cs", "h0", "final")}
    ptrs.update({"cu_seqlens": "*i64", "first_slot": "*i32"} if varlen else {"first_slot": "*i32"})
    absent = {} if varlen else {"cu_seqlens": None}
    return aot_case(f"{'reverse' if reverse else 'forward'}{' varlen' if varlen else ''}", ssd_state_pass_kernel,
                    ptrs, dict(absent, L=64, BLOCK=PASS_BLOCK, REVERSE=reverse, HAS_H0=True, IS_VARLEN=varlen))


AOT_CASES = [
    _cumsum_case(256, True), _cumsum_case(64, False),
    _state_case("bf16", 256, False, True), _state_case("fp32", 64, False, False), _state_case("bf16", 64, True, True),
    int64_case(_state_case("bf16", 256, False, True)),
    _pass_case(False, True), _pass_case(True, False),
]
