"""The delta rule and the gated delta rule in plain PyTorch: the spec of every kernel of this stem.

Per state head h (HS = max(HQ, HK, HV); state head h reads q head h // (HS // HQ),
k head h // (HS // HK), v head h // (HS // HV)), with q̂, k̂ L2-normalised when
``use_qk_l2norm`` is set:

    S_j = exp(g_j) (I - β_j k̂_j k̂_jᵀ) S_{j-1} + β_j k̂_j v_jᵀ        S: [K, V]
    o_t = scale · S_{j(t)}ᵀ q̂_t

DeltaNet is the gated rule with g = 0. Without lag, j(t) = t. With
``lag=(W, S)`` (DESIGN §1), per sequence, the state absorbs tokens S .. t-W
and row t reads it with q_t; rows with t - W < S are 0; the initial state is
the state before token S and the final state the one after token T_seq-1-W.

``recurrent`` is the token loop (the oracle). ``chunked`` is the same math in
chunks of C tokens (the WY / UT form); the ops run it where no kernel serves them.

Both accept fp32, fp16, bf16 and fp64. They compute in fp32 for fp16/bf16
inputs and in the input dtype for fp32/fp64; gates are read in that dtype (never
rounded to fp16/bf16). The output is cast once to q's dtype; the final state
stays in the compute dtype (fp32, or fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch

L2NORM_EPS = 1e-6


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _prepare(q, k, v, beta, g, scale, initial_state, cu_seqlens, use_qk_l2norm):
    """Cast to the compute dtype, normalise q/k, fill defaults; heads are not yet expanded."""
    B, T, _, K = q.shape
    HS = max(q.shape[2], k.shape[2], v.shape[2])
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dt = _compute_dtype(q.dtype)
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    g = beta.new_zeros(B, T, HS) if g is None else g.to(dt)  # [B, T, HS]; DeltaNet decays by exp(0) = 1
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    if initial_state is None:
        h0 = q.new_zeros(N, HS, K, v.shape[-1])  # [N, HS, K, V]
    else:
        h0 = initial_state.to(dt)
    scale = K ** -0.5 if scale is None else scale
    return q, k, v, beta, g, h0, scale


def _expand_heads(x: torch.Tensor, HS: int) -> torch.Tensor:
    """[..., H, D] -> [..., HS, D]: state head h reads head h // (HS // H)."""
    return x.repeat_interleave(HS // x.shape[-2], dim=-2)


def _sequences(B: int, T: int, cu_seqlens) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of each sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = cu_seqlens.tolist()
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def recurrent(q, k, v, beta, g=None, scale=None, initial_state=None, cu_seqlens=None,
              use_qk_l2norm=False, lag=None):
    """Token-by-token delta rule (the test oracle; slow, autograd-capable).

    Args:
        q: [B, T, HQ, K]; k: [B, T, HK, K]; v: [B, T, HV, V].
        beta: [B, T, HS]; g: [B, T, HS] log-decay (<= 0) or None for DeltaNet.
        scale: float, default K^-0.5.
        initial_state: [N, HS, K, V] or None (zeros).
        cu_seqlens: [N+1] int32/int64 with B = 1, or None (N = B).
        use_qk_l2norm: L2-normalise q and k (eps 1e-6).
        lag: (window_size W, num_sinks S) or None.
    Returns:
        o: [B, T, HS, V] in q's dtype; final_state: [N, HS, K, V] in the compute dtype.
    """
    B, T = q.shape[:2]
    HS, V, out_dtype = beta.shape[-1], v.shape[-1], q.dtype
    q, k, v, beta, g, h0, scale = _prepare(q, k, v, beta, g, scale, initial_state, cu_seqlens, use_qk_l2norm)
    q, k, v = _expand_heads(q, HS), _expand_heads(k, HS), _expand_heads(v, HS)
    W, S = lag if lag is not None else (0, 0)
    zeros = q.new_zeros(HS, V)  # [HS, V]
    # Per-token views by unbinding, not indexing: the backward of each x[b, j] would
    # materialise a zero tensor of x's full size (autograd O(T^2) over the loop).
    q, k, v, beta, g = ([xb.unbind(0) for xb in x.unbind(0)] for x in (q, k, v, beta, g))
    outs, finals = [], []
    for n, (b, start, end) in enumerate(_sequences(B, T, cu_seqlens)):
        h = h0[n]  # [HS, K, V]
        rows = [zeros] * min(end - start, S + W)
        for t in range(start + S + W, end):
            j = t - W
            kj, bj = k[b][j], beta[b][j][:, None, None]  # [HS, K], [HS, 1, 1]
            kh = torch.einsum("hk,hkv->hv", kj, h)
            h = g[b][j].exp()[:, None, None] * (h - bj * kj[:, :, None] * kh[:, None, :])
            h = h + bj * kj[:, :, None] * v[b][j][:, None, :]
            rows.append(scale * torch.einsum("hk,hkv->hv", q[b][t], h))
        outs.append(torch.stack(rows) if rows else zeros.new_zeros(0, HS, V))  # [T_seq, HS, V]
        finals.append(h)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]  # [B, T, HS, V]
    ht = torch.stack(finals) if finals else h0  # [N, HS, K, V]
    return o.to(out_dtype), ht


