"""DeltaNet and Gated DeltaNet: references, chunk ops and the CPU chunk kernels (DESIGN §5).

The fused_recurrent backends are tested in test_delta_rule_recurrent.py.

The oracle is ``reference.recurrent`` (the token loop) in fp64; ``reference.chunked``
is checked against it, and the ops against both.
"""

import pytest
import torch
from torch.library import opcheck

import ahn_kernels
from ahn_kernels import _backend
from ahn_kernels.delta_rule import op, reference
from ahn_kernels.testing import (
    AWKWARD_T,
    DELTA_CHUNK_SIZES,
    DELTA_DIMS,
    DELTA_HEADS,
    DELTA_LAGS,
    VARLEN_LENGTHS,
    assert_close,
    make_delta_inputs,
    fp64_leaves,
    red_zone,
    tolerance,
)

FP64_EXACT = 1e-10  # two fp64 formulations of the same math
GATED = pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
CHUNK_OPS = {False: op.chunk_delta_rule, True: op.chunk_gated_delta_rule}
GRAD_ORDER = ("q", "k", "v", "beta", "g", "initial_state")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of tiny ops; on a busy machine two OpenMP threads spin-wait
    on each other and make them 10-50x slower (measured: a 400-step token loop 0.06 s -> 2.8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _oracle(inputs, **kw):
    """fp64 token loop: (o, final_state)."""
    return reference.recurrent(**fp64_leaves(inputs), **kw)


def _grads(outputs, upstream, inputs):
    """Gradients of <outputs, upstream> w.r.t. the differentiable inputs, by name."""
    names = [n for n in GRAD_ORDER if isinstance(inputs.get(n), torch.Tensor)]
    loss = sum((o.double() * u.double()).sum() for o, u in zip(outputs, upstream))
    return dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names])))


# ----------------------------------------------------------------------------
# reference: chunked == recurrent, gradients
# ----------------------------------------------------------------------------
# Every AWKWARD_T with every chunk size; dims (odd), head layout, h0, in-kernel l2norm
# and decay (5 = strong: the in-chunk prefix sum reaches -320) rotate over the grid.
_VARIANTS = [  # (K, V, heads, initial_state, use_qk_l2norm, decay)
    (DELTA_DIMS[0], DELTA_DIMS[0], DELTA_HEADS[0], True, False, 1.0),
    (DELTA_DIMS[1], DELTA_DIMS[2], DELTA_HEADS[1], False, True, 1.0),
    (DELTA_DIMS[2], DELTA_DIMS[1], DELTA_HEADS[0], True, True, 5.0),
    (DELTA_DIMS[0], DELTA_DIMS[2], DELTA_HEADS[1], True, False, 5.0),
]
CHUNKED_CASES = [(T, C, *_VARIANTS[(i + j) % len(_VARIANTS)])
                 for i, T in enumerate(AWKWARD_T) for j, C in enumerate(DELTA_CHUNK_SIZES)]


@GATED
@pytest.mark.parametrize("T, chunk_size, K, V, heads, h0, l2norm, decay", CHUNKED_CASES)
def test_chunked_equals_recurrent(gated, T, chunk_size, K, V, heads, h0, l2norm, decay):
    x = fp64_leaves(make_delta_inputs(2, T, heads, K, V, gated=gated, initial_state=h0, unit_keys=not l2norm,
                                decay=decay))
    o_ref, ht_ref = reference.recurrent(**x, use_qk_l2norm=l2norm)
    o, ht = reference.chunked(**x, use_qk_l2norm=l2norm, chunk_size=chunk_size)
    assert_close("o", o, o_ref, FP64_EXACT)
    assert_close("final_state", ht, ht_ref, FP64_EXACT)


@GATED
@pytest.mark.parametrize("lengths, lag", [(VARLEN_LENGTHS[0], None), (VARLEN_LENGTHS[0], (10, 3)),
                                          (VARLEN_LENGTHS[1], (1, 0)), (VARLEN_LENGTHS[1], (5, 250))])
