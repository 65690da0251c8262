"""swa_decode and ahn_evict_update's Triton kernels under the interpreter against the fp64 references:
rows at different positions (before the sinks end, in the first window, at the first eviction, wrapped),
S = 0 and S > W, GQA, odd and 128 head dims, all three memory rules, red zones, and an AHNCache loop.
"""

import pytest
import torch

import ahn_kernels
from ahn_kernels import AHNCache, _backend, ahn_evict_update, swa_decode
from ahn_kernels.cache import reference as cache_reference
from ahn_kernels.cache.triton_evict import ahn_evict_update as triton_evict
from ahn_kernels.swa import reference as swa_reference
from ahn_kernels.swa.triton_decode import swa_decode as triton_decode
from ahn_kernels.testing import (
    AHN_RULES,
    ahn_A,
    ahn_gates,
    assert_close,
    red_zone,
    tolerance,
)

pytestmark = pytest.mark.skipif("triton" not in _backend.available("swa_decode", "cpu"),
                                reason="triton is not installed or TRITON_INTERPRET is not 1")

WINDOWS = ((4, 0), (4, 2), (3, 7), (70, 1))  # (W, S): no sinks, a few, more than the window, W > one block
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _positions(W, S):
    """Rows before the sinks end, inside the first window, at the first eviction, and after wrapping."""
    return sorted({0, max(S - 1, 0), S, S + W - 1, S + W, S + 2 * W + 1, S + 5 * W + 2})


def _cache(B, L, HK, D, dtype, pos, W, S):
    """[B, S + W, HK, D] with random tokens in the slots each row has filled, NaN in the others."""
    cache = torch.randn(B, L, HK, D).to(dtype)
    for b, p in enumerate(pos):
        filled = min(p, L)  # slots < p are written once p > slot; all of them once p >= S + W
        cache[b, filled:] = float("nan")
    return cache


# (W, S), (HQ, HK), D, dtype: every window with every dtype; heads and head dims rotate.
DECODE_CASES = [(ws, ((4, 2), (8, 1), (2, 2))[(i + j) % 3], (7, 128, 33)[(i + 2 * j) % 3], dtype)
                for i, ws in enumerate(WINDOWS) for j, dtype in enumerate(DTYPES)]


@pytest.mark.parametrize("ws, heads, D, dtype", DECODE_CASES)
def test_decode_vs_reference(ws, heads, D, dtype):
    (W, S), (HQ, HK) = ws, heads
    pos = _positions(W, S)
    B = len(pos)
    k_cache, v_cache = _cache(B, S + W, HK, D, dtype, pos, W, S), _cache(B, S + W, HK, D, dtype, pos, W, S)
    q = torch.randn(B, 1, HQ, D).to(dtype)
    k_new, v_new = torch.randn(B, 1, HK, D).to(dtype), torch.randn(B, 1, HK, D).to(dtype)
    seqlens = torch.tensor(pos, dtype=torch.int32)
    want_k, want_v = k_cache.double(), v_cache.double()
    want_o = swa_reference.decode(q.double(), want_k, want_v, k_new.double(), v_new.double(), seqlens, W, S,
                                  D ** -0.5)
    with ahn_kernels.use_backend("triton"):
        assert _backend.choose("swa_decode", "cpu") == "triton"
        o = swa_decode(q, k_cache, v_cache, k_new, v_new, seqlens, W, S)
    assert o.dtype == dtype and o.shape == (B, 1, HQ, D)
    assert_close("o", o, want_o, tolerance(dtype, "out"))
    for name, got, want in (("k_cache", k_cache, want_k), ("v_cache", v_cache, want_v)):
        assert torch.equal(got.double().nan_to_num(7.0), want.nan_to_num(7.0)), f"{name}: wrong slots written"


# (W, S), rule, (HQ, HK), (K, V), dtype: every window with every rule; the rest rotates.
EVICT_CASES = [(ws, rule, ((4, 2), (8, 1), (2, 2))[(i + j) % 3], ((7, 33), (128, 128), (16, 60))[(i + 2 * j) % 3],
                DTYPES[(2 * i + j) % 3])
               for i, ws in enumerate(WINDOWS) for j, rule in enumerate(AHN_RULES)]


def _evict_inputs(ws, rule, heads, dims, dtype):
    (W, S), (HQ, HK), (K, V) = ws, heads, dims
    HS = max(HQ, HK)
    pos = _positions(W, S)
    B = len(pos)
    return dict(state=torch.randn(B, HS, K, V), q=torch.randn(B, 1, HQ, K).to(dtype),
                k_cache=torch.randn(B, S + W, HK, K).to(dtype), v_cache=torch.randn(B, S + W, HK, V).to(dtype),
                gates=ahn_gates(rule, B, W, HS), gates_new=ahn_gates(rule, B, HS),
                cache_seqlens=torch.tensor(pos, dtype=torch.int32), window_size=W, num_sinks=S, rule=rule,
                A=ahn_A(HS) if rule == "ssd" else None)


