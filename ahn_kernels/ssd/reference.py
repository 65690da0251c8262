"""Mamba2's SSD (state space duality) in plain PyTorch: the spec of every kernel of this stem.

Semantics are mamba's ``mamba_chunk_scan_combined`` and ``selective_state_update``.
Head h reads B/C group g = h // (H // G) and keeps a state [P, N_state]:

    dt_t = clamp(softplus(dt_raw_t + dt_bias), dt_limit)   softplus optional, threshold 20
    h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ
    y_t  = (h_t C_t + D x_t) · silu(z_t)

Like mamba, the chunked scan always clamps dt to ``dt_limit`` (default [0, inf),
so a negative dt without softplus becomes 0); the decode step has no limit.

Lag (DESIGN §1): with ``lag=(W, S)`` the state of a sequence absorbs tokens
S .. t-W and row t reads it with C_t; rows with t - W < S have an empty memory
and read 0. The skip term D x_t and the gate silu(z_t) belong to token t, not to
the memory, so they still apply to row t (AHN passes neither). The initial
state is the state before token S; the final state the one after token
T_seq-1-W.

- ``recurrent``: the token loop (the oracle; slow).
- ``chunked``: mamba's chunked algorithm, vectorised over chunks, sequences and
  heads, with a Python loop only in the state pass. The op runs it where
  no kernel serves it (and its backward, ``chunked_bwd``, on every device today).
- ``chunked_bwd``: the gradients of ``chunked`` by explicit math (mamba's stages
  in reverse); the op's backward runs it.
- ``state_update``: one decode step, state updated in place.

All accept fp32, fp16, bf16 and fp64 and are autograd-capable. They compute in
fp32 (fp64 for fp64 inputs); gates (dt, A, D, dt_bias) are read in that dtype,
never rounded to fp16/bf16. The output is cast once to x's dtype; states stay in
the compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dt(dt, dt_bias, dt_softplus, dt_limit, cd):
    """The step size in the compute dtype: bias, softplus (threshold 20, as mamba), clamp."""
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt, threshold=20.0)  # dt > 20 stays dt, like mamba's `dt <= 20` branch
    if dt_limit is not None:
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def _absorb(h, x, dt, A, B):
    """h [.., H, P, N_state] after one token: exp(dt A) h + dt x Bᵀ; x [.., H, P], dt [.., H], B [.., H, N_state]."""
    decay = torch.exp(dt * A)[..., None, None]
    return decay * h + (dt[..., None] * x)[..., None] * B[..., None, :]


def _finish(y, x, D, z):
    """The per-token terms outside the state: + D x, then · silu(z). y, x [.., H, P] in the compute dtype."""
    if D is not None:
        D = D.to(y.dtype)
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _spans(B: int, T: int, cu_seqlens) -> list[tuple[int, int]]:
    """[bos, eos) of each sequence along the flattened [B * T] token axis. Reads cu_seqlens on the host."""
    if cu_seqlens is None:
        return [(b * T, (b + 1) * T) for b in range(B)]
    c = cu_seqlens.tolist()
    return [(c[n], c[n + 1]) for n in range(len(c) - 1)]


def _initial(initial_states, N, H, P, n_state, cd, device):
    if initial_states is None:
        return torch.zeros(N, H, P, n_state, dtype=cd, device=device)  # [N, H, P, N_state]
    return initial_states.to(cd)


def recurrent(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, cu_seqlens=None,
              dt_softplus=False, dt_limit=(0.0, math.inf), lag=None):
    """Token-by-token SSD (the test oracle).

    Args:
        x: [B, T, H, P]. dt: [B, T, H]. A: [H]. B, C: [B, T, G, N_state], G divides H.
        D: [H] or [H, P] or None. z: [B, T, H, P] or None. dt_bias: [H] or None.
        initial_states: [N, H, P, N_state] or None (zeros).
        cu_seqlens: [N+1] int32/int64 with B = 1, or None (N = B).
        dt_softplus, dt_limit, lag: see the module docstring.
    Returns:
        out [B, T, H, P] in x.dtype, final_states [N, H, P, N_state] in the compute dtype.
    """
    cd = _compute_dtype(x.dtype)
    Bsz, T, H, P = x.shape
    n_state = B.shape[-1]
    R = H // B.shape[2]
    xf = x.to(cd).reshape(Bsz * T, H, P)
    dtf = _dt(dt, dt_bias, dt_softplus, dt_limit, cd).reshape(Bsz * T, H)
    A = A.to(cd)
    Bh = B.to(cd).repeat_interleave(R, dim=2).reshape(Bsz * T, H, n_state)  # [B * T, H, N_state]
    Ch = C.to(cd).repeat_interleave(R, dim=2).reshape(Bsz * T, H, n_state)  # [B * T, H, N_state]
    window, sinks = lag or (0, 0)
    spans = _spans(Bsz, T, cu_seqlens)
    h0 = _initial(initial_states, len(spans), H, P, n_state, cd, x.device)
    # Per-token views by unbinding, not indexing: the backward of each xf[i] would
    # materialise a zero tensor of xf's full size (autograd O(T^2) over the loop).
    xs, dts, Bs, Cs = xf.unbind(0), dtf.unbind(0), Bh.unbind(0), Ch.unbind(0)
    rows, finals = [], []
    for n, (bos, eos) in enumerate(spans):
        h = h0[n]
        for t in range(eos - bos):
            j = t - window  # the token absorbed at step t
            if j < sinks:
                rows.append(xf.new_zeros(H, P))  # empty memory
                continue
            h = _absorb(h, xs[bos + j], dts[bos + j], A, Bs[bos + j])
            rows.append(torch.einsum("hpn,hn->hp", h, Cs[bos + t]))
        finals.append(h)
    y = torch.stack(rows) if rows else xf.new_zeros(0, H, P)  # [B * T, H, P]
    y = _finish(y, xf, D, None if z is None else z.reshape(Bsz * T, H, P))
    return y.reshape(Bsz, T, H, P).to(x.dtype), torch.stack(finals) if finals else h0


def _layout(spans, window, sinks, chunk_size, rows, device):
    """Where the chunks of the scan read and write, in the flattened token axis of ``rows`` rows.

    Sequence n absorbs M_n = max(0, L_n - W - S) tokens: rows bos+S+m (read for
    x, dt, B), each read out at row bos+S+W+m (with that row's C), m < M_n. They
    fill ceil(M_n / chunk_size) chunks of their own, so no chunk straddles two
    sequences; slots past M_n are padding and read row ``rows``, a zero row
    (dt = 0 there: no decay, no input, so the state passes through unchanged).

    Returns kv [NC * chunk_size] and q [NC * chunk_size] (the row each slot
    reads), out [rows] (the slot each row's memory readout comes from;
    NC * chunk_size, a zero slot, for rows with an empty memory) and the chunk
    count of each sequence. Every real row appears at most once in kv, q, out.
    """
    kv, q, out_rows, out_slots, n_chunks = [], [], [], [], []
    slot = 0
    for bos, eos in spans:
        m = max(0, eos - bos - window - sinks)
        nc = -(-m // chunk_size)
        pad = torch.full((nc * chunk_size - m,), rows)
        first = bos + sinks
        kv += [torch.arange(first, first + m), pad]
        q += [torch.arange(first + window, first + window + m), pad]
        out_rows.append(torch.arange(first + window, first + window + m))
        out_slots.append(torch.arange(slot, slot + m))
        slot += nc * chunk_size
        n_chunks.append(nc)
    out = torch.full((rows,), slot)
    if out_rows:
        out[torch.cat(out_rows)] = torch.cat(out_slots)
    empty = torch.zeros(0, dtype=torch.long)
    kv = torch.cat(kv) if kv else empty
    q = torch.cat(q) if q else empty
    return kv.to(device), q.to(device), out.to(device), n_chunks


def _steps(n_chunks, device):
    """The state pass schedule: step k advances every sequence that has a k-th chunk.

    Returns, per step, (the sequences, the index of their k-th chunk), so the pass
    loops max(n_chunks) times, batched over sequences.
    """
    first = [0]
    for c in n_chunks:
        first.append(first[-1] + c)
    steps = []
    for k in range(max(n_chunks, default=0)):
        seqs = [n for n, c in enumerate(n_chunks) if c > k]
        steps.append((torch.tensor(seqs, device=device), torch.tensor([first[n] + k for n in seqs], device=device)))
    return steps


def _to_chunks(t, idx, chunk_size):
    """[B, T, ...] -> [NC, chunk_size, ...]: slot i reads row idx[i] of the flattened token axis (B * T: zeros)."""
    flat = t.reshape(-1, *t.shape[2:])
    flat = torch.cat([flat, flat.new_zeros(1, *t.shape[2:])])  # [B * T + 1, ...]
    return flat[idx].view(-1, chunk_size, *t.shape[2:])


def _from_chunks(g, idx, shape):
    """The gradient of ``_to_chunks``: g [NC, chunk_size, ...] summed back into rows, as ``shape`` [B, T, ...]."""
    rows = shape[0] * shape[1]
    flat = g.new_zeros(rows + 1, *shape[2:])  # [B * T + 1, ...]; row B * T collects the padding
    flat.index_add_(0, idx, g.reshape(-1, *shape[2:]))
    return flat[:rows].view(shape)


def _segsum(a):
    """a [..., L] -> [..., L, L]: out[..., i, j] = a_{j+1} + ... + a_i for j <= i, -inf for j > i.

    Summed directly instead of as cumsum_i - cumsum_j, which cancels in fp32 when
    the prefix sums are long; and the -inf (rather than a 0 mask after exp) keeps
    exp away from the positive exponents above the diagonal, so no 0·inf appears
    in the forward or the backward.
    """
    L = a.shape[-1]
    below = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # [L, L]: j < i
    terms = a[..., :, None].expand(*a.shape, L).masked_fill(~below, 0)  # [..., L, L]: a_i where j < i
    causal = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()  # [L, L]: j <= i
    return terms.cumsum(-2).masked_fill(~causal, -math.inf)


def _segsum_bwd(dseg):
    """The gradient of ``_segsum``: d a_k = sum of dseg[i, j] over i >= k > j."""
    L = dseg.shape[-1]
    left = F.pad(dseg.cumsum(-1)[..., :-1], (1, 0))  # [..., i, k] = sum_{j < k} dseg[i, j]
    causal = torch.ones(L, L, dtype=torch.bool, device=dseg.device).tril()  # [L, L]: k <= i
    return left.masked_fill(~causal, 0).sum(-2)


def _state_pass(states, decay, h0, steps):
    """Carry the state over chunks: h_out = decay h_in + states; a sequence's first chunk starts from h0.

    states [NC, H, P, N_state] (each chunk's own contribution at its end), decay
    [NC, H], h0 [N, H, P, N_state]. Returns h_in [NC, H, P, N_state] (the state
    entering each chunk) and the final state per sequence [N, H, P, N_state]
    (h0 for a sequence with no chunk).
    """
    h = h0.clone()  # [N, H, P, N_state]; a copy, so the final state never aliases initial_states
    entering, order = [], []
    for seqs, ids in steps:
        hk = h[seqs]  # [len(seqs), H, P, N_state]
        entering.append(hk)
        order.append(ids)
        h = h.index_copy(0, seqs, decay[ids, :, None, None] * hk + states[ids])
    if not entering:
        return torch.zeros_like(states), h
    return torch.cat(entering)[torch.argsort(torch.cat(order))], h


def _state_pass_bwd(dh_in, dfinal, h_in, decay, steps):
    """The gradient of ``_state_pass``, walking the chunks backwards; returns dstates, ddecay, dh0."""
    g = dfinal.clone()  # [N, H, P, N_state]: gradient w.r.t. each sequence's running state
    dstates = torch.zeros_like(dh_in)  # [NC, H, P, N_state]
    ddecay = torch.zeros_like(decay)  # [NC, H]
    for seqs, ids in reversed(steps):
        gk = g[seqs]  # gradient w.r.t. the state leaving chunk ids
        dstates[ids] = gk
        ddecay[ids] = (gk * h_in[ids]).sum((-2, -1))
        g[seqs] = dh_in[ids] + decay[ids, :, None, None] * gk
    return dstates, ddecay, g


def _ssd(x, dt, A, B, C, h0, steps):
    """Chunked SSD over NC chunks of L tokens (mamba's stages).

    x [NC, L, H, P], dt [NC, L, H], A [H], B, C [NC, L, G, N_state],
    h0 [N, H, P, N_state]; ``steps`` from ``_steps``.
    Returns y [NC, L, H, P] (the memory readout), the final states
    [N, H, P, N_state] and what ``_ssd_bwd`` needs.
    """
    NC, L, H, P = x.shape
    G, n_state = B.shape[2:]
    R = H // G
    dA = (dt * A).transpose(1, 2)  # [NC, H, L], fp32 (fp64) like every prefix sum below
    E = torch.exp(_segsum(dA)).view(NC, G, R, L, L)  # [NC, G, R, L, L]: decay from token j to token i
    xdt = (x * dt[..., None]).view(NC, L, G, R, P)  # [NC, L, G, R, P]
    # 1. intra-chunk: y_i = sum_{j <= i} (C_i . B_j) E_ij dt_j x_j; C Bᵀ once per group
    CB = torch.einsum("clgn,csgn->cgls", C, B)  # [NC, G, L, L]
    y = torch.einsum("cgls,cgrls,csgrp->clgrp", CB, E, xdt)  # [NC, L, G, R, P]
    # 2. each chunk's own end state: sum_j E_{L-1, j} dt_j x_j B_jᵀ
    states = torch.einsum("cgrs,csgrp,csgn->cgrpn", E[..., -1, :], xdt, B).reshape(NC, H, P, n_state)
    # 3. state pass, sequential over chunks
    decay = torch.exp(dA.sum(-1))  # [NC, H]
    h_in, final = _state_pass(states, decay, h0, steps)
    # 4. inter-chunk: exp(dA_0 + ... + dA_i) C_i h_in
    from_start = torch.exp(dA.cumsum(-1)).view(NC, G, R, L)  # [NC, G, R, L]
    h_in_g = h_in.view(NC, G, R, P, n_state)
    y = y + torch.einsum("clgn,cgrpn,cgrl->clgrp", C, h_in_g, from_start)
    return y.reshape(NC, L, H, P), final, (E, xdt, CB, decay, h_in_g, from_start)


def _ssd_bwd(dy, dfinal, x, dt, A, B, C, saved, steps):
    """The gradient of ``_ssd`` for dy [NC, L, H, P] and dfinal [N, H, P, N_state]: dx, ddt, dA, dB, dC, dh0."""
    E, xdt, CB, decay, h_in_g, from_start = saved
    NC, L, H, P = x.shape
    G, n_state = B.shape[2:]
    R = H // G
    dy = dy.view(NC, L, G, R, P)
    # 4. inter-chunk
    dfrom_start = torch.einsum("clgrp,clgn,cgrpn->cgrl", dy, C, h_in_g)
    dC = torch.einsum("cgrl,clgrp,cgrpn->clgn", from_start, dy, h_in_g)
    dh_in = torch.einsum("cgrl,clgrp,clgn->cgrpn", from_start, dy, C).reshape(NC, H, P, n_state)
    # 3. state pass
    dstates, ddecay, dh0 = _state_pass_bwd(dh_in, dfinal, h_in_g.reshape(NC, H, P, n_state), decay, steps)
    dstates = dstates.view(NC, G, R, P, n_state)
    # 2. chunk end states
    to_end = E[..., -1, :]  # [NC, G, R, L]
    dE = torch.einsum("clgrp,csgrp,cgls->cgrls", dy, xdt, CB)  # [NC, G, R, L, L]
    dE[..., -1, :] += torch.einsum("cgrpn,csgrp,csgn->cgrs", dstates, xdt, B)
    dxdt = torch.einsum("cgrs,cgrpn,csgn->csgrp", to_end, dstates, B)
    dB = torch.einsum("cgrs,csgrp,cgrpn->csgn", to_end, xdt, dstates)
    # 1. intra-chunk
    dxdt += torch.einsum("cgls,cgrls,clgrp->csgrp", CB, E, dy)
    dCB = torch.einsum("cgrls,clgrp,csgrp->cgls", E, dy, xdt)  # [NC, G, L, L]
    dC += torch.einsum("cgls,csgn->clgn", dCB, B)
    dB += torch.einsum("cgls,clgn->csgn", dCB, C)
    # every decay is exp of a sum of dA = dt A
    ddA = _segsum_bwd((dE * E).view(NC, H, L, L))  # [NC, H, L]
    ddA += (dfrom_start * from_start).view(NC, H, L).flip(-1).cumsum(-1).flip(-1)
    ddA += (ddecay * decay)[..., None]
    ddA = ddA.transpose(1, 2)  # [NC, L, H]
    dxdt = dxdt.reshape(NC, L, H, P)
    ddt = ddA * A + (dxdt * x).sum(-1)
    return dxdt * dt[..., None], ddt, (ddA * dt).sum((0, 1)), dB, dC, dh0


def _prepare(x, dt, A, B, C, chunk_size, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_limit, lag):
    """Cast to the compute dtype, process dt and cut each (lag-shifted) sequence into chunks of its own.

    Returns x [B, T, H, P] in the compute dtype, the layout (kv, q, out, steps)
    and ``_ssd``'s inputs (x, dt, B, C in chunks, A, h0 [N, H, P, N_state]).
    """
    cd = _compute_dtype(x.dtype)
    Bsz, T, H, P = x.shape
    spans = _spans(Bsz, T, cu_seqlens)
    window, sinks = lag or (0, 0)
    kv, q, out, n_chunks = _layout(spans, window, sinks, chunk_size, Bsz * T, x.device)
    xc = x.to(cd)
    dtc = _dt(dt, dt_bias, dt_softplus, dt_limit, cd)  # [B, T, H]; padding slots read dt = 0
    h0 = _initial(initial_states, len(spans), H, P, B.shape[3], cd, x.device)
    chunks = (_to_chunks(xc, kv, chunk_size), _to_chunks(dtc, kv, chunk_size), A.to(cd),
              _to_chunks(B.to(cd), kv, chunk_size), _to_chunks(C.to(cd), q, chunk_size), h0)
    return xc, (kv, q, out, _steps(n_chunks, x.device)), chunks


def _readout(y, out, shape):
    """Each row's memory readout: y [NC, L, H, P] -> ``shape`` [B, T, H, P] (empty memory: 0)."""
    y = y.reshape(-1, *shape[2:])
    return torch.cat([y, y.new_zeros(1, *shape[2:])])[out].view(shape)


def chunked(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, initial_states=None,
            cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf), lag=None):
    """Chunked SSD: same arguments and results as ``recurrent``, plus ``chunk_size`` (any int >= 1).

    Each sequence (each lag-shifted sequence under ``lag``) is cut into chunks of
    its own; the chunks of all sequences are processed together.
    """
    xc, (kv, q, out, steps), chunks = _prepare(x, dt, A, B, C, chunk_size, dt_bias, initial_states, cu_seqlens,
                                               dt_softplus, dt_limit, lag)
    y, final, _ = _ssd(*chunks, steps)
    return _finish(_readout(y, out, x.shape), xc, D, z).to(x.dtype), final


@torch.no_grad()
def chunked_bwd(dout, dfinal_states, x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None,
                initial_states=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf), lag=None):
    """The gradients of ``chunked`` by explicit math (recomputing the forward): the spec of the backward.

    Args: dout [B, T, H, P], dfinal_states [N, H, P, N_state], then ``chunked``'s arguments.
    Returns: dx, ddt, dA, dB, dC, dD, dz, ddt_bias (each in its input's dtype;
    None for an absent D, z, dt_bias) and dinitial_states [N, H, P, N_state] in
    the compute dtype (the gradient w.r.t. the zero state when it was None).
    """
    xc, (kv, q, out, steps), chunks = _prepare(x, dt, A, B, C, chunk_size, dt_bias, initial_states, cu_seqlens,
                                               dt_softplus, dt_limit, lag)
    cd = xc.dtype
    y, _, saved = _ssd(*chunks, steps)
    dy = dout.to(cd)
    dz = None
    if z is not None:  # out = y' silu(z), y' = readout + D x
        zc = z.to(cd)
        sig = torch.sigmoid(zc)
        dz = (dy * _finish(_readout(y, out, x.shape), xc, D, None) * sig * (1 + zc * (1 - sig))).to(z.dtype)
        dy = dy * zc * sig
    dx, dD = torch.zeros_like(xc), None
    if D is not None:
        Dc = D.to(cd)
        dx = dy * (Dc[:, None] if D.dim() == 1 else Dc)
        dD = (dy * xc).sum((0, 1, 3) if D.dim() == 1 else (0, 1)).to(D.dtype)
    dy_chunks = _from_chunks(dy.reshape(1, -1, *x.shape[2:]), out, (1, y.shape[0] * y.shape[1], *x.shape[2:]))
    gx, gdt, dA, gB, gC, dh0 = _ssd_bwd(dy_chunks.view(y.shape), dfinal_states.to(cd), *chunks[:5], saved, steps)
    dx = dx + _from_chunks(gx, kv, x.shape)
    ddt, ddt_bias = _dt_bwd(_from_chunks(gdt, kv, dt.shape), dt, dt_bias, dt_softplus, dt_limit, cd)
    return (dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), _from_chunks(gB, kv, B.shape).to(B.dtype),
            _from_chunks(gC, q, C.shape).to(C.dtype), dD, dz, None if dt_bias is None else ddt_bias.to(dt_bias.dtype),
            dh0)


