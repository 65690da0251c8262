"""Mamba2 SSD: references against each other, the public ops against the fp64 reference (DESIGN §5) and the
compiled CPU kernels against the fp64 token loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from ahn_kernels import _backend, testing
from ahn_kernels.ssd import op as ssd_op
from ahn_kernels.ssd import reference, ssd_chunk_scan, ssd_state_update
from ahn_kernels.testing import CPU_KERNEL_FP32, MAMBA_ALLCLOSE, assert_close, make_ssd_inputs, tolerance

pytestmark = pytest.mark.filterwarnings("ignore:ahn_kernels.*no compiled kernel:RuntimeWarning")

GRAD_KIND = {"x": "grad", "B": "grad", "C": "grad", "z": "grad", "initial_states": "grad",
             "dt": "gate", "A": "gate", "D": "gate", "dt_bias": "gate"}


def _cast(inputs, dtype=torch.float64, requires_grad=False):
    """Fresh leaves: every floating tensor converted to ``dtype`` (None and ints kept)."""
    def one(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().to(dtype).requires_grad_(requires_grad)
        return t
    return {k: one(t) for k, t in inputs.items()}


def _leaves(inputs):
    return {k: t for k, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}


def _exact(got, ref):
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------
# references: the token loop is the oracle
# ----------------------------------------------------------------------------
RECURRENT_CASES = [
    dict(G=1),
    dict(G=2, D="H", dt_bias=True, initial_states=True),
    dict(G=4, D="HP", z=True, dt_bias=True, initial_states=True, dt_limit=(0.03, 0.08)),  # clips both sides
    dict(G=2, z=True, dt_softplus=False, initial_states=True, dt_shift=-0.05),  # negative dt clamps to 0
]


@pytest.mark.parametrize("case", range(len(RECURRENT_CASES)))
@pytest.mark.parametrize("chunk_size", testing.SSD_CHUNK_SIZES)
@pytest.mark.parametrize("T", testing.AWKWARD_T)
def test_recurrent_equals_chunked(T, chunk_size, case):
    opts = dict(RECURRENT_CASES[case])
    G, limit, shift = opts.pop("G"), opts.pop("dt_limit", (0.0, math.inf)), opts.pop("dt_shift", 0.0)
    inputs = _cast(make_ssd_inputs(2, T, 4, 5, 7, G, **opts))
    inputs["dt"] = inputs["dt"] + shift
    y_rec, final_rec = reference.recurrent(**inputs, dt_limit=limit)
    y, final = reference.chunked(**inputs, chunk_size=chunk_size, dt_limit=limit)
    _exact(y, y_rec)
    _exact(final, final_rec)


@pytest.mark.parametrize("lag", (None,) + testing.SSD_LAGS)
@pytest.mark.parametrize("lengths", testing.VARLEN_LENGTHS)
def test_recurrent_equals_chunked_varlen(lengths, lag):
    inputs = _cast(make_ssd_inputs(1, sum(lengths), 4, 5, 7, 2, D="H", z=True, dt_bias=True,
                                   initial_states=True, lengths=lengths))
    y_rec, final_rec = reference.recurrent(**inputs, lag=lag)
    y, final = reference.chunked(**inputs, chunk_size=64, lag=lag)
    _exact(y, y_rec)
    _exact(final, final_rec)


def _quadratic(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_limit):
    """SSD's dual (attention) form, fp64, no chunks: an oracle that shares no code with the references.

    dt' = clamp(softplus(dt + dt_bias), dt_limit), a = cumsum(dt' A),
    y_t = (sum_{j<=t} exp(a_t - a_j) dt'_j (C_t . B_j) x_j + exp(a_t) C_t h0 + D x_t) silu(z_t).
    """
    R = x.shape[2] // B.shape[2]
    Bh, Ch = B.repeat_interleave(R, 2), C.repeat_interleave(R, 2)  # [B, T, H, N_state]
    dt = F.softplus(dt + dt_bias).clamp(*dt_limit)  # [B, T, H]
    a = torch.cumsum(dt * A, 1)  # [B, T, H]
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]  # [1, T, T, 1]
    decay = torch.exp((a[:, :, None] - a[:, None, :]).masked_fill(~causal, -math.inf))  # [B, T, T, H]
    y = torch.einsum("btjh,bthn,bjhn,bjh,bjhp->bthp", decay, Ch, Bh, dt, x)
    y = y + torch.einsum("bth,bthn,bhpn->bthp", torch.exp(a), Ch, initial_states)
    y = (y + D * x) * z * torch.sigmoid(z)
    to_end = torch.exp(a[:, -1:] - a)  # [B, T, H]
    final = torch.einsum("bjh,bjh,bjhp,bjhn->bhpn", to_end, dt, x, Bh)
    return y, final + torch.exp(a[:, -1])[..., None, None] * initial_states


def test_chunked_equals_quadratic_form():
    inputs = _cast(make_ssd_inputs(2, 130, 4, 5, 7, 2, D="HP", z=True, dt_bias=True, initial_states=True))
    limit = (0.03, 0.08)
    y, final = reference.chunked(**inputs, chunk_size=64, dt_limit=limit)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
    y_q, final_q = _quadratic(*(inputs[k] for k in names), limit)
    _exact(y, y_q)
    _exact(final, final_q)


def test_softplus_threshold_20():
    """Below 20 dt is softplus(dt); above, dt itself (log1p(exp(20.5)) differs from 20.5 by 1e-9)."""
    inputs = _cast(make_ssd_inputs(1, 2, 1, 1, 1, dt_softplus=True))
    inputs["dt"] = torch.tensor([[[19.5], [20.5]]], dtype=torch.float64)
    inputs["A"] = torch.tensor([-1e-30], dtype=torch.float64)  # no decay: y_t = sum_j dt_j x_j B_j C_t
    want_dt = torch.tensor([math.log1p(math.exp(19.5)), 20.5], dtype=torch.float64)
    xb = (inputs["x"][0, :, 0, 0] * inputs["B"][0, :, 0, 0])
    want = torch.cumsum(want_dt * xb, 0) * inputs["C"][0, :, 0, 0]
    for fn in (reference.recurrent, reference.chunked):
        y, _ = fn(**inputs)
        torch.testing.assert_close(y[0, :, 0, 0], want, rtol=1e-14, atol=0)


def test_gradcheck_reference():
    inputs = _cast(make_ssd_inputs(1, 9, 2, 3, 2, 1, D="HP", z=True, dt_bias=True, initial_states=True),
                   requires_grad=True)
    leaves = _leaves(inputs)

    def fn(*args):
        return reference.chunked(**{**inputs, **dict(zip(leaves, args))}, chunk_size=4)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


def _raise_some_dt_above_20(dt):
    """Every other step lands above softplus's threshold, where dt passes through unchanged."""
    dt[..., ::2] += 22.0


BWD_CASES = [  # (make_ssd_inputs options, chunked options, edit of dt)
    (dict(G=1, D="H", z=True, initial_states=True), dict(chunk_size=16), None),
    (dict(G=2, D="HP", dt_bias=True, lengths=(0, 1, 63, 66)), dict(chunk_size=64, dt_limit=(0.03, 0.08)), None),
    (dict(G=4, z=True, dt_bias=True, initial_states=True, lengths=(0, 1, 63, 66)), dict(chunk_size=16, lag=(10, 3)),
     None),
    (dict(G=2, D="H", z=True, dt_bias=True), dict(chunk_size=32), _raise_some_dt_above_20),
]


@pytest.mark.parametrize("case", range(len(BWD_CASES)))
def test_chunked_bwd_equals_autograd(case):
    """The explicit backward (what the op runs) against autograd through the chunked reference, fp64."""
    opts, kwargs, edit = BWD_CASES[case]
    opts = dict(opts)
    G, lengths = opts.pop("G"), opts.get("lengths")
    B, T = (1, sum(lengths)) if lengths else (2, 70)
    inputs = _cast(make_ssd_inputs(B, T, 4, 5, 7, G, **opts))
    if edit is not None:
        edit(inputs["dt"])
    leaves = {k: t.requires_grad_() for k, t in inputs.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and k != "initial_states"}
    h0 = inputs["initial_states"]
    if h0 is None:  # the backward also returns the gradient w.r.t. the zero initial state
        h0 = torch.zeros(len(lengths) if lengths else B, 4, 5, 7, dtype=torch.float64)
    h0.requires_grad_()
    out, final = reference.chunked(**{**inputs, "initial_states": h0}, **kwargs)
    dout, dfinal = torch.randn_like(out), torch.randn_like(final)
    want = torch.autograd.grad((out * dout).sum() + (final * dfinal).sum(), (*leaves.values(), h0))
    got = reference.chunked_bwd(dout, dfinal, **inputs, **kwargs)
    got = dict(zip(("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"), got))
    for k, w in zip((*leaves, "initial_states"), want):
        assert got[k] is not None, f"d{k} missing"
        torch.testing.assert_close(got[k], w, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{k}: {m}")
    for k in ("D", "z", "dt_bias"):
        assert (got[k] is None) == (inputs[k] is None)


def test_gradcheck_op_varlen_lag():
    """gradcheck through torch.ops.ahn.ssd_chunk_scan (fp64 at the raw op), i.e. its explicit backward."""
    inputs = make_ssd_inputs(1, 11, 2, 2, 2, 2, D="H", z=True, dt_bias=True, initial_states=True, lengths=(0, 3, 8))
    inputs = _cast(inputs, requires_grad=True)
    leaves = _leaves(inputs)

    def fn(*args):
        return torch.ops.ahn.ssd_chunk_scan(*_op_args({**inputs, **dict(zip(leaves, args))}, chunk_size=2,
                                                      lag=(2, 1)))

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


# ----------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------
def _op_args(inputs, chunk_size=16, dt_limit=(0.0, math.inf), lag=(0, 0)):
    i = inputs
    return (i["x"], i["dt"], i["A"], i["B"], i["C"], chunk_size, i["D"], i["z"], i["dt_bias"], i["initial_states"],
            i["cu_seqlens"], i["dt_softplus"], *dt_limit, *lag)


OPCHECK_CASES = [  # (requires_grad, lengths, make_ssd_inputs options, lag)
    (False, (0, 5, 17), dict(D="H", initial_states=True), (0, 0)),
    (True, (0, 5, 17), dict(D="HP", z=True, dt_bias=True), (0, 0)),
    (True, None, dict(z=True, initial_states=True), (3, 1)),
    (False, None, dict(), (0, 0)),
]


@pytest.mark.parametrize("requires_grad, lengths, opts, lag", OPCHECK_CASES)
def test_opcheck_chunk_scan(requires_grad, lengths, opts, lag):
    B, T = (1, sum(lengths)) if lengths else (2, 19)
    inputs = make_ssd_inputs(B, T, 4, 5, 7, 2, lengths=lengths, requires_grad=requires_grad, **opts)
    torch.library.opcheck(torch.ops.ahn.ssd_chunk_scan.default, _op_args(inputs, lag=lag))


def test_opcheck_chunk_scan_bwd():
    inputs = make_ssd_inputs(1, 22, 4, 5, 7, 2, z=True, lengths=(0, 5, 17))
    dout = torch.randn_like(inputs["x"])
    dfinal = torch.randn(3, 4, 5, 7)
    torch.library.opcheck(torch.ops.ahn.ssd_chunk_scan_bwd.default, (dout, dfinal, *_op_args(inputs)))


@pytest.mark.parametrize("indexed", (False, True))
def test_opcheck_state_update(indexed):
    s = _step_inputs(make_ssd_inputs(2, 1, 4, 5, 7, 2, D="HP", z=True, dt_bias=True), 0)
    state = torch.randn(5 if indexed else 2, 4, 5, 7)
    idx = torch.tensor([3, 1], dtype=torch.int32) if indexed else None
    torch.library.opcheck(torch.ops.ahn.ssd_state_update.default,
                          (state, s["x"], s["dt"], s["A"], s["B"], s["C"], s["D"], s["z"], s["dt_bias"],
                           s["dt_softplus"], idx))


def test_compile_fullgraph_forward_backward():
    inputs = make_ssd_inputs(1, 40, 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True,
                             lengths=(0, 17, 23), requires_grad=True)
    dout, dfinal = torch.randn(1, 40, 4, 5), torch.randn(3, 4, 5, 7)

    def step(fn):
        out, final = fn(**inputs, chunk_size=16, return_final_states=True)
        grads = torch.autograd.grad((out * dout).sum() + (final * dfinal).sum(), tuple(_leaves(inputs).values()))
        return (out, final) + grads

    eager = step(ssd_chunk_scan)
    compiled = step(torch.compile(ssd_chunk_scan, fullgraph=True))
    for got, ref in zip(compiled, eager):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# the public op against the fp64 reference
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, gate_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                               (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(2, 100, None), (1, 130, (0, 1, 63, 66))], ids=["dense", "varlen"])
def test_op_matches_fp64_reference(dtype, gate_dtype, shape):
    B, T, lengths = shape
    inputs = make_ssd_inputs(B, T, 4, 16, 16, 2, dtype=dtype, gate_dtype=gate_dtype, D="HP", z=True,
                             dt_bias=True, initial_states=True, lengths=lengths, requires_grad=True)
    ref_inputs = _cast(inputs, requires_grad=True)
    out, final = ssd_chunk_scan(**inputs, chunk_size=64, return_final_states=True)
    out_ref, final_ref = reference.chunked(**ref_inputs, chunk_size=64)
    assert out.dtype == dtype and final.dtype == torch.float32
    dout, dfinal = torch.randn_like(out), torch.randn_like(final)
    leaves, ref_leaves = _leaves(inputs), _leaves(ref_inputs)
    grads = torch.autograd.grad((out * dout).float().sum() + (final * dfinal).sum(), tuple(leaves.values()))
    grads_ref = torch.autograd.grad((out_ref * dout.double()).sum() + (final_ref * dfinal.double()).sum(),
                                    tuple(ref_leaves.values()))
    rtol, atol = MAMBA_ALLCLOSE[dtype]
    checks = [("out", out, out_ref, "out"), ("final_states", final, final_ref, "out")]
    for k, g, r in zip(leaves, grads, grads_ref):
        assert g.dtype == inputs[k].dtype, f"d{k}: dtype {g.dtype} != {k}'s {inputs[k].dtype}"
        checks.append((f"d{k}", g, r, GRAD_KIND[k]))
    for name, got, ref, kind in checks:
        assert_close(name, got, ref, tolerance(dtype, kind))
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------
# consistency of the public op with itself: lag, varlen, split, decode
# ----------------------------------------------------------------------------
def _slice_seq(inputs, bos, eos):
    """One sequence [bos, eos) of a packed batch as a B = 1 batch of its own."""
    return {k: (t[:, bos:eos] if isinstance(t, torch.Tensor) and t.dim() >= 3 else t)
            for k, t in inputs.items() if k not in ("cu_seqlens", "initial_states")}


def _sliced_lag(inputs, lengths, lag):
    """AHN's formulation by slicing: per sequence, scan tokens S .. L-1-W and read token j's state at row j+W."""
    W, S = lag
    outs, finals = [], []
    pos = 0
    for n, L in enumerate(lengths):
        seq = _slice_seq(inputs, pos, pos + L)
        x, z = seq["x"], seq["z"]
        mem = torch.zeros_like(x, dtype=torch.float32)
        h0 = inputs["initial_states"][n:n + 1]
        M = max(0, L - W - S)
        final = h0[0]
        if M:
            kv = {k: seq[k][:, S:S + M] for k in ("x", "dt", "B")}
            m, f = ssd_chunk_scan(**kv, A=inputs["A"], C=seq["C"][:, S + W:S + W + M], dt_bias=inputs["dt_bias"],
                                  initial_states=h0, dt_softplus=True, chunk_size=64, return_final_states=True)
            mem = torch.cat([mem[:, :S + W], m.float(), mem[:, S + W + M:]], 1)
            final = f[0]
        D = inputs["D"]
        outs.append((mem + x.float() * D[:, None]) * F.silu(z.float()))
        finals.append(final)
        pos += L
    return torch.cat(outs, 1), torch.stack(finals)


@pytest.mark.parametrize("lag", testing.SSD_LAGS)
@pytest.mark.parametrize("lengths", [(100,), testing.VARLEN_LENGTHS[0]], ids=["dense", "varlen"])
def test_lag_equals_slicing(lengths, lag):
    inputs = make_ssd_inputs(1, sum(lengths), 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True,
                             lengths=None if len(lengths) == 1 else lengths)
    out, final = ssd_chunk_scan(**inputs, chunk_size=64, return_final_states=True, lag=lag)
    want, want_final = _sliced_lag(inputs, lengths, lag)
    assert_close("out", out, want, tolerance(torch.float32, "out"))
    assert_close("final_states", final, want_final, tolerance(torch.float32, "out"))


@pytest.mark.parametrize("lengths", testing.VARLEN_LENGTHS)
def test_varlen_equals_per_sequence_loop(lengths):
    inputs = make_ssd_inputs(1, sum(lengths), 4, 5, 7, 2, D="HP", z=True, dt_bias=True, initial_states=True,
                             lengths=lengths, requires_grad=True)
    dout, dfinal = torch.randn_like(inputs["x"]), torch.randn_like(inputs["initial_states"])
    out, final = ssd_chunk_scan(**inputs, chunk_size=64, return_final_states=True)
    grads = torch.autograd.grad((out * dout).sum() + (final * dfinal).sum(), tuple(_leaves(inputs).values()))
    outs, finals = [], []
    pos = 0
    for n, L in enumerate(lengths):  # every sequence alone, the empty one included (T = 0)
        o, f = ssd_chunk_scan(**_slice_seq(inputs, pos, pos + L), initial_states=inputs["initial_states"][n:n + 1],
                              chunk_size=64, return_final_states=True)
        outs.append(o)
        finals.append(f)
        pos += L
    out_loop, final_loop = torch.cat(outs, 1), torch.cat(finals)
    grads_loop = torch.autograd.grad((out_loop * dout).sum() + (final_loop * dfinal).sum(),
                                     tuple(_leaves(inputs).values()))
    tol = tolerance(torch.float32, "out")
    assert_close("out", out, out_loop, tol)
    assert_close("final_states", final, final_loop, tol)
    for k, g, r in zip(_leaves(inputs), grads, grads_loop):
        assert_close(f"d{k}", g, r, tolerance(torch.float32, GRAD_KIND[k]))


@pytest.mark.parametrize("split", (1, 63, 64, 65, 128))
def test_split_continuation_equals_whole(split):
    inputs = make_ssd_inputs(2, 150, 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True)
    out, final = ssd_chunk_scan(**inputs, chunk_size=64, return_final_states=True)
    head = {k: (t[:, :split] if isinstance(t, torch.Tensor) and t.dim() >= 3 and k != "initial_states" else t)
            for k, t in inputs.items()}
    tail = {k: (t[:, split:] if isinstance(t, torch.Tensor) and t.dim() >= 3 and k != "initial_states" else t)
            for k, t in inputs.items()}
    out1, h = ssd_chunk_scan(**head, chunk_size=64, return_final_states=True)
    out2, final2 = ssd_chunk_scan(**{**tail, "initial_states": h}, chunk_size=64, return_final_states=True)
    joined = torch.cat([out1, out2], 1)
    if split % 64 == 0:  # chunk-aligned splits are bitwise (DESIGN §4)
        assert torch.equal(joined, out) and torch.equal(final2, final)
    assert_close("out", joined, out, tolerance(torch.float32, "out"))
    assert_close("final_states", final2, final, tolerance(torch.float32, "out"))


def test_strided_views_equal_contiguous():
    """Last-dim-contiguous views (a slice of a wider buffer, permuted heads) are read in place, bitwise."""
    inputs = make_ssd_inputs(2, 70, 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True)
    wide = torch.randn(2, 4, 70, 9)  # [B, H, T, 9]: x is a sliced, permuted view of it
    wide[..., 2:7] = inputs["x"].transpose(1, 2)
    B_t = inputs["B"].transpose(1, 2).contiguous()  # [B, G, T, N_state]
    views = {**inputs, "x": wide[..., 2:7].transpose(1, 2), "B": B_t.transpose(1, 2)}
    assert not views["x"].is_contiguous() and not views["B"].is_contiguous()
    out, final = ssd_chunk_scan(**views, chunk_size=64, return_final_states=True)
    out_c, final_c = ssd_chunk_scan(**inputs, chunk_size=64, return_final_states=True)
    assert out.is_contiguous() and torch.equal(out, out_c) and torch.equal(final, final_c)


def _step_inputs(inputs, t):
    """Token t of a [B, T, ...] input set, as ssd_state_update arguments."""
    keep = ("A", "D", "dt_bias", "dt_softplus")
    step = {k: inputs[k] for k in keep}
    step.update({k: None if inputs[k] is None else inputs[k][:, t] for k in ("x", "dt", "B", "C", "z")})
    return step


@pytest.mark.parametrize("indexed", (False, True))
@pytest.mark.parametrize("impl", ("op", "reference"))
def test_state_update_equals_chunk_scan(impl, indexed):
    T = 20
    inputs = make_ssd_inputs(2, T, 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True)
    ref = reference.chunked(**_cast(inputs), chunk_size=16)
    if impl == "reference":  # the fp64 decode step against the fp64 chunked scan
        inputs, fn, tol = _cast(inputs), reference.state_update, 1e-12
    else:
        fn, tol = ssd_state_update, tolerance(torch.float32, "out")
    dtype = inputs["initial_states"].dtype
    slots = torch.tensor([3, 0], dtype=torch.int32) if indexed else None
    state = torch.randn(5, 4, 5, 7, dtype=dtype) if indexed else torch.empty(2, 4, 5, 7, dtype=dtype)
    rows = slots.long() if indexed else torch.arange(2)
    state[rows] = inputs["initial_states"]
    untouched = state.clone()
    outs = [fn(state, **_step_inputs(inputs, t), state_batch_indices=slots) for t in range(T)]
    assert_close("out", torch.stack(outs, 1), ref[0], tol)
    assert_close("state", state[rows], ref[1], tol)
    others = torch.ones(state.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(state[others], untouched[others])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_state_update_matches_fp64_reference(dtype):
    inputs = make_ssd_inputs(3, 1, 4, 16, 16, 2, dtype=dtype, D="HP", z=True, dt_bias=True)
    step = _step_inputs(inputs, 0)
    state = torch.randn(3, 4, 16, 16)
    state_ref = state.double()
    out = ssd_state_update(state, **step)
    out_ref = reference.state_update(state_ref, **_cast(step))
    rtol, atol = MAMBA_ALLCLOSE[dtype]
    for name, got, ref in (("out", out, out_ref), ("state", state, state_ref)):
        assert_close(name, got, ref, tolerance(dtype, "out"))
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# the compiled CPU kernels (token-serial scan, decode step) against the fp64 token loop
# ----------------------------------------------------------------------------
def _require_cpu_kernels():
    for op_name in ("ssd_chunk_scan", "ssd_chunk_scan_bwd", "ssd_state_update"):
        if "cpu" not in _backend.available(op_name, "cpu"):
            pytest.skip("ahn_kernels._C was not built")


def _kernel_tol(dtype):
    return CPU_KERNEL_FP32 if dtype == torch.float32 else tolerance(dtype, "out")


@pytest.mark.parametrize("case", range(len(RECURRENT_CASES)))
@pytest.mark.parametrize("T", testing.AWKWARD_T)
def test_cpu_scan_matches_token_loop(T, case):
    _require_cpu_kernels()
    opts = dict(RECURRENT_CASES[case])
    G, limit, shift = opts.pop("G"), opts.pop("dt_limit", (0.0, math.inf)), opts.pop("dt_shift", 0.0)
    inputs = make_ssd_inputs(2, T, 4, 5, 7, G, **opts)
    inputs["dt"] = inputs["dt"] + shift
    with _backend.use_backend("cpu"):
        out, final = ssd_chunk_scan(**inputs, chunk_size=64, dt_limit=limit, return_final_states=True)
    out_ref, final_ref = reference.recurrent(**_cast(inputs), dt_limit=limit)
    assert_close("out", out, out_ref, CPU_KERNEL_FP32)
    assert_close("final_states", final, final_ref, CPU_KERNEL_FP32)


def test_cpu_scan_strong_decay_matches_token_loop():
    """The kernel carries the decay as a double scale and folds it into the state when it gets small: strong
    decays (exp(dt A) ~ 0.5) fold many times within a chunk, and a step whose decay underflows to 0 resets it."""
    _require_cpu_kernels()
    inputs = make_ssd_inputs(2, 200, 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True)
    inputs["dt"] = inputs["dt"] + 3.5
    inputs["dt"][:, 150] = 1e4
    with _backend.use_backend("cpu"):
        out, final = ssd_chunk_scan(**inputs, chunk_size=256, return_final_states=True)
    out_ref, final_ref = reference.recurrent(**_cast(inputs))
    assert_close("out", out, out_ref, CPU_KERNEL_FP32)
    assert_close("final_states", final, final_ref, CPU_KERNEL_FP32)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("lag", (None,) + testing.SSD_LAGS)
def test_cpu_scan_varlen_lag_matches_token_loop(lag, dtype):
    _require_cpu_kernels()
    lengths = testing.VARLEN_LENGTHS[0]
    inputs = make_ssd_inputs(1, sum(lengths), 4, 6, 9, 4, dtype=dtype, D="HP", z=True, dt_bias=True,
                             initial_states=True, lengths=lengths)
    with _backend.use_backend("cpu"):
        out, final = ssd_chunk_scan(**inputs, return_final_states=True, lag=lag)
    out_ref, final_ref = reference.recurrent(**_cast(inputs), lag=lag)
    assert out.dtype == dtype
    assert_close("out", out, out_ref, _kernel_tol(dtype))
    assert_close("final_states", final, final_ref, _kernel_tol(dtype))


def _zoned(inputs):
    """Every tensor of ``inputs`` copied into a red zone (NaN, or a huge offset for cu_seqlens); returns the checks."""
    zoned, checks = dict(inputs), []
    for k, t in inputs.items():
        if isinstance(t, torch.Tensor):
            zoned[k], check = testing.red_zone(tuple(t.shape), t.dtype,
                                               fill=float("nan") if t.is_floating_point() else 1 << 40)
            zoned[k].copy_(t)
            checks.append(check)
    return zoned, checks


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cpu_scan_red_zone_and_threads(dtype):
    """Reads and writes stay inside every tensor (NaN guard bands), x is read through a strided view, and the
    result is bitwise the same on 1 and 2 threads (one task per sequence and head)."""
    _require_cpu_kernels()
    lengths, lag = testing.VARLEN_LENGTHS[1], (3, 1)
    inputs = make_ssd_inputs(1, sum(lengths), 4, 5, 7, 2, dtype=dtype, D="H", z=True, dt_bias=True,
                             initial_states=True, lengths=lengths)
    zoned, checks = _zoned(inputs)
    wide, check_wide = testing.red_zone((1, 4, sum(lengths), 9), dtype)  # [B, H, T, 9]: x a permuted slice of it
    wide[..., 2:7] = inputs["x"].transpose(1, 2)
    zoned["x"] = wide[..., 2:7].transpose(1, 2)
    checks.append(check_wide)
    args = [zoned[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "cu_seqlens")]
    results, threads = [], torch.get_num_threads()
    for n_threads in (1, 2):
        out, check_out = testing.red_zone((1, sum(lengths), 4, 5), dtype)
        final, check_final = testing.red_zone((3, 4, 5, 7), torch.float32)
        torch.set_num_threads(n_threads)
        try:
            ssd_op.run_chunk_scan(*args[:5], 16, *args[5:], True, 0.0, math.inf, *lag, out, final)
        finally:
            torch.set_num_threads(threads)
        for check in (*checks, check_out, check_final):
            check()
        results.append((out.clone(), final.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    out_ref, final_ref = reference.recurrent(**_cast(inputs), lag=lag)
    assert_close("out", results[0][0], out_ref, _kernel_tol(dtype))
    assert_close("final_states", results[0][1], final_ref, _kernel_tol(dtype))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("opts", [dict(G=1), dict(G=2, D="H", dt_bias=True), dict(G=4, D="HP", z=True, dt_bias=True),
                                  dict(G=2, z=True, dt_softplus=False)], ids=["plain", "D_H", "D_HP_z", "no_softplus"])
def test_cpu_state_update_matches_token_loop(opts, dtype):
    """The decode kernel on a strided state (slots of a wider buffer) with state_batch_indices, inside red zones."""
    _require_cpu_kernels()
    opts = dict(opts)
    G = opts.pop("G")
    step = _step_inputs(make_ssd_inputs(3, 1, 4, 6, 9, G, dtype=dtype, **opts), 0)
    zoned, checks = _zoned({k: v for k, v in step.items() if k != "dt_softplus"})
    buf, check_buf = testing.red_zone((5, 4, 6, 12), torch.float32)  # state: [N, H, P, N_state] slice of N_state 12
    buf.copy_(torch.randn(5, 4, 6, 12))
    state = buf[..., 1:10]
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    state_ref = state.double()  # [N, H, P, N_state]
    results, threads, start = [], torch.get_num_threads(), buf.clone()
    for n_threads in (1, 2):
        buf.copy_(start)
        torch.set_num_threads(n_threads)
        try:
            with _backend.use_backend("cpu"):
                out = ssd_state_update(state, **zoned, dt_softplus=step["dt_softplus"], state_batch_indices=idx)
        finally:
            torch.set_num_threads(threads)
        for check in (*checks, check_buf):
            check()
        results.append((out, buf.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    out_ref = reference.state_update(state_ref, **_cast(step), state_batch_indices=idx)
    assert out.dtype == dtype
    assert_close("out", out, out_ref, _kernel_tol(dtype))
    assert_close("state", state, state_ref, CPU_KERNEL_FP32)
    assert torch.equal(buf[..., :1], start[..., :1]) and torch.equal(buf[..., 10:], start[..., 10:])
    assert torch.equal(buf[[1, 3]], start[[1, 3]])  # slots no row names


# ----------------------------------------------------------------------------
# the compiled CPU backward against the fp64 explicit backward (itself checked against autograd above)
# ----------------------------------------------------------------------------
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def _bwd_args(inputs, chunk_size, limit, lag):
    return (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size, inputs["D"], inputs["z"],
            inputs["dt_bias"], inputs["initial_states"], inputs["cu_seqlens"], inputs["dt_softplus"], *limit, *lag)


def _check_cpu_bwd(inputs, chunk_size=64, limit=(0.0, math.inf), lag=(0, 0)):
    """The kernel's gradients (random upstream gradients of out and of the final states) against
    ``reference.chunked_bwd`` in fp64: DESIGN §4 tolerances and mamba's allclose."""
    dtype, N = inputs["x"].dtype, _num_seqs(inputs)
    dout = torch.randn(inputs["x"].shape).to(dtype)
    dfinal = torch.randn(N, *inputs["x"].shape[2:], inputs["B"].shape[3])  # [N, H, P, N_state]
    with _backend.use_backend("cpu"):
        got = torch.ops.ahn.ssd_chunk_scan_bwd(dout, dfinal, *_bwd_args(inputs, chunk_size, limit, lag))
    ref_inputs = _cast(inputs)
    want = reference.chunked_bwd(dout.double(), dfinal.double(), *_bwd_args(ref_inputs, chunk_size, limit, lag)[:12],
                                 limit, lag if lag[0] else None)
    rtol, atol = MAMBA_ALLCLOSE[dtype]
    for k, g, w in zip(GRAD_NAMES, got, want):
        if w is None:
            assert g.numel() == 0, f"d{k}: expected an empty placeholder"
            continue
        ref_dtype = torch.float32 if k == "initial_states" else inputs[k].dtype
        assert g.dtype == ref_dtype and g.shape == w.shape, f"d{k}: {g.dtype} {tuple(g.shape)}"
        assert_close(f"d{k}", g, w, tolerance(dtype, GRAD_KIND[k]))
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol, msg=lambda m: f"d{k}: {m}")
    return got


def _num_seqs(inputs):
    cu = inputs["cu_seqlens"]
    return inputs["x"].shape[0] if cu is None else cu.shape[0] - 1


@pytest.mark.parametrize("case", range(len(RECURRENT_CASES)))
@pytest.mark.parametrize("chunk_size", testing.SSD_CHUNK_SIZES)
@pytest.mark.parametrize("T", (1, 63, 64, 65, 1000))
def test_cpu_bwd_matches_fp64_reference(T, chunk_size, case):
    """ngroups 1, 2 and H; D none, [H] and [H, P]; z; dt_bias; softplus on and off; dt_limit; initial states."""
    _require_cpu_kernels()
    opts = dict(RECURRENT_CASES[case])
    G, limit, shift = opts.pop("G"), opts.pop("dt_limit", (0.0, math.inf)), opts.pop("dt_shift", 0.0)
    inputs = make_ssd_inputs(2, T, 4, 5, 7, G, **opts)
    inputs["dt"] = inputs["dt"] + shift
    _check_cpu_bwd(inputs, chunk_size, limit)


def test_cpu_bwd_strong_decay_and_dt_above_20():
    """Strong decays make both passes fold their scaled states many times; dt above softplus's threshold
    passes through with slope 1."""
    _require_cpu_kernels()
    inputs = make_ssd_inputs(2, 200, 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True)
    inputs["dt"] = inputs["dt"] + 3.5
    _raise_some_dt_above_20(inputs["dt"][:, :20])
    _check_cpu_bwd(inputs, 256)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("lag", ((0, 0),) + testing.SSD_LAGS)
def test_cpu_bwd_varlen_lag_matches_fp64_reference(lag, dtype):
    _require_cpu_kernels()
    lengths = testing.VARLEN_LENGTHS[0]  # with an empty sequence
    inputs = make_ssd_inputs(1, sum(lengths), 4, 6, 9, 2, dtype=dtype, D="HP", z=True, dt_bias=True,
                             initial_states=True, lengths=lengths)
    _check_cpu_bwd(inputs, 64, lag=lag)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cpu_bwd_red_zone_and_threads(dtype):
    """Reads and writes stay inside every tensor (NaN guard bands), x and dout are read through strided views,
    and the gradients are bitwise the same on 1 and 2 threads (one task per sequence and head, fixed-order
    sums over the heads of a group and over sequences)."""
    _require_cpu_kernels()
    lengths, lag, H, P, NS = testing.VARLEN_LENGTHS[1], (3, 1), 4, 5, 7
    T, N = sum(lengths), len(lengths)
    inputs = make_ssd_inputs(1, T, H, P, NS, 2, dtype=dtype, D="HP", z=True, dt_bias=True, initial_states=True,
                             lengths=lengths)
    zoned, checks = _zoned(inputs)
    wide, check_wide = testing.red_zone((1, H, T, 9), dtype)  # [B, H, T, 9]: x a permuted slice of it
    wide[..., 2:7] = inputs["x"].transpose(1, 2)
    zoned["x"] = wide[..., 2:7].transpose(1, 2)
    dout_wide, check_dout = testing.red_zone((1, T, H, 8), dtype)  # dout: a slice of a wider row
    dout_wide.copy_(torch.randn(1, T, H, 8))
    dout = dout_wide[..., 1:6]
    dfinal, check_dfinal = testing.red_zone((N, H, P, NS), torch.float32)
    dfinal.copy_(torch.randn(N, H, P, NS))
    checks += [check_wide, check_dout, check_dfinal]
    shapes = [((1, T, H, P), dtype), ((1, T, H), torch.float32), ((H,), torch.float32), ((1, T, 2, NS), dtype),
              ((1, T, 2, NS), dtype), ((H, P), torch.float32), ((1, T, H, P), dtype), ((H,), torch.float32),
              ((N, H, P, NS), torch.float32)]
    results, threads = [], torch.get_num_threads()
    for n_threads in (1, 2):
        grads, grad_checks = zip(*(testing.red_zone(shape, dt) for shape, dt in shapes))
        torch.set_num_threads(n_threads)
        try:
            ssd_op.run_chunk_scan_bwd(dout, dfinal, *_bwd_args(zoned, 16, (0.0, math.inf), lag), grads)
        finally:
            torch.set_num_threads(threads)
        for check in (*checks, *grad_checks):
            check()
        results.append([g.clone() for g in grads])
    for k, a, b in zip(GRAD_NAMES, *results):
        assert torch.equal(a, b), f"d{k} differs between 1 and 2 threads"
    want = reference.chunked_bwd(dout.double(), dfinal.double(),
                                 *_bwd_args(_cast(inputs), 16, (0.0, math.inf), lag)[:12], (0.0, math.inf), lag)
    for k, g, w in zip(GRAD_NAMES, results[0], want):
        assert_close(f"d{k}", g, w, tolerance(dtype, GRAD_KIND[k]))


@pytest.mark.parametrize("G", (2, 8), ids=["group_sums", "direct"])
def test_cpu_large_outputs_red_zone(G):
    """Outputs over 4 MiB, whose pages the kernels fault in themselves (huge pages, a parallel first touch:
    csrc/common/pages.h), as they do the backward's per-head dB, dC shares (G < H): writes stay inside the
    red zones and are bitwise those into plain tensors."""
    _require_cpu_kernels()
    T, H, P, NS = 2100, 8, 64, 128  # out, dx, dz [1, T, H, P] fp32: 4.3 MiB; dB, dC at G = H: 8.6 MiB
    args = _bwd_args(make_ssd_inputs(1, T, H, P, NS, G, D="H", z=True, dt_bias=True), 256, (0.0, math.inf), (0, 0))
    dout, dfinal = torch.randn(1, T, H, P), torch.randn(1, H, P, NS)
    shapes = [(1, T, H, P), (1, H, P, NS),  # out, final states
              (1, T, H, P), (1, T, H), (H,), (1, T, G, NS), (1, T, G, NS), (H,), (1, T, H, P), (H,), (1, H, P, NS)]
    plain = [torch.empty(s) for s in shapes]
    zoned, checks = zip(*(testing.red_zone(s, torch.float32) for s in shapes))
    for outs in (plain, zoned):
        ssd_op.run_chunk_scan(*args, *outs[:2])
        ssd_op.run_chunk_scan_bwd(dout, dfinal, *args, outs[2:])
    for check in checks:
        check()
    for name, a, b in zip(("out", "final_states") + GRAD_NAMES, plain, zoned):
        assert torch.equal(a, b), name


def test_state_update_equals_chunk_scan_after_1000_steps():
    """The decode kernel fed token by token and the scan kernel over the same 1000 tokens agree in fp32 to 1e-5
    relative (outputs and state): the two share a state step but not its schedule (the scan keeps a scaled state)."""
    _require_cpu_kernels()
    T = 1000
    inputs = make_ssd_inputs(2, T, 4, 16, 16, 2, D="HP", z=True, dt_bias=True, initial_states=True)
    with _backend.use_backend("cpu"):
        out, final = ssd_chunk_scan(**inputs, chunk_size=256, return_final_states=True)
        state = inputs["initial_states"].clone()
        outs = [ssd_state_update(state, **_step_inputs(inputs, t)) for t in range(T)]
    assert_close("out", torch.stack(outs, 1), out, 1e-5)
    assert_close("state", state, final, 1e-5)
