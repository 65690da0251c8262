"""Element offsets past 2^31 on the CPU kernels (DESIGN §4: int64 offsets).

Each input is a view whose second token sits 2^31 elements after its first, inside
one bf16 buffer of 2^31 + a few elements: ``torch.empty`` only reserves the
address range, and the kernels touch two pages of it. A kernel computing an
offset in 32 bits reads the wrong memory (or faults); the results must equal,
bit for bit, the same values in compact tensors.
"""

import pytest
import torch

import ahn_kernels as ak
from ahn_kernels import _backend

GAP = 2**31  # elements between token 0 and token 1 of every input

pytestmark = pytest.mark.skipif(_backend._C is None, reason="needs the compiled CPU kernels")


def _far(t):
    """``t`` [1, 2, H, D] as a view whose token 1 starts GAP elements after token 0."""
    _, T, H, D = t.shape
    buf = torch.empty(GAP + H * D, dtype=t.dtype)  # [GAP + H*D]: address space, two pages touched
    view = buf.as_strided(t.shape, (GAP * T, GAP, D, 1))
    view.copy_(t)
    return view


def test_far_offsets_bitwise():
    torch.manual_seed(0)
    bf = torch.bfloat16
    q, k, v = (torch.randn(1, 2, 2, 16, dtype=bf) for _ in range(3))
    g, beta = -torch.rand(1, 2, 2), torch.rand(1, 2, 2)
    x, B, C = torch.randn(1, 2, 2, 8, dtype=bf), torch.randn(1, 2, 1, 4, dtype=bf), torch.randn(1, 2, 1, 4, dtype=bf)
    dt, A = torch.rand(1, 2, 2), -torch.rand(2)
    calls = {
        "fused_recurrent_gated_delta_rule": lambda q, k, v, x, B, C: ak.fused_recurrent_gated_delta_rule(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0],
        "chunk_gated_delta_rule": lambda q, k, v, x, B, C: ak.chunk_gated_delta_rule(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0],
        "ssd_chunk_scan": lambda q, k, v, x, B, C: ak.ssd_chunk_scan(x, dt, A, B, C, chunk_size=16),
        "swa_attention": lambda q, k, v, x, B, C: ak.swa_attention(q, k, v, 1, 1),
    }
    far = [_far(t) for t in (q, k, v, x, B, C)]
    assert far[0].stride(1) == GAP and far[0][0, 1].data_ptr() - far[0].data_ptr() == GAP * 2
    for op, call in calls.items():
        assert _backend.choose(op, "cpu") == "cpu", op
        want = call(q, k, v, x, B, C)
        got = call(*far)
        assert torch.equal(got, want), f"{op}: wrong past 2^31 elements"
