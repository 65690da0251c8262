"""Benchmark cases shared by ``bench/`` (pytest-benchmark) and ``python -m ahn_kernels bench``.

A case is one op at one shape and mode, with several providers: ``ahn`` (our
public op, on whatever backend ``_backend.choose`` picks) and the peers a user
would otherwise pick. Every case names the peer its ratio is taken against, so
each reported speed-up compares two functions timed in the same run.

CPU peers: Hugging Face transformers' PyTorch fallbacks (Qwen3-Next's
``torch_recurrent_gated_delta_rule`` / ``torch_chunk_gated_delta_rule``,
Mamba2's ``mamba2_chunk_scan`` / ``mamba2_selective_state_update``), called
through ``inspect.unwrap`` so that no hub kernel replaces them, and
``scaled_dot_product_attention`` with an explicit window mask.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import ahn_kernels as ak


@dataclass
class Case:
    op: str
    label: str
    tokens: int                      # tokens processed per call (for tokens/s)
    peer: str                        # provider the speed-up is measured against
    providers: dict[str, Callable[[], Callable[[], object]]] = field(default_factory=dict)
    flops: float | None = None       # useful FLOPs per call of the ahn algorithm, if counted

    @property
    def name(self) -> str:
        return f"{self.op} {self.label}"


def time_fn(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5) -> float:
    """Median wall time in seconds of ``fn()`` over ``reps`` runs (CUDA work is synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _transformers(module: str, name: str):
    """A transformers function with its hub-kernel decorators peeled off (None if not installed)."""
    try:
        mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[name])
    except ImportError:
        return None
    return inspect.unwrap(getattr(mod, name))


def _fwd_bwd(fn: Callable[[], tuple], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """Forward, then backward of the sum of the first output (the upstream gradient is all ones)."""
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    return run


def _rand(*shape, device, dtype, requires_grad=False):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------
# delta rule family
# ----------------------------------------------------------------------------
def _gdn_inputs(B, T, H, K, V, device, dtype, requires_grad):
    q = _rand(B, T, H, K, device=device, dtype=dtype, requires_grad=requires_grad)
    k = _rand(B, T, H, K, device=device, dtype=dtype, requires_grad=requires_grad)
    v = _rand(B, T, H, V, device=device, dtype=dtype, requires_grad=requires_grad)
    g = F.logsigmoid(torch.randn(B, T, H, device=device)).requires_grad_(requires_grad)  # log-decay in (-inf, 0)
    beta = torch.rand(B, T, H, device=device).requires_grad_(requires_grad)
    return q, k, v, g, beta


def fused_recurrent_cases(device="cpu", dtype=torch.float32, T=2048, H=8, K=128, V=128) -> list[Case]:
    q, k, v, g, beta = _gdn_inputs(1, T, H, K, V, device, dtype, False)
    peer = _transformers("qwen3_next", "torch_recurrent_gated_delta_rule")
    label = f"B1 T{T} H{H} K{K} V{V} {str(dtype)[6:]}"
    cases = []
    for gated in (True, False):
        op = "fused_recurrent_gated_delta_rule" if gated else "fused_recurrent_delta_rule"
        gate = g if gated else torch.zeros_like(g)
        case = Case(op, label + " fwd", tokens=T, peer="transformers", flops=8.0 * T * H * K * V)
        if gated:
            case.providers["ahn"] = lambda: lambda: ak.fused_recurrent_gated_delta_rule(
                q, k, v, g, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)
        else:
            case.providers["ahn"] = lambda: lambda: ak.fused_recurrent_delta_rule(
                q, k, v, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)
        if peer is not None:
            case.providers["transformers"] = (lambda gate=gate: lambda: peer(
                q, k, v, gate, beta, output_final_state=True, use_qk_l2norm_in_kernel=True))
        cases.append(case)
    return cases


def chunk_gated_delta_rule_cases(device="cpu", dtype=torch.float32, T=4096, H=8, K=128, V=128) -> list[Case]:
    peer = _transformers("qwen3_next", "torch_chunk_gated_delta_rule")
    label = f"B1 T{T} H{H} K{K} V{V} {str(dtype)[6:]}"
    C = 64
    flops = 2.0 * T * H * (3 * K * V + 3 * C * K + 2 * C * V)
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        grad = mode != "fwd"
        inputs = _gdn_inputs(1, T, H, K, V, device, dtype, grad)
        q, k, v, g, beta = inputs
        case = Case("chunk_gated_delta_rule", f"{label} {mode}", tokens=T, peer="transformers",
                    flops=flops if not grad else None)
        ours = lambda: ak.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
                                                 output_final_state=True)
        theirs = (lambda: peer(q, k, v, g, beta, chunk_size=C, output_final_state=True,
                               use_qk_l2norm_in_kernel=True)) if peer is not None else None
        for name, fn in (("ahn", ours), ("transformers", theirs)):
            if fn is None:
                continue
            case.providers[name] = (lambda fn=fn: _fwd_bwd(fn, list(inputs))) if grad else (lambda fn=fn: fn)
        cases.append(case)
    return cases


