"""Benchmark cases shared by ``bench/`` (pytest-benchmark) and ``python -m ahn_kernels bench``.

A case is one op at one shape and mode, with several providers: ``ahn`` (our
public op, on whatever backend ``_backend.choose`` picks) and the peers a user
would otherwise pick. Every case names the peer its ratio is taken against, so
each reported speed-up compares two functions timed in the same run.

CPU peers: Hugging Face transformers' PyTorch fallbacks (Qwen3-Next's
``torch_recurrent_gated_delta_rule`` / ``torch_chunk_gated_delta_rule``,
Mamba2's ``mamba2_chunk_scan`` / ``mamba2_selective_state_update``), called
through ``inspect.unwrap`` so that no hub kernel replaces them, and
``scaled_dot_product_attention`` with an explicit window mask. GPU peers, where
importable: flash-linear-attention, mamba_ssm and flash-attention; on a GPU
they become the peer of their cases.
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
    rounds: dict[str, int] = field(default_factory=dict)  # provider -> timed runs without warm-up (peers taking seconds)

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


def matmul_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """GFLOP/s of ``torch.matmul`` on [n, n] x [n, n]: the machine's dense rate, for context."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2.0 * n ** 3 / time_fn(lambda: torch.matmul(a, b), reps=5) / 1e9


def _import(module: str, name: str):
    """``module.name`` if importable here, else None."""
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def _transformers(module: str, name: str):
    """A transformers function with its hub-kernel decorators peeled off (None if not installed)."""
    fn = _import(f"transformers.models.{module}.modeling_{module}", name)
    return None if fn is None else inspect.unwrap(fn)


def _gpu_peer(device: str, module: str, name: str):
    """A GPU library's op (flash-linear-attention, mamba_ssm, flash-attention) on CUDA, if importable."""
    return _import(module, name) if device == "cuda" else None


def _add(case: Case, name: str, fn, inputs, grad: bool) -> None:
    """Register provider ``name`` running ``fn`` (forward, or forward + backward w.r.t. ``inputs``)."""
    if fn is not None:
        case.providers[name] = (lambda: _fwd_bwd(fn, inputs)) if grad else (lambda: fn)


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
def _gdn_inputs(B, T, H, K, V, device, dtype, requires_grad, HK=None):
    """q [B, T, H, K], k [B, T, HK, K], v [B, T, HK, V] (HK = H unless given), g, beta [B, T, H]."""
    HK = HK or H
    q = _rand(B, T, H, K, device=device, dtype=dtype, requires_grad=requires_grad)
    k = _rand(B, T, HK, K, device=device, dtype=dtype, requires_grad=requires_grad)
    v = _rand(B, T, HK, V, device=device, dtype=dtype, requires_grad=requires_grad)
    g = F.logsigmoid(torch.randn(B, T, H, device=device)).requires_grad_(requires_grad)  # log-decay in (-inf, 0)
    beta = torch.rand(B, T, H, device=device).requires_grad_(requires_grad)
    return q, k, v, g, beta


def fused_recurrent_cases(device="cpu", dtype=torch.float32, T=2048, H=8, K=128, V=128) -> list[Case]:
    q, k, v, g, beta = _gdn_inputs(1, T, H, K, V, device, dtype, False)
    hf = _transformers("qwen3_next", "torch_recurrent_gated_delta_rule")
    label = f"B1 T{T} H{H} K{K} V{V} {str(dtype)[6:]} fwd"
    kw = dict(use_qk_l2norm_in_kernel=True, output_final_state=True)
    flops = 8.0 * T * H * K * V
    gdn = Case("fused_recurrent_gated_delta_rule", label, tokens=T, peer="transformers", flops=flops)
    _add(gdn, "ahn", lambda: ak.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kw), [], False)
    _add(gdn, "transformers", hf and (lambda: hf(q, k, v, g, beta, **kw)), [], False)
    fla = _gpu_peer(device, "fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule")
    _add(gdn, "fla", fla and (lambda: fla(q, k, v, g, beta, **kw)), [], False)
    dn = Case("fused_recurrent_delta_rule", label, tokens=T, peer="transformers", flops=flops)
    no_decay = torch.zeros_like(g)  # transformers has only the gated rule: DeltaNet is g = 0
    _add(dn, "ahn", lambda: ak.fused_recurrent_delta_rule(q, k, v, beta, **kw), [], False)
    _add(dn, "transformers", hf and (lambda: hf(q, k, v, no_decay, beta, **kw)), [], False)
    fla = _gpu_peer(device, "fla.ops.delta_rule", "fused_recurrent_delta_rule")
    _add(dn, "fla", fla and (lambda: fla(q, k, v, beta, **kw)), [], False)
    for case in (gdn, dn):
        if "fla" in case.providers:
            case.peer = "fla"
    return [gdn, dn]