def _dt_bwd(ddt, dt, dt_bias, dt_softplus, dt_limit, cd):
    """The gradient of ``_dt`` (torch's conventions: clamp passes its bounds, softplus is linear above 20)."""
    pre = dt.to(cd) if dt_bias is None else dt.to(cd) + dt_bias.to(cd)
    act = F.softplus(pre, threshold=20.0) if dt_softplus else pre
    ddt = ddt * ((act >= dt_limit[0]) & (act <= dt_limit[1]))
    if dt_softplus:
        ddt = ddt * torch.where(pre > 20.0, 1.0, torch.sigmoid(pre))
    return ddt, ddt.sum((0, 1))


def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                 state_batch_indices=None):
    """One decode step (mamba's ``selective_state_update``); ``state`` is updated in place.

    Args:
        state: [N, H, P, N_state] fp32 (fp64 allowed here). x: [B, H, P]. dt: [B, H]. A: [H].
        B, C: [B, G, N_state]. D: [H] or [H, P] or None. z: [B, H, P] or None. dt_bias: [H] or None.
        state_batch_indices: [B] int or None; row b updates state[state_batch_indices[b]]
            (state[b] when None, then N = B).
    Returns:
        out [B, H, P] in x.dtype.
    """
    cd = torch.float64 if torch.float64 in (x.dtype, state.dtype) else torch.float32
    R = x.shape[1] // B.shape[1]
    if state_batch_indices is None:
        slots = torch.arange(x.shape[0], device=x.device)
    else:
        slots = state_batch_indices.long()
    xc = x.to(cd)
    h = _absorb(state[slots].to(cd), xc, _dt(dt, dt_bias, dt_softplus, None, cd), A.to(cd),
                B.to(cd).repeat_interleave(R, dim=1))  # [B, H, P, N_state]
    state.index_copy_(0, slots, h.to(state.dtype))
    y = torch.einsum("bhpn,bhn->bhp", h, C.to(cd).repeat_interleave(R, dim=1))  # [B, H, P]
    return _finish(y, xc, D, z).to(x.dtype)