# ----------------------------------------------------------------------------
# SSD
# ----------------------------------------------------------------------------
def ssd_cases(device="cpu", dtype=torch.float32, T=4096, H=8, P=64, N=128, G=1) -> list[Case]:
    peer = _transformers("mamba2", "mamba2_chunk_scan")
    label = f"B1 T{T} H{H} P{P} N{N} G{G} {str(dtype)[6:]}"
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        grad = mode != "fwd"
        x = _rand(1, T, H, P, device=device, dtype=dtype, requires_grad=grad)
        dt = _rand(1, T, H, device=device, dtype=torch.float32, requires_grad=grad)
        A = (-torch.rand(H, device=device) - 0.5).requires_grad_(grad)
        Bm = _rand(1, T, G, N, device=device, dtype=dtype, requires_grad=grad)
        Cm = _rand(1, T, G, N, device=device, dtype=dtype, requires_grad=grad)
        dt_bias = torch.randn(H, device=device).requires_grad_(grad)
        inputs = [x, dt, A, Bm, Cm, dt_bias]
        case = Case("ssd_chunk_scan", f"{label} {mode}", tokens=T, peer="transformers")
        ours = lambda: ak.ssd_chunk_scan(x, dt, A, Bm, Cm, chunk_size=256, dt_bias=dt_bias, dt_softplus=True,
                                         return_final_states=True)
        theirs = (lambda: peer(x, dt, A, Bm, Cm, 256, dt_bias=dt_bias, dt_softplus=True,
                               return_final_states=True)) if peer is not None else None
        for name, fn in (("ahn", ours), ("transformers", theirs)):
            if fn is None:
                continue
            case.providers[name] = (lambda fn=fn: _fwd_bwd(fn, inputs)) if grad else (lambda fn=fn: fn)
        cases.append(case)
    return cases


def ssd_state_update_cases(device="cpu", dtype=torch.float32, batch=16, H=8, P=64, N=128, G=1) -> list[Case]:
    peer = _transformers("mamba2", "mamba2_selective_state_update")
    state = torch.randn(batch, H, P, N, device=device)
    x = _rand(batch, H, P, device=device, dtype=dtype)
    dt = torch.randn(batch, H, device=device)
    A = -torch.rand(H, device=device) - 0.5
    Bm = _rand(batch, G, N, device=device, dtype=dtype)
    Cm = _rand(batch, G, N, device=device, dtype=dtype)
    dt_bias = torch.randn(H, device=device)
    case = Case("ssd_state_update", f"B{batch} H{H} P{P} N{N} G{G} {str(dtype)[6:]}", tokens=batch,
                peer="transformers")
    case.providers["ahn"] = lambda: lambda: ak.ssd_state_update(state, x, dt, A, Bm, Cm, dt_bias=dt_bias,
                                                                dt_softplus=True)
    if peer is not None:  # it wants dt [B, H, P], A [H, P, N], dt_bias [H, P]: stride-0 views, as mamba's callers pass
        dt_x, A_x, bias_x = dt[..., None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N), dt_bias[:, None].expand(-1, P)
        case.providers["transformers"] = lambda: lambda: peer(state, x, dt_x, A_x, Bm, Cm, dt_bias=bias_x,
                                                              dt_softplus=True)
    return [case]


# ----------------------------------------------------------------------------
# sliding-window attention with sinks
# ----------------------------------------------------------------------------
def window_mask(T: int, window_size: int, num_sinks: int, device) -> torch.Tensor:
    """[T, T] bool: key j visible to query i iff j <= i and (i - j < W or j < S)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & ((i - j < window_size) | (j < num_sinks))


def swa_cases(device="cpu", dtype=torch.float32, T=4096, HQ=16, HK=2, D=128, W=512, S=64) -> list[Case]:
    label = f"B1 T{T} HQ{HQ} HK{HK} D{D} W{W} S{S} {str(dtype)[6:]}"
    mask = window_mask(T, W, S, device)
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        grad = mode != "fwd"
        q = _rand(1, T, HQ, D, device=device, dtype=dtype, requires_grad=grad)
        k = _rand(1, T, HK, D, device=device, dtype=dtype, requires_grad=grad)
        v = _rand(1, T, HK, D, device=device, dtype=dtype, requires_grad=grad)
        case = Case("swa_attention", f"{label} {mode}", tokens=T, peer="sdpa_mask")
        ours = lambda: ak.swa_attention(q, k, v, W, S)
        theirs = lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True)
        for name, fn in (("ahn", ours), ("sdpa_mask", theirs)):
            case.providers[name] = (lambda fn=fn: _fwd_bwd(fn, [q, k, v])) if grad else (lambda fn=fn: fn)
        cases.append(case)
    return cases


def default_cases(device="cpu", quick: bool = False) -> list[Case]:
    """The table ``python -m ahn_kernels bench`` prints (``quick``: smaller T, for smoke runs)."""
    s = 4 if quick else 1
    return (fused_recurrent_cases(device, T=2048 // s)
            + chunk_gated_delta_rule_cases(device, T=4096 // s)
            + ssd_cases(device, T=4096 // s)
            + ssd_state_update_cases(device)
            + swa_cases(device, T=4096 // s))
