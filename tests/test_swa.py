"""swa_attention: blockwise reference vs the masked spec, explicit backward, registration, dtypes.

The compiled CPU kernels are tested in test_swa_cpu.py.

swa_decode is tested with the cache in test_cache.py.
"""

import pytest
import torch

from ahn_kernels import swa_attention
from ahn_kernels.swa import reference
from ahn_kernels.testing import (
    AWKWARD_T,
    SWA_HEAD_DIMS,
    SWA_HEADS,
    SWA_WINDOWS,
    VARLEN_LENGTHS,
    assert_close,
    seqlens_to_cu,
    swa_inputs,
    swa_sinks,
    tolerance,
)

F64 = 1e-12  # fp64 formulations of the same math agree to rounding
LOW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _op(q, k, v, W, S, cu=None):
    """The registered op with the default scale (fp64 allowed: the public function accepts fp32/16/bf16)."""
    return torch.ops.ahn.swa_attention(q, k, v, W, S, q.shape[-1] ** -0.5, cu)


def _masked_grads(q, k, v, W, S, do, dlse, cu=None):
    """Autograd through the masked spec: (o, lse, dq, dk, dv)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = reference.masked(q, k, v, W, S, cu_seqlens=cu)
    dq, dk, dv = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, k, v))
    return o.detach(), lse.detach(), dq, dk, dv


def _op_grads(q, k, v, W, S, do, dlse, cu=None, public=False):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    if public:
        o, lse = swa_attention(q, k, v, W, S, cu_seqlens=cu, return_lse=True)
    else:
        o, lse = _op(q, k, v, W, S, cu)
    dq, dk, dv = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, k, v))
    return o.detach(), lse.detach(), dq, dk, dv


def _upstream(q, dtype=None):
    B, T, HQ, D = q.shape
    dtype = q.dtype if dtype is None else dtype
    return torch.randn(B, T, HQ, D, dtype=dtype), torch.randn(B, HQ, T, dtype=dtype)


# ----------------------------------------------------------------------------
# 1. blockwise reference == masked spec (fp64)
# ----------------------------------------------------------------------------
HEADS_DIMS = [(h, d) for h in SWA_HEADS for d in SWA_HEAD_DIMS]


def _check_blockwise(T, W, S, HQ, HK, D):
    q, k, v = swa_inputs(2, T, HQ, HK, D, torch.float64)
    o, lse = reference.blockwise(q, k, v, W, S, D ** -0.5)
    o_ref, lse_ref = reference.masked(q, k, v, W, S)
    case = f"T={T} W={W} S={S} HQ={HQ} HK={HK} D={D}"
    assert_close(f"o {case}", o, o_ref, F64)
    assert_close(f"lse {case}", lse, lse_ref, F64)


@pytest.mark.parametrize("W", SWA_WINDOWS)
@pytest.mark.parametrize("T", AWKWARD_T)
def test_blockwise_matches_masked(T, W):
    """Every (T, W, S); the (heads, D) pairs rotate so that each meets many windows."""
    for n, S in enumerate(swa_sinks(W)):
        (HQ, HK), D = HEADS_DIMS[(AWKWARD_T.index(T) * 7 + SWA_WINDOWS.index(W) * 3 + n) % len(HEADS_DIMS)]
        _check_blockwise(T, W, S, HQ, HK, D)


@pytest.mark.parametrize("heads, D", HEADS_DIMS)
def test_blockwise_matches_masked_heads(heads, D):
    for W in SWA_WINDOWS:
        _check_blockwise(65, W, 3, *heads, D)


@pytest.mark.parametrize("T", AWKWARD_T)
def test_full_causal(T):
    """window_size=None is causal attention (against SDPA, a third formulation); sinks change nothing."""
    q, k, v = swa_inputs(1, T, 4, 2, 60, torch.float64)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    for S in (0, 5):
        o, _ = reference.blockwise(q, k, v, None, S, 60 ** -0.5)
        assert_close(f"o S={S}", o, sdpa, F64)


@pytest.mark.parametrize("lengths", VARLEN_LENGTHS)
@pytest.mark.parametrize("W, S", [(16, 3), (1, 0), (None, 0), (64, 66)])
def test_varlen_matches_per_sequence(lengths, W, S):
    q, k, v = swa_inputs(1, sum(lengths), 4, 2, 7, torch.float64)
    cu = seqlens_to_cu(lengths)
    o, lse = reference.blockwise(q, k, v, W, S, 7 ** -0.5, cu)
    o_masked, lse_masked = reference.masked(q, k, v, W, S, cu_seqlens=cu)
    assert_close("o vs masked varlen", o, o_masked, F64)
    assert_close("lse vs masked varlen", lse, lse_masked, F64)
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        o_n, lse_n = reference.masked(q[:, a:b], k[:, a:b], v[:, a:b], W, S)
        assert_close(f"o seq {n}", o[:, a:b], o_n, F64)
        assert_close(f"lse seq {n}", lse[:, :, a:b], lse_n, F64)


def test_window_is_exactly_the_visible_keys():
    """Changing a key outside query i's visible set leaves row i bitwise unchanged; inside, it changes it."""
    T, W, S = 40, 8, 3
    q, k, v = swa_inputs(1, T, 2, 1, 4, torch.float64)
    o, _ = reference.blockwise(q, k, v, W, S, 0.5)
    i = 30
    for j in range(T):
        v2 = v.clone()
        v2[0, j] += 1.0
        o2, _ = reference.blockwise(q, k, v2, W, S, 0.5)
        visible = j <= i and (i - j < W or j < S)
        assert (o2[0, i] != o[0, i]).any() == visible, f"key {j} for query {i}: visible={visible}"


