"""swa_attention: blockwise reference vs the masked spec, explicit backward, registration, dtypes,
and the compiled CPU forward vs the fp64 masked spec.

swa_decode is tested with the cache in test_cache.py.
"""

import pytest
import torch

import ahn_kernels
from ahn_kernels import _backend, swa_attention
from ahn_kernels.swa import reference
from ahn_kernels.swa.op import run_cpu, run_cpu_bwd
from ahn_kernels.testing import (
    AWKWARD_T,
    CPU_KERNEL_FP32,
    SWA_HEAD_DIMS,
    SWA_HEADS,
    SWA_WINDOWS,
    VARLEN_LENGTHS,
    assert_close,
    red_zone,
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


# ----------------------------------------------------------------------------
# 6. the compiled CPU forward vs the fp64 masked spec
# ----------------------------------------------------------------------------
KERNEL_WINDOWS = (*SWA_WINDOWS, None)
KERNEL_HEAD_DIMS = (*SWA_HEAD_DIMS, 128)


def _require_kernel():
    if "cpu" not in _backend.available("swa_attention", "cpu"):
        pytest.skip(f"ahn_kernels._C is not built ({_backend.build_info().get('error')})")


def _kernel(q, k, v, W, S, cu=None):
    """(o, lse) from the compiled forward through the public function; fails if another backend would run."""
    with ahn_kernels.use_backend("cpu"):
        assert _backend.choose("swa_attention", "cpu") == "cpu"
        return swa_attention(q, k, v, W, S, cu_seqlens=cu, return_lse=True)


def _check_kernel_fp32(q, k, v, W, S, cu=None, case=""):
    o, lse = _kernel(q, k, v, W, S, cu)
    o_ref, lse_ref = reference.masked(q.double(), k.double(), v.double(), W, S, cu_seqlens=cu)
    assert o.dtype == torch.float32 and o.is_contiguous() and lse.dtype == torch.float32 and lse.is_contiguous()
    assert_close(f"o {case}", o, o_ref, CPU_KERNEL_FP32)
    # lse is a log: its error is absolute (the softmax sum's relative error), and a single
    # score near 0 (T = 1) makes a relative measure meaningless.
    err = (lse.double() - lse_ref).abs().max().item() if lse.numel() else 0.0
    assert err <= tolerance(torch.float32, "out"), f"lse {case}: max error {err:.2e}"


@pytest.mark.parametrize("W", KERNEL_WINDOWS)
@pytest.mark.parametrize("T", AWKWARD_T)
def test_kernel_matches_masked(T, W):
    """Every (T, W, S, heads) in fp32; D rotates so that each head dim meets every window and length."""
    _require_kernel()
    sinks = (0, 3) if W is None else swa_sinks(W)
    for n, S in enumerate(sinks):
        for m, (HQ, HK) in enumerate(SWA_HEADS):
            D = KERNEL_HEAD_DIMS[(AWKWARD_T.index(T) + KERNEL_WINDOWS.index(W) + n + m) % len(KERNEL_HEAD_DIMS)]
            q, k, v = swa_inputs(2, T, HQ, HK, D)
            _check_kernel_fp32(q, k, v, W, S, case=f"T={T} W={W} S={S} HQ={HQ} HK={HK} D={D}")


@pytest.mark.parametrize("D", [1, *KERNEL_HEAD_DIMS, 129, 256])
def test_kernel_head_dims(D):
    _require_kernel()
    for HQ, HK in SWA_HEADS:
        q, k, v = swa_inputs(1, 130, HQ, HK, D)
        _check_kernel_fp32(q, k, v, 16, 3, case=f"D={D} HQ={HQ} HK={HK}")


@pytest.mark.parametrize("lengths", [*VARLEN_LENGTHS, (0,)])
@pytest.mark.parametrize("W, S", [(16, 3), (1, 0), (None, 0), (64, 66)])
def test_kernel_varlen(lengths, W, S):
    _require_kernel()
    q, k, v = swa_inputs(1, sum(lengths), 8, 2, 60)
    for cu_dtype in (torch.int64, torch.int32):
        _check_kernel_fp32(q, k, v, W, S, seqlens_to_cu(lengths, dtype=cu_dtype), case=f"{lengths} {cu_dtype}")


KERNEL_LOW_CASES = [  # (B, T, HQ, HK, D, W, S, lengths)
    (2, 200, 4, 2, 128, 64, 3, None),
    (1, 130, 8, 1, 7, 16, 20, None),
    (2, 65, 1, 1, 60, None, 0, None),
    (1, None, 4, 2, 64, 16, 3, VARLEN_LENGTHS[0]),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, HQ, HK, D, W, S, lengths", KERNEL_LOW_CASES)
def test_kernel_low_precision(dtype, B, T, HQ, HK, D, W, S, lengths):
    """The tolerance table, and flash-attention's rule: max error <= 2x that of the spec run in the same dtype."""
    _require_kernel()
    cu = None if lengths is None else seqlens_to_cu(lengths)
    T = sum(lengths) if lengths is not None else T
    q, k, v = swa_inputs(B, T, HQ, HK, D, dtype)
    got = _kernel(q, k, v, W, S, cu)
    ref = reference.masked(q.double(), k.double(), v.double(), W, S, cu_seqlens=cu)
    same = reference.masked(q, k, v, W, S, cu_seqlens=cu)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, b, c in zip(("o", "lse"), got, ref, same):
        assert_close(f"{name} {dtype}", a, b, tolerance(dtype, "out"))
        err, err_same = _max_err(a, b), _max_err(c, b)
        assert err <= 2 * err_same + 1e-5, f"{name} {dtype}: max error {err:.3e} > 2 x {err_same:.3e}"


def test_kernel_strided_inputs_bitwise():
    """Any strides over (B, T, H), last dim contiguous: bitwise the result of contiguous inputs."""
    _require_kernel()
    qkv = torch.randn(2, 130, 12, 60)
    q = qkv[:, :, 1:9]  # [B, T, HQ, D], head and time strides of the packed projection
    k = torch.randn(2, 2, 130, 60).transpose(1, 2)  # [B, T, HK, D] from a head-major buffer
    v = torch.randn(130, 2, 2, 60).transpose(0, 1)  # [B, T, HK, D] from a time-major buffer
    for W, S in ((16, 3), (None, 0)):
        o, lse = _kernel(q, k, v, W, S)
        o_c, lse_c = _kernel(q.contiguous(), k.contiguous(), v.contiguous(), W, S)
        assert torch.equal(o, o_c) and torch.equal(lse, lse_c)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("lengths", [None, VARLEN_LENGTHS[1]])
def test_kernel_red_zones(dtype, lengths):
    """The kernel writes exactly o [B, T, HQ, D] and lse [B, HQ, T], nothing around them."""
    _require_kernel()
    B, T = (2, 65) if lengths is None else (1, sum(lengths))
    cu = None if lengths is None else seqlens_to_cu(lengths)
    q, k, v = swa_inputs(B, T, 8, 2, 60, dtype)
    o, check_o = red_zone((B, T, 8, 60), dtype)
    lse, check_lse = red_zone((B, 8, T), torch.float32)
    run_cpu(q, k, v, 16, 3, 60 ** -0.5, cu, o, lse)
    check_o()
    check_lse()
    o_ref, lse_ref = _kernel(q, k, v, 16, 3, cu)
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


def test_kernel_threads_bitwise():
    """Tasks never share a sum: 1 and 2 threads give the same bits."""
    _require_kernel()
    q, k, v = swa_inputs(1, 333, 8, 2, 64)
    cu = seqlens_to_cu((100, 0, 233))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append([_kernel(q, k, v, W, S, c) for W, S, c in ((16, 3, None), (64, 70, cu), (None, 0, None))])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------
# 7. the compiled CPU backward vs the fp64 masked spec
# ----------------------------------------------------------------------------
BWD_T = (1, 63, 64, 65, 1000)
BWD_WINDOWS = (1, 16, 100, "T+5", None)
BWD_HEADS = ((1, 1), (4, 2), (8, 1))  # GQA ratios 1, 2, 8
BWD_HEAD_DIMS = (7, 128)


def _bwd_sinks(W):
    """None, one, a block's worth, more than the window (full causal: sinks change nothing)."""
    return (0, 3) if W is None else (0, 1, 64, W + 2)


def _kernel_grads(q, k, v, W, S, do, dlse, cu=None):
    """(o, lse, dq, dk, dv) through the public function; fails if another backend would run either pass."""
    with ahn_kernels.use_backend("cpu"):
        assert _backend.choose("swa_attention_bwd", "cpu") == "cpu"
        return _op_grads(q, k, v, W, S, do, dlse, cu, public=True)


def _fp32_floor(ref):
    """Two fp32 rounding steps at the reference's magnitude (flash-attention's CuTe and Hopper tests add
    the same floor, ``2 * (ref + 0.3 - 0.3 - ref).abs().max()``): where the spec run in the same dtype
    happens to round exactly, a kernel that accumulates in fp32 cannot do better than this."""
    r = ref.float()
    return 2 * (r + 0.3 - 0.3 - r).abs().max().item() if r.numel() else 0.0


def _blockwise_grads(q, k, v, W, S, do, dlse, cu=None):
    """(dq, dk, dv) of the blockwise reference, forward and backward, in q's dtype."""
    scale = q.shape[-1] ** -0.5
    o, lse = reference.blockwise(q, k, v, W, S, scale, cu)
    return reference.blockwise_bwd(do, dlse, q, k, v, o, lse, W, S, scale, cu)


def _check_kernel_grads(q, k, v, W, S, cu=None, case=""):
    """Gradients against the fp64 spec: the tolerance table, and max error <= 3x that of the reference in q's dtype.

    The same-dtype run is the blockwise reference, the formulation the kernel computes: its
    delta = rowsum(dO · O) does not cancel dP's rounding the way the spec's softmax backward
    rowsum(P · dP) does (exactly, when a row sees one key), so against the spec in fp32 any
    flash backward, the blockwise reference too, has up to ~30x its max error.
    """
    dtype = q.dtype
    do, dlse = _upstream(q, torch.float32)
    do = do.to(dtype)
    got = _kernel_grads(q, k, v, W, S, do, dlse, cu)[2:]
    ref = _masked_grads(q.double(), k.double(), v.double(), W, S, do.double(), dlse.double(), cu)[2:]
    same = _blockwise_grads(q, k, v, W, S, do, dlse, cu)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, ref, same):
        assert a.dtype == dtype and a.is_contiguous(), f"{name} {case}: {a.dtype}, contiguous={a.is_contiguous()}"
        assert_close(f"{name} {case}", a, b, tolerance(dtype, "grad"))
        err, err_same = _max_err(a, b), _max_err(c, b)
        assert err <= 3 * err_same + _fp32_floor(b), f"{name} {case}: max error {err:.3e} > 3 x {err_same:.3e}"


# T = 1000: one S per window, more sinks than the window once (the oracle's T x T matrices cost seconds).
BWD_LONG_SINKS = {1: 64, 16: 18, 100: 1, "T+5": 0, None: 3}


@pytest.mark.parametrize("W", BWD_WINDOWS)
@pytest.mark.parametrize("T", BWD_T)
def test_kernel_bwd_matches_masked(T, W):
    """fp32 over T x W x S; heads (GQA 1, 2, 8) and D (odd, 128) rotate so that each meets many windows."""
    _require_kernel()
    sinks = (BWD_LONG_SINKS[W],) if T == 1000 else _bwd_sinks(T + 5 if W == "T+5" else W)
    W = T + 5 if W == "T+5" else W
    for n, S in enumerate(sinks):
        i = BWD_T.index(T) + BWD_WINDOWS.index(W if W != T + 5 else "T+5") + n
        (HQ, HK), D = BWD_HEADS[i % len(BWD_HEADS)], BWD_HEAD_DIMS[(i + n) % len(BWD_HEAD_DIMS)]
        B = 1 if T == 1000 else 2
        q, k, v = swa_inputs(B, T, HQ, HK, D)
        _check_kernel_grads(q, k, v, W, S, case=f"T={T} W={W} S={S} HQ={HQ} HK={HK} D={D}")


@pytest.mark.parametrize("lengths", [*VARLEN_LENGTHS, (0,)])
@pytest.mark.parametrize("W, S", [(16, 3), (1, 0), (None, 0), (64, 66)])
def test_kernel_bwd_varlen(lengths, W, S):
    _require_kernel()
    q, k, v = swa_inputs(1, sum(lengths), 8, 2, 60)
    _check_kernel_grads(q, k, v, W, S, seqlens_to_cu(lengths, dtype=torch.int32), case=f"{lengths}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, HQ, HK, D, W, S, lengths", KERNEL_LOW_CASES)
def test_kernel_bwd_low_precision(dtype, B, T, HQ, HK, D, W, S, lengths):
    _require_kernel()
    cu = None if lengths is None else seqlens_to_cu(lengths)
    T = sum(lengths) if lengths is not None else T
    q, k, v = swa_inputs(B, T, HQ, HK, D, dtype)
    _check_kernel_grads(q, k, v, W, S, cu, case=f"{dtype}")


def test_kernel_bwd_strided_bitwise():
    """Strided q, k, v and upstream gradient (last dim contiguous): bitwise the contiguous result."""
    _require_kernel()
    qkv = torch.randn(2, 130, 12, 60)
    q, k, v = qkv[:, :, 1:9], qkv[:, :, 9:11], torch.randn(130, 2, 2, 60).transpose(0, 1)
    do = torch.randn(2, 8, 130, 60).transpose(1, 2)  # [B, T, HQ, D] from a head-major buffer
    dlse = torch.randn(2, 8, 130)
    for W, S in ((16, 3), (None, 0)):
        got = _kernel_grads(q, k, v, W, S, do, dlse)
        want = _kernel_grads(q.contiguous(), k.contiguous(), v.contiguous(), W, S, do.contiguous(), dlse)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("lengths", [None, VARLEN_LENGTHS[1]])
def test_kernel_bwd_red_zones(dtype, lengths):
    """The backward writes exactly dq [B, T, HQ, D] and dk, dv [B, T, HK, D], nothing around them."""
    _require_kernel()
    B, T = (2, 65) if lengths is None else (1, sum(lengths))
    cu = None if lengths is None else seqlens_to_cu(lengths)
    q, k, v = swa_inputs(B, T, 8, 2, 60, dtype)
    o, lse = _kernel(q, k, v, 16, 3, cu)
    do, dlse = _upstream(o)
    zones = [red_zone((B, T, 8, 60), dtype), red_zone((B, T, 2, 60), dtype), red_zone((B, T, 2, 60), dtype)]
    run_cpu_bwd(do, dlse.float(), q, k, v, o, lse, 16, 3, 60 ** -0.5, cu, *(z[0] for z in zones))
    for _, check in zones:
        check()
    want = torch.ops.ahn.swa_attention_bwd(do, dlse.float(), q, k, v, o, lse, 16, 3, 60 ** -0.5, cu)
    for (got, _), w in zip(zones, want):
        assert torch.equal(got, w)


def test_kernel_bwd_threads_bitwise():
    """Every gradient row is summed by one task in a fixed order: 1 and 2 threads give the same bits."""
    _require_kernel()
    q, k, v = swa_inputs(1, 333, 8, 2, 64)
    do, dlse = _upstream(q)
    cu = seqlens_to_cu((100, 0, 233))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append([_kernel_grads(q, k, v, W, S, do, dlse, c)
                         for W, S, c in ((16, 3, None), (64, 70, cu), (None, 0, None))])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