def test_chunked_equals_recurrent_varlen_lag(gated, lengths, lag):
    x = fp64_leaves(make_delta_inputs(1, sum(lengths), DELTA_HEADS[1], 7, 12, gated=gated, lengths=lengths,
                                initial_state=True))
    o_ref, ht_ref = reference.recurrent(**x, lag=lag)
    o, ht = reference.chunked(**x, lag=lag, chunk_size=16)
    assert_close("o", o, o_ref, FP64_EXACT)
    assert_close("final_state", ht, ht_ref, FP64_EXACT)


@pytest.mark.parametrize("T, heads, l2norm, lengths, lag", [
    (1, (1, 1, 2), False, None, None),
    (5, (2, 1, 1), True, None, None),
    (9, (1, 2, 1), False, None, (2, 1)),
    (9, (2, 1, 2), False, (4, 0, 5), (1, 1)),
])
def test_gradcheck_chunked(T, heads, l2norm, lengths, lag):
    """fp64 gradcheck of the chunked reference; chunk 4 gives several chunks and a partial one."""
    x = fp64_leaves(make_delta_inputs(1, T, heads, 3, 4, lengths=lengths, initial_state=True, decay=5.0,
                                unit_keys=not l2norm), requires_grad=True)
    names = [n for n in GRAD_ORDER if x.get(n) is not None]

    def fn(*tensors):
        kw = dict(x, **dict(zip(names, tensors)))
        return reference.chunked(**kw, use_qk_l2norm=l2norm, lag=lag, chunk_size=4)

    assert torch.autograd.gradcheck(fn, [x[n] for n in names], fast_mode=True)


@GATED
@pytest.mark.parametrize("lengths, lag, l2norm, h0", [
    (None, None, True, True),
    (VARLEN_LENGTHS[0], (10, 3), False, False),
    (VARLEN_LENGTHS[1], (1, 0), True, True),
])
def test_chunked_bwd_equals_recurrent_autograd(gated, lengths, lag, l2norm, h0):
    """The explicit backward of the chunked form vs autograd through the token loop, fp64."""
    T = 70 if lengths is None else sum(lengths)
    x = fp64_leaves(make_delta_inputs(1 if lengths else 2, T, DELTA_HEADS[int(gated)], 9, 6, gated=gated,
                                lengths=lengths, initial_state=h0, unit_keys=not l2norm), requires_grad=True)
    o, ht = reference.recurrent(**x, use_qk_l2norm=l2norm, lag=lag)
    up = (torch.randn_like(o), torch.randn_like(ht))
    want = _grads((o, ht), up, x)
    got = reference.chunked_bwd(*up, x["q"], x["k"], x["v"], x["beta"], x.get("g"), None, x["initial_state"],
                                x["cu_seqlens"], l2norm, lag, 16)
    got = dict(zip(("q", "k", "v", "beta", "g", "initial_state"), got))
    for name, ref in want.items():
        assert_close(f"d{name}", got[name], ref, FP64_EXACT)
    if not h0:  # the gradient w.r.t. a zero initial state
        assert got["initial_state"].shape == ht.shape


# ----------------------------------------------------------------------------
# reference: lag == slicing, varlen == per sequence, split-continuation == whole
# ----------------------------------------------------------------------------
@GATED
@pytest.mark.parametrize("lag", DELTA_LAGS)
@pytest.mark.parametrize("lengths", [None, VARLEN_LENGTHS[1]], ids=["dense", "varlen"])
def test_lag_equals_slicing(gated, lag, lengths):
    """Row t reads the state after tokens S .. t-W with q_t: slice each sequence and run without lag."""
    T = 65 if lengths is None else sum(lengths)
    B = 2 if lengths is None else 1
    x = fp64_leaves(make_delta_inputs(B, T, DELTA_HEADS[0], 7, 5, gated=gated, lengths=lengths, initial_state=True))
    o, ht = reference.chunked(**x, lag=lag, chunk_size=16)
    W, S = lag
    bounds = [(b, 0, T) for b in range(B)] if lengths is None else [(0, s, e) for s, e in zip(
        x["cu_seqlens"][:-1].tolist(), x["cu_seqlens"][1:].tolist())]
    want_o, want_ht = torch.zeros_like(o), x["initial_state"].clone()
    for n, (b, s, e) in enumerate(bounds):
        if e - s - W - S <= 0:
            continue
        mem = slice(s + S, e - W)
        sl = {name: x[name][b:b + 1, mem] for name in ("k", "v", "beta", "g") if name in x}
        o_n, ht_n = reference.chunked(x["q"][b:b + 1, s + S + W:e], **sl, initial_state=x["initial_state"][n:n + 1],
                                      chunk_size=16)
        want_o[b, s + S + W:e] = o_n[0]
        want_ht[n] = ht_n[0]
    assert torch.equal(o[want_o == 0], want_o[want_o == 0]), "rows without memory must be exactly 0"
    assert_close("o", o, want_o, FP64_EXACT)
    assert_close("final_state", ht, want_ht, FP64_EXACT)


