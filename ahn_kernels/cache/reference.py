"""The AHN memory at decode: fold the token leaving the window into the state, read it with q.

Rules (DESIGN §1), per state head, with k̂, q̂ L2-normalised (eps 1e-6) and
the state S ``[K, V]`` in fp32:

- ``delta``       (gates: β):    S' = S + β k̂ (v - Sᵀ k̂)ᵀ
- ``gated_delta`` (gates: β, g): S' = e^g S + β k̂ (v - (e^g S)ᵀ k̂)ᵀ
- ``ssd``         (gates: dt):   S' = e^(dt·A) S + dt k̂ vᵀ   (dt already softplus'ed)

readout ``o = scale · S'ᵀ q̂``. Head mapping: state head h reads q head
``h // (HS / HQ)`` and k/v head ``h // (HS / HK)``.
"""

from __future__ import annotations

import torch

RULE_GATES = {"delta": 1, "gated_delta": 2, "ssd": 1}  # rule -> n_gates
L2_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x · rsqrt(Σ x² + 1e-6) over the last dim (the in-kernel normalisation of every rule)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def expand_heads(x: torch.Tensor, HS: int) -> torch.Tensor:
    """[B, H, D] -> [B, HS, D]: state head h reads head h // (HS / H)."""
    return x.repeat_interleave(HS // x.shape[1], dim=1)


def fold(state, k, v, gates, rule: str, A=None):
    """One step of ``rule``: the new state, out of place.

    Args:
        state: [..., HS, K, V]; k: [..., HS, K] (normalised); v: [..., HS, V];
        gates: [..., HS, n_gates]; A: [HS] (ssd only).
    """
    if rule == "ssd":
        dt = gates[..., 0]
        write = (dt[..., None] * k)[..., :, None] * v[..., None, :]  # [..., HS, K, V]
        return torch.exp(dt * A)[..., None, None] * state + write
    if rule == "gated_delta":
        state = torch.exp(gates[..., 1])[..., None, None] * state
    err = v - torch.einsum("...kv,...k->...v", state, k)  # [..., HS, V]
    return state + gates[..., 0, None, None] * k[..., :, None] * err[..., None, :]


def evict_update(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size, num_sinks, rule,
                 scale, A=None):
    """Fold token p - W into the state (if it left the window), read with q, store the new gates.

    Args:
        state: [B, HS, K, V] fp32 (fp64 accepted), mutated where a token is evicted.
        q: [B, 1, HQ, K]; k_cache: [B, S + W, HK, K]; v_cache: [B, S + W, HK, V].
        gates: [B, W, HS, n_gates] fp32 ring of arrival-time gates, mutated.
        gates_new: [B, HS, n_gates] fp32, the new token's gates.
        cache_seqlens: [B] int, the position p of the new token.
        A: [HS] (ssd only).
    Returns:
        o_mem [B, 1, HS, V] in q.dtype; 0 for rows that evicted nothing (empty memory).

    The evicted token e = p - W sits in ring index (e - S) mod W = (p - S) mod W,
    exactly where the new token's k/v and gates go: everything is read first.
    No host sync, no data-dependent shape: rows are selected with masks.
    """
    B, HS = state.shape[:2]
    cdt = state.dtype
    pos = cache_seqlens.long()  # [B]
    rows = torch.arange(B, device=state.device)
    evict = pos - window_size >= num_sinks  # [B]
    ring = (pos - num_sinks).remainder(window_size)  # [B], meaningful for pos >= S
    slot = num_sinks + ring  # [B], = ring_slot(p - W) when evicting
    k_e = l2norm(expand_heads(k_cache[rows, slot].to(cdt), HS))  # [B, HS, K]
    v_e = expand_heads(v_cache[rows, slot].to(cdt), HS)  # [B, HS, V]
    g_e = gates[rows, ring]  # [B, HS, n_gates], a copy: read before the overwrite below
    A = None if A is None else A.to(cdt)
    folded = fold(state, k_e, v_e, g_e.to(cdt), rule, A)  # [B, HS, K, V]
    # torch.where, not arithmetic masking: rows that evict nothing may read garbage (never NaN-mixed in).
    state.copy_(torch.where(evict[:, None, None, None], folded, state))
    q_hat = l2norm(expand_heads(q[:, 0].to(cdt), HS))  # [B, HS, K]
    o = scale * torch.einsum("bhkv,bhk->bhv", state, q_hat)  # [B, HS, V]
    o = torch.where(evict[:, None, None], o, torch.zeros_like(o))
    gates[rows, ring] = torch.where((pos >= num_sinks)[:, None, None], gates_new.to(gates.dtype), g_e)
    return o[:, None].to(q.dtype)
