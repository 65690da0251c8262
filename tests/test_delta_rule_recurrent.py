"""fused_recurrent_{,gated_}delta_rule: every backend (C++ CPU, Triton under the interpreter,
reference) against the fp64 token loop, with decode continuation, T = 0 and red zones."""

import pytest
import torch

import ahn_kernels
from ahn_kernels import _backend
from ahn_kernels.delta_rule import op, reference
from ahn_kernels.testing import (
    CPU_KERNEL_FP32,
    DELTA_HEADS,
    DELTA_RECURRENT_DIMS,
    DELTA_RECURRENT_T,
    VARLEN_LENGTHS,
    assert_close,
    fp64_leaves,
    make_delta_inputs,
    red_zone,
    tolerance,
)

FUSED_OPS = {False: op.fused_recurrent_delta_rule, True: op.fused_recurrent_gated_delta_rule}


def _oracle(inputs, **kw):
    """fp64 token loop: (o, final_state)."""
    return reference.recurrent(**fp64_leaves(inputs), **kw)


# ----------------------------------------------------------------------------
# fused_recurrent: every backend vs the fp64 token loop
# ----------------------------------------------------------------------------
BACKENDS = ["cpu", "triton", "reference"]
# (B, T, K, V, heads, lengths, initial_state, l2norm, dtype, gated, on_triton): every
# DELTA_RECURRENT_T with every DELTA_RECURRENT_DIMS as K (V the next one) in fp32, then
# fp16 / bf16 and varlen cases. The Triton interpreter costs milliseconds per token and
# program, so it runs the T = 1 and the small cases only.
FUSED_CASES = [
    (2 if T < 65 else 1, T, K, DELTA_RECURRENT_DIMS[(j + 1) % 4], DELTA_HEADS[(i + j) % 2], None, (i + j) % 3 != 0,
     (i + j) % 2 == 1, torch.float32, (i + j) % 4 != 1, T == 1)
    for i, T in enumerate(DELTA_RECURRENT_T) for j, K in enumerate(DELTA_RECURRENT_DIMS)
] + [
    (1, 65, 7, 8, DELTA_HEADS[1], None, True, True, torch.float32, True, True),
    (1, 22, 16, 16, DELTA_HEADS[0], VARLEN_LENGTHS[1], True, True, torch.float16, True, True),
    (1, 22, 60, 7, DELTA_HEADS[1], VARLEN_LENGTHS[1], False, False, torch.bfloat16, False, True),
    (2, 65, 60, 100, DELTA_HEADS[0], None, True, True, torch.bfloat16, True, False),
    (1, sum(VARLEN_LENGTHS[0]), 60, 100, DELTA_HEADS[1], VARLEN_LENGTHS[0], True, True, torch.float32, True, False),
]


def _require(backend, gated):
    name = f"fused_recurrent_{'gated_' if gated else ''}delta_rule"
    if backend not in _backend.available(name, "cpu"):
        reason = {"cpu": f"ahn_kernels._C is not built ({_backend.build_info().get('error')})",
                  "triton": "triton is not installed or TRITON_INTERPRET is not 1"}[backend]
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")
    return name


def _fused_tolerance(backend, dtype):
    return CPU_KERNEL_FP32 if backend == "cpu" and dtype == torch.float32 else tolerance(dtype, "out")


def _fused_id(backend, B, T, K, V, heads, lengths, h0, l2norm, dtype, gated):
    return "-".join([backend, "gated" if gated else "delta", str(dtype).replace("torch.float", "fp"),
                     f"B{B}T{T}K{K}V{V}", "H{}.{}.{}".format(*heads), "varlen" if lengths else "dense",
                     "h0" if h0 else "no_h0", "l2norm" if l2norm else "raw"])


FUSED_PARAMS = [pytest.param(backend, *case[:-1], id=_fused_id(backend, *case[:-1]))
                for case in FUSED_CASES for backend in BACKENDS if backend != "triton" or case[-1]]


