"""chunk_{,gated_}delta_rule on the Triton kernels (``triton_chunk_ut.py``, ``triton_chunk.py``,
``triton_chunk_bwd.py``), under ``TRITON_INTERPRET=1`` on CPU tensors, against the fp64 token loop:
forward, final state and every gradient; red zones, determinism, split continuation and opcheck
through the Triton path.

On CPU tensors the launchers take all of K and V per slice and tile (``triton_chunk.whole_tiles``:
the interpreter's cost is per op); the red zones and K = V = 256 run in ``gpu_tiles()``, so the
slice loops and the masks of partial slices are tested as the GPU runs them."""

import pytest
import torch
from torch.library import opcheck

import ahn_kernels
from ahn_kernels import _backend
from ahn_kernels.delta_rule import op, reference, triton_chunk
from ahn_kernels.testing import (
    VARLEN_LENGTHS,
    assert_close,
    fp64_leaves,
    make_delta_inputs,
    red_zone,
    tolerance,
)

CHUNK_OPS = {False: op.chunk_delta_rule, True: op.chunk_gated_delta_rule}
GRAD_ORDER = ("q", "k", "v", "beta", "g", "initial_state")
GKV, GV = (2, 1, 1), (1, 1, 2)  # AHN's grouped k/v (HK = HV < HQ), fla's grouped values (HQ = HK < HV)