CHUNK_T = (1024, 4096, 16384)  # the sequence lengths at B = 1, H = 8, K = V = 128
AHN_HEADS = (16, 2)            # (HQ, HK = HV): AHN's grouped k/v


def _chunk_case(op, device, dtype, T, HQ, HK, K, V, mode) -> Case:
    """One chunk_{gated_}delta_rule case. The peers have no grouped k/v: they get k, v repeated
    to HQ heads inside the timed call, as a user would; DeltaNet runs transformers' gated rule with g = 0."""
    grad, gated, C = mode == "fwd+bwd", op == "chunk_gated_delta_rule", 64
    q, k, v, g, beta = _gdn_inputs(1, T, HQ, K, V, device, dtype, grad, HK=HK)
    heads = f"H{HQ}" if HK == HQ else f"HQ{HQ} HK{HK}"
    flops = 2.0 * T * HQ * (3 * K * V + 3 * C * K + 2 * C * V)
    case = Case(op, f"B1 T{T} {heads} K{K} V{V} {str(dtype)[6:]} {mode}", tokens=T, peer="transformers",
                flops=None if grad else flops)
    if grad and T >= 16384:  # the peer takes ~36 s per call here
        case.rounds = {case.peer: 1}

    def expand(x):  # [1, T, HK, D] -> [1, T, HQ, D]: state head h reads k/v head h // (HQ // HK)
        return x if HK == HQ else x.repeat_interleave(HQ // HK, dim=2)

    kw = dict(use_qk_l2norm_in_kernel=True, output_final_state=True)
    hf = _transformers("qwen3_next", "torch_chunk_gated_delta_rule")
    fla = _gpu_peer(device, f"fla.ops.{'gated_' if gated else ''}delta_rule", op)
    if gated:
        inputs = [q, k, v, g, beta]
        ahn = lambda: ak.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
        peer = hf and (lambda: hf(q, expand(k), expand(v), g, beta, chunk_size=C, **kw))
        peer_fla = fla and (lambda: fla(q, expand(k), expand(v), g, beta, **kw))
    else:
        inputs = [q, k, v, beta]
        no_decay = torch.zeros_like(g).detach()  # [1, T, HQ]
        ahn = lambda: ak.chunk_delta_rule(q, k, v, beta, **kw)
        peer = hf and (lambda: hf(q, expand(k), expand(v), no_decay, beta, chunk_size=C, **kw))
        peer_fla = fla and (lambda: fla(q, expand(k), expand(v), beta, **kw))
    _add(case, "ahn", ahn, inputs, grad)
    _add(case, "transformers", peer, inputs, grad)
    _add(case, "fla", peer_fla, inputs, grad)
    if peer_fla is not None:
        case.peer = "fla"
    return case


def chunk_cases(op, device="cpu", dtype=torch.float32, Ts=CHUNK_T, ahn_T=4096, K=128, V=128) -> list[Case]:
    """``op`` (chunk_delta_rule or chunk_gated_delta_rule), forward and forward + backward:
    H = 8 at each T in ``Ts``, then AHN's heads (HQ = 16, HK = HV = 2) at ``ahn_T`` (None: not)."""
    shapes = [(T, 8, 8) for T in Ts] + ([(ahn_T, *AHN_HEADS)] if ahn_T else [])
    return [_chunk_case(op, device, dtype, T, HQ, HK, K, V, mode)
            for T, HQ, HK in shapes for mode in ("fwd", "fwd+bwd")]


# ----------------------------------------------------------------------------
# SSD
# ----------------------------------------------------------------------------
def _ssd_case(device, dtype, T, H, P, N, G, mode) -> Case:
    grad = mode == "fwd+bwd"
    x = _rand(1, T, H, P, device=device, dtype=dtype, requires_grad=grad)
    dt = _rand(1, T, H, device=device, dtype=torch.float32, requires_grad=grad)
    A = (-torch.rand(H, device=device) - 0.5).requires_grad_(grad)
    Bm = _rand(1, T, G, N, device=device, dtype=dtype, requires_grad=grad)
    Cm = _rand(1, T, G, N, device=device, dtype=dtype, requires_grad=grad)
    dt_bias = torch.randn(H, device=device).requires_grad_(grad)
    inputs = [x, dt, A, Bm, Cm, dt_bias]
    # FLOPs of the token-serial scan the CPU runs: decay, write and read of the [P, N] state per token
    # (two FMAs per element), and for the backward two more passes of three FMAs each (csrc/ssd/bwd_cpu.cpp).
    case = Case("ssd_chunk_scan", f"B1 T{T} H{H} P{P} N{N} G{G} {str(dtype)[6:]} {mode}", tokens=T,
                peer="transformers", flops=(16.0 if grad else 4.0) * T * H * P * N)
    kw = dict(dt_bias=dt_bias, dt_softplus=True, return_final_states=True)
    hf = _transformers("mamba2", "mamba2_chunk_scan")
    mamba = _gpu_peer(device, "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    _add(case, "ahn", lambda: ak.ssd_chunk_scan(x, dt, A, Bm, Cm, chunk_size=256, **kw), inputs, grad)
    _add(case, "transformers", hf and (lambda: hf(x, dt, A, Bm, Cm, 256, **kw)), inputs, grad)
    _add(case, "mamba_ssm", mamba and (lambda: mamba(x, dt, A, Bm, Cm, 256, **kw)), inputs, grad)
    if mamba is not None:
        case.peer = "mamba_ssm"
    return case


def ssd_cases(device="cpu", dtype=torch.float32, T=4096, H=8, P=64, N=128, G=1) -> list[Case]:
    return [_ssd_case(device, dtype, T, H, P, N, G, mode) for mode in ("fwd", "fwd+bwd")]


def ssd_long_cases(device="cpu", dtype=torch.float32, T=16384) -> list[Case]:
    """Forward + backward at T = 16384 on CPU, where transformers' backward turns superlinear (one timed run:
    its ~2 s per call); the GPU peers need no such case."""
    if device != "cpu":
        return []
    case = _ssd_case(device, dtype, T, 8, 64, 128, 1, "fwd+bwd")
    case.rounds = {case.peer: 1}
    return [case]


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
    _add(case, "ahn", lambda: ak.ssd_state_update(state, x, dt, A, Bm, Cm, dt_bias=dt_bias, dt_softplus=True),
         [], False)
    # Both peers want dt [B, H, P], A [H, P, N], dt_bias [H, P]: stride-0 views, as mamba's own callers pass.
    dt_x, A_x, bias_x = dt[..., None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N), dt_bias[:, None].expand(-1, P)
    mamba = _gpu_peer(device, "mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
    for name, fn in (("transformers", peer), ("mamba_ssm", mamba)):
        _add(case, name, fn and (lambda fn=fn: fn(state, x, dt_x, A_x, Bm, Cm, dt_bias=bias_x, dt_softplus=True)),
             [], False)
    if mamba is not None:
        case.peer = "mamba_ssm"
    return [case]


# ----------------------------------------------------------------------------
# sliding-window attention with sinks
# ----------------------------------------------------------------------------
def window_mask(T: int, window_size: int, num_sinks: int, device) -> torch.Tensor:
    """[T, T] bool: key j visible to query i iff j <= i and (i - j < W or j < S)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & ((i - j < window_size) | (j < num_sinks))


def _flex_window(q, k, v, W: int, S: int):
    """Provider factory: flex_attention, compiled, with the window + sinks rule as its mask_mod.

    q [B, HQ, T, D], k, v [B, HK, T, D]. The block mask and the compile (a minute on a CPU)
    happen when the provider is first built, not when the case is listed.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < W) | (kv_idx < S))

    def build():
        T = q.shape[2]
        block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device)
        flex = torch.compile(flex_attention, fullgraph=True)
        return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    return build


