"""Property-based fuzzing of every op against its fp64 oracle (hypothesis, issue 7).

Strategies draw the whole argument space at once: batch or packed varlen
(with zero-length sequences), both grouped head layouts, head dims 1..72,
chunk sizes, lag, windows and sinks, dtype and memory layout. Each example runs
the op on the backend ``_backend.choose`` picks for CPU tensors (the C++ kernel
where there is one) and compares forward outputs, final states and every
gradient with the DESIGN §4 relative-RMSE bars.

The profile is fixed and derandomised (the same examples every run, CI-sized);
``AHN_FUZZ_EXAMPLES`` raises the count for a long local run. A failure that
hypothesis shrinks is pinned as an ``@example`` on its test, beside the
hand-picked edge cases already there.
"""

import os

import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import ahn_kernels as ak
from ahn_kernels import testing
from ahn_kernels.delta_rule import reference as delta_ref
from ahn_kernels.ssd import reference as ssd_ref
from ahn_kernels.swa import reference as swa_ref

PROFILE = settings(max_examples=int(os.environ.get("AHN_FUZZ_EXAMPLES", "12")), derandomize=True, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@st.composite
def batches(draw, max_T=90):
    """(B, T, lengths): a plain batch (lengths None) or B = 1 packing 1-4 sequences, some empty."""
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, max_T // 2), min_size=1, max_size=4))
        return 1, sum(lengths), tuple(lengths)
    return draw(st.integers(1, 2)), draw(st.integers(1, max_T)), None


def _strided(t, transposed):
    """``t`` [B, T, H, D] as is, or with [B, H, T, D] storage (same values, last dim contiguous)."""
    if not transposed:
        return t
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


def _check(name, outs, refs, leaves, ref_leaves, dtype, gate_names=()):
    for i, (o, r) in enumerate(zip(outs, refs)):
        testing.assert_close(f"{name} output {i}", o, r, testing.tolerance(dtype, "out"))
    # Outputs the oracle does not connect to any input (a final state of zero tokens and no
    # initial state) carry no gradient on either side.
    pairs = [(o, r) for o, r in zip(outs, refs) if r.requires_grad]
    if not pairs:
        return
    upstream = [torch.randn_like(r) for _, r in pairs]
    names = list(leaves)
    got = torch.autograd.grad([o for o, _ in pairs], [leaves[n] for n in names],
                              [u.to(o.dtype) for u, (o, _) in zip(upstream, pairs)], allow_unused=True)
    want = torch.autograd.grad([r for _, r in pairs], [ref_leaves[n] for n in names], upstream, allow_unused=True)
    for n, g, w in zip(names, got, want):
        if w is None:
            assert g is None or not g.any(), f"{name} d{n}: gradient where the oracle has none"
            continue
        testing.assert_close(f"{name} d{n}", g, w, testing.tolerance(dtype, "gate" if n in gate_names else "grad"))


@PROFILE
@given(batch=batches(), heads=st.sampled_from([(1, 1, 1), (2, 2, 4), (4, 2, 2), (4, 1, 1)]),
       K=st.integers(1, 72), V=st.integers(1, 72), chunk=st.sampled_from([16, 32, 64]), gated=st.booleans(),
       h0=st.booleans(), l2norm=st.booleans(),
       lag=st.one_of(st.none(), st.tuples(st.integers(1, 80), st.integers(0, 40))), dtype=DTYPES,
       transposed=st.booleans(), seed=st.integers(0, 2**16))
@example(batch=(1, 65, (0, 64, 1)), heads=(4, 2, 2), K=1, V=3, chunk=64, gated=True, h0=True, l2norm=False,
         lag=(1, 0), dtype=torch.float32, transposed=True, seed=0)
@example(batch=(1, 0, (0,)), heads=(1, 1, 1), K=1, V=1, chunk=16, gated=False, h0=False, l2norm=False, lag=None,
         dtype=torch.float32, transposed=False, seed=0)  # shrunk: no token at all, no gradient to compare
def test_fuzz_chunk_delta_rule(batch, heads, K, V, chunk, gated, h0, l2norm, lag, dtype, transposed, seed):
    # K = 1 with the L2 norm: q/|q| is ±1 and its true gradient ~eps/|q|³, so any fp32 kernel's
    # gradient is rounding noise against a near-zero oracle (a shrunk case that says nothing).
    assume(K > 1 or not l2norm)
    torch.manual_seed(seed)
    B, T, lengths = batch
    d = testing.make_delta_inputs(B, T, heads, K, V, gated=gated, dtype=dtype, lengths=lengths, initial_state=h0,
                                  unit_keys=not l2norm, requires_grad=True)
    leaves = {n: t for n, t in d.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    ref_in = testing.fp64_leaves(d, requires_grad=True)
    ref = delta_ref.recurrent(ref_in["q"], ref_in["k"], ref_in["v"], ref_in["beta"], ref_in.get("g"), None,
                              ref_in["initial_state"], ref_in["cu_seqlens"], use_qk_l2norm=l2norm, lag=lag)
    q, k, v = (_strided(d[n], transposed) for n in "qkv")
    fn = ak.chunk_gated_delta_rule if gated else ak.chunk_delta_rule
    gates = (d["g"], d["beta"]) if gated else (d["beta"],)
    o, ht = fn(q, k, v, *gates, initial_state=d["initial_state"], output_final_state=True,
               use_qk_l2norm_in_kernel=l2norm, cu_seqlens=d["cu_seqlens"], chunk_size=chunk, lag=lag)
    leaves.update(q=q, k=k, v=v)
    _check("chunk delta rule", [o, ht], list(ref), leaves, ref_in, dtype, ("g", "beta"))


@PROFILE
@given(batch=batches(), heads=st.sampled_from([(1, 1, 1), (2, 2, 4), (4, 2, 2)]), K=st.integers(2, 72),
       V=st.integers(1, 72), gated=st.booleans(), h0=st.booleans(), dtype=DTYPES, transposed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzz_fused_recurrent(batch, heads, K, V, gated, h0, dtype, transposed, seed):
    torch.manual_seed(seed)
    B, T, lengths = batch
    d = testing.make_delta_inputs(B, T, heads, K, V, gated=gated, dtype=dtype, lengths=lengths, initial_state=h0,
                                  unit_keys=False)
    r = testing.fp64_leaves(d)
    ref = delta_ref.recurrent(r["q"], r["k"], r["v"], r["beta"], r.get("g"), None, r["initial_state"],
                              d["cu_seqlens"], use_qk_l2norm=True)
    fn = ak.fused_recurrent_gated_delta_rule if gated else ak.fused_recurrent_delta_rule
    gates = (d["g"], d["beta"]) if gated else (d["beta"],)
    o, ht = fn(*(_strided(d[n], transposed) for n in "qkv"), *gates, initial_state=d["initial_state"],
               output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=d["cu_seqlens"])
    for i, (got, want) in enumerate(zip([o, ht], ref)):
        testing.assert_close(f"fused recurrent output {i}", got, want, testing.tolerance(dtype, "out"))


@PROFILE
@given(batch=batches(max_T=140), HG=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]), P=st.integers(1, 40),
       N=st.integers(1, 40), chunk=st.sampled_from([16, 64, 256]), D=st.sampled_from([None, "H", "HP"]),
       z=st.booleans(), dt_bias=st.booleans(), softplus=st.booleans(),
       dt_limit=st.sampled_from([(0.0, float("inf")), (0.01, 0.1)]), h0=st.booleans(),
       lag=st.one_of(st.none(), st.tuples(st.integers(1, 80), st.integers(0, 40))), dtype=DTYPES,
       transposed=st.booleans(), seed=st.integers(0, 2**16))
@example(batch=(1, 0, (0,)), HG=(1, 1), P=1, N=1, chunk=16, D=None, z=False, dt_bias=False, softplus=False,
         dt_limit=(0.0, float("inf")), h0=False, lag=None, dtype=torch.float32, transposed=False,
         seed=0)  # shrunk: no token at all, no gradient to compare
def test_fuzz_ssd_chunk_scan(batch, HG, P, N, chunk, D, z, dt_bias, softplus, dt_limit, h0, lag, dtype, transposed,
                             seed):
    torch.manual_seed(seed)
    B, T, lengths = batch
    H, G = HG
    d = testing.make_ssd_inputs(B, T, H, P, N, G, dtype=dtype, D=D, z=z, dt_bias=dt_bias, initial_states=h0,
                                lengths=lengths, dt_softplus=softplus, requires_grad=True)
    leaves = {n: t for n, t in d.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    ref_in = testing.fp64_leaves(d, requires_grad=True)
    ref = ssd_ref.recurrent(**ref_in, dt_limit=dt_limit, lag=lag)
    args = dict(d, x=_strided(d["x"], transposed), B=_strided(d["B"], transposed))
    y, hT = ak.ssd_chunk_scan(**args, chunk_size=chunk, dt_limit=dt_limit, return_final_states=True, lag=lag)
    leaves.update(x=args["x"], B=args["B"])
    _check("ssd_chunk_scan", [y, hT], list(ref), leaves, ref_in, dtype, ("dt", "A", "D", "dt_bias"))


@PROFILE
@given(batch=batches(max_T=140), heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 1)]), D=st.integers(1, 72),
       window=st.one_of(st.none(), st.integers(1, 100)), sinks=st.integers(0, 70), dtype=DTYPES,
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_swa_attention(batch, heads, D, window, sinks, dtype, transposed, seed):
    torch.manual_seed(seed)
    B, T, lengths = batch
    q, k, v = testing.swa_inputs(B, T, *heads, D, dtype=dtype, requires_grad=True)
    cu = None if lengths is None else testing.seqlens_to_cu(lengths)
    ref_in = testing.fp64_leaves({"q": q, "k": k, "v": v}, requires_grad=True)
    ref = swa_ref.masked(ref_in["q"], ref_in["k"], ref_in["v"], window, sinks, cu_seqlens=cu)[0]
    qs, ks, vs = (_strided(t, transposed) for t in (q, k, v))
    o = ak.swa_attention(qs, ks, vs, window, sinks, cu_seqlens=cu)
    _check("swa_attention", [o], [ref], {"q": qs, "k": ks, "v": vs}, ref_in, dtype)
