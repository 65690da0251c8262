"""Mamba2 SSD Triton kernels (under TRITON_INTERPRET=1, on CPU tensors) against the fp64 references:
chunked scan forward, final states and every gradient, decode step, red zones."""

import math

import pytest
import torch

import ahn_kernels
from ahn_kernels import _backend, testing
from ahn_kernels.ssd import op as ssd_op
from ahn_kernels.ssd import reference, ssd_chunk_scan, ssd_state_update
from ahn_kernels.testing import MAMBA_ALLCLOSE, assert_close, make_ssd_inputs, tolerance

GRAD_KIND = {"x": "grad", "B": "grad", "C": "grad", "z": "grad", "initial_states": "grad",
             "dt": "gate", "A": "gate", "D": "gate", "dt_bias": "gate"}


@pytest.fixture(autouse=True)
def _triton():
    for name in ("ssd_chunk_scan", "ssd_chunk_scan_bwd", "ssd_state_update"):
        if "triton" not in _backend.available(name, "cpu"):
            pytest.skip("triton is not installed or TRITON_INTERPRET is not 1")
    with ahn_kernels.use_backend("triton"):
        yield


def _fp64(inputs, requires_grad=False):
    return testing.fp64_leaves(inputs, requires_grad)


def _leaves(inputs):
    return {k: t for k, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}


def _check(name, got, ref, dtype, kind):
    """DESIGN §4's relative RMSE and mamba's allclose, both."""
    assert_close(name, got, ref, tolerance(dtype, kind))
    rtol, atol = MAMBA_ALLCLOSE[dtype]
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------
# chunked scan: forward and final states (and, with grads=True, every gradient)
# ----------------------------------------------------------------------------
# (B, T, (H, P, N_state, G), chunk, make_ssd_inputs options, dt_limit, lag, dtype, grads): every awkward T,
# both chunk sizes, ngroups 1 / 2 / H, each option on and off, small and odd head dims, fp32 and bf16.
# The interpreter runs the backward of the T = 1000 cases too slowly for this file: forward only there.
SHAPES = testing.SSD_SHAPES
CASES = [
    (2, 1, SHAPES[0], 64, dict(D="H", z=True, dt_bias=True, initial_states=True), None, None, torch.float32, True),
    (2, 63, SHAPES[1], 64, dict(), None, None, torch.float32, True),
    (1, 64, SHAPES[2], 64, dict(D="HP", z=True, dt_bias=True, initial_states=True), (0.03, 0.08), None,
     torch.float32, True),
    (2, 65, SHAPES[3], 64, dict(D="H", dt_softplus=False, initial_states=True), None, None, torch.bfloat16, True),
    (1, 1000, SHAPES[1], 256, dict(D="HP", z=True, dt_bias=True, initial_states=True), None, None, torch.float32,
     False),
    (1, 1000, (2, 5, 7, 2), 64, dict(z=True, dt_bias=True), (0.0, 0.1), None, torch.bfloat16, False),
    (1, 300, (2, 5, 7, 2), 256, dict(D="H", z=True, dt_bias=True, initial_states=True), None, None, torch.float32,
     True),
    (2, 65, SHAPES[0], 256, dict(z=True, initial_states=True), None, (10, 3), torch.float32, True),
    (1, 100, (2, 33, 40, 1), 64, dict(D="H", z=True, dt_bias=True, initial_states=True), None, None, torch.bfloat16,
     True),
]


def _case_id(case):
    B, T, (H, P, NS, G), chunk, opts, limit, lag, dtype, grads = case
    parts = [str(dtype).replace("torch.", ""), f"B{B}T{T}H{H}P{P}N{NS}G{G}", f"c{chunk}", "bwd" if grads else "fwd"]
    parts += [k if v is True else f"{k}={v}" for k, v in opts.items()]
    return "-".join(parts + ([f"limit{limit}"] if limit else []) + ([f"lag{lag}"] if lag else []))


