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
        """Run a prompt through the layer and leave the cache ready to decode its next token.

        Attention is ``swa_attention``; the memory is the lagged chunk op of the
        rule (``lag=(W, S)``), whose final state becomes ``state``. The ring
        keeps each sequence's sinks and last W tokens, with their gates. The
        cache must be empty (all positions 0): continuing a prefill is not
        supported yet. Reads cu_seqlens on the host (prefill is not graph-captured).

        Args:
            q: [B, T, HQ, D]; k, v: [B, T, HK, D] post-RoPE, the cache's dtype.
            gates: [B, T, HS, n_gates] fp32, every token's gates.
            A: [HS] fp32 (rule "ssd" only). scale: memory readout scale (default D^-0.5, 1 for "ssd").
            cu_seqlens: [N+1] for a packed prompt (B = 1); sequence n fills cache row n.
        Returns:
            (attn_out [B, T, HQ, D], mem_out [B, T, HS, D]).
        """
        W, S, N = self.window_size, self.num_sinks, self.positions.shape[0]
        check.tensor("gates", gates, ndim=4, dims="B T HS n_gates", dtypes=(torch.float32,))
        check.shape("gates", gates, (*q.shape[:2], *self.gates.shape[2:]), "B T HS n_gates")
        n = check.cu_seqlens(cu_seqlens, q, q.shape[0], q.shape[1])
        if n != N:
            raise ValueError(f"q: holds {n} sequences, but the cache has {N} rows")
        if (A is not None) != (self.rule == "ssd"):
            raise ValueError(f"A: required for rule 'ssd' and only there (rule {self.rule!r})")
        if self.positions.any():
            raise ValueError(f"positions: prefill needs an empty cache, got positions {self.positions.tolist()}")
        attn = swa_attention(q, k, v, W, S, cu_seqlens=cu_seqlens)
        mem = self._prefill_memory(q, k, v, gates, A, scale, cu_seqlens)
        B, T = q.shape[:2]
        cu = torch.arange(B + 1, device=q.device) * T if cu_seqlens is None else cu_seqlens.long()
        token = torch.arange(B * T, device=q.device)  # over the flattened [B * T] token axis
        seq = torch.searchsorted(cu[1:], token, right=True)  # [B * T]
        pos, length = token - cu[seq], cu[seq + 1] - cu[seq]
        kept = (pos < S) | (pos >= length - W)  # the sinks and the last W tokens
        rows, pos, token = seq[kept], pos[kept], token[kept]
        slot = ring_slot(pos, W, S)
        self.k[rows, slot] = k.flatten(0, 1)[token]
        self.v[rows, slot] = v.flatten(0, 1)[token]
        ring = pos >= S
        self.gates[rows[ring], (pos[ring] - S) % W] = gates.flatten(0, 1)[token[ring]]
        self.positions.copy_(cu[1:] - cu[:-1])
        return attn, mem

    def _prefill_memory(self, q, k, v, gates, A, scale, cu_seqlens):
        """Lagged memory readout [B, T, HS, D]; writes the final state into ``state``."""
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
            mem, final = ssd_chunk_scan(x, dt, A, kh, qh, cu_seqlens=cu_seqlens,
                                        return_final_states=True, lag=lag)
            self.state.copy_(final.transpose(-1, -2))  # mamba's [P, N_state] is our [V, K]
            return mem if scale is None else mem * scale
        if self.rule == "gated_delta":
            beta, g = gate
            mem, final = chunk_gated_delta_rule(q, k, v, g, beta, scale, None, True, True,
                                                cu_seqlens=cu_seqlens, lag=lag)
        else:
            (beta,) = gate
            mem, final = chunk_delta_rule(q, k, v, beta, scale, None, True, True, cu_seqlens=cu_seqlens,
                                          lag=lag)
        self.state.copy_(final)
        return mem
