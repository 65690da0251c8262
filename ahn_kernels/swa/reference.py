"""Sliding-window attention with sink tokens: the spec and the vectorised reference.

Visibility (DESIGN §2), with ``i``, ``j`` positions inside one sequence:
key ``j`` is visible to query ``i`` iff ``j <= i`` and (``i - j < W`` or
``j < S``); ``W = None`` is full causal. Every query sees at least itself, so
no softmax row is empty.

- ``masked``: the spec. One explicit ``[T, T]`` mask and ``torch.softmax``,
  computed in the input dtype. O(T²) memory: for tests and small T only.
- ``blockwise`` / ``blockwise_bwd``: what the op runs where no kernel does. Query blocks of
  ``BQ`` rows meet only the keys they can see (the sinks left of the window
  span, then the span), so memory is O(BQ · (S + BQ + W)) per step and never
  T x T. fp32 math for fp16/bf16 (fp64 stays fp64). The backward is the
  flash-attention one: recompute P from lse, ``delta = rowsum(dO · O)``.
- ``decode``: one new token per sequence over the AHN ring-buffer cache.

GQA: query head ``h`` reads key/value head ``h // (HQ / HK)``; k and v are
never repeated in memory (the group axis G = HQ / HK is a view of q).
"""

from __future__ import annotations

import torch

BQ = 64  # query rows per block of the blockwise reference


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spans(cu_seqlens, T: int) -> list[tuple[int, int]]:
    """[bos, eos) of each sequence along T (one span for the dense batch). Reads cu_seqlens on the host."""
    if cu_seqlens is None:
        return [(0, T)]
    c = cu_seqlens.tolist()
    return [(c[n], c[n + 1]) for n in range(len(c) - 1)]


def _visible(i: torch.Tensor, j: torch.Tensor, window_size, num_sinks: int) -> torch.Tensor:
    """Mask [len(i), len(j)] from query positions i and key positions j (same sequence)."""
    i, j = i[:, None], j[None, :]
    vis = j <= i
    if window_size is not None:
        vis = vis & ((i - j < window_size) | (j < num_sinks))
    return vis


def masked(q, k, v, window_size, num_sinks=0, scale=None, cu_seqlens=None):
    """Attention through one explicit visibility mask, in the input dtype (the spec).

    Args:
        q: [B, T, HQ, D]; k, v: [B, T, HK, D] with HK dividing HQ.
        window_size: W, or None for full causal. num_sinks: S.
        scale: softmax scale, default D^-0.5.
        cu_seqlens: [N+1] for a packed batch (B = 1); positions restart per sequence.
    Returns:
        o [B, T, HQ, D] and lse [B, HQ, T], both in q.dtype.
    """
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    pos = torch.arange(T, device=q.device)
    seq = torch.zeros(T, dtype=torch.long, device=q.device)
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        seq = torch.searchsorted(cu[1:], pos, right=True)
        pos = pos - cu[seq]
    visible = _visible(pos, pos, window_size, num_sinks) & (seq[:, None] == seq[None, :])  # [T, T]
    kr = k.repeat_interleave(G, dim=2)  # [B, T, HQ, D]
    vr = v.repeat_interleave(G, dim=2)  # [B, T, HQ, D]
    s = torch.einsum("bihd,bjhd->bhij", q, kr) * scale  # [B, HQ, T, T]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, HQ, T]
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhij,bjhd->bihd", p, vr)  # [B, T, HQ, D]
    return o, lse


def _key_ranges(i0: int, window_size, num_sinks: int) -> tuple[int, int]:
    """For a query block starting at local row i0: (sink_hi, lo).

    The block sees the sinks [0, sink_hi) that lie left of its window span and
    the span [lo, i1): no key is listed twice, every sink left of the span is
    visible to every row of the block (it is < lo <= i0 and < S).
    """
    lo = 0 if window_size is None else max(0, i0 - window_size + 1)
    return min(num_sinks, lo), lo


