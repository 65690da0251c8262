"""DESIGN §1 checked the slow, obvious way.

An AHN layer's output at position t is attention over the sinks and the window
plus the readout of a memory that has absorbed exactly the tokens S .. t-W.
Here that is computed with an explicit mask and an explicit per-token memory
loop (one token evicted per step, as in decode), in fp64, and compared with
what a user trains with: ``swa_attention`` + one lagged chunk op (fp32).
"""

import pytest
import torch

import ahn_kernels as ak
from ahn_kernels import testing

HQ, HK, K = 4, 2, 12


def l2n(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def slow_ahn_layer(q, k, v, gates, A, rule, W, S, lengths):
    """[T, HQ, K] inputs of packed sequences -> attn [T, HQ, K], mem [T, HQ, K], all fp64, by loops."""
    attn, mem = torch.zeros_like(q), torch.zeros_like(q)
    G = HQ // HK
    start = 0
    for n in lengths:
        state = q.new_zeros(HQ, K, K)
        for t in range(n):
            # attention: key j visible iff j <= t and (t - j < W or j < S)
            for h in range(HQ):
                keys = [j for j in range(t + 1) if t - j < W or j < S]
                s = torch.stack([q[start + t, h] @ k[start + j, h // G] for j in keys]) * K ** -0.5
                p = torch.softmax(s, 0)
                attn[start + t, h] = sum(p[i] * v[start + j, h // G] for i, j in enumerate(keys))
            # memory: the token leaving the window now is e = t - W (if it is not a sink)
            e = t - W
            if e >= S:
                for h in range(HQ):
                    ke, ve = l2n(k[start + e, h // G]), v[start + e, h // G]
                    gate = gates[start + e, h]
                    if rule == "ssd":
                        state[h] = torch.exp(gate[0] * A[h]) * state[h] + gate[0] * torch.outer(ke, ve)
                    else:
                        if rule == "gated_delta":
                            state[h] = torch.exp(gate[1]) * state[h]
                        state[h] = state[h] + gate[0] * torch.outer(ke, ve - state[h].T @ ke)
                scale = 1.0 if rule == "ssd" else K ** -0.5
                for h in range(HQ):
                    mem[start + t, h] = scale * state[h].T @ l2n(q[start + t, h])
        start += n
    return attn, mem


def fast_ahn_layer(q, k, v, gates, A, rule, W, S, cu):
    """The same through the public ops: one swa_attention + one lagged memory op, fp32, packed varlen."""
    q, k, v = (x[None].float() for x in (q, k, v))  # [1, T, H, K]
    attn = ak.swa_attention(q, k, v, W, S, cu_seqlens=cu)
    g = gates[None].float()  # [1, T, HQ, n_gates]
    if rule == "ssd":
        G = HQ // HK
        mem = ak.ssd_chunk_scan(v.repeat_interleave(G, 2), g[..., 0], A.float(),
                                l2n(k).repeat_interleave(G, 2), l2n(q), chunk_size=16, cu_seqlens=cu,
                                lag=(W, S))
    elif rule == "gated_delta":
        mem, _ = ak.chunk_gated_delta_rule(q, k, v, g[..., 1], g[..., 0], use_qk_l2norm_in_kernel=True,
                                           cu_seqlens=cu, chunk_size=16, lag=(W, S))
    else:
        mem, _ = ak.chunk_delta_rule(q, k, v, g[..., 0], use_qk_l2norm_in_kernel=True, cu_seqlens=cu,
                                     chunk_size=16, lag=(W, S))
    return attn[0], mem[0]


@pytest.mark.parametrize("rule", testing.AHN_RULES)
@pytest.mark.parametrize("W, S", [(5, 0), (5, 3), (3, 8)])
def test_ahn_layer_equals_window_attention_plus_lagged_memory(rule, W, S):
    lengths = (0, 19, 1, 40)
    T = sum(lengths)
    q = torch.randn(T, HQ, K, dtype=torch.float64)
    k = torch.randn(T, HK, K, dtype=torch.float64)
    v = torch.randn(T, HK, K, dtype=torch.float64)
    gates = testing.ahn_gates(rule, T, HQ).double()
    A = testing.ahn_A(HQ).double()
    attn_ref, mem_ref = slow_ahn_layer(q, k, v, gates, A, rule, W, S, lengths)
    assert mem_ref.abs().sum() > 0, "the case must evict something"
    attn, mem = fast_ahn_layer(q, k, v, gates, A, rule, W, S, testing.seqlens_to_cu(lengths))
    tol = testing.tolerance(torch.float32, "out")
    testing.assert_close("attention", attn, attn_ref, tol)
    testing.assert_close("memory", mem, mem_ref, tol)
    testing.assert_close("layer", attn + mem, attn_ref + mem_ref, tol)
