"""Sliding-window attention with sinks, forward in Triton (flash-attention-2 style).

One program owns one query block of one KV head of one sequence (a 1-D grid
over blocks x HK, so neither the sequence count nor HK meets the 65,535 limit of
grid axes 1 and 2). Its tile packs the G = HQ / HK query heads of that KV head:
row r is token ``i0 + r // GP`` and query head ``r % GP`` of the group (GP =
next_pow2(G); rows past G are masked), so each K/V block is loaded once per KV
head and serves all G heads. The program visits the key blocks of the sinks
left of its window span, then those of the span ``[lo, i1)`` (as the CPU kernel
and ``reference.blockwise``), with the online softmax in fp32 and exp2, and
stores o once in the input dtype and lse in fp32: work O(T·(W+S)), no T x T.

Varlen batches go through a block table built on the device (no host sync):
``query_blocks`` lists (sequence, block) for an upper bound of the block count,
T // BT + N, and surplus programs exit at once.

Tiles for H100/H200, not measured (no GPU was available to tune); register counts are
ptxas's from ``python -m ahn_kernels.triton_aot`` (sm_80 / sm_90):
- BD = next_pow2(D), at least 16 (``tl.dot``'s minimum); D is masked.
- ``FWD_TILES``: BM = BT·GP query rows and BN keys per step by BD and element size.
  bf16/fp16: 128 x 32 at BD <= 128 (202 / 191 registers at D = 128; 186 / 181 with
  G = 8 packed, varlen), 64 x 32 at BD = 256 (195 / 218), all 8 warps, no spills. An
  odd D halves BM (unvectorised masked loads: 220 / 198 at D = 100, G = 3).
- fp32 products run as tf32x3 (see ``dot``), whose hi/lo operand splits triple the
  operand registers: 32 x 32 at BD = 128 (252 / 234, no spill); at BD = 256 even
  the smallest tile, 16 x 16, spills 4 / 8 words per thread (the one spilling
  forward case; fp32 at D = 256 is not a training configuration we expect).
- bf16/fp16 take tensor cores with fp32 accumulation, P rounded to the input dtype
  for the P·V product as flash-attention does.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .._index import needs_int64
from ..triton_aot import AOTCase

MIN_BD = 16  # tl.dot needs every dimension >= 16
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Triton's interpreter keeps bf16 as uint16 bits and its tl.dot multiplies those bits
# (triton-lang/triton#11584, "not supported yet"): there the operands go through fp32,
# which equals the GPU's products (bf16 x bf16 and fp16 x fp16 are exact in fp32).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def block_d(D: int) -> int:
    return max(MIN_BD, triton.next_power_of_2(D))


# (max(BD, 64), bytes per input element) -> (BM query rows, BN keys, num_warps), sized by compiling
# AOT_CASES for sm_80 and sm_90 (module docstring).
FWD_TILES = {(64, 2): (128, 64, 8), (128, 2): (128, 32, 8), (256, 2): (64, 32, 8),
             (64, 4): (32, 32, 4), (128, 4): (32, 32, 8), (256, 4): (16, 16, 8)}


def fwd_config(D: int, G: int, esize: int) -> tuple[int, int, int, int]:
    """(BT query tokens, GP heads per row group, BN keys per block, num_warps) of the forward."""
    GP = triton.next_power_of_2(G)
    BM, BN, num_warps = FWD_TILES[max(64, block_d(D)), esize]
    if D % 16:  # unvectorised, masked loads cost registers: ptxas spilled 26 words at D = 100, BM = 128 (sm_80)
        BM //= 2
    BM = max(BM, GP, 16)
    return BM // GP, GP, BN, num_warps


def window_arg(window_size, T: int) -> int:
    """The kernels' W: None (full causal) becomes T, which no i - j (at most T - 1) reaches."""
    return max(T, 1) if window_size is None else window_size


def query_blocks(cu_seqlens, B: int, T: int, BT: int):
    """(table, count): the blocks of BT tokens of every sequence, for a 1-D grid.

    Dense: no table, B · cdiv(T, BT) blocks. Varlen: an int32 table [count, 2] of
    (sequence, block index), -1 past the last real block; count = T // BT + N
    bounds Σ cdiv(len_n, BT) without reading cu_seqlens on the host.
    """
    if cu_seqlens is None:
        return None, B * triton.cdiv(T, BT)
    N = cu_seqlens.shape[0] - 1
    count = T // BT + N
    lens = cu_seqlens[1:] - cu_seqlens[:-1]  # [N]
    nblk = (lens + BT - 1) // BT  # [N]
    ends = torch.cumsum(nblk, 0)  # [N]
    idx = torch.arange(count, device=cu_seqlens.device)  # [count]
    seq = torch.searchsorted(ends, idx, right=True)  # [count], N past the last block
    first = torch.cat([ends.new_zeros(1), ends])[seq]  # [count], first table row of that sequence
    real = seq < N
    table = torch.stack([torch.where(real, seq, -1), torch.where(real, idx - first, -1)], 1)  # [count, 2]
    return table.to(torch.int32), count