def _swa_case(device, dtype, T, HQ, HK, D, W, S, mode, flex=False) -> Case:
    grad = mode == "fwd+bwd"
    q = _rand(1, T, HQ, D, device=device, dtype=dtype, requires_grad=grad)
    k = _rand(1, T, HK, D, device=device, dtype=dtype, requires_grad=grad)
    v = _rand(1, T, HK, D, device=device, dtype=dtype, requires_grad=grad)
    mask = window_mask(T, W, S, device)
    case = Case("swa_attention", f"B1 T{T} HQ{HQ} HK{HK} D{D} W{W} S{S} {str(dtype)[6:]} {mode}", tokens=T,
                peer="sdpa_mask")
    _add(case, "ahn", lambda: ak.swa_attention(q, k, v, W, S), [q, k, v], grad)
    _add(case, "sdpa_mask", lambda: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True), [q, k, v], grad)
    # torch 2.13 raises NotImplementedError for flex_attention's backward on CPU: a forward peer there.
    if flex and (device != "cpu" or not grad) and _import("torch.nn.attention.flex_attention", "flex_attention"):
        case.providers["flex_attention"] = _flex_window(*(x.transpose(1, 2) for x in (q, k, v)), W, S)
    # flash-attention has no sink tokens: it runs the same window without them (the cost a user would see).
    fa = _gpu_peer(device, "flash_attn", "flash_attn_func")
    _add(case, "flash_attn", fa and (lambda: fa(q, k, v, causal=True, window_size=(W - 1, 0))), [q, k, v], grad)
    if fa is not None:
        case.peer = "flash_attn"
    return case


