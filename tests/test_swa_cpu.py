"""swa_attention: the compiled C++ CPU forward and backward against the fp64 masked spec, with
red zones, strides and thread counts. (test_swa.py: the references, registration, dtypes.)"""

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
from test_swa import LOW_DTYPES, _masked_grads, _max_err, _op_grads, _upstream


# ----------------------------------------------------------------------------
# 1. the compiled CPU forward vs the fp64 masked spec
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
# 2. the compiled CPU backward vs the fp64 masked spec
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
