"""The compiled CPU decode kernels (swa_decode, ahn_evict_update) against their references.

Rows sit at different positions (before the sinks end, inside the first window, at
the first eviction, after the ring wrapped); every buffer a kernel touches lives in a
NaN red zone; slots never written hold NaN. The references run in fp64 on copies.
"""

import pytest
import torch

from ahn_kernels import _backend
from ahn_kernels.cache import op as cache_op
from ahn_kernels.cache import reference as cache_reference
from ahn_kernels.swa import op as swa_op
from ahn_kernels.swa import reference as swa_reference
from ahn_kernels.testing import AHN_RULES, CPU_KERNEL_FP32, ahn_A, ahn_gates, assert_close, red_zone, tolerance

pytestmark = pytest.mark.skipif(not _backend.build_info().get("cpu"), reason="needs the compiled CPU kernels")

HEADS = ((2, 2), (4, 2), (8, 1))  # (HQ, HK): GQA ratios 1, 2, 8
WINDOWS = ((5, 0), (4, 7))  # (W, S): no sinks; more sinks than the window


def _positions(W, S):
    return [0, max(S - 1, 0), S, S + W - 1, S + W, S + 2 * W + 1, S + 5 * W + 2]


def _tol(dtype):
    return CPU_KERNEL_FP32 if dtype == torch.float32 else tolerance(dtype, "out")


def _in_red_zone(x):
    """A copy of ``x`` inside a NaN red zone, and the zone's check."""
    view, check = red_zone(tuple(x.shape), x.dtype)
    view.copy_(x)
    return view, check


def _cache(B, W, S, HK, D, pos, dtype):
    """k/v caches [B, S + W, HK, D] whose slots beyond each row's tokens hold NaN (never read)."""
    kc, vc = torch.randn(B, S + W, HK, D).to(dtype), torch.randn(B, S + W, HK, D).to(dtype)
    for b, p in enumerate(pos):
        kc[b, p:], vc[b, p:] = float("nan"), float("nan")  # slots >= p are unwritten while p < S + W
    return kc, vc