def swa_cases(device="cpu", dtype=torch.float32, T=4096, HQ=16, HK=2, D=128, W=512, S=64) -> list[Case]:
    return [_swa_case(device, dtype, T, HQ, HK, D, W, S, mode) for mode in ("fwd", "fwd+bwd")]


# ----------------------------------------------------------------------------
# AHN decode step (evict + memory update + attention) over the ring-buffer cache
# ----------------------------------------------------------------------------
def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


class ConcatTrimDecode:
    """The paper's gated-DeltaNet AHN decode step, re-expressed in plain PyTorch (the decode baseline).

    Its KV cache keeps the sinks and the window in position order, [B, HK, S + W, D]
    (Hugging Face's layout), and its gate cache [B, W, HS, 2] in arrival order. A step
    appends the new k/v with ``torch.cat``, repeats k/v over the query heads of each
    group (``repeat_kv``), concatenates again without the evicted key (index S) for
    attention (SDPA here, flash-attention in the paper), runs the recurrent memory step
    on the evicted token (GQA-expanded, in torch), then trims the evicted token from
    the K/V and gate caches by concatenation. About four window copies per step.
    """

    def __init__(self, B, HQ, HK, D, W, S, device, dtype):
        self.S, self.G = S, HQ // HK
        self.k = torch.randn(B, HK, S + W, D, device=device, dtype=dtype)  # [B, HK, S + W, D]
        self.v = torch.randn(B, HK, S + W, D, device=device, dtype=dtype)  # [B, HK, S + W, D]
        self.gates = _decode_gates(B, W, HQ, device=device)  # [B, W, HS, 2]
        self.state = torch.zeros(B, HQ, D, D, device=device)  # [B, HS, K, V] fp32

    def step(self, q, k, v, gates_new):
        """q [B, 1, HQ, D]; k, v [B, 1, HK, D]; gates_new [B, HS, 2] -> (attn [B, 1, HQ, D], mem [B, 1, HS, D])."""
        S, G = self.S, self.G
        k_all = torch.cat([self.k, k.transpose(1, 2)], dim=2)  # [B, HK, S + W + 1, D]
        v_all = torch.cat([self.v, v.transpose(1, 2)], dim=2)
        k_rep, v_rep = (x.repeat_interleave(G, dim=1) for x in (k_all, v_all))  # [B, HQ, S + W + 1, D]
        k_att = torch.cat([k_rep[:, :, :S], k_rep[:, :, S + 1:]], dim=2)  # [B, HQ, S + W, D]
        v_att = torch.cat([v_rep[:, :, :S], v_rep[:, :, S + 1:]], dim=2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k_att, v_att).transpose(1, 2)
        # memory: the evicted token (index S) with its arrival-time gates (the oldest in the gate cache)
        k_e = _l2norm(k_rep[:, :, S].float())  # [B, HS, K]
        v_e = v_rep[:, :, S].float()  # [B, HS, V]
        beta, g = self.gates[:, 0, :, 0], self.gates[:, 0, :, 1]  # [B, HS]
        state = torch.exp(g)[..., None, None] * self.state
        err = v_e - torch.einsum("bhkv,bhk->bhv", state, k_e)
        self.state = state + beta[..., None, None] * k_e[..., :, None] * err[..., None, :]
        mem = torch.einsum("bhkv,bhk->bhv", self.state, _l2norm(q[:, 0].float())) * q.shape[-1] ** -0.5
        self.k = torch.cat([k_all[:, :, :S], k_all[:, :, S + 1:]], dim=2).contiguous()
        self.v = torch.cat([v_all[:, :, :S], v_all[:, :, S + 1:]], dim=2).contiguous()
        self.gates = torch.cat([self.gates[:, 1:], gates_new[:, None]], dim=1)
        return attn, mem[:, None].to(q.dtype)