def _run(inputs, chunk, limit, lag, grads):
    """Forward (and backward with random upstream grads) of the op and of the fp64 reference."""
    limit = limit or (0.0, math.inf)
    ref_inputs = _fp64(inputs, requires_grad=grads)
    out, final = ssd_chunk_scan(**inputs, chunk_size=chunk, dt_limit=limit, lag=lag, return_final_states=True)
    # the fp64 chunked reference: equal to the token loop to 1e-10 (test_ssd.py), and fast enough for T = 1000
    out_ref, final_ref = reference.chunked(**ref_inputs, chunk_size=64, dt_limit=limit, lag=lag)
    results = [("out", out, out_ref, "out"), ("final_states", final, final_ref, "out")]
    if grads:
        dout, dfinal = torch.randn_like(out), torch.randn_like(final)
        leaves, ref_leaves = _leaves(inputs), _leaves(ref_inputs)
        got = torch.autograd.grad((out * dout).float().sum() + (final * dfinal).sum(), tuple(leaves.values()))
        want = torch.autograd.grad((out_ref * dout.double()).sum() + (final_ref * dfinal.double()).sum(),
                                   tuple(ref_leaves.values()))
        for k, g, w in zip(leaves, got, want):
            assert g.dtype == inputs[k].dtype, f"d{k}: dtype {g.dtype} != {k}'s {inputs[k].dtype}"
            results.append((f"d{k}", g, w, GRAD_KIND[k]))
    return results


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_chunk_scan(case):
    B, T, (H, P, NS, G), chunk, opts, limit, lag, dtype, grads = case
    inputs = make_ssd_inputs(B, T, H, P, NS, G, dtype=dtype, requires_grad=grads, **opts)
    for name, got, ref, kind in _run(inputs, chunk, limit, lag, grads):
        _check(name, got, ref, dtype, kind)


# (lengths, lag, grads): an empty sequence, sequences shorter and longer than a chunk, every lag.
VARLEN_CASES = [(testing.VARLEN_LENGTHS[0], lag, lag is None) for lag in (None,) + testing.SSD_LAGS] + [
    (testing.VARLEN_LENGTHS[1], (10, 3), True)]


@pytest.mark.parametrize("lengths, lag, grads", VARLEN_CASES)
def test_chunk_scan_varlen_lag(lengths, lag, grads):
    """Packed sequences (an empty one among them), each with its final state, with and without lag."""
    inputs = make_ssd_inputs(1, sum(lengths), 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True,
                             lengths=lengths, requires_grad=grads)
    for name, got, ref, kind in _run(inputs, 64, None, lag, grads):
        _check(name, got, ref, torch.float32, kind)


@pytest.mark.parametrize("kind", ["underflow", "jump", "huge"])
def test_chunk_scan_bwd_strong_decays(kind):
    """d(dt A) sums the terms that cross each slot, so gradients that strong decays make tiny stay accurate:
    dt at softplus's threshold (dt A about -2 .. -20 per token: a chunk's decay products underflow), or one
    token's decay of about exp(-4 .. -40) among weak ones. "huge": dt = 1e4 at one token (dt A near -1e4):
    the decays of the pairs after it are sums of the steps they span, not differences of prefix sums near
    -1e4 (which put out 5.6e-4 and every gradient but dD 4e-4 .. 7e-4 off)."""
    inputs = make_ssd_inputs(1, 100, 2, 5, 7, 1, D="H", z=True, dt_bias=True, initial_states=True,
                             requires_grad=True)
    with torch.no_grad():
        if kind == "underflow":
            inputs["dt"].add_(23.0)
        else:
            inputs["dt"][:, 40] = 40.0 if kind == "jump" else 1e4
    for name, got, ref, grad_kind in _run(inputs, 64, None, None, True):
        _check(name, got, ref, torch.float32, grad_kind)