def _evict_reference(x):
    """(o, state, gates) of the fp64 reference on copies of x."""
    y = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and n != "gates" else t)
         for n, t in x.items()}
    y["gates"] = x["gates"].clone()
    scale = 1.0 if x["rule"] == "ssd" else x["q"].shape[-1] ** -0.5
    o = cache_reference.evict_update(**{**y, "scale": scale})
    return o, y["state"], y["gates"]


@pytest.mark.parametrize("ws, rule, heads, dims, dtype", EVICT_CASES)
def test_evict_update_vs_reference(ws, rule, heads, dims, dtype):
    x = _evict_inputs(ws, rule, heads, dims, dtype)
    want_o, want_state, want_gates = _evict_reference(x)
    before = x["state"].clone()
    with ahn_kernels.use_backend("triton"):
        assert _backend.choose("ahn_evict_update", "cpu") == "triton"
        o = ahn_evict_update(**x)
    assert o.dtype == dtype and o.shape == (len(x["cache_seqlens"]), 1, x["state"].shape[1], dims[1])
    assert_close("o_mem", o, want_o, tolerance(dtype, "out"))
    assert_close("state", x["state"], want_state, tolerance(torch.float32, "out"))
    assert torch.equal(x["gates"], want_gates)
    W, S = ws
    for b, p in enumerate(x["cache_seqlens"].tolist()):  # empty memory: o exactly 0, state bitwise kept
        if p - W < S:
            assert not o[b].any() and torch.equal(x["state"][b], before[b])


def _zoned(t):
    """t's values inside a NaN red zone (int tensors: a huge fill), and its check."""
    fill = float("nan") if t.is_floating_point() else (1 << 30)
    z, check = red_zone(tuple(t.shape), t.dtype, fill=fill)
    z.copy_(t)
    return z, check


def test_decode_red_zones():
    W, S, HQ, HK, D = 4, 2, 4, 2, 33
    pos = _positions(W, S)
    B = len(pos)
    ins = [torch.randn(B, 1, HQ, D), torch.randn(B, S + W, HK, D), torch.randn(B, S + W, HK, D),
           torch.randn(B, 1, HK, D), torch.randn(B, 1, HK, D), torch.tensor(pos, dtype=torch.int32)]
    zoned = [_zoned(t) for t in ins]
    o, check_o = red_zone((B, 1, HQ, D), torch.float32)
    triton_decode(*(z for z, _ in zoned), W, S, D ** -0.5, o)
    for _, check in (*zoned, (None, check_o)):
        check()
    want = swa_reference.decode(*(t.double() if t.is_floating_point() else t for t in ins), W, S, D ** -0.5)
    assert_close("o", o, want, tolerance(torch.float32, "out"))


@pytest.mark.parametrize("rule", AHN_RULES)
def test_evict_update_red_zones(rule):
    x = _evict_inputs((4, 2), rule, (4, 2), (7, 33), torch.float32)
    want_o, want_state, want_gates = _evict_reference(x)
    zoned = {n: _zoned(t) if isinstance(t, torch.Tensor) else (t, None) for n, t in x.items()}
    B, HS = x["state"].shape[:2]
    o, check_o = red_zone((B, 1, HS, 33), torch.float32)
    args = {n: z for n, (z, _) in zoned.items()}
    triton_evict(**args, scale=1.0 if rule == "ssd" else 7 ** -0.5, o=o)
    for _, check in zoned.values():
        if check is not None:
            check()
    check_o()
    assert_close("o_mem", o, want_o, tolerance(torch.float32, "out"))
    assert_close("state", args["state"], want_state, tolerance(torch.float32, "out"))
    assert torch.equal(args["gates"], want_gates)


@pytest.mark.parametrize("rule", AHN_RULES)
def test_cache_loop_matches_reference_backend(rule):
    """AHNCache.step (evict, then decode) for 3W + S steps: Triton equals the reference backend."""
    W, S, B, HQ, HK, D = 3, 2, 2, 4, 2, 16
    HS = max(HQ, HK)
    A = ahn_A(HS) if rule == "ssd" else None
    steps = [(torch.randn(B, 1, HQ, D), torch.randn(B, 1, HK, D), torch.randn(B, 1, HK, D), ahn_gates(rule, B, HS))
             for _ in range(3 * W + S)]
    outs = {}
    for backend in ("triton", "reference"):
        cache = AHNCache.empty(B, W, S, HK, D, HS, rule, torch.float32, "cpu")
        with ahn_kernels.use_backend(backend):
            outs[backend] = [cache.step(*x, A=A) for x in steps], (cache.state, cache.k, cache.v, cache.gates)
    for t, (got, want) in enumerate(zip(outs["triton"][0], outs["reference"][0])):
        for name, a, b in zip(("attn", "mem"), got, want):
            assert_close(f"step {t} {name}", a, b, tolerance(torch.float32, "out"))
    for name, a, b in zip(("state", "k", "v", "gates"), outs["triton"][1], outs["reference"][1]):
        assert_close(name, a, b, tolerance(torch.float32, "out"))
