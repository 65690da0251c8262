"""Index width: which paths compute element offsets in 32 bits, which in 64 (DESIGN §4).

- The Triton kernels (``INT64`` constexpr) and the CUDA fused recurrent kernel
  (offset type template) use int32 offsets unless ``ahn_kernels._index.needs_int64``
  says an offset of the launch can reach 2^31: the largest reach Σ (size - 1)·|stride|
  over every tensor the launch touches, inputs, outputs and scratch.
- Always int64: the C++ CPU kernels (free on x86-64), the fused recurrent Triton
  kernel (a few scalar offsets; int32 ones cost it registers, see its module), the
  launchers' params, validation and the fake kernels.

Pinned here:

- the predicate on meta tensors: just below / at 2^31, huge singleton strides
  (int32), empty tensors, expanded stride-0 dims, packed varlen tensors;
- every Triton kernel takes INT64, and forcing it either way gives bitwise the
  same results on small inputs, forward and backward, under the interpreter;
- far inputs under the interpreter: views whose elements lie 2^31 apart; every
  Triton launch that touches one passes INT64=True (one that touches only compact
  scratch keeps int32), and the results equal the compact run's bit for bit;
- far offsets on the CPU kernels: each input is a view whose second token sits
  2^31 elements after its first, inside one bf16 buffer of 2^31 + a few
  elements (``torch.empty`` only reserves the address range; the kernels touch
  two pages of it), dense and through ``cu_seqlens`` (int32 and int64); a kernel
  computing an offset in 32 bits reads the wrong memory (or faults), and the
  results must equal, bit for bit, the same values in compact tensors;
- huge singleton strides (2^40 on a size-1 dim, legal in PyTorch and reachable
  through ``expand``/indexing) give bitwise the compact results on every backend
  here, the Triton kernels under the interpreter included;
- every size, stride and pointer field of the C++ launchers' params holds 2^40;
- validation and fake kernels take tensors past 2^31 elements (meta tensors).

The CUDA kernel's int64 path and the Triton kernels compiled for a GPU run past
2^31 elements in ``tests/test_gpu_reliability.py::test_past_2_31`` (bench/gpu_suite.sh).
"""

import importlib
import math

import pytest
import test_gpu_reliability as gpu  # its CASES: a tiny forward + backward run of every op family
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ahn_kernels as ak
from ahn_kernels import _backend, _index, triton_aot

GAP = 2**31  # elements between token 0 and token 1 of every far input
HUGE = 2**40  # the stride put on size-1 dims

needs_cpu_kernels = pytest.mark.skipif(_backend._C is None, reason="needs the compiled CPU kernels")


def _inputs(T=2, dtype=torch.bfloat16):
    """q, k, v [1, T, 2, 16], x [1, T, 2, 8], B, C [1, T, 1, 4] in ``dtype``; gates fp32."""
    torch.manual_seed(0)
    acts = dict(q=torch.randn(1, T, 2, 16), k=torch.randn(1, T, 2, 16), v=torch.randn(1, T, 2, 16),
                x=torch.randn(1, T, 2, 8), B=torch.randn(1, T, 1, 4), C=torch.randn(1, T, 1, 4))
    gates = dict(g=-torch.rand(1, T, 2), beta=torch.rand(1, T, 2), dt=torch.rand(1, T, 2), A=-torch.rand(2))
    return {n: t.to(dtype) for n, t in acts.items()}, gates


def _calls(gates, cu=None):
    """The prefill ops, each a function of the activations returning its output."""
    g, beta, dt, A = gates["g"], gates["beta"], gates["dt"], gates["A"]
    return {
        "fused_recurrent_gated_delta_rule": lambda a: ak.fused_recurrent_gated_delta_rule(
            a["q"], a["k"], a["v"], g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)[0],
        "chunk_gated_delta_rule": lambda a: ak.chunk_gated_delta_rule(
            a["q"], a["k"], a["v"], g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu, chunk_size=16)[0],
        "ssd_chunk_scan": lambda a: ak.ssd_chunk_scan(a["x"], dt, A, a["B"], a["C"], chunk_size=16, cu_seqlens=cu),
        "swa_attention": lambda a: ak.swa_attention(a["q"], a["k"], a["v"], 1, 1, cu_seqlens=cu),
    }


def _far(t):
    """``t`` [1, 2, H, D] as a view whose token 1 starts GAP elements after token 0."""
    _, T, H, D = t.shape
    buf = torch.empty(GAP + H * D, dtype=t.dtype)  # [GAP + H*D]: address space, two pages touched
    view = buf.as_strided(t.shape, (GAP * T, GAP, D, 1))
    view.copy_(t)
    return view


@needs_cpu_kernels
@pytest.mark.parametrize("cu", [None, torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1, 2])],
                         ids=["dense", "varlen_int32", "varlen_int64"])
def test_far_offsets_bitwise(cu):
    acts, gates = _inputs()
    far = {n: _far(t) for n, t in acts.items()}
    assert far["q"].stride(1) == GAP and far["q"][0, 1].data_ptr() - far["q"].data_ptr() == GAP * 2
    for op, call in _calls(gates, cu).items():
        assert _backend.choose(op, "cpu") == "cpu", op
        assert torch.equal(call(far), call(acts)), f"{op}: wrong past 2^31 elements"