def chunked(q, k, v, beta, g=None, scale=None, initial_state=None, cu_seqlens=None,
            use_qk_l2norm=False, lag=None, chunk_size=64):
    """Chunked delta rule (WY / UT form), vectorised over sequences, heads and chunks.

    Same arguments and results as ``recurrent``, plus ``chunk_size`` C (any
    positive int here; the ops accept 16, 32, 64). Autograd-capable; ``chunked_bwd``
    gives the same gradients by explicit math.

    Per chunk, with G the in-chunk inclusive prefix sum of g, Γ_ij = exp(G_i - G_j)
    for i >= j (0 above), and S_0 the state at the chunk start, the delta rule
    unrolls to
        (I + strict_lower(diag(β) K Kᵀ ⊙ Γ)) Δ = diag(β) V - diag(β exp(G)) K S_0
        O   = scale · (diag(exp(G)) Q S_0 + (Q Kᵀ ⊙ Γ) Δ)
        S_C = exp(G_C) S_0 + (diag(exp(G_C - G)) K)ᵀ Δ
    so Δ = U - W S_0 with U, W solved once for all chunks; only the state pass
    loops over chunks. Every decay is exp of a difference <= 0, so strong decays
    underflow to 0 and never form 0·inf.
    """
    rows, c, h0, scale = _layout(q, k, v, beta, g, scale, initial_state, cu_seqlens, use_qk_l2norm, lag, chunk_size)
    h_start, delta, ht = c.state_pass(h0)
    return rows.scatter(c.output(h_start, delta, scale)).to(q.dtype), ht