def test_chunk_scan_bwd_without_initial_states():
    """The backward returns the gradient w.r.t. the zero initial state too (the op's dinitial_states)."""
    inputs = make_ssd_inputs(2, 70, 4, 5, 7, 2, D="H", z=True)
    dout, dfinal = torch.randn(2, 70, 4, 5), torch.randn(2, 4, 5, 7)
    got = torch.ops.ahn.ssd_chunk_scan_bwd(dout, dfinal, *_op_args(inputs, chunk_size=64))
    want = reference.chunked_bwd(dout.double(), dfinal.double(), **_fp64(inputs), chunk_size=64)
    for name, g, w in zip(("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"), got, want):
        if w is None:
            assert g.numel() == 0, f"d{name}: expected the empty placeholder"
            continue
        _check(f"d{name}", g, w, torch.float32, GRAD_KIND[name])


def _op_args(inputs, chunk_size, lag=(0, 0)):
    i = inputs
    return (i["x"], i["dt"], i["A"], i["B"], i["C"], chunk_size, i["D"], i["z"], i["dt_bias"], i["initial_states"],
            i["cu_seqlens"], i["dt_softplus"], 0.0, math.inf, *lag)


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


@pytest.mark.parametrize("lengths", [None, testing.VARLEN_LENGTHS[1]], ids=["dense", "varlen"])
def test_chunk_scan_red_zone(lengths):
    """Reads and writes stay inside every tensor (NaN guard bands); x is read through a strided view."""
    B, T = (2, 40) if lengths is None else (1, sum(lengths))
    N = B if lengths is None else len(lengths)
    inputs = make_ssd_inputs(B, T, 4, 5, 7, 2, D="HP", z=True, dt_bias=True, initial_states=True, lengths=lengths)
    zoned, checks = _zoned(inputs)
    wide, check_wide = testing.red_zone((B, 4, T, 9), torch.float32)  # [B, H, T, 9]: x a permuted slice of it
    wide[..., 2:7] = inputs["x"].transpose(1, 2)
    zoned["x"] = wide[..., 2:7].transpose(1, 2)
    checks.append(check_wide)
    out, check_out = testing.red_zone((B, T, 4, 5), torch.float32)
    final, check_final = testing.red_zone((N, 4, 5, 7), torch.float32)
    args = [zoned[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "cu_seqlens")]
    ssd_op.run_chunk_scan_triton(*args[:5], 16, *args[5:], True, 0.0, math.inf, 3, 1, out, final)
    for check in (*checks, check_out, check_final):
        check()
    out_ref, final_ref = reference.recurrent(**_fp64(inputs), lag=(3, 1))
    _check("out", out, out_ref, torch.float32, "out")
    _check("final_states", final, final_ref, torch.float32, "out")


def test_chunk_scan_bwd_red_zone():
    """The backward reads only inside its inputs (NaN guard bands, a strided x), varlen with lag."""
    lengths = testing.VARLEN_LENGTHS[1]
    T = sum(lengths)
    inputs = make_ssd_inputs(1, T, 4, 5, 7, 2, D="H", z=True, dt_bias=True, initial_states=True, lengths=lengths)
    inputs["dout"], inputs["dfinal"] = torch.randn(1, T, 4, 5), torch.randn(3, 4, 5, 7)
    zoned, checks = _zoned(inputs)
    wide, check_wide = testing.red_zone((1, 4, T, 9), torch.float32)  # [B, H, T, 9]: x a permuted slice of it
    wide[..., 2:7] = inputs["x"].transpose(1, 2)
    zoned["x"] = wide[..., 2:7].transpose(1, 2)
    checks.append(check_wide)
    args = [zoned[k] for k in ("x", "dt", "A", "B", "C")]
    rest = [zoned[k] for k in ("D", "z", "dt_bias", "initial_states", "cu_seqlens")]
    got = ssd_op.run_chunk_scan_bwd_triton(zoned["dout"], zoned["dfinal"], *args, 16, *rest, True, 0.0, math.inf, 3, 1)
    for check in checks:
        check()
    ref = {k: v for k, v in _fp64(inputs).items() if k not in ("dout", "dfinal")}
    want = reference.chunked_bwd(inputs["dout"].double(), inputs["dfinal"].double(), **ref, chunk_size=16, lag=(3, 1))
    for name, g, w in zip(("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"), got, want):
        _check(f"d{name}", g, w, torch.float32, GRAD_KIND[name])


