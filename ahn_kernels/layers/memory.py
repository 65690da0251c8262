"""AHN memory modules with the paper's parameterisation and the released checkpoints' parameter names.

Each module turns a layer's post-RoPE q/k/v (and its prenormed hidden state
x) into the memory term added to the attention output before ``o_proj``
(DESIGN §1). Three stages, each usable alone:

- ``gates(x)``: every token's gates at arrival, [B, T, HS, n_gates] fp32
  (``AHNCache``'s gate layout);
- ``readout(q, k, v, gates, lag)``: the lagged memory op, [B, T, HS, D];
- ``output(mem, x)``: the paper's output path (per-head norm and scalar
  gate, then the block-diagonal ``o_proj``), [B, T, HS·D].

Parameter names and shapes are those of ByteDance-Seed/AHN
(``src/ahn/rnn/{delta_net,gated_deltanet,mamba2}.py``), which the AHN-only
checkpoints store under ``model.layers.{i}.ahn.fn.``; HS is the model's
number of query heads and D its head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..delta_rule import chunk_delta_rule, chunk_gated_delta_rule
from ..ssd import ssd_chunk_scan

L2_EPS = 1e-6  # the ops' in-kernel q/k normalisation (DESIGN §1)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x · rsqrt(Σ x² + 1e-6) over the last dim, in fp32, cast back to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + L2_EPS)).to(x.dtype)


class GroupLinear(nn.Module):
    """Block-diagonal linear map: head h's [D_in] slice times its own [D_in, D_out] block.

    ``weight``: [H, D_in, D_out] (the released layout: input dim first), initialised to zero
    so that a fresh AHN leaves the base model unchanged.
    """

    def __init__(self, num_heads: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, in_dim, out_dim))  # [H, D_in, D_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D_in] -> [B, T, H·D_out]."""
        return torch.einsum("bthi,hio->btho", x, self.weight).flatten(2)


class HeadRMSNormGate(nn.Module):
    """Per-head RMSNorm times silu of a per-head scalar gate (fla's ``FusedRMSNormSwishGate``, gate per head).

    ``weight``: [D]. The gate stays [B, T, H, 1]: never repeated to [B, T, H·D].
    """

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))  # [D]
        self.eps = eps

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o: [B, T, H, D], gate: [B, T, H] -> [B, T, H, D] in o's dtype."""
        of = o.float()
        normed = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (normed * F.silu(gate.float())[..., None]).to(o.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's output norm: RMSNorm over all H·D of (o · silu(gate)), gate per head, applied before the norm.

    ``weight``: [H·D] (fla ``RMSNormGated(H·D, norm_before_gate=False)``).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))  # [H·D]
        self.eps = eps

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o: [B, T, H, D], gate: [B, T, H] -> [B, T, H, D] in o's dtype."""
        y = o.float() * F.silu(gate.float())[..., None]  # [B, T, H, D]
        rstd = torch.rsqrt(y.pow(2).mean((-2, -1), keepdim=True) + self.eps)
        return (y * rstd * self.weight.float().view(o.shape[-2:])).to(o.dtype)