def chunked_bwd(grad_o, grad_ht, q, k, v, beta, g=None, scale=None, initial_state=None, cu_seqlens=None,
                use_qk_l2norm=False, lag=None, chunk_size=64):
    """Gradients of ``chunked`` by explicit math (no autograd): the spec of the backward kernels.

    grad_o: [B, T, HS, V]; grad_ht: [N, HS, K, V]; other arguments as ``chunked``.
    Returns (dq, dk, dv, dbeta, dg, dh0) in the dtypes of q, k, v, beta, g (dg is None
    when g is None) and dh0 [N, HS, K, V] in the compute dtype, also when no
    initial state was given (the gradient w.r.t. a zero state).
    """
    rows, c, h0, scale = _layout(q, k, v, beta, g, scale, initial_state, cu_seqlens, use_qk_l2norm, lag, chunk_size)
    dt = h0.dtype
    *grads, dh0 = c.backward(rows.unscatter(grad_o.to(dt)), grad_ht.to(dt), h0, scale)
    dq, dk, dv, dbeta, dg = (rows.ungather(d, idx) for d, idx in zip(grads, (rows.q, rows.kv, rows.kv, rows.kv,
                                                                              rows.kv)))
    dq, dk, dv = _reduce_heads(dq, q.shape[2]), _reduce_heads(dk, k.shape[2]), _reduce_heads(dv, v.shape[2])
    if use_qk_l2norm:
        dq, dk = _l2norm_bwd(q.to(dt), dq), _l2norm_bwd(k.to(dt), dk)
    dg = None if g is None else dg.to(g.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dg, dh0


def _layout(q, k, v, beta, g, scale, initial_state, cu_seqlens, use_qk_l2norm, lag, chunk_size):
    """Prepared inputs laid out per sequence and chunk: (rows map, chunks, h0, scale)."""
    B, T = q.shape[:2]
    q, k, v, beta, g, h0, scale = _prepare(q, k, v, beta, g, scale, initial_state, cu_seqlens, use_qk_l2norm)
    rows = _Rows(B, T, cu_seqlens, lag, q.device)
    per_step = (rows.gather(x, idx) for x, idx in ((q, rows.q), (k, rows.kv), (v, rows.kv), (beta, rows.kv),
                                                   (g, rows.kv)))
    return rows, _Chunks(*per_step, beta.shape[-1], chunk_size), h0, scale


def _reduce_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """[..., HS, D] -> [..., H, D]: the transpose of ``_expand_heads`` (sums each group)."""
    *lead, HS, D = x.shape
    return x.reshape(*lead, H, HS // H, D).sum(-2)


def _l2norm_bwd(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx for y = x r, r = (Σx² + eps)^-1/2: r dy - r³ x (x · dy)."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)
    return r * dy - r ** 3 * x * (x * dy).sum(-1, keepdim=True)


class _Rows:
    """Maps packed token rows [B, T] to per-sequence memory steps [N, M] and back.

    Sequence n has M_n = max(0, L_n - W - S) memory steps (W = S = 0 without lag):
    step i absorbs token start + S + i and is read by the query at start + S + W + i.
    Sequences are padded to M = max M_n with a zero row, whose β = g = 0 leaves the
    state unchanged, so final states are exact; outputs of padding are dropped.
    """

    def __init__(self, B, T, cu_seqlens, lag, device):
        W, S = lag if lag is not None else (0, 0)
        if cu_seqlens is None:
            cu = torch.arange(B + 1, device=device) * T  # [B+1] over the flattened B*T rows
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.long)
        self.B, self.T = B, T
        self.R = B * T  # index of the zero row appended to every flattened input
        starts, lens = cu[:-1], cu[1:] - cu[:-1]  # [N], [N]
        steps = (lens - W - S).clamp(min=0)  # [N]
        self.N = starts.shape[0]
        self.M = int(steps.max()) if self.N else 0
        i = torch.arange(self.M, device=device)
        valid = i[None, :] < steps[:, None]  # [N, M]
        self.kv = torch.where(valid, starts[:, None] + S + i, self.R)  # [N, M]
        self.q = torch.where(valid, starts[:, None] + S + W + i, self.R)  # [N, M]
        # Output row r of sequence n reads memory step r - start - S - W when it exists.
        r = torch.arange(B * T, device=device)
        n = torch.searchsorted(cu[1:], r, right=True)  # [B*T], sequence of each row
        step = r - starts[n] - S - W
        has = (step >= 0) & (step < steps[n])
        self.o = torch.where(has, n * self.M + step, self.N * self.M)  # [B*T]

    def gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, M, ...] by row index; padding reads a zero row."""
        flat = x.reshape(self.R, *x.shape[2:])
        return torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])[idx]

    def ungather(self, dx: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The transpose of ``gather``: [N, M, ...] -> [B, T, ...], summing rows read twice."""
        flat = dx.new_zeros(self.R + 1, *dx.shape[2:])  # [B*T + 1, ...]
        flat.index_add_(0, idx.reshape(-1), dx.reshape(-1, *dx.shape[2:]))
        return flat[:-1].reshape(self.B, self.T, *dx.shape[2:])

    def scatter(self, o: torch.Tensor) -> torch.Tensor:
        """[N, M, HS, V] -> [B, T, HS, V]; rows without memory are 0."""
        flat = o.reshape(self.N * self.M, *o.shape[2:])
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])  # [N*M + 1, HS, V]
        return flat[self.o].reshape(self.B, self.T, *o.shape[2:])

    def unscatter(self, do: torch.Tensor) -> torch.Tensor:
        """The transpose of ``scatter``: [B, T, HS, V] -> [N, M, HS, V]."""
        flat = do.new_zeros(self.N * self.M + 1, *do.shape[2:])  # [N*M + 1, HS, V]
        flat.index_add_(0, self.o, do.reshape(self.R, *do.shape[2:]))
        return flat[:-1].reshape(self.N, self.M, *do.shape[2:])


