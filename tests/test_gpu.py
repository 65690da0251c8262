"""CUDA and Triton kernels on a real GPU against the fp64 reference (run by ``bench/gpu_suite.sh``).

Without a CUDA device these tests are skipped; CI has none. The same kernels
are checked on the CPU by the Triton interpreter (tests/test_delta_rule.py) and
compiled for sm_80/sm_90 ahead of time (tests/test_triton_aot.py, test_build.py).
"""

import pytest
import torch

import ahn_kernels as ak
from ahn_kernels import _backend, testing
from ahn_kernels.delta_rule import reference as delta_ref

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (HQ, HK, HV): grouped-KV (AHN) and grouped-value (fla)
LAYOUTS = ((4, 2, 2), (1, 1, 4))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("gated", [True, False], ids=["gdn", "dn"])
@pytest.mark.parametrize("T, K, V", [(1, 7, 60), (63, 60, 100), (64, 128, 128), (65, 256, 256), (1000, 128, 128)])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["grouped_kv", "grouped_v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_recurrent_gpu(backend, gated, T, K, V, layout, dtype):
    op = "fused_recurrent_gated_delta_rule" if gated else "fused_recurrent_delta_rule"
    if backend not in _backend.available(op, "cuda"):
        pytest.fail(f"{backend} backend missing for {op} on this GPU build: {_backend.build_info()}")
    HQ, HK, HV = layout
    HS = max(layout)
    lengths = (0, 5, T)
    total = sum(lengths)
    dev = "cuda"
    q = torch.randn(1, total, HQ, K, device=dev, dtype=dtype)
    k = torch.randn(1, total, HK, K, device=dev, dtype=dtype)
    v = torch.randn(1, total, HV, V, device=dev, dtype=dtype)
    beta = torch.rand(1, total, HS, device=dev)
    g = torch.nn.functional.logsigmoid(torch.randn(1, total, HS, device=dev) + 3)
    h0 = torch.randn(len(lengths), HS, K, V, device=dev)
    cu = testing.seqlens_to_cu(lengths, dev)
    with ak.use_backend(backend):
        assert _backend.choose(op, "cuda") == backend
        if gated:
            o, ht = ak.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                        use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
        else:
            o, ht = ak.fused_recurrent_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    torch.cuda.synchronize()
    o_ref, ht_ref = delta_ref.recurrent(q.double(), k.double(), v.double(), beta.double(),
                                        g.double() if gated else None, None, h0.double(), cu, use_qk_l2norm=True)
    tol = testing.tolerance(dtype, "out")
    testing.assert_close("o", o, o_ref, tol)
    testing.assert_close("final_state", ht, ht_ref, tol)


@pytest.mark.parametrize("op", list(_backend.KERNELS))
def test_every_op_runs_on_cuda_tensors(op):
    """Every op accepts CUDA tensors (through its kernel or its reference) and matches the CPU result."""
    from ahn_kernels.check import _cases

    make, ours, _ = _cases()[op]
    torch.manual_seed(0)
    inputs = make()
    cpu = ours(inputs)
    cuda_inputs = {n: (t.detach().cuda().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t)
                   for n, t in inputs.items()}
    got = ours(cuda_inputs)
    for name, want in cpu.items():
        testing.assert_close(name, got[name].cpu(), want, testing.tolerance(torch.float32, "out"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T, W, S, HQ, HK, D", [(1000, 100, 64, 8, 1, 128), (65, 16, 1, 4, 2, 7),
                                                (300, None, 0, 2, 2, 256), (200, 1, 3, 6, 2, 64)])
def test_triton_swa_attention_gpu(dtype, T, W, S, HQ, HK, D):
    """Triton forward and backward on the GPU (fp32 runs its products as tf32x3) against the fp64 spec."""
    from ahn_kernels.swa import reference as swa_ref

    lengths = (0, 5, T)
    cu = testing.seqlens_to_cu(lengths, "cuda")
    q, k, v = testing.swa_inputs(1, sum(lengths), HQ, HK, D, dtype, "cuda", requires_grad=True)
    do = torch.randn_like(q)
    dlse = torch.randn(1, HQ, sum(lengths), device="cuda")
    with ak.use_backend("triton"):
        o, lse = ak.swa_attention(q, k, v, W, S, cu_seqlens=cu, return_lse=True)
        got = (o, lse, *torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, k, v)))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = swa_ref.masked(*leaves, W, S, cu_seqlens=cu)
    ref = (o_ref, lse_ref, *torch.autograd.grad((o_ref * do.double()).sum() + (lse_ref * dlse.double()).sum(),
                                                leaves))
    for i, (name, a, b) in enumerate(zip(("o", "lse", "dq", "dk", "dv"), got, ref)):
        testing.assert_close(name, a, b, testing.tolerance(dtype, "out" if i < 2 else "grad"))


@pytest.mark.parametrize("rule", ["gated_delta", "ssd"])
def test_triton_decode_step_cuda_graph(rule):
    """One AHN decode step (ahn_evict_update + swa_decode, Triton) captured in a CUDA graph, then replayed
    with new inputs copied into the same buffers: each replay equals the reference run eagerly on a copy."""
    W, S, B, HQ, HK, D = 8, 2, 3, 4, 2, 64
    HS, dev, dtype = HQ, "cuda", torch.bfloat16
    cache = ak.AHNCache.empty(B, W, S, HK, D, HS, rule, dtype, dev)
    for t in (cache.k, cache.v, cache.state):
        t.normal_()
    cache.gates.copy_(testing.ahn_gates(rule, B, W, HS, device=dev))
    cache.positions.copy_(torch.tensor([0, S + W, S + 3 * W + 1], dtype=torch.int32))
    A = testing.ahn_A(HS, dev) if rule == "ssd" else None
    q, k, v = (torch.randn(B, 1, h, D, device=dev, dtype=dtype) for h in (HQ, HK, HK))
    gates_new = testing.ahn_gates(rule, B, HS, device=dev)
    buffers = (cache.k, cache.v, cache.gates, cache.state, cache.positions)

    def step(c):
        mem = ak.ahn_evict_update(c.state, q, c.k, c.v, c.gates, gates_new, c.positions, W, S, rule, A=A)
        attn = ak.swa_decode(q, c.k, c.v, k, v, c.positions, W, S)
        c.positions.add_(1)
        return attn, mem

    def snapshot():
        return ak.AHNCache(*(t.clone() for t in buffers), W, S, rule)

    with ak.use_backend("triton"):
        saved = snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the kernels outside the capture
            step(cache)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(buffers, (saved.k, saved.v, saved.gates, saved.state, saved.positions)):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            attn, mem = step(cache)
    for _ in range(2 * W):
        for t in (q, k, v):
            t.normal_()
        gates_new.copy_(testing.ahn_gates(rule, B, HS, device=dev))
        expected = snapshot()
        with ak.use_backend("reference"):
            want_attn, want_mem = step(expected)
        graph.replay()
        torch.cuda.synchronize()
        testing.assert_close("attn", attn, want_attn, testing.tolerance(dtype, "out"))
        testing.assert_close("mem", mem, want_mem, testing.tolerance(dtype, "out"))
        testing.assert_close("state", cache.state, expected.state, testing.tolerance(torch.float32, "out"))
        assert torch.equal(cache.k, expected.k) and torch.equal(cache.v, expected.v)
        assert torch.equal(cache.gates, expected.gates) and torch.equal(cache.positions, expected.positions)