# ----------------------------------------------------------------------------
# 2. gradients: explicit backward vs autograd through the spec (fp64), gradcheck
# ----------------------------------------------------------------------------
GRAD_CASES = [  # (B, T, HQ, HK, D, W, S, lengths)
    (2, 65, 4, 2, 7, 16, 3, None),
    (1, 200, 8, 1, 60, 64, 66, None),
    (2, 63, 1, 1, 64, None, 0, None),
    (2, 1, 4, 2, 7, 1, 0, None),
    (1, None, 4, 2, 7, 16, 3, VARLEN_LENGTHS[0]),
    (1, None, 8, 1, 7, 1, 2, VARLEN_LENGTHS[1]),
]


@pytest.mark.parametrize("B, T, HQ, HK, D, W, S, lengths", GRAD_CASES)
def test_gradients_match_masked(B, T, HQ, HK, D, W, S, lengths):
    cu = None if lengths is None else seqlens_to_cu(lengths)
    T = sum(lengths) if lengths is not None else T
    q, k, v = swa_inputs(B, T, HQ, HK, D, torch.float64)
    do, dlse = _upstream(q)
    got = _op_grads(q, k, v, W, S, do, dlse, cu)
    ref = _masked_grads(q, k, v, W, S, do, dlse, cu)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(name, a, b, F64)


def test_gradcheck():
    q, k, v = swa_inputs(1, 7, 2, 1, 3, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: _op(q, k, v, 2, 1), (q, k, v))
    cu = seqlens_to_cu((3, 0, 4))
    assert torch.autograd.gradcheck(lambda q, k, v: _op(q, k, v, 2, 1, cu), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: _op(q, k, v, None, 0), (q, k, v))


def test_double_backward_raises():
    q, k, v = swa_inputs(1, 5, 2, 1, 3, torch.float64, requires_grad=True)
    o, _ = _op(q, k, v, 2, 1)
    (dq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()


# ----------------------------------------------------------------------------
# 3. registration: opcheck, torch.compile
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("lengths", [None, (17, 0, 5)])
def test_opcheck(requires_grad, lengths):
    T = 22 if lengths is None else sum(lengths)
    B = 2 if lengths is None else 1
    cu = None if lengths is None else seqlens_to_cu(lengths, dtype=torch.int32)
    # q is a head-slice of a packed qkv projection: strided, last dim contiguous.
    qkv = torch.randn(B, T, 8, 16)
    q, k, v = (x.detach().requires_grad_(requires_grad) for x in (qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]))
    W = None if requires_grad and lengths is None else 4  # full causal once
    torch.library.opcheck(torch.ops.ahn.swa_attention.default, (q, k, v, W, 2, 0.25, cu))
    q, k, v = (x.detach() for x in (q, k, v))
    o, lse = torch.ops.ahn.swa_attention(q, k, v, W, 2, 0.25, cu)
    do, dlse = _upstream(o)
    dlse = dlse if requires_grad else None  # the bwd op takes an absent lse gradient
    torch.library.opcheck(torch.ops.ahn.swa_attention_bwd.default, (do, dlse, q, k, v, o, lse, W, 2, 0.25, cu))