@GATED
def test_varlen_equals_per_sequence(gated):
    lengths = VARLEN_LENGTHS[0]
    x = make_delta_inputs(1, sum(lengths), DELTA_HEADS[1], 60, 7, gated=gated, lengths=lengths, initial_state=True)
    o, ht = CHUNK_OPS[gated](**x, output_final_state=True)
    cu = x["cu_seqlens"].tolist()
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        seq = {name: t[:, s:e] for name, t in x.items() if name not in ("initial_state", "cu_seqlens")}
        o_n, ht_n = CHUNK_OPS[gated](**seq, initial_state=x["initial_state"][n:n + 1], output_final_state=True)
        assert_close(f"o[{n}]", o[:, s:e], o_n, tolerance(torch.float32, "out"))
        assert_close(f"final_state[{n}]", ht[n:n + 1], ht_n, tolerance(torch.float32, "out"))


@GATED
@pytest.mark.parametrize("split", [37, 64, 128])
def test_split_continuation_equals_whole(gated, split):
    """A prefill continued from its returned state equals the whole prefill; bitwise at chunk multiples."""
    x = make_delta_inputs(2, 150, DELTA_HEADS[0], 60, 100, gated=gated, initial_state=True)
    fn = CHUNK_OPS[gated]
    o, ht = fn(**x, output_final_state=True)
    gates = ("beta", "g") if gated else ("beta",)
    first = {n: x[n][:, :split] for n in ("q", "k", "v", *gates)}
    second = {n: x[n][:, split:] for n in ("q", "k", "v", *gates)}
    o1, h1 = fn(**first, initial_state=x["initial_state"], output_final_state=True)
    o2, h2 = fn(**second, initial_state=h1, output_final_state=True)
    got = torch.cat([o1, o2], 1)
    if split % 64 == 0:
        assert torch.equal(got, o) and torch.equal(h2, ht)
    else:
        assert_close("o", got, o, tolerance(torch.float32, "out"))
        assert_close("final_state", h2, ht, tolerance(torch.float32, "out"))


# ----------------------------------------------------------------------------
# ops: opcheck, torch.compile, public ops vs the fp64 oracle
# ----------------------------------------------------------------------------
def _op_args(x, gated, *, fused=False, lag=(0, 0), l2norm=False, chunk_size=16):
    """Positional arguments of torch.ops.ahn.* in schema order."""
    K = x["q"].shape[-1]
    gates = (x["g"], x["beta"]) if gated else (x["beta"],)
    args = (x["q"], x["k"], x["v"], *gates, K ** -0.5, x["initial_state"], x["cu_seqlens"], l2norm)
    return args if fused else (*args, chunk_size, *lag)


def _permuted(x):
    """q, k, v as [B, H, T, D] memory viewed as [B, T, H, D] (last dim contiguous, T not outermost)."""
    return {n: (t.transpose(1, 2).contiguous().transpose(1, 2) if n in ("q", "k", "v") else t) for n, t in x.items()}


OPCHECK_CASES = [  # (name, gated, fused, lengths, initial_state, requires_grad, permuted, lag)
    ("chunk_gated_permuted", True, False, None, True, False, True, (0, 0)),
    ("chunk_gated_varlen_lag", True, False, (5, 0, 15), False, True, False, (3, 1)),
    ("chunk_delta", False, False, None, False, False, False, (0, 0)),
    ("chunk_delta_varlen", False, False, (5, 0, 15), True, True, False, (0, 0)),
    ("fused_gated_varlen", True, True, (5, 0, 15), True, True, False, None),
    ("fused_delta", False, True, None, False, False, True, None),
]


