"""Bad input gets a clear Python exception naming the argument, before any kernel runs."""

import math

import pytest
import torch

import ahn_kernels as ak

B, T, H, K, V = 1, 8, 2, 4, 4


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def gdn(**over):
    args = dict(q=_r(B, T, H, K), k=_r(B, T, H, K), v=_r(B, T, H, V),
                g=-torch.rand(B, T, H), beta=torch.rand(B, T, H))
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return lambda: ak.chunk_gated_delta_rule(**args, **kw)


def fused(**over):
    args = dict(q=_r(B, T, H, K), k=_r(B, T, H, K), v=_r(B, T, H, V), beta=torch.rand(B, T, H))
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return lambda: ak.fused_recurrent_delta_rule(**args, **kw)


def ssd(**over):
    P, N, G = 4, 3, 1
    args = dict(x=_r(B, T, H, P), dt=torch.rand(B, T, H), A=-torch.rand(H),
                B=_r(B, T, G, N), C=_r(B, T, G, N))
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return lambda: ak.ssd_chunk_scan(**args, **kw)


def ssd_step(**over):
    P, N = 4, 3
    args = dict(state=torch.zeros(B, H, P, N), x=_r(B, H, P), dt=torch.rand(B, H), A=-torch.rand(H),
                B=_r(B, 1, N), C=_r(B, 1, N))
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return lambda: ak.ssd_state_update(**args, **kw)


def swa(**over):
    args = dict(q=_r(B, T, 4, 8), k=_r(B, T, 2, 8), v=_r(B, T, 2, 8), window_size=4)
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return lambda: ak.swa_attention(**args, **kw)


W, S, HQ, HK, D = 4, 2, 4, 2, 8


def decode(**over):
    args = dict(q=_r(B, 1, HQ, D), k_cache=_r(B, S + W, HK, D), v_cache=_r(B, S + W, HK, D),
                k_new=_r(B, 1, HK, D), v_new=_r(B, 1, HK, D),
                cache_seqlens=torch.zeros(B, dtype=torch.int32), window_size=W, num_sinks=S)
    args.update(over)
    return lambda: ak.swa_decode(**args)


def evict(**over):
    args = dict(state=torch.zeros(B, HQ, D, D), q=_r(B, 1, HQ, D), k_cache=_r(B, S + W, HK, D),
                v_cache=_r(B, S + W, HK, D), gates=torch.rand(B, W, HQ, 2), gates_new=torch.rand(B, HQ, 2),
                cache_seqlens=torch.zeros(B, dtype=torch.int32), window_size=W, num_sinks=S, rule="gated_delta")
    args.update(over)
    return lambda: ak.ahn_evict_update(**args)


def prefill(positions=0, **over):
    """AHNCache.prefill into a gated-DeltaNet cache whose sequence is at ``positions``."""
    cache = ak.AHNCache.empty(B, W, S, HK, D, HQ, "gated_delta", torch.float32, "cpu")
    cache.positions.fill_(positions)
    args = dict(q=_r(B, T, HQ, D), k=_r(B, T, HK, D), v=_r(B, T, HK, D), gates=torch.rand(B, T, HQ, 2))
    args.update(over)
    return lambda: cache.prefill(**args)


CU = torch.tensor([0, 3, 8])