class _Chunks:
    """The in-chunk quantities of N equal-length sequences, chunked, heads expanded.

    Inputs q: [N, M, HQ, K]; k: [N, M, HK, K]; v: [N, M, HV, V]; beta, g: [N, M, HS].
    Stored blocked as [N, HS, NC, C, D] (gates [N, HS, NC, C]); tokens padded to
    NC·C have β = g = 0 and change nothing.
    """

    def __init__(self, q, k, v, beta, g, HS, C):
        self.N, self.M = k.shape[:2]
        self.HS, self.C, self.NC = HS, C, -(-self.M // C)
        self.q, self.k, self.v = self.blocks(q), self.blocks(k), self.blocks(v)
        self.beta, g = (self.blocks(x[..., None])[..., 0] for x in (beta, g))  # [N, HS, NC, C]
        self.G = g.cumsum(-1)  # [N, HS, NC, C], fp32 (or fp64) per chunk
        lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
        self.decay = torch.where(lower, self.G[..., :, None] - self.G[..., None, :], float("-inf")).exp()  # [.., C, C]
        self.kk = self.k @ self.k.transpose(-1, -2)  # [N, HS, NC, C, C]
        self.L = (self.beta[..., None] * self.kk * self.decay).tril(-1)  # [N, HS, NC, C, C], strictly lower
        self.eG = self.G.exp()  # [N, HS, NC, C]
        rhs = torch.cat([(self.beta * self.eG)[..., None] * self.k, self.beta[..., None] * self.v], -1)
        K = self.k.shape[-1]
        self.w, self.u = self._solve(rhs, upper=False).split([K, rhs.shape[-1] - K], -1)  # [.., C, K], [.., C, V]
        self.qk = self.q @ self.k.transpose(-1, -2)  # [N, HS, NC, C, C]
        self.e_end = (self.G[..., -1:] - self.G).exp()  # [N, HS, NC, C], decay from token to chunk end
        self.gain = self.eG[..., -1, None, None]  # [N, HS, NC, 1, 1], decay over the chunk

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[N, M, H, D] -> [N, HS, NC, C, D]."""
        x = _expand_heads(x, self.HS)
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.NC * self.C - self.M))
        return x.reshape(self.N, self.NC, self.C, self.HS, x.shape[-1]).permute(0, 3, 1, 2, 4)

    def unblocks(self, x: torch.Tensor) -> torch.Tensor:
        """[N, HS, NC, C, D] -> [N, M, HS, D] (the transpose of ``blocks`` before head expansion)."""
        x = x.permute(0, 2, 3, 1, 4).reshape(self.N, self.NC * self.C, self.HS, x.shape[-1])
        return x[:, :self.M]

    def _solve(self, rhs: torch.Tensor, upper: bool) -> torch.Tensor:
        """(I + L)^-1 rhs, or (I + L)^-T rhs when ``upper``; the unit diagonal is implied."""
        L = self.L.transpose(-1, -2) if upper else self.L
        return torch.linalg.solve_triangular(L, rhs, upper=upper, unitriangular=True)

    def state_pass(self, h0):
        """States at chunk starts [N, HS, NC, K, V], Δ [N, HS, NC, C, V], final state [N, HS, K, V]."""
        h, starts, deltas = h0, [], []
        for c in range(self.NC):
            starts.append(h)
            deltas.append(self.u[:, :, c] - self.w[:, :, c] @ h)  # [N, HS, C, V]
            h = self.gain[:, :, c] * h + (self.k[:, :, c] * self.e_end[:, :, c, :, None]).transpose(-1, -2) @ deltas[-1]
        return self._stack(starts, h0, h0.shape[-2]), self._stack(deltas, h0, self.C), h

    def _stack(self, xs, h0, rows):
        """Per-chunk [N, HS, rows, V] tensors -> [N, HS, NC, rows, V] (also for NC = 0)."""
        return torch.stack(xs, 2) if xs else h0.new_zeros(self.N, self.HS, 0, rows, h0.shape[-1])

    def output(self, h_start, delta, scale):
        """o [N, M, HS, V] = scale · (exp(G) Q S_c + (Q Kᵀ ⊙ Γ) Δ)."""
        o = scale * ((self.q * self.eG[..., None]) @ h_start + (self.qk * self.decay) @ delta)
        return self.unblocks(o)

    def backward(self, grad_o, grad_ht, h0, scale):
        """(dq, dk, dv, dbeta, dg) as [N, M, HS, D] / [N, M, HS] and dh0 [N, HS, K, V]."""
        h_start, delta, _ = self.state_pass(h0)
        do = self.blocks(grad_o)  # [N, HS, NC, C, V]
        q, k, v, beta, eG, decay = self.q, self.k, self.v, self.beta, self.eG, self.decay
        T_ = lambda x: x.transpose(-1, -2)  # noqa: E731
        # Readout: o = scale (exp(G) Q S_c + (Q Kᵀ ⊙ Γ) Δ).
        dq_g = scale * do @ T_(h_start)  # [.., C, K], w.r.t. exp(G) ⊙ Q
        dh_out = scale * T_(q * eG[..., None]) @ do  # [.., NC, K, V]
        dattn = scale * do @ T_(delta) * decay  # [.., C, C], w.r.t. Q Kᵀ
        ddelta_out = scale * T_(self.qk * decay) @ do  # [.., C, V]
        # Reverse state pass: S_{c+1} = gain S_c + (e_end K)ᵀ Δ_c with Δ_c = U_c - W_c S_c.
        k_end = k * self.e_end[..., None]  # [.., C, K]
        dh, dh_ends, ddeltas = grad_ht, [None] * self.NC, [None] * self.NC
        for c in reversed(range(self.NC)):
            dh_ends[c] = dh
            ddeltas[c] = ddelta_out[:, :, c] + k_end[:, :, c] @ dh
            dh = self.gain[:, :, c] * dh + dh_out[:, :, c] - T_(self.w[:, :, c]) @ ddeltas[c]
        dh_end = self._stack(dh_ends, h0, h0.shape[-2])  # [.., NC, K, V], gradient of each chunk's end state
        ddelta = self._stack(ddeltas, h0, self.C)  # [.., NC, C, V]
        dk_end = delta @ T_(dh_end)  # [.., C, K]
        dgain = (dh_end * h_start).sum((-1, -2))  # [N, HS, NC]
        # W = A (β exp(G) K), U = A (β V), A = (I + L)^-1: d(rhs) = Aᵀ d(W, U), dL = -d(rhs) (W, U)ᵀ.
        K = k.shape[-1]
        drk, drv = self._solve(torch.cat([-ddelta @ T_(h_start), ddelta], -1), upper=True).split(
            [K, ddelta.shape[-1]], -1)
        dL = -(drk @ T_(self.w) + drv @ T_(self.u)).tril(-1)  # [.., C, C]
        dkk = dL * beta[..., None] * decay  # [.., C, C], w.r.t. K Kᵀ
        dq = dq_g * eG[..., None] + dattn @ k
        dk = (dk_end * self.e_end[..., None] + T_(dattn) @ q + (beta * eG)[..., None] * drk
              + (dkk + T_(dkk)) @ k)
        dv = beta[..., None] * drv
        dbeta = eG * (drk * k).sum(-1) + (drv * v).sum(-1) + (dL * self.kk * decay).sum(-1)
        # Gates, through G = cumsum(g): Γ_ij = exp(G_i - G_j), exp(G), exp(G_C - G) and exp(G_C).
        dE = dattn * self.qk + dkk * self.kk  # [.., C, C], w.r.t. G_i - G_j
        d_end = (dk_end * k_end).sum(-1)  # [N, HS, NC, C], w.r.t. G_C - G_i
        dG = ((dq_g * q + (beta[..., None] * drk) * k) * eG[..., None]).sum(-1) - d_end + dE.sum(-1) - dE.sum(-2)
        dG[..., -1] += d_end.sum(-1) + dgain * self.gain[..., 0, 0]
        dg = dG.flip(-1).cumsum(-1).flip(-1)  # [N, HS, NC, C]
        grads = (dq, dk, dv, dbeta[..., None], dg[..., None])
        dq, dk, dv, dbeta, dg = (self.unblocks(x) for x in grads)
        return dq, dk, dv, dbeta[..., 0], dg[..., 0], dh

