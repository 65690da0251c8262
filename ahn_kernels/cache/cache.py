"""``AHNCache``: one AHN layer's decode cache (sinks + ring-buffer window, gate ring, memory state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validate as check
from ..delta_rule import chunk_delta_rule, chunk_gated_delta_rule
from ..ssd import ssd_chunk_scan
from ..swa.op import swa_attention, swa_decode
from ..swa.reference import ring_slot
from .op import ahn_evict_update
from .reference import RULE_GATES, l2norm


@dataclass
class AHNCache:
    """Everything one AHN layer keeps between decode steps (DESIGN §2, "The AHN cache").

    Token p lives in slot p of ``k``/``v`` if p < S, else in slot
    S + (p - S) mod W; its arrival-time gates live in ``gates[:, (p - S) mod W]``.
    ``state`` has absorbed tokens S .. p - W - 1 when the next token is p.
    Buffers are allocated once; ``prefill`` and ``step`` write into them in
    place (``step`` copies no K/V at all).

    Fields:
        k, v: [B, S + W, HK, D] in the activation dtype.
        gates: [B, W, HS, n_gates] fp32 (β / β, g / dt per rule).
        state: [B, HS, D, D] fp32 memory state ([K, V] per head).
        positions: [B] int32, the position of the next token of each sequence.
        window_size: W. num_sinks: S. rule: "delta", "gated_delta" or "ssd".
    """

    k: torch.Tensor
    v: torch.Tensor
    gates: torch.Tensor
    state: torch.Tensor
    positions: torch.Tensor
    window_size: int
    num_sinks: int
    rule: str

    @classmethod
    def empty(cls, batch, window_size, num_sinks, num_kv_heads, head_dim, num_state_heads, rule, dtype, device):
        """A cache for ``batch`` sequences that have seen no token yet.

        Buffers start at zero, not uninitialised, so that nothing ever holds a NaN.
        """
        if rule not in RULE_GATES:
            raise ValueError(f"rule: must be one of {tuple(RULE_GATES)}, got {rule!r}")
        B, W, S, HK, D, HS = batch, window_size, num_sinks, num_kv_heads, head_dim, num_state_heads
        return cls(
            k=torch.zeros(B, S + W, HK, D, dtype=dtype, device=device),  # [B, S + W, HK, D]
            v=torch.zeros(B, S + W, HK, D, dtype=dtype, device=device),  # [B, S + W, HK, D]
            gates=torch.zeros(B, W, HS, RULE_GATES[rule], dtype=torch.float32, device=device),  # [B, W, HS, n]
            state=torch.zeros(B, HS, D, D, dtype=torch.float32, device=device),  # [B, HS, D, D]
            positions=torch.zeros(B, dtype=torch.int32, device=device),  # [B]
            window_size=W,
            num_sinks=S,
            rule=rule,
        )

    def step(self, q, k, v, gates_new, A=None, scale=None):
        """Decode one token per sequence: memory first (it reads the slot the new token takes), then attention.

        Args:
            q: [B, 1, HQ, D] post-RoPE query; k, v: [B, 1, HK, D] post-RoPE key, value.
            gates_new: [B, HS, n_gates] fp32, this token's gates (stored until it leaves the window).
            A: [HS] fp32 (rule "ssd" only). scale: memory readout scale (default D^-0.5, 1 for "ssd").
        Returns:
            (attn_out [B, 1, HQ, D], mem_out [B, 1, HS, D]); the AHN output is their sum
            once HS = HQ (before o_proj).
        """
        mem = ahn_evict_update(self.state, q, self.k, self.v, self.gates, gates_new, self.positions,
                               self.window_size, self.num_sinks, self.rule, scale, A)
        attn = swa_decode(q, self.k, self.v, k, v, self.positions, self.window_size, self.num_sinks)
        self.positions.add_(1)
        return attn, mem

    def prefill(self, q, k, v, gates, A=None, scale=None, *, cu_seqlens=None):
        """Run a prompt (or the next turn of a conversation) through the layer; leave the cache ready to decode.

        Attention is ``swa_attention``; the memory is the lagged chunk op of the
        rule (``lag=(W, S)``) started from ``state``, whose final state replaces
        it. The ring then keeps each sequence's sinks and last W tokens, with
        their gates. Into an empty cache (all positions 0) both ops run on the
        prompt itself. After earlier tokens (a second turn, chunked prefill),
        each sequence's cached context (its sinks and last W tokens, at most
        S + W, gathered from the ring in position order) is put before its new
        tokens, so the same two ops see every key the new tokens may see; only
        the new tokens' outputs are returned. Sequences may be at different
        positions. Reads positions and cu_seqlens on the host (prefill is not graph-captured).

        Args:
            q: [B, T, HQ, D]; k, v: [B, T, HK, D] post-RoPE, the cache's dtype.
            gates: [B, T, HS, n_gates] fp32, every token's gates.
            A: [HS] fp32 (rule "ssd" only). scale: memory readout scale (default D^-0.5, 1 for "ssd").
            cu_seqlens: [N+1] for a packed prompt (B = 1); sequence n continues cache row n.
        Returns:
            (attn_out [B, T, HQ, D], mem_out [B, T, HS, D]).
        """
        N, HK, D = self.positions.shape[0], self.k.shape[2], self.k.shape[3]
        check.tensor("q", q, ndim=4, dims="B T HQ D")
        check.shape("q", q, (None, None, None, D), "B T HQ D")
        for name, x in (("k", k), ("v", v)):  # the cache's layout, checked before any gather
            check.tensor(name, x, ndim=4, dims="B T HK D")
            check.shape(name, x, (*q.shape[:2], HK, D), "B T HK D")
        check.same_dtype("k_cache", self.k, q=q, k=k, v=v)
        check.tensor("gates", gates, ndim=4, dims="B T HS n_gates", dtypes=(torch.float32,))
        check.shape("gates", gates, (*q.shape[:2], *self.gates.shape[2:]), "B T HS n_gates")
        n = check.cu_seqlens(cu_seqlens, q, q.shape[0], q.shape[1])
        if n != N:
            raise ValueError(f"q: holds {n} sequences, but the cache has {N} rows")
        if (A is not None) != (self.rule == "ssd"):
            raise ValueError(f"A: required for rule 'ssd' and only there (rule {self.rule!r})")
        B, T = q.shape[:2]
        cu = torch.arange(B + 1, device=q.device) * T if cu_seqlens is None else cu_seqlens.long()  # [N + 1]
        past = self.positions.long()  # [N], tokens each sequence has seen
        if past.any():
            attn, mem = self._continue(q, k, v, gates, A, scale, cu, past)
        else:
            attn = swa_attention(q, k, v, self.window_size, self.num_sinks, cu_seqlens=cu_seqlens)
            mem = self._prefill_memory(q, k, v, gates, A, scale, cu_seqlens)
        self._store(k, v, gates, cu, past)
        return attn, mem

    def _continue(self, q, k, v, gates, A, scale, cu, past):
        """Prefill after earlier tokens: per sequence, its cached context then its new tokens, packed.

        The context holds positions [0, min(P, S)) and [max(S, P - W), P) of a
        sequence at position P, in order. Packed after it, the new tokens keep
        their distances to every context token but the sinks', and the sinks
        stay the first S rows, so visibility and the lag are those of the whole
        sequence: the window tokens enter the memory here (with their
        arrival-time gates) exactly when a whole-sequence pass would absorb them.
        """
        W, S = self.window_size, self.num_sinks
        flat = [x.flatten(0, 1) for x in (q, k, v, gates)]  # each [B * T, ...]
        parts, rows, lengths = [[], [], [], []], [], []
        for n, (P, bos, eos) in enumerate(zip(past.tolist(), cu[:-1].tolist(), cu[1:].tolist())):
            ctx = torch.cat([torch.arange(min(P, S)), torch.arange(max(S, P - W), max(S, P))]).to(q.device)  # [C]
            slot = ring_slot(ctx, W, S)
            ring_gates = self.gates[n, (ctx - S).remainder(W)]  # [C, HS, n_gates]; sinks have none
            ring_gates = torch.where((ctx >= S)[:, None, None], ring_gates, torch.zeros_like(ring_gates))
            # Context rows only serve as keys and memory input: their queries are zeros, outputs dropped.
            context = (q.new_zeros(len(ctx), *q.shape[2:]), self.k[n, slot], self.v[n, slot], ring_gates)
            for part, c, x in zip(parts, context, flat):
                part += [c, x[bos:eos]]
            start = sum(lengths)
            rows.append(torch.arange(start + len(ctx), start + len(ctx) + eos - bos, device=q.device))
            lengths.append(len(ctx) + eos - bos)
        qp, kp, vp, gp = (torch.cat(part)[None] for part in parts)  # [1, sum(C + T_n), ...]
        cu_packed = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=q.device)  # [N + 1]
        attn = swa_attention(qp, kp, vp, W, S, cu_seqlens=cu_packed)
        mem = self._prefill_memory(qp, kp, vp, gp, A, scale, cu_packed)
        rows = torch.cat(rows)  # packed rows of the new tokens, in q's order
        return attn[0, rows].view(q.shape), mem[0, rows].view(*q.shape[:2], *mem.shape[2:])

    def _store(self, k, v, gates, cu, past):
        """Write the new tokens that stay (sinks, the last W of each sequence) into their slots; advance positions."""
        W, S = self.window_size, self.num_sinks
        token = torch.arange(k.shape[0] * k.shape[1], device=k.device)  # over the flattened [B * T] token axis
        seq = torch.searchsorted(cu[1:], token, right=True)  # [B * T]
        pos, length = token - cu[seq] + past[seq], cu[seq + 1] - cu[seq] + past[seq]
        kept = (pos < S) | (pos >= length - W)  # the sinks and the last W tokens
        rows, pos, token = seq[kept], pos[kept], token[kept]
        slot = ring_slot(pos, W, S)
        self.k[rows, slot] = k.flatten(0, 1)[token]
        self.v[rows, slot] = v.flatten(0, 1)[token]
        ring = pos >= S
        self.gates[rows[ring], (pos[ring] - S) % W] = gates.flatten(0, 1)[token[ring]]
        self.positions.add_((cu[1:] - cu[:-1]).to(self.positions.dtype))

    def _prefill_memory(self, q, k, v, gates, A, scale, cu_seqlens):
        """Lagged memory readout [B, T, HS, D] from ``state``; writes the final state into ``state``."""
        lag = (self.window_size, self.num_sinks)
        # The ops take each gate as its own [B, T, HS] tensor with a contiguous last dim: tiny copies.
        gate = [gates[..., i].contiguous() for i in range(gates.shape[-1])]  # each [B, T, HS]
        if self.rule == "ssd":
            HS = self.state.shape[1]
            # mamba's scan takes one group count for B and C and does not normalise them: normalise here
            # (fp32, rounded once to the activation dtype) and give every state head its own group.
            kh = l2norm(k.float()).to(k.dtype).repeat_interleave(HS // k.shape[2], dim=2)  # [B, T, HS, D]
            qh = l2norm(q.float()).to(q.dtype).repeat_interleave(HS // q.shape[2], dim=2)  # [B, T, HS, D]
            x = v.repeat_interleave(HS // v.shape[2], dim=2)  # [B, T, HS, D]
            (dt,) = gate
            h0 = self.state.transpose(-1, -2).contiguous()  # [B, HS, V, K]: mamba's [P, N_state] layout
            mem, final = ssd_chunk_scan(x, dt, A, kh, qh, initial_states=h0, cu_seqlens=cu_seqlens,
                                        return_final_states=True, lag=lag)
            self.state.copy_(final.transpose(-1, -2))
            return mem if scale is None else mem * scale
        if self.rule == "gated_delta":
            beta, g = gate
            mem, final = chunk_gated_delta_rule(q, k, v, g, beta, scale, self.state, True, True,
                                                cu_seqlens=cu_seqlens, lag=lag)
        else:
            (beta,) = gate
            mem, final = chunk_delta_rule(q, k, v, beta, scale, self.state, True, True, cu_seqlens=cu_seqlens,
                                          lag=lag)
        self.state.copy_(final)
        return mem