@triton.jit
def locate(i_blk, cu_seqlens, blocks, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr, INT64: tl.constexpr):
    """(batch row, first token of the sequence, its length, block index); i_t = -1 for a surplus program."""
    if IS_VARLEN:
        i_n = tl.load(blocks + 2 * i_blk)
        i_t = tl.load(blocks + 2 * i_blk + 1)
        i_nc = tl.maximum(i_n, 0)  # a surplus program reads sequence 0's offsets, then exits
        bos = tl.load(cu_seqlens + i_nc).to(tl.int64 if INT64 else tl.int32)
        T_seq = (tl.load(cu_seqlens + i_nc + 1).to(tl.int64 if INT64 else tl.int32) - bos).to(tl.int32)
        i_b = bos * 0
    else:
        NT = tl.cdiv(T, BT)
        i_b = (i_blk // NT).to(tl.int64 if INT64 else tl.int32)
        i_t = i_blk % NT
        bos = i_b * 0
        T_seq = T
    return i_b, bos, T_seq, i_t


@triton.jit
def query_rows(i0, i_hk, G, T_seq, BT: tl.constexpr, GP: tl.constexpr):
    """(token position, query head, valid) of each of the BT·GP rows of a packed tile starting at token i0."""
    o_r = tl.arange(0, BT * GP)
    r_t = i0 + o_r // GP
    r_h = i_hk * G + o_r % GP
    return r_t, r_h, (r_t < T_seq) & (o_r % GP < G)


@triton.jit
def dot(a, b):
    """a @ b with fp32 accumulation; fp32 operands as three TF32 products (tf32x3: hi·hi + hi·lo + lo·hi).

    Plain TF32 (10-bit mantissa) misses DESIGN §4's fp32 bar of 1e-5; tf32x3 keeps about 22 bits
    on tensor cores, where "ieee" runs on FMA units with operand layouts that spill every fp32 tile
    of AOT_CASES (ptxas: 300 to 2,900 words at BD = 64..256).
    """
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def visible(i, j, j_end, W, S):
    """Mask of query positions i and key positions j (broadcast): key j exists (< j_end) and
    j <= i and (i - j < W or j < S) (DESIGN §2)."""
    return (j < j_end) & (j <= i) & ((i - j < W) | (j < S))


@triton.jit
def _attend(acc, m_i, l_i, b_q, p_k, p_v, r_t, o_d, m_d, j0, j_end, W, S, stride_kt, stride_vt, qk_scale,
            BN: tl.constexpr):
    """One key block [j0, j0 + BN) ∩ [0, j_end) into the running (acc, max, sum) of every row."""
    o_j = j0 + tl.arange(0, BN)
    m_j = o_j < j_end
    # Keys past j_end load as 0: a NaN there would survive the masked p = 0 through the dot.
    b_kt = tl.load(p_k + o_j[None, :] * stride_kt + o_d[:, None], mask=m_d[:, None] & m_j[None, :], other=0.0)
    b_s = dot(b_q, b_kt) * qk_scale  # [BM, BN], log2 units
    b_s = tl.where(visible(r_t[:, None], o_j[None, :], j_end, W, S), b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 there so exp2 sees -inf - 0, not nan.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_p = tl.exp2(b_s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    b_v = tl.load(p_v + o_j[:, None] * stride_vt + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.0)
    acc = acc * alpha[:, None] + dot(b_p.to(b_v.dtype), b_v)
    return acc, m_new, l_i


@triton.jit
def swa_fwd_kernel(
    # pointers
    q, k, v, o, lse, cu_seqlens, blocks,
    # sizes
    T, HQ, HK, D, W, S,
    # strides (elements) of the [B, T, H] axes; the last dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
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
    m_q = m_r[:, None] & m_d[None, :]

    # Bases in the launch's offset type (bos, i_b are INT64-wide): B·T·H·D may pass 2^31. A stride
    # >= 2^31 (a size-1 dim's, with INT64 off) arrives as int64 from Triton and widens its product.
    p_q = q + i_b * stride_qb + (bos + r_t) * stride_qt + r_h * stride_qh
    b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m_q, other=0.0)
    p_k = k + i_b * stride_kb + bos * stride_kt + i_hk * stride_kh
    p_v = v + i_b * stride_vb + bos * stride_vt + i_hk * stride_vh
    qk_scale = scale * LOG2E  # the softmax runs in exp2

    m_i = tl.full([BT * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BT * GP], tl.float32)
    acc = tl.zeros([BT * GP, BD], tl.float32)
    # Sinks left of the span are seen by every row; the span [lo, i1) holds every other visible key.
    lo = tl.maximum(i0 - W + 1, 0)
    sink_hi = tl.minimum(S, lo)
    for j0 in range(0, sink_hi, BN):
        acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, r_t, o_d, m_d, j0, sink_hi, W, S,
                                stride_kt, stride_vt, qk_scale, BN)
    for j0 in range(lo, i1, BN):
        acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, r_t, o_d, m_d, j0, i1, W, S,
                                stride_kt, stride_vt, qk_scale, BN)

    # l >= 1 on every real row: it sees its own key, at the running max or below.
    b_o = acc / l_i[:, None]
    p_o = o + ((i_b * T + bos + r_t) * HQ + r_h) * D
    tl.store(p_o[:, None] + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_q)  # the one downcast of o
    tl.store(lse + (i_b * HQ + r_h) * T + bos + r_t, (m_i + tl.log2(l_i)) * LN2, mask=m_r)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def swa_fwd(q, k, v, window_size, num_sinks, scale, cu_seqlens, o, lse) -> None:
    """Run the forward, writing ``o`` and ``lse`` in place. Arguments are validated by the op.

    Args:
        q: [B, T, HQ, D] fp32/fp16/bf16; k, v: [B, T, HK, D]; last dim contiguous, any other strides.
        window_size: W or None (full causal). num_sinks: S. scale: softmax scale.
        cu_seqlens: None or [N+1] int32/int64 (B = 1).
        o: preallocated contiguous [B, T, HQ, D] in q's dtype; lse: contiguous [B, HQ, T] fp32.
    """
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    BT, GP, BN, num_warps = fwd_config(D, HQ // HK, q.element_size())
    blocks, count = query_blocks(cu_seqlens, B, T, BT)
    if count * HK == 0:
        return
    with device_guard(q):
        swa_fwd_kernel[(count * HK,)](
            q, k, v, o, lse, cu_seqlens, blocks,
            T, HQ, HK, D, window_arg(window_size, T), num_sinks,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            scale,
            BT=BT, GP=GP, BN=BN, BD=block_d(D), IS_VARLEN=cu_seqlens is not None,
            INT64=needs_int64(q, k, v, o, lse),
            num_warps=num_warps,
        )


# Pointer arguments of the swa and cache kernels that are not in the activation dtype.
_POINTER_TYPES = {"lse": "*fp32", "delta": "*fp32", "dlse": "*fp32", "state": "*fp32", "gates": "*fp32",
                  "gates_new": "*fp32", "A": "*fp32", "cu_seqlens": "*i64", "blocks": "*i32", "cache_seqlens": "*i32"}
_ACTIVATIONS = {"q", "k", "v", "o", "do", "dq", "dk", "dv", "k_cache", "v_cache", "k_new", "v_new"}


def aot_case(kernel, constexprs: dict, num_warps: int, dtype: str, label: str, aligned: bool = True,
             must_not_spill: bool = True) -> AOTCase:
    """One compiled variant of a swa / cache kernel as its launcher specialises it.

    ``constexprs`` gives the tiles and flags, and None for each absent optional
    pointer. Pointers are 16-byte aligned (torch's allocations); with
    ``aligned``, D and every stride are multiples of 16 too, as for head dims of
    16, 32, ... in packed projections; otherwise only the pointers are.
    """
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in _POINTER_TYPES:
            types[name] = _POINTER_TYPES[name]
        elif name in _ACTIVATIONS:
            types[name] = f"*{dtype}"
        else:
            types[name] = "fp32" if name == "scale" else "i32"
    divisible = [n for n, t in types.items() if t.startswith("*")]
    if aligned:
        divisible += [n for n in types if n.startswith("stride_") or n in ("D", "K", "V")]
    return AOTCase(f"{dtype} {label}", kernel, types, constexprs, num_warps, divisible=tuple(divisible),
                   must_not_spill=must_not_spill)


ESIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def _fwd_case(dtype: str, D: int, G: int, varlen: bool, must_not_spill: bool = True, int64: bool = False) -> AOTCase:
    BT, GP, BN, num_warps = fwd_config(D, G, ESIZE[dtype])
    tiles = dict(BT=BT, GP=GP, BN=BN, BD=block_d(D), IS_VARLEN=varlen, INT64=int64)
    if not varlen:
        tiles.update(cu_seqlens=None, blocks=None)
    label = f"D={D} G={G}{' varlen' if varlen else ''}{' int64' if int64 else ''}"
    return aot_case(swa_fwd_kernel, tiles, num_warps, dtype, label, aligned=D % 16 == 0, must_not_spill=must_not_spill)


# bf16 at BD = 128 and 256 (MHA, dense); the GQA packing at G = 8 and at G = 3 (padded rows, odd D,
# halved tile), varlen, the former with 64-bit offsets too; fp32 (tf32x3, smaller tiles) at BD = 128
# and 256. fp16 compiles as bf16 does.
AOT_CASES = [_fwd_case("bf16", D, 1, False) for D in (128, 256)] + [
    _fwd_case("bf16", 128, 8, True),
    _fwd_case("bf16", 128, 8, True, int64=True),
    _fwd_case("bf16", 100, 3, True),
    _fwd_case("fp32", 128, 1, True),
    _fwd_case("fp32", 256, 1, False, must_not_spill=False),  # 4 / 8 words at the smallest tile (docstring)
]
