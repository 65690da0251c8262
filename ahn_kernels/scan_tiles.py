"""The tile pieces every chunked scan shares: the chunked delta rule (``delta_rule/triton_chunk*.py``)
and the SSD (``ssd/triton_*.py``) are both gated linear attention within a chunk, with a scalar
log decay per token (g of the gated delta rule, dt·A of the SSD) and a state carried between chunks.

Pieces (both ops call each, but the products: see there):

- Chunk layout: every (lag-shifted, varlen or dense) sequence is cut into chunks of its own;
  sequence n absorbs M_n = max(0, L_n - W - S) tokens, token m reading its inputs at row
  bos + S + m and read out at row bos + S + W + m. ``chunk_slots`` numbers the chunks on the
  device (no host sync) into a slot table (sequence, chunk in sequence), an upper bound of
  slots under varlen whose extra slots say -1; ``chunk_at`` / ``sequence`` give a kernel its
  slot's sequence, chunk, batch row, bos and M.
- Products at a stated precision: ``dot_in`` for raw input tiles (16-bit ones exact on the
  tensor cores), ``dot_f32`` for computed fp32 tiles (IEEE fp32 for fp32 inputs, tf32 for
  16-bit ones), ``dot_tf32`` (the interpreter truncates operands to tf32's mantissa). The delta
  rule's policy; the SSD kernels still multiply fp32 operands in tf32x3 (their docstrings), whose
  move to these is not yet checked against the AOT spills and the 16-bit bars.
- Pair decays Γ_ij = exp(Σ_{j<m<=i} g_m) (``pair_decays``) and the decays to the chunk's
  end exp(Σ_{m>j} g_m) (``rest_sums``), each a sum of the steps it spans, taken directly:
  never the difference of two prefix sums, which in fp32 loses the small differences after a
  large step (one SSD token with dt·A = -1e4 put the prefix sums near -1e4, and every later
  pair's decay off by 6e-4 relative: eps · 1e4).
- The gradient of a log decay as crossing sums (``crossing_sums``): d g_k sums each term whose
  decay spans step k (readout i >= k, key j < k), never "readout terms minus key terms, then a
  suffix sum": there the pairs on one side of k cancel, and their fp32 rounding swamps a
  gradient that strong decays make tiny (Triton delta rule at g = -8 per token: dg 5.3e-4
  relative; SSD at dt·A = -20 .. -200: dA off by 1e9).

Not shared, because it is not the same math: the pass over a sequence's chunks. The delta
rule's carries S through the UT-corrected Δ = A diag(β)(V - K S_0), which reads the state
entering the chunk, so the chunks run one after another within one program per sequence
and V tile. The SSD's is a linear scan h <- exp(a_C) h + (chunk state), whose chunk states
are independent of h: they are formed for every chunk in parallel and the pass is an
elementwise recurrence over [P, N_state] blocks.

No kernel lives here (so no ``triton*.py`` name, whose modules ``triton_aot`` compiles): the
pieces are compiled into the kernels that call them, and those kernels' AOT cases cover them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ----------------------------------------------------------------------------
# chunk layout
# ----------------------------------------------------------------------------
@triton.jit
def sequence(i_n, cu_seqlens, T, W, S, IS_VARLEN: tl.constexpr, INT64: tl.constexpr):
    """(batch index, first row, memory steps) of sequence i_n in the launch's offset type (``_index``:
    int64 where B·T·H·D may pass 2^31)."""
    if IS_VARLEN:
        i_b = tl.zeros([], dtype=tl.int64 if INT64 else tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64 if INT64 else tl.int32)
        n_rows = tl.load(cu_seqlens + i_n + 1).to(tl.int64 if INT64 else tl.int32) - bos
    else:
        i_b = i_n.to(tl.int64 if INT64 else tl.int32)
        bos = tl.zeros([], dtype=tl.int64 if INT64 else tl.int32)
        n_rows = tl.zeros([], dtype=tl.int64 if INT64 else tl.int32) + T
    return i_b, bos, tl.maximum(n_rows - W - S, 0)


@triton.jit
def chunk_at(slots, i_s, cu_seqlens, T, W, S, IS_VARLEN: tl.constexpr, INT64: tl.constexpr):
    """(sequence, chunk in sequence, batch index, first row, memory steps) of slot i_s of the
    ``chunk_slots`` table; the sequence is -1 past the last chunk, and the caller returns."""
    i_n = tl.load(slots + 2 * i_s)
    i_b, bos, M = sequence(tl.maximum(i_n, 0), cu_seqlens, T, W, S, IS_VARLEN, INT64)
    return i_n, tl.load(slots + 2 * i_s + 1), i_b, bos, M


def chunk_slots(cu_seqlens, B: int, T: int, C: int, W: int, S: int, device):
    """Number the chunks of every sequence, on the device (no host sync).

    Returns ``(slots, first_slot)``: slots [NS, 2] int32 holds (sequence, chunk in sequence)
    per slot, (-1, 0) past the last one; first_slot [N] int32 is each sequence's first slot.
    NS is exact for equal-length batches and the bound cdiv(T, C) + N under varlen.
    """
    if cu_seqlens is None:
        steps = torch.full((B,), max(T - W - S, 0), dtype=torch.int64, device=device)  # [N]
        n_slots = B * triton.cdiv(max(T - W - S, 0), C)
    else:
        steps = (cu_seqlens[1:] - cu_seqlens[:-1] - W - S).clamp(min=0)  # [N]
        n_slots = triton.cdiv(T, C) + steps.shape[0]
    chunks = (steps + C - 1) // C  # [N]
    ends = chunks.cumsum(0)  # [N]
    slot = torch.arange(n_slots, device=device)  # [NS]
    seq = torch.searchsorted(ends, slot, right=True)  # [NS]
    valid = seq < steps.shape[0]
    seq = seq.clamp(max=max(steps.shape[0] - 1, 0))
    table = torch.stack([torch.where(valid, seq, -1), torch.where(valid, slot - (ends - chunks)[seq], 0)], 1)
    return table.to(torch.int32).contiguous(), (ends - chunks).to(torch.int32)


# ----------------------------------------------------------------------------
# products
# ----------------------------------------------------------------------------
@triton.jit
def dot_in(a, b, DT: tl.constexpr):
    """a @ b of raw input tiles (values of dtype DT held in fp32), fp32 accumulation.

    16-bit operands go to the tensor cores as they are: their products are exact in fp32.
    """
    if DT == tl.float32:
        return dot_f32(a, b, DT)
    elif INTERPRETED:
        # Triton 3.9's interpreter multiplies bf16 tiles wrongly (measured: an error of 2e10 on
        # a 16 x 16 product of N(0, 1) entries); the fp32 values are the same numbers.
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def dot_tf32(a, b):
    """a @ b in tf32 on the tensor cores; the interpreter, which has no tf32, truncates the
    operands to its 10 mantissa bits (at least the hardware's rounding error) and multiplies in fp32."""
    if INTERPRETED:
        a = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        b = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def dot_f32(a, b, DT: tl.constexpr):
    """a @ b of computed fp32 tiles (states, Δ, A): IEEE fp32 for fp32 inputs, tf32 for 16-bit ones.

    Rounding them to bf16 instead costs 4x the bf16 output bar (measured 1.2e-2 vs 3e-3 relative
    RMSE of o at T = 130, K = 60, V = 100). tf32x3 would be fp32-like on the tensor cores but
    spills (ptxas, sm_90: 1,642 words for one [32, 256] x [256, 32] product; IEEE: none).
    """
    if DT == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return dot_tf32(a, b)


# ----------------------------------------------------------------------------
# decays
# ----------------------------------------------------------------------------
@triton.jit
def exclusive_cumsum(b_x, REVERSE: tl.constexpr):
    """[BT] Σ_{m < t} x_m (REVERSE: Σ_{m > t} x_m) as a masked [BT, BT] sum, not an inclusive sum
    minus x_t (x_t may dwarf the sum before it). (Not ``tl.associative_scan``: the interpreter runs
    a custom scan element by element, seconds per tile.)"""
    o_t = tl.arange(0, b_x.shape[0])
    if REVERSE:
        m_t = o_t[None, :] > o_t[:, None]
    else:
        m_t = o_t[None, :] < o_t[:, None]
    return tl.sum(tl.where(m_t, b_x[None, :], 0.0), 1)


@triton.jit
def rest_sums(b_g):
    """[BT] Σ_{m > t} g_m: the log decay from step t to the end of the block."""
    return exclusive_cumsum(b_g, True)


@triton.jit
def pair_decays(b_gi, b_gj, between, o_i, o_j, DIAGONAL: tl.constexpr):
    """Γ_ij = exp(Σ_{j < m <= i} g_m) [BI, BJ] for rows i (steps b_gi [BI]) and columns j (b_gj [BJ]),
    0 where j > i (exp never sees a positive sum there).

    ``DIAGONAL``: rows and columns are the same block (b_gj is b_gi, o_j is o_i); else the column
    block ends before the row block starts, and ``between`` is the sum of the steps strictly between
    them. Either way the exponent is a sum of the steps it spans (module docstring).
    """
    if DIAGONAL:
        # row m, column j: g_m where m > j; summed down the rows to i, Σ_{j < m <= i} g_m
        b_seg = tl.cumsum(tl.where(o_i[:, None] > o_j[None, :], b_gi[:, None], 0.0), 0)
        return tl.exp(tl.where(o_i[:, None] >= o_j[None, :], b_seg, float("-inf")))
    else:
        return tl.exp(tl.cumsum(b_gi, 0)[:, None] + between + rest_sums(b_gj)[None, :])


@triton.jit
def chunk_decays(b_g, BT: tl.constexpr):
    """From a chunk's steps g [BT]: G (prefix sums), Γ [BT, BT] (``pair_decays``), the rest
    Σ_{m > t} g_m [BT] (``rest_sums``) and G_C."""
    o_t = tl.arange(0, BT)
    return tl.cumsum(b_g, 0), pair_decays(b_g, b_g, 0.0, o_t, o_t, True), rest_sums(b_g), tl.sum(b_g, 0)


# ----------------------------------------------------------------------------
# gradients of log decays
# ----------------------------------------------------------------------------
@triton.jit
def crossing_sums(b_w, b_carry, o_i, o_k, diagonal):
    """The terms crossing each step k of a block of columns: for the pair terms w [BI, BK] (rows
    i = readouts, columns j = keys), Σ_{i >= k} (carry_i + Σ_{j < k} w_ij) for every column k [BK],
    and the carry for the next block of columns, carry + Σ_j w_ij [BI] (the diagonal block is the last).

    carry_i [BI] holds what row i brings to every step up to its own: the terms of the columns
    before the block, and a readout of the state entering the chunk (decay exp(G_i)).
    ``diagonal``: rows and columns are the same steps (o_i is o_k; w_ij for j >= i crosses
    nothing and is not counted); else every row comes after the block's columns.
    """
    b_in = tl.sum(tl.where(o_i[:, None] >= o_k[None, :], b_carry[:, None], 0.0), 0)
    if diagonal:
        # Σ_{j < k} of S_kj = Σ_{i >= k} w_ij (a suffix sum down each column)
        b_s = tl.cumsum(b_w, 0, reverse=True)
        b_pairs = tl.sum(tl.where(o_k[None, :] < o_k[:, None], b_s, 0.0), 1)
    else:
        b_pairs = exclusive_cumsum(tl.sum(b_w, 0), False)
    return b_in + b_pairs, b_carry + tl.sum(b_w, 1)
