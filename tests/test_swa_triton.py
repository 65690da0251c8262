"""swa_attention's Triton kernels under the interpreter against the fp64 masked spec: forward and gradients,
over a covering design of lengths, windows, sinks, GQA ratios, head dims and dtypes, varlen with an empty
sequence, and NaN red zones around every input and output.

swa_decode's Triton kernel is tested with ahn_evict_update's in test_cache_triton.py.
"""

import pytest
import torch

import ahn_kernels
from ahn_kernels import _backend, swa_attention
from ahn_kernels.swa import op, reference
from ahn_kernels.testing import (
    assert_close,
    red_zone,
    seqlens_to_cu,
    swa_inputs,
    tolerance,
)

pytestmark = pytest.mark.skipif("triton" not in _backend.available("swa_attention", "cpu"),
                                reason="triton is not installed or TRITON_INTERPRET is not 1")

T_VALUES = (1, 63, 64, 65, 1000)
HEADS = ((2, 2), (4, 2), (8, 1))  # (HQ, HK): GQA ratios 1, 2, 8
HEAD_DIMS = (7, 128, 33)


def _windows(T):
    return (1, 16, 100, T + 5)


def _sinks(W):
    return (0, 1, 64, W + 3)  # none, one, a block, more than the window


# (B, T, HQ, HK, D, W, S, lengths, dtype): every T meets every W; S, heads and D rotate so that each
# meets several of both. The interpreter's cost grows with HQ·T·(W+S) (the dk/dv kernel steps through
# queries BM / G tokens at a time): T = 1000 runs with one or two query heads and small D, and its
# full-causal case is W = T + 5. Full causal (None) at the other lengths; low precision on a few.
CASES = [
    (2, T, *HEADS[(a + 2 * b) % 3], HEAD_DIMS[(a + b) % 3], W, _sinks(W)[(a + b) % 4], None, torch.float32)
    for a, T in enumerate(T_VALUES[:-1]) for b, W in enumerate(_windows(T))
] + [
    (1, 1000, *((1, 1), (2, 1))[b % 2], (7, 33)[b // 2], W, _sinks(W)[b], None, torch.float32)
    for b, W in enumerate(_windows(1000))
] + [(1, T, 4, 2, 60, None, 0, None, torch.float32) for T in T_VALUES[:-1]] + [
    (1, None, 4, 2, 7, 16, 3, (0, 1, 63, 64, 65, 130), torch.float32),
    (1, None, 8, 1, 128, 1, 2, (17, 0, 5), torch.float32),
    (1, None, 4, 2, 64, 100, 64, (0, 1, 63, 130), torch.bfloat16),
    (1, 65, 8, 1, 128, 16, 1, None, torch.bfloat16),
    (1, 200, 4, 2, 33, 64, 66, None, torch.float16),
    (1, None, 2, 2, 128, None, 0, (100, 0, 30), torch.float16),
]


def _id(B, T, HQ, HK, D, W, S, lengths, dtype):
    shape = f"T{T}" if lengths is None else "varlen" + ".".join(map(str, lengths))
    return f"{str(dtype).replace('torch.', '')}-B{B}-{shape}-W{W}-S{S}-H{HQ}.{HK}-D{D}"


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _masked(q, k, v, W, S, do, dlse, cu):
    """(o, lse, dq, dk, dv) by autograd through the spec, in q's dtype."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = reference.masked(q, k, v, W, S, cu_seqlens=cu)
    dq, dk, dv = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, k, v))
    return o.detach(), lse.detach(), dq, dk, dv


def _triton(q, k, v, W, S, do, dlse, cu):
    """(o, lse, dq, dk, dv) through the public function on the Triton backend."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    with ahn_kernels.use_backend("triton"):
        assert _backend.choose("swa_attention", "cpu") == "triton"
        assert _backend.choose("swa_attention_bwd", "cpu") == "triton"
        o, lse = swa_attention(q, k, v, W, S, cu_seqlens=cu, return_lse=True)
        dq, dk, dv = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, k, v))
    return o.detach(), lse.detach(), dq, dk, dv


@pytest.mark.parametrize("B, T, HQ, HK, D, W, S, lengths, dtype", [pytest.param(*c, id=_id(*c)) for c in CASES])
def test_vs_masked(B, T, HQ, HK, D, W, S, lengths, dtype):
    """Forward and gradients: relative RMSE per DESIGN §4, and max error <= 2x (3x for gradients) that
    of the spec run in the same dtype."""
    cu = None if lengths is None else seqlens_to_cu(lengths)
    T = sum(lengths) if lengths is not None else T
    q, k, v = swa_inputs(B, T, HQ, HK, D, dtype)
    do, dlse = torch.randn(B, T, HQ, D).to(dtype), torch.randn(B, HQ, T)
    got = _triton(q, k, v, W, S, do, dlse, cu)
    ref = _masked(*(x.double() for x in (q, k, v)), W, S, do.double(), dlse.double(), cu)
    same = _masked(q, k, v, W, S, do, dlse.to(dtype), cu)
    assert got[0].dtype == dtype and got[0].is_contiguous() and got[1].dtype == torch.float32
    assert all(g.dtype == dtype and g.is_contiguous() for g in got[2:])
    for i, (name, a, b, c) in enumerate(zip(("o", "lse", "dq", "dk", "dv"), got, ref, same)):
        kind, factor, slack = ("out", 2, 1e-5) if i < 2 else ("grad", 3, 2e-4)
        assert_close(f"{name} {dtype}", a, b, tolerance(dtype, kind))
        err, err_same = _max_err(a, b), _max_err(c, b)
        assert err <= factor * err_same + slack, f"{name}: max error {err:.3e} > {factor} x {err_same:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [None, (17, 0, 5)], ids=["dense", "varlen"])
def test_forward_red_zones(lengths, dtype):
    """NaN around q, k, v (strided: a packed projection) and around o, lse: nothing read or written outside."""
    B, T = (2, 65) if lengths is None else (1, sum(lengths))
    cu = None if lengths is None else seqlens_to_cu(lengths)
    HQ, HK, D = 4, 2, 33
    qkv, check_in = red_zone((B, T, HQ + 2 * HK, D), dtype)
    qkv.copy_(torch.randn(B, T, HQ + 2 * HK, D))
    q, k, v = qkv[:, :, :HQ], qkv[:, :, HQ:HQ + HK], qkv[:, :, HQ + HK:]
    o, check_o = red_zone((B, T, HQ, D), dtype)
    lse, check_lse = red_zone((B, HQ, T), torch.float32)
    op.run_triton(q, k, v, 16, 3, D ** -0.5, cu, o, lse)
    for check in (check_in, check_o, check_lse):
        check()
    o_ref, lse_ref = reference.masked(q.double(), k.double(), v.double(), 16, 3, cu_seqlens=cu)
    assert_close("o", o, o_ref, tolerance(dtype, "out"))
    assert_close("lse", lse, lse_ref, tolerance(dtype, "out"))


def test_no_tokens():
    """T = 0 dense and all-empty varlen: nothing to launch, empty outputs."""
    q, k, v = swa_inputs(1, 0, 4, 2, 16)
    with ahn_kernels.use_backend("triton"):
        for cu in (None, seqlens_to_cu((0, 0))):
            o, lse = swa_attention(q, k, v, 4, 1, cu_seqlens=cu, return_lse=True)
            assert o.shape == (1, 0, 4, 16) and lse.shape == (1, 4, 0)