CASES = [
    # delta rule family: types, ranks, shapes, heads, dims
    ("q as a list", gdn(q=[[0.0]]), TypeError, "q"),
    ("q integer dtype", gdn(q=torch.ones(B, T, H, K, dtype=torch.int32)), TypeError, "q"),
    ("q fp64", gdn(q=_r(B, T, H, K, dtype=torch.float64)), TypeError, "q"),
    ("q rank 3", gdn(q=_r(B, T, H * K)), ValueError, "q"),
    ("k length differs", gdn(k=_r(B, T + 1, H, K)), ValueError, "k"),
    ("v batch differs", gdn(v=_r(B + 1, T, H, V)), ValueError, "v"),
    ("k head dim differs from q", gdn(k=_r(B, T, H, K + 1)), ValueError, "k"),
    ("q head dim 257", gdn(q=_r(B, T, H, 257), k=_r(B, T, H, 257)), ValueError, "q"),
    ("v head dim 300", gdn(v=_r(B, T, H, 300)), ValueError, "v"),
    ("heads do not divide", gdn(q=_r(B, T, 3, K), g=-torch.rand(B, T, 3), beta=torch.rand(B, T, 3)),
     ValueError, "k"),
    ("g wrong heads", gdn(g=-torch.rand(B, T, H + 1)), ValueError, "g"),
    ("beta wrong length", gdn(beta=torch.rand(B, T - 1, H)), ValueError, "beta"),
    ("k dtype differs from q", gdn(k=_r(B, T, H, K, dtype=torch.float16)), TypeError, "k"),
    ("v on another device", gdn(v=torch.empty(B, T, H, V, device="meta")), ValueError, "v"),
    ("q last dim strided", gdn(q=_r(B, T, H, 2 * K)[..., ::2]), ValueError, "q"),
    ("initial_state wrong shape", gdn(initial_state=torch.zeros(B, H, K + 1, V)), ValueError, "initial_state"),
    ("initial_state fp16", gdn(initial_state=torch.zeros(B, H, K, V, dtype=torch.float16)),
     TypeError, "initial_state"),
    ("cu_seqlens float", gdn(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens"),
    ("cu_seqlens 2-D", gdn(cu_seqlens=torch.tensor([[0, 8]])), ValueError, "cu_seqlens"),
    ("cu_seqlens not from 0", gdn(cu_seqlens=torch.tensor([1, 8])), ValueError, "cu_seqlens"),
    ("cu_seqlens decreasing", gdn(cu_seqlens=torch.tensor([0, 5, 3, 8])), ValueError, "cu_seqlens"),
    ("cu_seqlens not ending at T", gdn(cu_seqlens=torch.tensor([0, 7])), ValueError, "cu_seqlens"),
    ("cu_seqlens with B=2", gdn(q=_r(2, T, H, K), k=_r(2, T, H, K), v=_r(2, T, H, V), g=-torch.rand(2, T, H),
                                beta=torch.rand(2, T, H), cu_seqlens=CU), ValueError, "cu_seqlens"),
    ("initial_state rows != sequences", gdn(cu_seqlens=CU, initial_state=torch.zeros(3, H, K, V)),
     ValueError, "initial_state"),
    ("chunk_size 48", gdn(chunk_size=48), ValueError, "chunk_size"),
    ("lag window 0", gdn(lag=(0, 0)), ValueError, "window_size"),
    ("lag negative sinks", gdn(lag=(4, -1)), ValueError, "num_sinks"),
    ("lag not a pair", gdn(lag=5), TypeError, "lag"),
    ("scale a string", gdn(scale="0.5"), TypeError, "scale"),
    ("fused recurrent K 257", fused(q=_r(B, T, H, 257), k=_r(B, T, H, 257)), ValueError, "q"),
    ("fused recurrent beta fp64 wrong rank", fused(beta=torch.rand(B, T)), ValueError, "beta"),
    # SSD
    ("ssd x rank 3", ssd(x=_r(B, T, H * 4)), ValueError, "x"),
    ("ssd dt wrong heads", ssd(dt=torch.rand(B, T, H + 1)), ValueError, "dt"),
    ("ssd A wrong size", ssd(A=-torch.rand(H + 1)), ValueError, "A"),
    ("ssd groups do not divide heads", ssd(x=_r(B, T, 3, 4), dt=torch.rand(B, T, 3), A=-torch.rand(3),
                                           B=_r(B, T, 2, 3), C=_r(B, T, 2, 3)), ValueError, "B"),
    ("ssd C differs from B", ssd(C=_r(B, T, 1, 5)), ValueError, "C"),
    ("ssd D wrong size", ssd(D=torch.rand(H + 1)), ValueError, "D"),
    ("ssd z wrong shape", ssd(z=_r(B, T, H, 5)), ValueError, "z"),
    ("ssd dt_limit reversed", ssd(dt_limit=(1.0, 0.0)), ValueError, "dt_limit"),
    ("ssd chunk_size 100", ssd(chunk_size=100), ValueError, "chunk_size"),
    ("ssd initial_states wrong shape", ssd(initial_states=torch.zeros(B, H, 4, 4)), ValueError, "initial_states"),
    ("ssd state fp16", ssd_step(state=torch.zeros(B, H, 4, 3, dtype=torch.float16)), TypeError, "state"),
    ("ssd state_batch_indices float", ssd_step(state_batch_indices=torch.zeros(B)), TypeError,
     "state_batch_indices"),
    # sliding-window attention
    ("swa window 0", swa(window_size=0), ValueError, "window_size"),
    ("swa negative sinks", swa(num_sinks=-1), ValueError, "num_sinks"),
    ("swa window float", swa(window_size=math.pi), TypeError, "window_size"),
    ("swa HQ not a multiple of HK", swa(q=_r(B, T, 3, 8)), ValueError, "q"),
    ("swa head dim 300", swa(q=_r(B, T, 4, 300), k=_r(B, T, 2, 300), v=_r(B, T, 2, 300)), ValueError, "q"),
    ("swa v shape differs from k", swa(v=_r(B, T, 2, 7)), ValueError, "v"),
    ("swa cu_seqlens end", swa(cu_seqlens=torch.tensor([0, 3])), ValueError, "cu_seqlens"),
    # decode and cache
    ("decode cache_seqlens float", decode(cache_seqlens=torch.zeros(B)), TypeError, "cache_seqlens"),
    ("decode k_cache slots != S + W", decode(k_cache=_r(B, S + W + 1, HK, D)), ValueError, "k_cache"),
    ("decode q two tokens", decode(q=_r(B, 2, HQ, D)), ValueError, "q"),
    ("evict unknown rule", evict(rule="lstm"), ValueError, "rule"),
    ("evict state fp16", evict(state=torch.zeros(B, HQ, D, D, dtype=torch.float16)), TypeError, "state"),
    ("evict gates wrong ring size", evict(gates=torch.rand(B, W + 1, HQ, 2)), ValueError, "gates"),
    ("prefill gates fp16", prefill(gates=torch.rand(B, T, HQ, 2).half()), TypeError, "gates"),
    ("prefill two sequences into one row", prefill(cu_seqlens=torch.tensor([0, 3, T])), ValueError, "q"),
    ("prefill A for a delta rule", prefill(A=-torch.rand(HQ)), ValueError, "A"),
    ("prefill next turn, k heads", prefill(positions=S + W + 3, k=_r(B, T, 3, D)), ValueError, "k"),
]


@pytest.mark.parametrize("call, exc, argname", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(call, exc, argname):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert argname in msg, f"message does not name {argname!r}: {msg}"
    assert "to be true" not in msg.lower()