@pytest.mark.parametrize("name, gated, fused, lengths, h0, requires_grad, permuted, lag", OPCHECK_CASES,
                         ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(name, gated, fused, lengths, h0, requires_grad, permuted, lag):
    T = 20 if lengths is None else sum(lengths)
    x = make_delta_inputs(1 if lengths else 2, T, DELTA_HEADS[0], 8, 8, gated=gated, lengths=lengths,
                          initial_state=h0, requires_grad=requires_grad)
    x = _permuted(x) if permuted else x
    prefix = "fused_recurrent" if fused else "chunk"
    target = getattr(torch.ops.ahn, f"{prefix}_{'gated_' if gated else ''}delta_rule").default
    opcheck(target, _op_args(x, gated, fused=fused, lag=lag, l2norm=True))


@GATED
def test_opcheck_bwd(gated):
    lengths = (5, 0, 15)
    x = make_delta_inputs(1, 20, DELTA_HEADS[1], 8, 8, gated=gated, lengths=lengths, initial_state=gated)
    grad_o, grad_ht = torch.randn(1, 20, 4, 8), torch.randn(3, 4, 8, 8)
    target = getattr(torch.ops.ahn, f"chunk_{'gated_' if gated else ''}delta_rule_bwd").default
    opcheck(target, (grad_o, grad_ht, *_op_args(x, gated, lag=(2, 1), l2norm=True)))


def test_compile_chunk_gated_delta_rule():
    x = make_delta_inputs(2, 40, DELTA_HEADS[1], 16, 16, initial_state=True, requires_grad=True)
    compiled = torch.compile(ahn_kernels.chunk_gated_delta_rule, fullgraph=True)
    o, ht = compiled(**x, output_final_state=True, chunk_size=16, lag=(4, 2))
    o_e, ht_e = ahn_kernels.chunk_gated_delta_rule(**x, output_final_state=True, chunk_size=16, lag=(4, 2))
    up = (torch.randn_like(o), torch.randn_like(ht))
    got, want = _grads((o, ht), up, x), _grads((o_e, ht_e), up, x)
    assert torch.equal(o, o_e) and torch.equal(ht, ht_e)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_compile_fused_recurrent_gated_delta_rule():
    x = make_delta_inputs(1, 20, DELTA_HEADS[0], 16, 16, lengths=(5, 0, 15), initial_state=True)
    compiled = torch.compile(ahn_kernels.fused_recurrent_gated_delta_rule, fullgraph=True)
    o, ht = compiled(**x, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_e, ht_e = ahn_kernels.fused_recurrent_gated_delta_rule(**x, output_final_state=True,
                                                             use_qk_l2norm_in_kernel=True)
    assert torch.equal(o, o_e) and torch.equal(ht, ht_e)


def test_fused_recurrent_is_forward_only():
    x = make_delta_inputs(1, 5, requires_grad=True)
    o, ht = ahn_kernels.fused_recurrent_gated_delta_rule(**x, output_final_state=True)
    assert not o.requires_grad and not ht.requires_grad


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                                 ids=["fp32", "fp16", "bf16"])
# (B, lengths, T, heads, K, V, initial_state, l2norm, lag, chunk_size)
OP_CASES = [
    (2, None, 70, DELTA_HEADS[0], 60, 32, True, True, None, 64),
    (1, VARLEN_LENGTHS[1], 22, DELTA_HEADS[1], 7, 100, True, False, (4, 2), 16),
]


@DTYPES
@GATED
@pytest.mark.parametrize("B, lengths, T, heads, K, V, h0, l2norm, lag, chunk_size", OP_CASES,
                         ids=["dense", "varlen_lag"])
def test_chunk_op_vs_reference(dtype, gated, B, lengths, T, heads, K, V, h0, l2norm, lag, chunk_size):
    """Forward, final state and every gradient (random upstream for o and the final state) vs fp64."""
    x = make_delta_inputs(B, T, heads, K, V, gated=gated, dtype=dtype, lengths=lengths, initial_state=h0,
                          unit_keys=not l2norm, requires_grad=True)
    o, ht = CHUNK_OPS[gated](**x, output_final_state=True, use_qk_l2norm_in_kernel=l2norm, lag=lag,
                             chunk_size=chunk_size)
    assert o.dtype == dtype and ht.dtype == torch.float32
    x64 = fp64_leaves(x, requires_grad=True)
    o_ref, ht_ref = reference.recurrent(**x64, use_qk_l2norm=l2norm, lag=lag)
    assert_close("o", o, o_ref, tolerance(dtype, "out"))
    assert_close("final_state", ht, ht_ref, tolerance(dtype, "out"))
    up = (torch.randn_like(o_ref), torch.randn_like(ht_ref))
    got = _grads((o, ht), (up[0].to(dtype), up[1].float()), x)
    want = _grads((o_ref, ht_ref), up, x64)
    for name, ref in want.items():
        kind = "gate" if name in ("beta", "g") else "grad"
        assert got[name].dtype == x[name].dtype
        assert_close(f"d{name}", got[name], ref, tolerance(dtype, kind))


# ----------------------------------------------------------------------------
# chunk: the compiled CPU forward vs the fp64 token loop
# ----------------------------------------------------------------------------
KERNEL_T = (1, 63, 64, 65, 300)
KERNEL_HEADS = ((4, 2, 2), (1, 1, 4))  # AHN's grouped k/v; fla's grouped values with one q/k head
# (K, V, heads, initial_state, l2norm, lag, decay, dtype, permuted), rotated over T x chunk size:
# every T with every chunk size, every variant with every chunk size.
_KERNEL_VARIANTS = [
    (60, 100, KERNEL_HEADS[0], True, False, None, 1.0, torch.float32, False),
    (128, 128, KERNEL_HEADS[1], False, True, (10, 3), 5.0, torch.float32, True),
    (100, 7, KERNEL_HEADS[0], True, True, (1, 0), 1.0, torch.bfloat16, False),
    (7, 60, KERNEL_HEADS[1], True, False, None, 5.0, torch.bfloat16, True),
    (128, 60, KERNEL_HEADS[0], False, False, (5, 250), 1.0, torch.float32, False),
]
KERNEL_CASES = [(T, C, *_KERNEL_VARIANTS[(i + j) % len(_KERNEL_VARIANTS)])
                for i, T in enumerate(KERNEL_T) for j, C in enumerate(DELTA_CHUNK_SIZES)]
# T = 1000 (many chunks, a partial last one) in both head layouts and K, V in {60, 100, 128}; two
# cases only: the fp64 oracle's autograd through 1000 token steps is slow and memory-hungry.
KERNEL_CASES += [(1000, 64, *_KERNEL_VARIANTS[0]), (1000, 32, *_KERNEL_VARIANTS[1])]


def _require_chunk_kernel():
    if "cpu" not in _backend.available("chunk_gated_delta_rule", "cpu"):
        pytest.skip(f"ahn_kernels._C is not built ({_backend.build_info().get('error')})")


def _chunk_kernel(x, gated, **kw):
    with ahn_kernels.use_backend("cpu"):
        assert _backend.choose(f"chunk_{'gated_' if gated else ''}delta_rule", "cpu") == "cpu"
        return CHUNK_OPS[gated](**x, output_final_state=True, **kw)


@GATED
@pytest.mark.parametrize("T, chunk_size, K, V, heads, h0, l2norm, lag, decay, dtype, permuted", KERNEL_CASES)
def test_chunk_kernel_vs_recurrent(gated, T, chunk_size, K, V, heads, h0, l2norm, lag, decay, dtype, permuted):
    _require_chunk_kernel()
    x = make_delta_inputs(2, T, heads, K, V, gated=gated, dtype=dtype, initial_state=h0, unit_keys=not l2norm,
                          decay=decay)
    x = _permuted(x) if permuted else x
    o, ht = _chunk_kernel(x, gated, use_qk_l2norm_in_kernel=l2norm, lag=lag, chunk_size=chunk_size)
    o_ref, ht_ref = _oracle(x, use_qk_l2norm=l2norm, lag=lag)
    assert o.dtype == dtype and o.is_contiguous() and ht.dtype == torch.float32
    assert_close("o", o, o_ref, tolerance(dtype, "out"))
    assert_close("final_state", ht, ht_ref, tolerance(dtype, "out"))


@GATED
@pytest.mark.parametrize("lag, chunk_size", [(None, 64), ((10, 3), 16), ((1, 0), 32)])
def test_chunk_kernel_varlen(gated, lag, chunk_size):
    """Packed sequences, with an empty and a one-token one; rows without memory must be exactly 0."""
    _require_chunk_kernel()
    lengths = VARLEN_LENGTHS[0]
    x = make_delta_inputs(1, sum(lengths), KERNEL_HEADS[0], 60, 33, gated=gated, lengths=lengths,
                          initial_state=True)
    o, ht = _chunk_kernel(x, gated, lag=lag, chunk_size=chunk_size)
    o_ref, ht_ref = _oracle(x, lag=lag)
    assert torch.equal(o[o_ref == 0], o_ref[o_ref == 0].float())
    assert_close("o", o, o_ref, tolerance(torch.float32, "out"))
    assert_close("final_state", ht, ht_ref, tolerance(torch.float32, "out"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_kernel_red_zone_and_threads(dtype):
    """Writes stay inside o and final_state (NaN guard bands around every tensor), and the
    result is bitwise the same on 1 and 2 threads (one task per sequence and head)."""
    _require_chunk_kernel()
    lengths = VARLEN_LENGTHS[1]
    x = make_delta_inputs(1, sum(lengths), KERNEL_HEADS[1], 7, 20, dtype=dtype, lengths=lengths,
                          initial_state=True)
    zoned, checks = {}, []
    for n, t in x.items():
        if isinstance(t, torch.Tensor):
            zoned[n], check = red_zone(tuple(t.shape), t.dtype, fill=float("nan") if t.is_floating_point() else 1 << 40)
            zoned[n].copy_(t)
            checks.append(check)
    results, threads = [], torch.get_num_threads()
    for n_threads in (1, 2):
        o, check_o = red_zone((1, sum(lengths), 4, 20), dtype)
        ht, check_ht = red_zone((3, 4, 7, 20), torch.float32)
        torch.set_num_threads(n_threads)
        try:
            op.run_chunk(zoned["q"], zoned["k"], zoned["v"], zoned["g"], zoned["beta"], 7 ** -0.5,
                         zoned["initial_state"], zoned["cu_seqlens"], True, 16, 3, 1, o, ht)
        finally:
            torch.set_num_threads(threads)
        for check in (*checks, check_o, check_ht):
            check()
        results.append((o.clone(), ht.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    o_ref, ht_ref = _oracle(x, use_qk_l2norm=True, lag=(3, 1))
    assert_close("o", results[0][0], o_ref, tolerance(dtype, "out"))
    assert_close("final_state", results[0][1], ht_ref, tolerance(dtype, "out"))


def test_chunk_kernel_large_output_red_zone():
    """An o over 4 MiB, whose pages the kernel faults in itself (huge pages, a parallel first touch:
    csrc/common/pages.h): writes stay inside its red zone and are bitwise those into a plain tensor."""
    _require_chunk_kernel()
    T, HS, K, V = 2100, 4, 16, 128  # o [1, T, HS, V] fp32: 4.3 MiB
    x = make_delta_inputs(1, T, (HS, 2, 2), K, V)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"], K ** -0.5, None, None, True, 64, 0, 0)
    plain = torch.empty(1, T, HS, V), torch.empty(1, HS, K, V)
    op.run_chunk(*args, *plain)
    o, check_o = red_zone((1, T, HS, V), torch.float32)
    ht, check_ht = red_zone((1, HS, K, V), torch.float32)
    op.run_chunk(*args, o, ht)
    check_o()
    check_ht()
    assert torch.equal(o, plain[0]) and torch.equal(ht, plain[1])


# ----------------------------------------------------------------------------
# chunk: the compiled CPU backward vs fp64 autograd through the token loop
# ----------------------------------------------------------------------------
def _chunk_kernel_grads(x, gated, up, **kw):
    """Gradients of <o, up_o> + <ht, up_ht> through the public op, forward and backward on the CPU kernels."""
    name = f"chunk_{'gated_' if gated else ''}delta_rule_bwd"
    with ahn_kernels.use_backend("cpu"):
        assert _backend.choose(name, "cpu") == "cpu"
        return _grads(_chunk_kernel(x, gated, **kw), up, x)


def _check_kernel_grads(x, gated, dtype, **kw):
    """Kernel gradients (random upstream for o and the final state) vs the fp64 token loop's."""
    x64 = fp64_leaves(x, requires_grad=True)
    o_ref, ht_ref = reference.recurrent(**x64, use_qk_l2norm=kw.get("use_qk_l2norm_in_kernel", False),
                                        lag=kw.get("lag"))
    up = (torch.randn_like(o_ref).to(dtype), torch.randn_like(ht_ref).float())  # what the op's backward receives
    got = _chunk_kernel_grads(x, gated, up, **kw)
    # With lag, short sequences absorb nothing: inputs the outputs do not depend on get zero gradients.
    loss = sum((o.double() * u.double()).sum() for o, u in zip((o_ref, ht_ref), up))
    leaves = [x64[n] for n in got]
    want = dict(zip(got, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
                    if loss.requires_grad else [torch.zeros_like(t) for t in leaves]))
    assert got.keys() == want.keys()
    for name, ref in want.items():
        assert got[name].dtype == x[name].dtype and got[name].shape == x[name].shape
        assert_close(f"d{name}", got[name], ref, tolerance(dtype, "gate" if name in ("beta", "g") else "grad"))


@GATED
@pytest.mark.parametrize("T, chunk_size, K, V, heads, h0, l2norm, lag, decay, dtype, permuted", KERNEL_CASES)
def test_chunk_kernel_bwd_vs_recurrent(gated, T, chunk_size, K, V, heads, h0, l2norm, lag, decay, dtype, permuted):
    _require_chunk_kernel()
    x = make_delta_inputs(2, T, heads, K, V, gated=gated, dtype=dtype, initial_state=h0, unit_keys=not l2norm,
                          decay=decay, requires_grad=True)
    x = _permuted(x) if permuted else x
    _check_kernel_grads(x, gated, dtype, use_qk_l2norm_in_kernel=l2norm, lag=lag, chunk_size=chunk_size)


@GATED
@pytest.mark.parametrize("lag, chunk_size, dtype", [(None, 64, torch.float32), ((10, 3), 16, torch.bfloat16),
                                                    ((1, 0), 32, torch.float32)])
def test_chunk_kernel_bwd_varlen(gated, lag, chunk_size, dtype):
    """Packed sequences with an empty and a one-token one, grouped k/v heads, in-kernel l2norm."""
    _require_chunk_kernel()
    lengths = VARLEN_LENGTHS[0]
    x = make_delta_inputs(1, sum(lengths), KERNEL_HEADS[0], 60, 33, gated=gated, dtype=dtype, lengths=lengths,
                          initial_state=True, unit_keys=False, requires_grad=True)
    _check_kernel_grads(x, gated, dtype, use_qk_l2norm_in_kernel=True, lag=lag, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", KERNEL_HEADS, ids=["grouped_kv", "grouped_v"])
def test_chunk_kernel_bwd_red_zone_and_threads(dtype, heads):
    """Writes stay inside every gradient (NaN guard bands around inputs and outputs), the result is
    bitwise the same on 1 and 2 threads, and dh0 is the gradient w.r.t. a zero state when none is given."""
    _require_chunk_kernel()
    lengths, K, V, lag = VARLEN_LENGTHS[1], 7, 20, (3, 1)
    T, HS, N = sum(lengths), max(heads), len(lengths)
    x = make_delta_inputs(1, T, heads, K, V, dtype=dtype, lengths=lengths, unit_keys=False)
    up = {"grad_o": torch.randn(1, T, HS, V).to(dtype), "grad_ht": torch.randn(N, HS, K, V)}
    zoned, checks = {}, []
    for n, t in (*x.items(), *up.items()):
        if isinstance(t, torch.Tensor):
            zoned[n], check = red_zone(tuple(t.shape), t.dtype, fill=float("nan") if t.is_floating_point() else 1 << 40)
            zoned[n].copy_(t)
            checks.append(check)
    shapes = {"dq": (x["q"].shape, dtype), "dk": (x["k"].shape, dtype), "dv": (x["v"].shape, dtype),
              "dbeta": ((1, T, HS), torch.float32), "dg": ((1, T, HS), torch.float32),
              "dh0": ((N, HS, K, V), torch.float32)}
    results, threads = [], torch.get_num_threads()
    for n_threads in (1, 2):
        outs = {n: red_zone(tuple(shape), dt) for n, (shape, dt) in shapes.items()}
        torch.set_num_threads(n_threads)
        try:
            op.run_chunk_bwd(zoned["grad_o"], zoned["grad_ht"], zoned["q"], zoned["k"], zoned["v"], zoned["g"],
                             zoned["beta"], K ** -0.5, None, zoned["cu_seqlens"], True, 16, *lag,
                             *(outs[n][0] for n in shapes))
        finally:
            torch.set_num_threads(threads)
        for check in (*checks, *(c for _, c in outs.values())):
            check()
        results.append({n: t.clone() for n, (t, _) in outs.items()})
    for n in shapes:
        assert torch.equal(results[0][n], results[1][n]), f"d{n} differs between 1 and 2 threads"
    x64 = fp64_leaves(x, requires_grad=True)
    x64["initial_state"] = torch.zeros(N, HS, K, V, dtype=torch.float64, requires_grad=True)
    want = _grads(reference.recurrent(**x64, use_qk_l2norm=True, lag=lag),
                  (up["grad_o"].double(), up["grad_ht"].double()), x64)
    for name, ref in want.items():
        got = results[0]["dh0" if name == "initial_state" else f"d{name}"]
        assert_close(f"d{name}", got, ref, tolerance(dtype, "gate" if name in ("beta", "g") else "grad"))


@pytest.mark.parametrize("gate", [-4.0, -5.0, -8.0, -20.0])
def test_chunk_kernel_bwd_strong_gates(gate):
    """dg where strong gates make it tiny (|dg| ~ 1e-9 at g = -20 per token) holds the relative bar:
    each slot sums only the terms that cross it, over fp64 prefix sums of g. The former per-token
    readout minus key terms and suffix sum cancelled to relative errors of 1.5e-3 at g = -8 and 8
    at g = -20 here (now 2e-7 at each g)."""
    _require_chunk_kernel()
    x = make_delta_inputs(1, 100, KERNEL_HEADS[0], 15, 17, initial_state=True, unit_keys=False)
    x["g"] = gate + 0.1 * torch.randn_like(x["g"])  # [1, T, HS]
    for t in (x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"]):
        t.requires_grad_(True)
    _check_kernel_grads(x, True, torch.float32, use_qk_l2norm_in_kernel=True, chunk_size=64)


# ----------------------------------------------------------------------------
# validation: every argument is checked at the boundary and named
# ----------------------------------------------------------------------------
BAD = [  # (change to the arguments, exception, text the message must contain)
    (lambda a: a.update(q=a["q"].double()), TypeError, "q: dtype"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "k: dtype"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q: expected 4 dims"),
    (lambda a: a.update(v=a["v"][:, :5]), ValueError, "v: dim 1 (T)"),
    (lambda a: a.update(k=a["k"][..., :4]), ValueError, "k: dim 3 (K)"),
    (lambda a: a.update(q=torch.randn(2, 10, 3, 8)), ValueError, "q: its 3 heads"),
    (lambda a: a.update(beta=a["beta"][..., :2]), ValueError, "beta: dim 2 (HS)"),
    (lambda a: a.update(g=None), TypeError, "g: expected a torch.Tensor"),
    (lambda a: a.update(initial_state=torch.randn(2, 4, 8, 8).half()), TypeError, "initial_state: dtype"),
    (lambda a: a.update(initial_state=torch.randn(3, 4, 8, 8)), ValueError, "initial_state: dim 0 (N)"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 10, 20])), ValueError, "cu_seqlens: given"),
    (lambda a: a.update(chunk_size=48), ValueError, "chunk_size"),
    (lambda a: a.update(lag=(0, 0)), ValueError, "window_size"),
    (lambda a: a.update(scale="1"), TypeError, "scale"),
    (lambda a: a.update(q=torch.randn(2, 10, 2, 300), k=torch.randn(2, 10, 2, 300)), ValueError, "q: head dim"),
]


@pytest.mark.parametrize("change, exc, text", BAD, ids=[b[2] for b in BAD])
def test_bad_arguments(change, exc, text):
    args = make_delta_inputs(2, 10, DELTA_HEADS[0], 8, 8)
    change(args)
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        op.chunk_gated_delta_rule(**args)