def _block(q, k, v, bos, i0, i1, window_size, num_sinks, scale):
    """Scores of rows [i0, i1) against their visible keys, in the compute dtype.

    Returns (qb [B, n, HK, G, D], kb, vb [B, L, HK, D], s [B, HK, G, n, L], (sink_hi, lo)).
    """
    B, _, HQ, D = q.shape
    HK = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    sink_hi, lo = _key_ranges(i0 - bos, window_size, num_sinks)
    qb = q[:, i0:i1].to(cdt).unflatten(2, (HK, HQ // HK))  # [B, n, HK, G, D]
    kb = torch.cat([k[:, bos:bos + sink_hi], k[:, bos + lo:i1]], dim=1).to(cdt)  # [B, L, HK, D]
    vb = torch.cat([v[:, bos:bos + sink_hi], v[:, bos + lo:i1]], dim=1).to(cdt)  # [B, L, HK, D]
    rows = torch.arange(i0 - bos, i1 - bos, device=q.device)
    cols = torch.cat([torch.arange(sink_hi, device=q.device), torch.arange(lo, i1 - bos, device=q.device)])
    vis = _visible(rows, cols, window_size, num_sinks)  # [n, L]
    s = torch.einsum("bqhgd,blhd->bhgql", qb, kb) * scale  # [B, HK, G, n, L]
    s = s.masked_fill(~vis, float("-inf"))
    return qb, kb, vb, s, (sink_hi, lo)


def blockwise(q, k, v, window_size, num_sinks, scale, cu_seqlens=None):
    """Memory-bounded attention forward, what the op runs where no kernel serves it.

    Args as ``masked`` (scale required). Returns o [B, T, HQ, D] in q.dtype and
    lse [B, HQ, T] in fp32 (fp64 for fp64 inputs).
    """
    B, T, HQ, D = q.shape
    cdt = _compute_dtype(q.dtype)
    o = q.new_empty(B, T, HQ, D)  # [B, T, HQ, D]
    lse = q.new_empty(B, HQ, T, dtype=cdt)  # [B, HQ, T]
    for bos, eos in _spans(cu_seqlens, T):
        for i0 in range(bos, eos, BQ):
            i1 = min(i0 + BQ, eos)
            _, _, vb, s, _ = _block(q, k, v, bos, i0, i1, window_size, num_sinks, scale)
            m = torch.logsumexp(s, dim=-1)  # [B, HK, G, n]
            p = torch.exp(s - m[..., None])
            ob = torch.einsum("bhgql,blhd->bqhgd", p, vb)  # [B, n, HK, G, D]
            o[:, i0:i1] = ob.flatten(2, 3)  # cast once to q.dtype at the store
            lse[:, :, i0:i1] = m.flatten(1, 2)
    return o, lse


def blockwise_bwd(do, dlse, q, k, v, o, lse, window_size, num_sinks, scale, cu_seqlens=None):
    """Gradients of ``blockwise`` from the saved o and lse (flash-attention backward).

    Args:
        do: [B, T, HQ, D]; dlse: [B, HQ, T] or None; o, lse: the forward's outputs.
    Returns:
        dq [B, T, HQ, D], dk, dv [B, T, HK, D], in the input dtypes.

    With s the scaled scores and P = exp(s - lse): dP = dO Vᵀ and
    dS = P ∘ (dP - delta + dlse), delta_i = Σ_d dO_id O_id (= Σ_j P_ij dP_ij);
    dQ = scale dS K, dK = scale dSᵀ Q, dV = Pᵀ dO, summed over the G query
    heads of a group for dK, dV.
    """
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    G = HQ // HK
    cdt = _compute_dtype(q.dtype)
    dq = q.new_empty(B, T, HQ, D)  # [B, T, HQ, D]
    # dk, dv collect contributions from every block that sees a key: fp32 until the final cast.
    dk = k.new_zeros(B, T, HK, D, dtype=cdt)  # [B, T, HK, D]
    dv = v.new_zeros(B, T, HK, D, dtype=cdt)  # [B, T, HK, D]
    for bos, eos in _spans(cu_seqlens, T):
        for i0 in range(bos, eos, BQ):
            i1 = min(i0 + BQ, eos)
            qb, kb, vb, s, (sink_hi, lo) = _block(q, k, v, bos, i0, i1, window_size, num_sinks, scale)
            lb = lse[:, :, i0:i1].to(cdt).unflatten(1, (HK, G))  # [B, HK, G, n]
            p = torch.exp(s - lb[..., None])  # [B, HK, G, n, L]
            dob = do[:, i0:i1].to(cdt).unflatten(2, (HK, G))  # [B, n, HK, G, D]
            ob = o[:, i0:i1].to(cdt).unflatten(2, (HK, G))  # [B, n, HK, G, D]
            delta = (dob * ob).sum(-1).permute(0, 2, 3, 1)  # [B, HK, G, n]
            if dlse is not None:
                delta = delta - dlse[:, :, i0:i1].to(cdt).unflatten(1, (HK, G))
            dp = torch.einsum("bqhgd,blhd->bhgql", dob, vb)  # [B, HK, G, n, L]
            ds = p * (dp - delta[..., None])
            dq[:, i0:i1] = (torch.einsum("bhgql,blhd->bqhgd", ds, kb) * scale).flatten(2, 3)
            dkb = torch.einsum("bhgql,bqhgd->blhd", ds, qb) * scale  # [B, L, HK, D]
            dvb = torch.einsum("bhgql,bqhgd->blhd", p, dob)  # [B, L, HK, D]
            dk[:, bos:bos + sink_hi] += dkb[:, :sink_hi]
            dk[:, bos + lo:i1] += dkb[:, sink_hi:]
            dv[:, bos:bos + sink_hi] += dvb[:, :sink_hi]
            dv[:, bos + lo:i1] += dvb[:, sink_hi:]
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def ring_slot(pos: torch.Tensor, window_size: int, num_sinks: int) -> torch.Tensor:
    """Cache slot of token ``pos`` (DESIGN §2): pos if pos < S, else S + (pos - S) mod W."""
    return torch.where(pos < num_sinks, pos, num_sinks + (pos - num_sinks).remainder(window_size))


def decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks, scale):
    """One decode step over the ring-buffer cache; writes k_new/v_new into their slot in place.

    Args:
        q: [B, 1, HQ, D]; k_new, v_new: [B, 1, HK, D].
        k_cache, v_cache: [B, S + W, HK, D], token p in slot ``ring_slot(p)``.
        cache_seqlens: [B] int, the position p of the new token.
    Returns:
        o [B, 1, HQ, D] in q.dtype. No host sync, no data-dependent shape.

    After the write the cache holds exactly the keys token p may see: the
    sinks and the last W non-sink tokens. Slots are valid iff slot <= p (all of
    them once p >= S + W - 1); softmax does not care about slot order.
    """
    B, _, HQ, D = q.shape
    L, HK = k_cache.shape[1], k_cache.shape[2]
    cdt = _compute_dtype(q.dtype)
    pos = cache_seqlens.long()  # [B]
    rows = torch.arange(B, device=q.device)
    slot = ring_slot(pos, window_size, num_sinks)  # [B]
    k_cache[rows, slot] = k_new[:, 0]
    v_cache[rows, slot] = v_new[:, 0]
    valid = torch.arange(L, device=q.device)[None, :] <= pos[:, None]  # [B, L]
    qb = q[:, 0].to(cdt).unflatten(1, (HK, HQ // HK))  # [B, HK, G, D]
    # The reference upcasts the whole cache per step; a kernel accumulates in fp32 instead.
    s = torch.einsum("bhgd,blhd->bhgl", qb, k_cache.to(cdt)) * scale  # [B, HK, G, L]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    # Slots never written may hold anything (NaN too); 0 · NaN would leak through the matmul.
    vb = v_cache.to(cdt).masked_fill(~valid[:, :, None, None], 0)  # [B, L, HK, D]
    o = torch.einsum("bhgl,blhd->bhgd", p, vb)  # [B, HK, G, D]
    return o.reshape(B, 1, HQ, D).to(q.dtype)