# ----------------------------------------------------------------------------
# decode step
# ----------------------------------------------------------------------------
def _step_inputs(inputs, t):
    """Token t of a [B, T, ...] input set, as ssd_state_update arguments."""
    step = {k: inputs[k] for k in ("A", "D", "dt_bias", "dt_softplus")}
    step.update({k: None if inputs[k] is None else inputs[k][:, t] for k in ("x", "dt", "B", "C", "z")})
    return step


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("opts", [dict(G=1), dict(G=2, D="H", dt_bias=True), dict(G=4, D="HP", z=True, dt_bias=True),
                                  dict(G=2, z=True, dt_softplus=False)], ids=["plain", "D_H", "D_HP_z", "no_softplus"])
def test_state_update_red_zone(opts, dtype):
    """A strided state (slots of a wider buffer) with state_batch_indices, every input inside a red zone."""
    opts = dict(opts)
    G = opts.pop("G")
    step = _step_inputs(make_ssd_inputs(3, 1, 4, 6, 9, G, dtype=dtype, **opts), 0)
    zoned, checks = _zoned({k: v for k, v in step.items() if k != "dt_softplus"})
    buf, check_buf = testing.red_zone((5, 4, 6, 12), torch.float32)  # state: [N, H, P, N_state] slice of N_state 12
    buf.copy_(torch.randn(5, 4, 6, 12))
    start = buf.clone()
    state = buf[..., 1:10]
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    state_ref = state.double()  # [N, H, P, N_state]
    out = ssd_state_update(state, **zoned, dt_softplus=step["dt_softplus"], state_batch_indices=idx)
    for check in (*checks, check_buf):
        check()
    out_ref = reference.state_update(state_ref, **_fp64(step), state_batch_indices=idx)
    assert out.dtype == dtype
    _check("out", out, out_ref, dtype, "out")
    _check("state", state, state_ref, torch.float32, "out")
    assert torch.equal(buf[..., :1], start[..., :1]) and torch.equal(buf[..., 10:], start[..., 10:])
    assert torch.equal(buf[[1, 3]], start[[1, 3]])  # slots no row names


@pytest.mark.parametrize("NS", (7, 128, 256))
def test_state_update_tiles(NS):
    """Every state tile shape: BN from 16 to 256, BP rows from 128 down to 8 (P = 20: a partial last tile)."""
    step = _step_inputs(make_ssd_inputs(2, 1, 2, 20, NS, 1, D="HP", z=True, dt_bias=True), 0)
    state = torch.randn(2, 2, 20, NS)
    state_ref = state.double()
    out = ssd_state_update(state, **step)
    out_ref = reference.state_update(state_ref, **_fp64(step))
    _check("out", out, out_ref, torch.float32, "out")
    _check("state", state, state_ref, torch.float32, "out")


def test_state_update_steps_equal_chunk_scan():
    """1000 decode steps from an initial state equal one chunked scan over the same tokens (out and state) to
    1e-5 relative in fp32: no drift between the two schedules. One head and small dims, as the interpreter
    pays about 0.02 s per launch and the steps launch one by one (~20 s here)."""
    T = 1000
    inputs = make_ssd_inputs(1, T, 1, 4, 4, 1, D="H", z=True, dt_bias=True, initial_states=True)
    out, final = ssd_chunk_scan(**inputs, chunk_size=64, return_final_states=True)
    state = inputs["initial_states"].clone()
    outs = [ssd_state_update(state, **_step_inputs(inputs, t)) for t in range(T)]
    assert_close("out", torch.stack(outs, 1), out, 1e-5)
    assert_close("state", state, final, 1e-5)