@pytest.mark.parametrize("backend, B, T, K, V, heads, lengths, h0, l2norm, dtype, gated", FUSED_PARAMS)
def test_fused_recurrent_vs_reference(backend, B, T, K, V, heads, lengths, h0, l2norm, dtype, gated):
    name = _require(backend, gated)
    x = make_delta_inputs(B, T, heads, K, V, gated=gated, dtype=dtype, lengths=lengths, initial_state=h0,
                          unit_keys=not l2norm)
    with ahn_kernels.use_backend(backend):
        assert _backend.choose(name, "cpu") == backend
        o, ht = FUSED_OPS[gated](**x, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    o_ref, ht_ref = _oracle(x, use_qk_l2norm=l2norm)
    assert o.dtype == dtype and o.is_contiguous() and ht.dtype == torch.float32
    tol = _fused_tolerance(backend, dtype)
    assert_close("o", o, o_ref, tol)
    assert_close("final_state", ht, ht_ref, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_recurrent_decode_continuation(backend):
    """A prefill then single-token steps, each from the returned state, equals the whole sequence."""
    _require(backend, True)
    x = make_delta_inputs(2, 22, DELTA_HEADS[1], 60, 7, initial_state=True)
    with ahn_kernels.use_backend(backend):
        o, ht = op.fused_recurrent_gated_delta_rule(**x, output_final_state=True)
        h, outs = x["initial_state"], []
        for s, e in ((0, 20), (20, 21), (21, 22)):
            part = {n: x[n][:, s:e] for n in ("q", "k", "v", "g", "beta")}
            o_p, h = op.fused_recurrent_gated_delta_rule(**part, initial_state=h, output_final_state=True)
            outs.append(o_p)
    tol = _fused_tolerance(backend, torch.float32)
    assert_close("o", torch.cat(outs, 1), o, tol)
    assert_close("final_state", h, ht, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [None, (0, 0)], ids=["dense", "varlen"])
@pytest.mark.parametrize("h0", [False, True], ids=["no_h0", "h0"])
def test_fused_recurrent_no_tokens(backend, lengths, h0):
    """T = 0: every sequence is empty, so the final state is the initial state (or zeros)."""
    _require(backend, True)
    x = make_delta_inputs(2 if lengths is None else 1, 0, DELTA_HEADS[1], 7, 8, lengths=lengths, initial_state=h0)
    with ahn_kernels.use_backend(backend):
        o, ht = op.fused_recurrent_gated_delta_rule(**x, output_final_state=True)
    assert o.shape == (o.shape[0], 0, 4, 8)
    assert torch.equal(ht, x["initial_state"] if h0 else torch.zeros(2, 4, 7, 8))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_recurrent_red_zone(backend):
    """Kernels read and write only inside their tensors: NaN guard bands around every input and output."""
    _require(backend, True)
    x = make_delta_inputs(1, 22, DELTA_HEADS[1], 7, 8, lengths=VARLEN_LENGTHS[1], initial_state=True)
    checks, zoned = [], {}
    for n, t in x.items():
        if isinstance(t, torch.Tensor):
            fill = float("nan") if t.is_floating_point() else 1 << 40
            zoned[n], check = red_zone(tuple(t.shape), t.dtype, fill=fill)
            zoned[n].copy_(t)
            checks.append(check)
        else:
            zoned[n] = t
    o, check_o = red_zone((1, 22, 4, 8), torch.float32)
    ht, check_ht = red_zone((3, 4, 7, 8), torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the CPU kernel splits sequences x heads over these threads
    try:
        op.run_fused_recurrent(backend, zoned["q"], zoned["k"], zoned["v"], zoned["g"], zoned["beta"], 7 ** -0.5,
                               zoned["initial_state"], zoned["cu_seqlens"], True, o, ht)
    finally:
        torch.set_num_threads(threads)
    for check in (*checks, check_o, check_ht):
        check()
    o_ref, ht_ref = _oracle(x, use_qk_l2norm=True)
    assert_close("o", o, o_ref, _fused_tolerance(backend, torch.float32))
    assert_close("final_state", ht, ht_ref, _fused_tolerance(backend, torch.float32))
