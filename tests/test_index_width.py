"""Index width: every element offset is computed in 64 bits, always (DESIGN §4).

There is no int32 fast path to switch to, so there is no switch to test; what is
pinned here is that no offset is ever narrowed:

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
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ahn_kernels as ak
from ahn_kernels import _backend

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