class _Memory(nn.Module):
    """What the three memories share: sizes, the output path, the delta rules' readout."""

    rule: str  # AHNCache's rule name

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim

    def A(self) -> torch.Tensor | None:
        """The SSD decay rate [HS] fp32 (``ssd`` only), else None."""
        return None

    def readout(self, q, k, v, gates, lag, cu_seqlens=None):
        """Memory readout through the lagged chunk op.

        Args:
            q: [B, T, HQ, D]; k, v: [B, T, HK, D] post-RoPE (HQ = HS).
            gates: [B, T, HS, n_gates] fp32 from ``gates``.
            lag: (window_size, num_sinks), or None for an unlagged memory.
            cu_seqlens: [N+1] offsets of a packed batch (B = 1), or None.
        Returns:
            [B, T, HS, D] in q's dtype (rows whose memory is empty are 0).
        """
        if self.rule == "gated_delta":
            o, _ = chunk_gated_delta_rule(q, k, v, gates[..., 1], gates[..., 0], None, None, False, True,
                                          cu_seqlens=cu_seqlens, lag=lag)
        else:
            o, _ = chunk_delta_rule(q, k, v, gates[..., 0], None, None, False, True, cu_seqlens=cu_seqlens, lag=lag)
        return o

    def output(self, mem: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """mem: [B, T, HS, D] readout, x: [B, T, hidden] the same tokens' prenormed states -> [B, T, HS·D]."""
        return self.o_proj(self.o_norm(mem, self.g_proj(x)))


class DeltaNetMemory(_Memory):
    """AHN-DN: S_j = (I - β_j k̂_j k̂_jᵀ) S_{j-1} + β_j k̂_j v_jᵀ, β = sigmoid(b_proj x).

    Parameters (released names): ``b_proj``, ``g_proj`` [HS, hidden]; ``o_norm.weight`` [D];
    ``o_proj.weight`` [HS, D, D].
    """

    rule = "delta"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, norm_eps: float = 1e-5):
        super().__init__(hidden_size, num_heads, head_dim)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.o_norm = HeadRMSNormGate(head_dim, norm_eps)
        self.o_proj = GroupLinear(num_heads, head_dim, head_dim)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] -> (β,) as [B, T, HS, 1] fp32."""
        return torch.sigmoid(self.b_proj(x).float())[..., None]


class GatedDeltaNetMemory(_Memory):
    """AHN-GDN: S_j = exp(g_j)(I - β_j k̂_j k̂_jᵀ) S_{j-1} + β_j k̂_j v_jᵀ.

    β = sigmoid(b_proj x), g = -exp(A_log) · softplus(a_proj x + dt_bias), in fp32.
    Parameters (released names): ``a_proj``, ``b_proj``, ``g_proj`` [HS, hidden];
    ``A_log``, ``dt_bias``, ``D`` [HS]; ``o_norm.weight`` [D]; ``o_proj.weight`` [HS, D, D].
    ``D`` is in the released files but the paper's layer never reads it: it is kept
    only so that those files load.
    """

    rule = "gated_delta"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, norm_eps: float = 1e-5):
        super().__init__(hidden_size, num_heads, head_dim)
        H = num_heads
        self.b_proj = nn.Linear(hidden_size, H, bias=False)
        self.a_proj = nn.Linear(hidden_size, H, bias=False)
        # The paper's init: A ~ U(0, 16); dt log-uniform in [1e-3, 0.1] floored at 1e-4, dt_bias = softplus⁻¹(dt).
        self.A_log = nn.Parameter(torch.empty(H).uniform_(0, 16).log())  # [HS]
        self.D = nn.Parameter(torch.ones(H))  # [HS]
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # [HS]
        self.g_proj = nn.Linear(hidden_size, H, bias=False)
        self.o_norm = HeadRMSNormGate(head_dim, norm_eps)
        self.o_proj = GroupLinear(H, head_dim, head_dim)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] -> (β, g) as [B, T, HS, 2] fp32."""
        beta = torch.sigmoid(self.b_proj(x).float())
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return torch.stack((beta, g), dim=-1)


class Mamba2Memory(_Memory):
    """AHN-Mamba2 (SSD, one group per head): S_j = exp(dt_j A) S_{j-1} + dt_j k̂_j v_jᵀ, readout S_jᵀ q̂_t (no scale).

    dt = softplus(dt_proj x + dt_bias), A = -exp(A_log), in fp32. Output: RMSNorm over
    all H·D of (readout · silu(g_proj x)), then ``o_proj``.
    Parameters (released names): ``dt_proj``, ``g_proj`` (weight [HS, hidden], bias [HS]);
    ``A_log``, ``dt_bias`` [HS]; ``norm.weight`` [HS·D]; ``o_proj.weight`` [HS, D, D].
    """

    rule = "ssd"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, norm_eps: float = 1e-5):
        super().__init__(hidden_size, num_heads, head_dim)
        H = num_heads
        self.dt_bias = nn.Parameter(torch.ones(H))  # [HS], the paper's init
        self.A_log = nn.Parameter(torch.arange(1, H + 1, dtype=torch.float32).log())  # [HS]
        self.norm = GatedRMSNorm(H, head_dim, norm_eps)
        self.dt_proj = nn.Linear(hidden_size, H, bias=True)
        self.g_proj = nn.Linear(hidden_size, H, bias=True)
        self.o_proj = GroupLinear(H, head_dim, head_dim)

    def A(self) -> torch.Tensor:
        return -self.A_log.float().exp()

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] -> (dt,) after softplus as [B, T, HS, 1] fp32."""
        return F.softplus(self.dt_proj(x).float() + self.dt_bias.float())[..., None]

    def readout(self, q, k, v, gates, lag, cu_seqlens=None):
        """As ``_Memory.readout``, through ``ssd_chunk_scan`` (x = v, B = k̂, C = q̂, one group per head)."""
        G = q.shape[2] // k.shape[2]
        # The scan takes one group count for B and C and x per head: k̂ and v are repeated to HS heads.
        x = v.repeat_interleave(G, dim=2)  # [B, T, HS, D]
        kh = l2norm(k).repeat_interleave(G, dim=2)  # [B, T, HS, D]
        # Chunk 64, not mamba's 256: the result does not depend on it (DESIGN §4), and the reference
        # backward's per-chunk [C, C] work made 256 about 2x slower in the distillation test.
        return ssd_chunk_scan(x, gates[..., 0], self.A(), kh, l2norm(q), 64, cu_seqlens=cu_seqlens, lag=lag)

    def output(self, mem: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.norm(mem, self.g_proj(x)))


MEMORIES = {"dn": DeltaNetMemory, "gdn": GatedDeltaNetMemory, "mamba2": Mamba2Memory}