def _singleton_strides(t):
    """The same values with a HUGE stride on every size-1 dim."""
    strides = tuple(HUGE if n == 1 else s for n, s in zip(t.shape, t.stride()))
    return t.as_strided(t.shape, strides)


def _backends(op):
    out = [b for b in _backend.available(op, "cpu") if b != "reference"]
    if "triton" in _backend.KERNELS[op]["cuda"] and _backend.triton_interpret():
        out.append("triton")
    return out


@pytest.mark.parametrize("op", list(_calls(_inputs()[1])))
def test_huge_singleton_strides_bitwise(op):
    # B = 1 and one-group B, C ([1, T, 1, N]) carry the HUGE stride; T = 20 crosses a 16-token chunk.
    acts, gates = _inputs(T=20, dtype=torch.float32)
    odd = {n: _singleton_strides(t) for n, t in acts.items()}
    assert odd["q"].stride(0) == HUGE and odd["B"].stride(2) == HUGE
    call = _calls(gates)[op]
    backends = _backends(op)
    assert backends, f"{op}: no kernel to run here"
    for backend in backends:
        with _backend.use_backend(backend):
            assert torch.equal(call(odd), call(acts)), f"{op}/{backend}: a singleton stride reached an offset"


def test_launcher_params_hold_64_bit_offsets():
    # Sizes, strides and addresses cross into C++ through these fields: each must hold a value past 2^32
    # (only the dtype and memory-rule codes are small enums).
    if _backend._C is None:
        pytest.skip("needs the compiled CPU kernels")
    classes = [c for n, c in vars(_backend._C).items() if n.endswith("Params")]
    assert len(classes) >= 8, classes
    for cls in classes:
        params = cls()
        for name in dir(params):
            value = getattr(params, name)
            if name.startswith("_") or name in ("dtype", "rule") or type(value) is not int:
                continue
            setattr(params, name, HUGE + 3)
            assert getattr(params, name) == HUGE + 3, f"{cls.__name__}.{name} narrows {HUGE + 3}"


def test_past_2_31_elements_on_meta_tensors():
    # Validation and the fake kernels size outputs from shapes past 2^31 elements without narrowing them.
    T = 2**22 + 1  # q: 2^22 + 1 tokens x 2 heads x 256 = 2^31 + 512 elements
    with FakeTensorMode():
        q, k, v = (torch.empty(1, T, 2, 256, dtype=torch.bfloat16) for _ in range(3))
        g, beta = torch.empty(1, T, 2), torch.empty(1, T, 2)
        o, ht = ak.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        assert o.shape == (1, T, 2, 256) and ht.shape == (1, 2, 256, 256)
        assert o.numel() > 2**31 and o.stride(1) == 512
        o = ak.swa_attention(q, k, v, 128, 4)
        assert o.shape == (1, T, 2, 256) and o.stride(0) == T * 512
        y = ak.ssd_chunk_scan(q, g, -torch.ones(2), k[..., :1, :], v[..., :1, :])
        assert y.shape == (1, T, 2, 256)


# ----------------------------------------------------------------------------
# The switch on the GPU paths: int32 offsets below 2^31, int64 from it.
# ----------------------------------------------------------------------------
LIMIT = _index.LIMIT


def _meta(shape, strides=None):
    strides = strides or torch.empty(shape, device="meta").stride()
    return torch.empty_strided(shape, strides, dtype=torch.bfloat16, device="meta")


PREDICATE_CASES = {
    "flat_below": ([_meta((LIMIT,))], False),  # last offset 2^31 - 1
    "flat_at": ([_meta((LIMIT + 1,))], True),
    "dense_below": ([_meta((1, 2**20, 2, 1024))], False),  # 2^31 elements
    "dense_at": ([_meta((2, 2**19, 2, 1024), (2**30 + 1, 2048, 1024, 1))], True),  # b = 1 starts 1 element later
    "stride_below": ([_meta((2, 16), (LIMIT - 16, 1))], False),
    "stride_at": ([_meta((2, 16), (LIMIT - 15, 1))], True),
    "huge_singleton_strides": ([_meta((1, 4, 1, 16), (HUGE, 16, HUGE, 1))], False),
    "huge_stride_size_2": ([_meta((2, 4, 1, 16), (HUGE, 16, HUGE, 1))], True),
    "empty": ([_meta((0, 4, 2, 16), (HUGE, HUGE, HUGE, 1)), _meta((3, 0), (HUGE, 1))], False),
    "expanded_stride_0": ([_meta((1, 1, 2, 16)).expand(2**20, 2**12, 2, 16)], False),  # 2^38 elements, 32 apart
    "varlen_packed_below": ([_meta((1, 2**22, 2, 256)), None], False),  # [1, T_total, H, D]; None skipped
    "varlen_packed_at": ([_meta((1, 2**22 + 1, 2, 256)), None], True),
    "any_tensor": ([_meta((4, 16)), _meta((1, 2**22 + 1, 2, 256)), _meta((4,))], True),
}