def _decode_gates(*shape, device) -> torch.Tensor:
    """Gated-DeltaNet gates [*shape, 2] fp32: β in (0, 1), log-decay g < 0."""
    return torch.stack([torch.rand(*shape, device=device), F.logsigmoid(torch.randn(*shape, device=device))], -1)


def decode_cases(device="cpu", dtype=torch.float32, W=4096, HQ=16, HK=2, D=128, S=64, B=1) -> list[Case]:
    """One AHN decode step (gated DeltaNet memory) with a full window: every step evicts a token.

    ``ahn`` is ``AHNCache.step`` (``ahn_evict_update`` + ``swa_decode``, in place);
    ``concat_trim`` the paper's procedure in plain PyTorch (``ConcatTrimDecode``);
    ``flash_attn`` (GPU) only the attention part, ``flash_attn_with_kvcache`` appending
    in place over a window of W + S keys (it has no sinks and no memory): a lower bound.
    """
    q = _rand(B, 1, HQ, D, device=device, dtype=dtype)
    k = _rand(B, 1, HK, D, device=device, dtype=dtype)
    v = _rand(B, 1, HK, D, device=device, dtype=dtype)
    gates = _decode_gates(B, HQ, device=device)  # [B, HS, 2]
    cache = ak.AHNCache.empty(B, W, S, HK, D, HQ, "gated_delta", dtype, device)
    for buf in (cache.k, cache.v):
        buf.normal_()
    cache.gates.copy_(_decode_gates(B, W, HQ, device=device))
    # The position stays put: each timed call is the same step, evicting, at a wrapped ring index.
    cache.positions.fill_(S + 3 * W + 5)
    baseline = ConcatTrimDecode(B, HQ, HK, D, W, S, device, dtype)
    case = Case("ahn_decode_step", f"B{B} HQ{HQ} HK{HK} D{D} W{W} S{S} gated_delta {str(dtype)[6:]}", tokens=B,
                peer="concat_trim")
    _add(case, "ahn", lambda: cache.step(q, k, v, gates), [], False)
    _add(case, "concat_trim", lambda: baseline.step(q, k, v, gates), [], False)
    fa = _gpu_peer(device, "flash_attn", "flash_attn_with_kvcache")
    if fa is not None:
        kc = _rand(B, S + W + 1, HK, D, device=device, dtype=dtype)  # [B, S + W + 1, HK, D]
        vc = _rand(B, S + W + 1, HK, D, device=device, dtype=dtype)
        seqlens = torch.full((B,), S + W, dtype=torch.int32, device=device)
        _add(case, "flash_attn", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens, causal=True,
                                            window_size=(W + S - 1, 0)), [], False)
    return [case]