def test_compile_fullgraph():
    q, k, v = swa_inputs(2, 70, 4, 2, 16)
    do, dlse = _upstream(q)

    def f(q, k, v):
        o, lse = swa_attention(q, k, v, 16, 3, return_lse=True)
        return (o * do).sum() + (lse * dlse).sum()

    compiled = torch.compile(f, fullgraph=True)
    outs = []
    for fn in (f, compiled):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        loss = fn(*x)
        outs.append((loss.detach(), *torch.autograd.grad(loss, x)))
    for name, a, b in zip(("loss", "dq", "dk", "dv"), outs[1], outs[0]):
        assert_close(f"compiled {name}", a, b, 1e-6)


def test_strided_inputs_equal_contiguous():
    qkv = torch.randn(2, 65, 8, 60)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    o = swa_attention(q, k, v, 16, 3)
    o_c = swa_attention(q.contiguous(), k.contiguous(), v.contiguous(), 16, 3)
    assert o.is_contiguous() and torch.equal(o, o_c)


# ----------------------------------------------------------------------------
# 4. the public op vs the fp64 reference, per dtype (rel-RMSE table + FA's 2x/3x rule)
# ----------------------------------------------------------------------------
DTYPE_CASES = [  # (B, T, HQ, HK, D, W, S, lengths)
    (2, 200, 4, 2, 60, 64, 3, None),
    (1, 130, 8, 1, 64, 16, 20, None),
    (1, None, 4, 2, 7, 16, 3, VARLEN_LENGTHS[0]),
]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("B, T, HQ, HK, D, W, S, lengths", DTYPE_CASES)
def test_public_op_vs_reference(dtype, B, T, HQ, HK, D, W, S, lengths):
    cu = None if lengths is None else seqlens_to_cu(lengths)
    T = sum(lengths) if lengths is not None else T
    q, k, v = swa_inputs(B, T, HQ, HK, D, dtype)
    do, dlse = _upstream(q, torch.float32)
    got = _op_grads(q, k, v, W, S, do.to(dtype), dlse, cu, public=True)
    ref = _masked_grads(q.double(), k.double(), v.double(), W, S, do.to(dtype).double(), dlse.double(), cu)
    # flash-attention's rule: error at most 2x (3x for grads) that of the spec run in the same dtype.
    same = _masked_grads(q, k, v, W, S, do.to(dtype), dlse.to(dtype), cu)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for i, name in enumerate(("o", "lse", "dq", "dk", "dv")):
        kind = "out" if i < 2 else "grad"
        assert_close(f"{name} {dtype}", got[i], ref[i], tolerance(dtype, kind))
        factor, slack = (2, 1e-5) if i < 2 else (3, 2e-4)
        err, err_same = _max_err(got[i], ref[i]), _max_err(same[i], ref[i])
        assert err <= factor * err_same + slack, f"{name} {dtype}: max error {err:.3e} > {factor} x {err_same:.3e}"


# ----------------------------------------------------------------------------
# 5. bad inputs name the argument
# ----------------------------------------------------------------------------
def _bad_cases():
    q, k, v = swa_inputs(1, 8, 4, 2, 16)
    return [
        (dict(q=q.double()), TypeError, "q:"),
        (dict(k=k.half()), TypeError, "k:"),
        (dict(k=torch.randn(1, 8, 3, 16)), ValueError, "k:"),
        (dict(v=torch.randn(1, 8, 2, 8)), ValueError, "v:"),
        (dict(q=torch.randn(1, 8, 4, 300), k=torch.randn(1, 8, 2, 300), v=torch.randn(1, 8, 2, 300)),
         ValueError, "head dim"),
        (dict(window_size=0), ValueError, "window_size"),
        (dict(num_sinks=-1), ValueError, "num_sinks"),
        (dict(softmax_scale="x"), TypeError, "softmax_scale"),
        (dict(q=q.transpose(1, 3)), ValueError, "q:"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7])), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens"),
    ], dict(q=q, k=k, v=v, window_size=4, num_sinks=1)


@pytest.mark.parametrize("i", range(11))
def test_bad_inputs(i):
    cases, good = _bad_cases()
    change, exc, text = cases[i]
    with pytest.raises(exc, match=text):
        swa_attention(**{**good, **change})