@pytest.mark.parametrize("name", list(PREDICATE_CASES))
def test_needs_int64(name):
    tensors, want = PREDICATE_CASES[name]
    assert _index.needs_int64(*tensors) is want


def _triton_modules():
    return [importlib.import_module(m) for m in triton_aot.discover()]


def _launched_kernels():
    """{name: kernel} of every Triton kernel that takes INT64 (the jit helpers are called, never launched)."""
    out = {}
    for module in _triton_modules():
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and "INT64" in getattr(obj, "arg_names", ()):
                out[name] = obj
    return out


ALWAYS_INT64 = {"fused_recurrent_fwd_kernel"}  # its offsets are a few scalars; int32 cost it registers


def test_every_launched_kernel_takes_int64():
    kernels = _launched_kernels()
    for module in _triton_modules():
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "arg_names") and name not in ALWAYS_INT64:
                assert name in kernels, f"{module.__name__}.{name} has no INT64 constexpr"
    assert len(kernels) >= 20, sorted(kernels)


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel, INT64 passed, whether a tensor argument reaches 2^31) for every Triton launch."""
    seen = []
    for name, kernel in _launched_kernels().items():
        def run(*args, _name=name, _run=kernel.run, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            seen.append((_name, kwargs["INT64"], any(_index.reach(t) >= LIMIT for t in tensors)))
            return _run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    return seen


def _family_run(family, inputs, upstream=None):
    """The family's outputs and (given ``upstream``) input gradients on the Triton backend; upstream is made if None."""
    case = gpu.CASES[family]
    with ak.use_backend("triton"):
        outs = case.run(inputs)
        if upstream is None:
            torch.manual_seed(1)
            upstream = {n: torch.randn_like(t, dtype=torch.float64) for n, t in outs.items() if t.requires_grad}
        return gpu._with_grads(outs, inputs, upstream), upstream


FAMILIES = [f for f in gpu.CASES if not f.startswith("fused_recurrent")]  # ALWAYS_INT64's ops


@pytest.fixture
def small(monkeypatch):
    """test_gpu_reliability's cases, smaller: the interpreter runs every program in Python."""
    sizes = dict(LENGTHS=(0, 1, 9), T_PACKED=10, HEADS=(2, 1, 1), HS=2, K=9, V=7, D=12)
    for name, value in sizes.items():
        monkeypatch.setattr(gpu, name, value)


def _far_view(t):
    """``t`` as a view whose entries along its first dim of size > 1 lie >= 2^31 / (n - 1) elements apart."""
    dim = next(i for i, n in enumerate(t.shape[:-1]) if n > 1)
    n, inner = t.shape[dim], math.prod(t.shape[dim + 1:])
    gap = max(-(-LIMIT // (n - 1)), inner)
    buf = torch.empty((n - 1) * gap + inner, dtype=t.dtype)  # address space; n blocks of `inner` touched
    strides = [buf.numel()] * dim + [gap] + list(torch.empty(t.shape[dim + 1:]).stride())
    view = buf.as_strided(t.shape, strides)
    view.copy_(t.detach())
    assert _index.reach(view) >= LIMIT
    return view.requires_grad_(t.requires_grad)


FAR = {"q", "k", "v", "g", "beta", "x", "dt", "B", "C", "z", "k_new", "v_new"}


@pytest.mark.parametrize("family", FAMILIES)
def test_int64_offsets(family, small, launches, monkeypatch):
    # Small inputs, the predicate forced either way: the same bits, forward and backward.
    force = [None]
    for module in _triton_modules():
        if hasattr(module, "needs_int64"):
            monkeypatch.setattr(module, "needs_int64", lambda *t: _index.needs_int64(*t) if force[0] is None
                                else force[0])
    torch.manual_seed(0)
    compact = gpu.CASES[family].make(torch.bfloat16)
    results, upstream = {}, None
    for force[0] in (False, True):
        results[force[0]], upstream = _family_run(family, gpu._moved(compact, "cpu"), upstream)
        assert launches and {flag for _, flag, _ in launches} == {force[0]}, launches
        launches.clear()
    gpu._assert_equal(f"{family} int64 vs int32 offsets", results[True], results[False])

    # Activations and gates whose elements lie 2^31 apart, the predicate free: every launch that
    # touches one passes INT64=True (one that touches only compact scratch keeps int32), and the
    # results equal the compact run's bit for bit (an int32 offset past 2^31 would wrap and read
    # the wrong memory, or fault).
    force[0] = None
    far = {n: _far_view(t) if n in FAR and t.dim() > 1 else t for n, t in compact.items()}
    got, _ = _family_run(family, far, upstream)
    wrong = [(name, flag) for name, flag, reaches in launches if flag != reaches]
    assert not wrong, f"{family}: launches whose INT64 differs from the reach of their tensors: {wrong}"
    assert any(flag for _, flag, _ in launches), f"{family}: no launch saw the far inputs"
    gpu._assert_equal(f"{family} past 2^31", got, results[False])