def swa_long_cases(device="cpu", dtype=torch.float32, T=4096, HQ=8, HK=2, D=128, W=512, S=64) -> list[Case]:
    """Forward at 2T and 4T against SDPA (one timed run each: a minute at 4T on 2 CPU threads), at 2T
    also against flex_attention (its block mask at 4T builds [4T, 4T] int64 index grids: GBs), and
    its linearity in T at fixed W: 4T tokens against four calls on T tokens."""
    cases = [_swa_case(device, dtype, n * T, HQ, HK, D, W, S, "fwd", flex=n == 2) for n in (2, 4)]
    for case in cases:
        case.rounds = {"sdpa_mask": 1}
    q = _rand(1, 4 * T, HQ, D, device=device, dtype=dtype)
    k = _rand(1, 4 * T, HK, D, device=device, dtype=dtype)
    v = _rand(1, 4 * T, HK, D, device=device, dtype=dtype)
    parts = [(q[:, i * T:(i + 1) * T], k[:, i * T:(i + 1) * T], v[:, i * T:(i + 1) * T]) for i in range(4)]
    # Speed-up >= 1 / 1.1 means 4x the tokens cost <= 4.4x the time.
    linear = Case("swa_attention", f"linearity B1 T{4 * T} vs 4 x T{T} HQ{HQ} HK{HK} D{D} W{W} S{S} "
                  f"{str(dtype)[6:]} fwd", tokens=4 * T, peer="4 x T/4")
    _add(linear, "ahn", lambda: ak.swa_attention(q, k, v, W, S), [], False)
    _add(linear, "4 x T/4", lambda: [ak.swa_attention(*x, W, S) for x in parts], [], False)
    return cases + [linear]


def device_and_dtype(device: str | None = None) -> tuple[str, torch.dtype]:
    """Where benchmarks run (the GPU when present) and in which dtype (bf16 there: the GPU peers' dtype)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, (torch.bfloat16 if device == "cuda" else torch.float32)


def default_cases(device="cpu", quick: bool = False) -> list[Case]:
    """The table ``python -m ahn_kernels bench`` prints (``quick``: smaller T, for smoke runs)."""
    s = 4 if quick else 1
    device, dtype = device_and_dtype(device)
    T = 4096 // s
    return (fused_recurrent_cases(device, dtype, T=2048 // s)
            + chunk_cases("chunk_gated_delta_rule", device, dtype, Ts=(T,), ahn_T=T)
            + chunk_cases("chunk_delta_rule", device, dtype, Ts=(T,), ahn_T=None)
            + ssd_cases(device, dtype, T=4096 // s)
            + ssd_cases(device, dtype, T=4096 // s, H=16, P=128, N=128, G=16)  # AHN-Mamba2: a group per head
            + ([] if quick else ssd_long_cases(device, dtype))
            + ssd_state_update_cases(device, dtype)
            + swa_cases(device, dtype, T=4096 // s)
            + decode_cases(device, dtype)
            + ([] if quick else swa_long_cases(device, dtype)))