def _threads(n, fn):
    """fn() with n threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("D", [7, 128])
@pytest.mark.parametrize("HQ, HK", HEADS)
@pytest.mark.parametrize("W, S", WINDOWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swa_decode_kernel(dtype, W, S, HQ, HK, D):
    pos = _positions(W, S)
    B = len(pos)
    kc, vc = _cache(B, W, S, HK, D, pos, dtype)
    q, kn, vn = (torch.randn(B, 1, h, D).to(dtype) for h in (HQ, HK, HK))
    seqlens = torch.tensor(pos, dtype=torch.int32)
    scale = D ** -0.5
    want_k, want_v = kc.double(), vc.double()
    want = swa_reference.decode(q.double(), want_k, want_v, kn.double(), vn.double(), seqlens, W, S, scale)
    same_dtype_k, same_dtype_v = kc.clone(), vc.clone()  # the reference in the kernel's dtype (fp32 math)
    same_dtype = swa_reference.decode(q, same_dtype_k, same_dtype_v, kn, vn, seqlens, W, S, scale)

    def run():
        args = [_in_red_zone(x) for x in (q, kc, vc, kn, vn)]
        o, o_check = red_zone((B, 1, HQ, D), dtype)
        swa_op.run_decode_cpu(*(a for a, _ in args), seqlens, W, S, scale, o)
        for _, check in args + [(o, o_check)]:
            check()
        return o.clone(), args[1][0].clone(), args[2][0].clone()

    o, k_after, v_after = _threads(2, run)
    assert_close("o", o, want, _tol(dtype))
    # The new token lands in its slot and nothing else moves (NaN compared as NaN).
    assert torch.equal(k_after.double().nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(v_after.double().nan_to_num(7.0), want_v.nan_to_num(7.0))
    if dtype != torch.float32:  # attention: at most 2x the error of the reference in the same dtype
        err, ref_err = ((x.double() - want).abs().max().item() for x in (o, same_dtype))
        assert err <= 2 * ref_err + 1e-12, f"max error {err:.3e} > 2 x {ref_err:.3e}"
    o1, k1, v1 = _threads(1, run)
    assert torch.equal(o1, o) and torch.equal(k1.nan_to_num(7.0), k_after.nan_to_num(7.0)), "1 vs 2 threads"


@pytest.mark.parametrize("D", [7, 128])
@pytest.mark.parametrize("HQ, HK", HEADS)
@pytest.mark.parametrize("W, S", WINDOWS)
@pytest.mark.parametrize("rule", AHN_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evict_update_kernel(dtype, rule, W, S, HQ, HK, D):
    pos = _positions(W, S)
    B, HS = len(pos), max(HQ, HK)
    state = torch.randn(B, HS, D, D) * 0.3
    q = torch.randn(B, 1, HQ, D).to(dtype)
    kc, vc = torch.randn(B, S + W, HK, D).to(dtype), torch.randn(B, S + W, HK, D).to(dtype)
    gates, gates_new = ahn_gates(rule, B, W, HS), ahn_gates(rule, B, HS)
    A = ahn_A(HS) if rule == "ssd" else None
    seqlens = torch.tensor(pos, dtype=torch.int32)
    scale = 1.0 if rule == "ssd" else D ** -0.5
    want_state, want_gates = state.double(), gates.clone()
    want = cache_reference.evict_update(want_state, q.double(), kc.double(), vc.double(), want_gates, gates_new,
                                        seqlens, W, S, rule, scale, A)

    def run():
        args = [_in_red_zone(x) for x in (state, q, kc, vc, gates, gates_new)]
        o, o_check = red_zone((B, 1, HS, D), dtype)
        A_ = None if A is None else _in_red_zone(A)[0]
        cache_op.run_cpu(*(a for a, _ in args), seqlens, W, S, rule, scale, A_, o)
        for _, check in args + [(o, o_check)]:
            check()
        return o.clone(), args[0][0].clone(), args[4][0].clone()

    o, state_after, gates_after = _threads(2, run)
    assert_close("o_mem", o, want, _tol(dtype))
    assert_close("state", state_after, want_state, CPU_KERNEL_FP32)
    assert torch.equal(gates_after, want_gates)
    for b, p in enumerate(pos):  # empty memory: exactly 0, state untouched bitwise
        if p - W < S:
            assert not o[b].any() and torch.equal(state_after[b], state[b])
    o1, state1, gates1 = _threads(1, run)
    assert torch.equal(o1, o) and torch.equal(state1, state_after) and torch.equal(gates1, gates_after), \
        "1 vs 2 threads"


@pytest.mark.parametrize("rule", AHN_RULES)
def test_strided_views(rule):
    """Views as a model hands them over: q, k, v split from one projection; k and v caches
    interleaved in one buffer; a state and a gate ring that are rows of larger buffers."""
    W, S, HQ, HK, D = 4, 2, 4, 2, 16
    pos = _positions(W, S)
    B, HS = len(pos), HQ
    qkv = torch.randn(B, 1, HQ + 2 * HK, D)  # [B, 1, HQ + 2 HK, D]
    q, kn, vn = qkv[:, :, :HQ], qkv[:, :, HQ:HQ + HK], qkv[:, :, HQ + HK:]
    kv = torch.randn(B, S + W, 2, HK, D)  # [B, S + W, 2, HK, D]
    kc, vc = kv[:, :, 0], kv[:, :, 1]
    state = torch.randn(B, HS + 1, D, D)[:, 1:] * 0.3  # [B, HS, D, D], a slice along heads
    gates = ahn_gates(rule, B, W, HS + 2)[:, :, 1:-1]  # [B, W, HS, n_gates], strided heads
    gates_new, A = ahn_gates(rule, B, HS), (ahn_A(HS) if rule == "ssd" else None)
    seqlens = torch.tensor(pos, dtype=torch.int32)
    scale = D ** -0.5
    want_state, want_gates = state.double(), gates.clone()
    want_mem = cache_reference.evict_update(want_state, q.double(), kc.double(), vc.double(), want_gates,
                                            gates_new, seqlens, W, S, rule, scale, A)
    want_k, want_v = kc.double(), vc.double()
    want_attn = swa_reference.decode(q.double(), want_k, want_v, kn.double(), vn.double(), seqlens, W, S, scale)
    mem = cache_op.ahn_evict_update(state, q, kc, vc, gates, gates_new, seqlens, W, S, rule, scale, A)
    attn = swa_op.swa_decode(q, kc, vc, kn, vn, seqlens, W, S, scale)
    assert_close("o_mem", mem, want_mem, CPU_KERNEL_FP32)
    assert_close("state", state, want_state, CPU_KERNEL_FP32)
    assert torch.equal(gates, want_gates)
    assert_close("attn", attn, want_attn, CPU_KERNEL_FP32)
    assert torch.equal(kc.double(), want_k) and torch.equal(vc.double(), want_v)


def test_kernels_serve_the_ops():
    """The public ops reach the compiled kernels on CPU (the reference would run only for fp64)."""
    assert _backend.choose("swa_decode", "cpu") == "cpu"
    assert _backend.choose("ahn_evict_update", "cpu") == "cpu"