@pytest.fixture(autouse=True, scope="module")
def _triton():
    """Every test here needs the interpreter; one torch thread keeps the interpreter's many tiny
    numpy and torch calls from spin-waiting on each other on a busy machine."""
    if "triton" not in _backend.available("chunk_gated_delta_rule", "cpu"):
        pytest.skip("triton is not installed or TRITON_INTERPRET is not 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _permuted(x):
    """q, k, v as [B, H, T, D] memory viewed as [B, T, H, D] (last dim contiguous, T not outermost)."""
    return {n: (t.transpose(1, 2).contiguous().transpose(1, 2) if n in ("q", "k", "v") else t) for n, t in x.items()}


def _run(x, gated, up=None, **kw):
    """(o, final_state, grads by name or None) through the public op on the Triton kernels."""
    names = [n for n in GRAD_ORDER if isinstance(x.get(n), torch.Tensor) and x[n].requires_grad]
    with ahn_kernels.use_backend("triton"):
        for suffix in ("", "_bwd"):
            assert _backend.choose(f"chunk_{'gated_' if gated else ''}delta_rule{suffix}", "cpu") == "triton"
        o, ht = CHUNK_OPS[gated](**x, output_final_state=True, **kw)
        if up is None:
            return o, ht, None
        loss = sum((a.double() * u.double()).sum() for a, u in zip((o, ht), up))
        return o, ht, dict(zip(names, torch.autograd.grad(loss, [x[n] for n in names])))


# (B, lengths, T, K, V, heads, h0, l2norm, lag, dtype, gated, chunk, permuted): a covering design,
# not the cross product (the interpreter is slow). Every T in (1, 63, 64, 65, 300, 1000), K and V in
# (60, 100, 128), both head layouts, h0 on/off, lag on/off, fp32 / bf16, gated / DeltaNet, chunk
# 16 / 32 / 64 appears; varlen batches hold an empty and a one-token sequence.
CASES = [
    (2, None, 1, 60, 100, GKV, True, True, None, torch.float32, True, 64, False),
    (1, None, 63, 100, 60, GV, False, False, (10, 3), torch.bfloat16, False, 16, True),
    (1, None, 64, 128, 128, GKV, True, False, None, torch.bfloat16, True, 32, False),
    (2, None, 65, 60, 128, GV, True, True, (1, 0), torch.float32, True, 64, True),
    (1, None, 300, 128, 60, GKV, False, True, (10, 3), torch.float32, False, 32, False),
    (1, None, 1000, 100, 60, GV, True, False, None, torch.bfloat16, True, 64, False),
    (1, VARLEN_LENGTHS[0], sum(VARLEN_LENGTHS[0]), 60, 100, GKV, True, True, (10, 3), torch.float32, True, 32, False),
    (1, VARLEN_LENGTHS[0], sum(VARLEN_LENGTHS[0]), 100, 60, GV, False, False, None, torch.bfloat16, False, 64, False),
]


def _case_id(B, lengths, T, K, V, heads, h0, l2norm, lag, dtype, gated, chunk, permuted):
    return "-".join(["gated" if gated else "delta", str(dtype).replace("torch.float", "fp"), f"B{B}T{T}K{K}V{V}",
                     "gkv" if heads == GKV else "gv", "varlen" if lengths else "dense", "h0" if h0 else "no_h0",
                     "l2norm" if l2norm else "raw", f"lag{lag[0]}.{lag[1]}" if lag else "nolag", f"C{chunk}",
                     "permuted" if permuted else "contiguous"])


@pytest.mark.parametrize("B, lengths, T, K, V, heads, h0, l2norm, lag, dtype, gated, chunk, permuted", CASES,
                         ids=[_case_id(*c) for c in CASES])
def test_chunk_triton_vs_recurrent(B, lengths, T, K, V, heads, h0, l2norm, lag, dtype, gated, chunk, permuted):
    """Forward, final state and every gradient (random upstream for o and the final state) vs fp64."""
    x = make_delta_inputs(B, T, heads, K, V, gated=gated, dtype=dtype, lengths=lengths, initial_state=h0,
                          unit_keys=not l2norm, requires_grad=True)
    x = _permuted(x) if permuted else x
    x64 = fp64_leaves(x, requires_grad=True)
    o_ref, ht_ref = reference.recurrent(**x64, use_qk_l2norm=l2norm, lag=lag)
    up = (torch.randn_like(o_ref).to(dtype), torch.randn_like(ht_ref).float())  # what the op's backward receives
    o, ht, got = _run(x, gated, up, use_qk_l2norm_in_kernel=l2norm, lag=lag, chunk_size=chunk)
    assert o.dtype == dtype and o.is_contiguous() and ht.dtype == torch.float32
    assert_close("o", o, o_ref, tolerance(dtype, "out"))
    assert_close("final_state", ht, ht_ref, tolerance(dtype, "out"))
    if lag is not None:
        assert torch.equal(o[o_ref == 0], o_ref[o_ref == 0].to(dtype)), "rows without memory must be exactly 0"
    loss = sum((a * u.double()).sum() for a, u in zip((o_ref, ht_ref), up))
    want = dict(zip(got, torch.autograd.grad(loss, [x64[n] for n in got], allow_unused=True, materialize_grads=True)))
    for name, ref in want.items():
        assert got[name].dtype == x[name].dtype and got[name].shape == x[name].shape
        assert_close(f"d{name}", got[name], ref, tolerance(dtype, "gate" if name in ("beta", "g") else "grad"))


def _zoned(tensors: dict):
    """Copies of the tensors inside NaN (floats) / 2^40 (ints) guard bands, and their checks."""
    zoned, checks = {}, []
    for n, t in tensors.items():
        if isinstance(t, torch.Tensor):
            zoned[n], check = red_zone(tuple(t.shape), t.dtype, fill=float("nan") if t.is_floating_point() else 1 << 40)
            zoned[n].copy_(t)
            checks.append(check)
        else:
            zoned[n] = t
    return zoned, checks


@pytest.mark.parametrize("heads", [GKV, GV], ids=["gkv", "gv"])
def test_chunk_triton_red_zone_and_repeatable(heads):
    """Reads and writes stay inside every tensor (NaN guard bands), two runs are bitwise equal,
    and dh0 is the gradient w.r.t. a zero state when none is given."""
    lengths, K, V, lag, C = VARLEN_LENGTHS[1], 60, 20, (3, 1), 16
    T, HS, N = sum(lengths), max(heads), len(lengths)
    x = make_delta_inputs(1, T, heads, K, V, lengths=lengths, unit_keys=False)
    up = {"grad_o": torch.randn(1, T, HS, V), "grad_ht": torch.randn(N, HS, K, V)}
    z, checks = _zoned({**x, **up})
    shapes = {"o": (1, T, HS, V), "ht": (N, HS, K, V), "dq": x["q"].shape, "dk": x["k"].shape, "dv": x["v"].shape,
              "dbeta": (1, T, HS), "dg": (1, T, HS), "dh0": (N, HS, K, V)}
    runs = []
    for _ in range(2):
        out = {n: red_zone(tuple(s), torch.float32) for n, s in shapes.items()}
        args = (z["q"], z["k"], z["v"], z["g"], z["beta"], K ** -0.5, None, z["cu_seqlens"], True, C, *lag)
        with triton_chunk.gpu_tiles():  # K and V in several slices and tiles, the last ones partial
            op.run_chunk_triton(*args, out["o"][0], out["ht"][0])
            op.run_chunk_bwd_triton(z["grad_o"], z["grad_ht"], *args, *(out[n][0] for n in list(shapes)[2:]))
        for check in (*checks, *(c for _, c in out.values())):
            check()
        runs.append({n: t.clone() for n, (t, _) in out.items()})
    for n in shapes:
        assert torch.equal(runs[0][n], runs[1][n]), f"{n} differs between two runs"
    x64 = fp64_leaves(x, requires_grad=True)
    x64["initial_state"] = torch.zeros(N, HS, K, V, dtype=torch.float64, requires_grad=True)
    o_ref, ht_ref = reference.recurrent(**x64, use_qk_l2norm=True, lag=lag)
    assert_close("o", runs[0]["o"], o_ref, tolerance(torch.float32, "out"))
    assert_close("final_state", runs[0]["ht"], ht_ref, tolerance(torch.float32, "out"))
    names = [n for n in GRAD_ORDER if isinstance(x64.get(n), torch.Tensor)]
    loss = (o_ref * up["grad_o"].double()).sum() + (ht_ref * up["grad_ht"].double()).sum()
    for name, ref in zip(names, torch.autograd.grad(loss, [x64[n] for n in names])):
        got = runs[0]["dh0" if name == "initial_state" else f"d{name}"]
        assert_close(f"d{name}", got, ref, tolerance(torch.float32, "gate" if name in ("beta", "g") else "grad"))


@pytest.mark.parametrize("split", [32, 64, 40])
def test_chunk_triton_split_continuation(split):
    """A prefill continued from its returned state equals the whole prefill; bitwise at chunk multiples."""
    C = 32
    x = make_delta_inputs(1, 96, GKV, 16, 16, initial_state=True)
    o, ht, _ = _run(x, True, chunk_size=C)
    parts = [{n: x[n][:, s:e] for n in ("q", "k", "v", "g", "beta")} for s, e in ((0, split), (split, 96))]
    o1, h1, _ = _run(dict(parts[0], initial_state=x["initial_state"]), True, chunk_size=C)
    o2, h2, _ = _run(dict(parts[1], initial_state=h1), True, chunk_size=C)
    got = torch.cat([o1, o2], 1)
    if split % C == 0:
        assert torch.equal(got, o) and torch.equal(h2, ht)
    else:
        assert_close("o", got, o, tolerance(torch.float32, "out"))
        assert_close("final_state", h2, ht, tolerance(torch.float32, "out"))


def test_chunk_triton_opcheck():
    """The custom op's registrations (schema, fake, autograd) hold with the Triton kernels serving it."""
    x = make_delta_inputs(1, 20, GKV, 8, 8, lengths=(5, 0, 15), initial_state=True, requires_grad=True)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"], 8 ** -0.5, x["initial_state"], x["cu_seqlens"], True, 16, 2, 1)
    with ahn_kernels.use_backend("triton"):
        opcheck(torch.ops.ahn.chunk_gated_delta_rule.default, args)


# The backward at the largest head dims (K = V = 256: eight K slices and sixteen V tiles per program),
# in fp32 (the tightest bar), small T; same columns as CASES.
CASES_256 = [(1, None, 17, 256, 256, GKV, True, True, None, torch.float32, True, 16, False)]


@pytest.mark.parametrize("B, lengths, T, K, V, heads, h0, l2norm, lag, dtype, gated, chunk, permuted", CASES_256,
                         ids=[_case_id(*c) for c in CASES_256])
def test_chunk_triton_head_dim_256(B, lengths, T, K, V, heads, h0, l2norm, lag, dtype, gated, chunk, permuted):
    """Forward, final state and every gradient at K = V = 256 vs fp64, with the GPU's tiles."""
    with triton_chunk.gpu_tiles():
        test_chunk_triton_vs_recurrent(B, lengths, T, K, V, heads, h0, l2norm, lag, dtype, gated, chunk, permuted)


@pytest.mark.parametrize("decay", [-4.0, -5.0, -8.0])
def test_chunk_triton_dg_strong_gates(decay):
    """dg under strong gates (g = decay + 0.1 noise per token: the in-chunk prefix sums reach -512)
    within 1e-5 of fp64, the fp32 output bar, though DESIGN §4 allows gates 2e-4: dg sums only the
    terms crossing each step (``scan_tiles.crossing_sums``). Readout minus key terms, then a suffix
    sum, gave 9.3e-6 / 2.9e-5 / 5.3e-4 here."""
    x = make_delta_inputs(1, 64, (1, 1, 1), 16, 16, unit_keys=False)
    x["g"] = decay + 0.1 * torch.randn(1, 64, 1)
    for t in (x["q"], x["k"], x["v"], x["g"], x["beta"]):
        t.requires_grad_(True)
    x64 = fp64_leaves(x, requires_grad=True)
    o_ref, _ = reference.recurrent(**x64, use_qk_l2norm=True)
    up = torch.randn_like(o_ref)
    with ahn_kernels.use_backend("triton"):
        o, _ = op.chunk_gated_delta_rule(**x, use_qk_l2norm_in_kernel=True, chunk_size=64)
        dg, = torch.autograd.grad((o.double() * up).sum(), [x["g"]])
    dg_ref, = torch.autograd.grad((o_ref * up).sum(), [x64["g"]])
    assert_close("dg", dg, dg_ref, tolerance(torch.float32, "out"))
