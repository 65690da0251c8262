"""``torch.ops.ahn.ahn_evict_update``: the AHN memory's decode step over the ring-buffer cache."""

from __future__ import annotations

import torch

from .. import _backend, _validate as check
from . import reference
from .reference import RULE_GATES

# ----------------------------------------------------------------------------
# 1. schema: mutates the state and the gate ring, returns only the readout.
# ----------------------------------------------------------------------------
torch.library.define(
    "ahn::ahn_evict_update",
    "(Tensor(a!) state, Tensor q, Tensor k_cache, Tensor v_cache, Tensor(b!) gates, Tensor gates_new, "
    "Tensor cache_seqlens, int window_size, int num_sinks, str rule, float scale, Tensor? A) -> Tensor",
)


# ----------------------------------------------------------------------------
# 2. device implementations
# ----------------------------------------------------------------------------
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common/dtype.h DType
_RULE_CODE = {"delta": 0, "gated_delta": 1, "ssd": 2}  # csrc/cache/cache.h MemoryRule


def _evict_update(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size, num_sinks, rule,
                  scale, A):
    # fp64 reaches the op only from tests (the public function rejects it): the reference serves it.
    backend = _backend.choose("ahn_evict_update", q.device.type)
    if backend in ("cpu", "triton") and q.dtype in _DTYPE_CODE and state.dtype == torch.float32:
        B, HS, _, V = state.shape
        o = q.new_empty(B, 1, HS, V)  # [B, 1, HS, V]
        if backend == "cpu":
            run_cpu(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size, num_sinks, rule,
                    scale, A, o)
        else:
            from .triton_evict import ahn_evict_update as run_triton
            run_triton(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size, num_sinks, rule,
                       scale, A, o)
        return o
    return reference.evict_update(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size,
                                  num_sinks, rule, scale, A)


def run_cpu(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size, num_sinks, rule, scale, A, o):
    """Run the compiled CPU step: mutates ``state`` and ``gates``, writes ``o`` [B, 1, HS, V] (contiguous).

    Reads only pointers, sizes and strides: no copy, no sync. Exposed so that tests can
    hand the kernel outputs inside red zones.
    """
    B, HS, K, V = state.shape
    p = _backend._C.EvictUpdateParams()
    p.state, p.q, p.k_cache, p.v_cache, p.gates, p.gates_new, p.cache_seqlens, p.o = (
        t.data_ptr() for t in (state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, o))
    p.A = 0 if A is None else A.data_ptr()
    p.B, p.HQ, p.HK, p.HS, p.K, p.V = B, q.shape[2], k_cache.shape[2], HS, K, V
    p.W, p.S, p.n_gates = window_size, num_sinks, gates.shape[3]
    p.state_sb, p.state_sh, p.state_sk = state.stride()[:3]
    p.q_sb, _, p.q_sh = q.stride()[:3]
    p.kc_sb, p.kc_st, p.kc_sh = k_cache.stride()[:3]
    p.vc_sb, p.vc_st, p.vc_sh = v_cache.stride()[:3]
    p.g_sb, p.g_st, p.g_sh = gates.stride()[:3]
    p.gn_sb, p.gn_sh = gates_new.stride()[:2]
    p.rule = _RULE_CODE[rule]
    p.scale = scale
    p.dtype = _DTYPE_CODE[q.dtype]
    _backend._C.launch_ahn_evict_update_cpu(p, torch.get_num_threads())


torch.library.impl("ahn::ahn_evict_update", "CPU", _evict_update)
torch.library.impl("ahn::ahn_evict_update", "CUDA", _evict_update)


# ----------------------------------------------------------------------------
# 3. fake (no autograd: an inference op)
# ----------------------------------------------------------------------------
@torch.library.register_fake("ahn::ahn_evict_update")
def _(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size, num_sinks, rule, scale, A):
    B, HS, _, V = state.shape
    return q.new_empty(B, 1, HS, V)


# ----------------------------------------------------------------------------
# 4. public function
# ----------------------------------------------------------------------------
def ahn_evict_update(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens, window_size, num_sinks, rule,
                     scale=None, A=None):
    """Fold the token leaving the window into the AHN memory state, in place, and read the memory with q.

    For each sequence b with p = cache_seqlens[b]: if e = p - W >= S, token e
    leaves the window; its k, v are read from slot S + (e - S) mod W of the
    cache (the slot the new token will take) and its arrival-time gates from
    gates[b, (e - S) mod W]; state[b] absorbs it with ``rule`` and
    o_mem = scale · stateᵀ q̂. Otherwise the memory is empty: o_mem = 0 and
    state[b] is untouched. Then, if p >= S, the new token's gates are stored
    in gates[b, (p - S) mod W]. Call it before ``swa_decode`` overwrites the
    slot. Does not advance cache_seqlens. No host sync.

    Args:
        state: [B, HS, K, V] fp32, mutated. HS = max(HQ, HK).
        q: [B, 1, HQ, K], the current token's (post-RoPE) query.
        k_cache: [B, S + W, HK, K]; v_cache: [B, S + W, HK, V]: the ring-buffer cache (read only).
        gates: [B, W, HS, n_gates] fp32 ring, mutated. gates_new: [B, HS, n_gates] fp32.
            "delta": (β,); "gated_delta": (β, g) with g <= 0 a log-decay; "ssd": (dt,) after softplus.
        cache_seqlens: [B] int32, the position of the new token.
        window_size: W >= 1. num_sinks: S >= 0. rule: "delta", "gated_delta" or "ssd".
        scale: readout scale, default K^-0.5 (1 for "ssd").
        A: [HS] fp32, = -exp(A_log), required for "ssd" only.
    Returns:
        o_mem [B, 1, HS, V] in q.dtype.
    """
    check.tensor("state", state, ndim=4, dims="B HS K V", dtypes=(torch.float32,))
    B, HS, K, V = state.shape
    check.window(window_size)
    check.sinks(num_sinks)
    L = num_sinks + window_size
    check.tensor("q", q, ndim=4, dims="B 1 HQ K")
    check.shape("q", q, (B, 1, None, K), "B 1 HQ K")
    check.tensor("k_cache", k_cache, ndim=4, dims="B S+W HK K")
    check.shape("k_cache", k_cache, (B, L, None, K), "B S+W HK K")
    HK = k_cache.shape[2]
    check.tensor("v_cache", v_cache, ndim=4, dims="B S+W HK V")
    check.shape("v_cache", v_cache, (B, L, HK, V), "B S+W HK V")
    check.same_dtype("q", q, k_cache=k_cache, v_cache=v_cache)
    check.head_dim("q", K)
    check.head_dim("v_cache", V)
    hs = check.state_heads(q.shape[2], HK, HK)
    check.shape("state", state, (B, hs, K, V), "B HS K V")
    if rule not in RULE_GATES:
        raise ValueError(f"rule: must be one of {tuple(RULE_GATES)}, got {rule!r}")
    n = RULE_GATES[rule]
    check.tensor("gates", gates, ndim=4, dims="B W HS n_gates", dtypes=(torch.float32,))
    check.shape("gates", gates, (B, window_size, HS, n), "B W HS n_gates")
    check.tensor("gates_new", gates_new, ndim=3, dims="B HS n_gates", dtypes=(torch.float32,))
    check.shape("gates_new", gates_new, (B, HS, n), "B HS n_gates")
    check.tensor("cache_seqlens", cache_seqlens, ndim=1, dims="B", dtypes=(torch.int32,))
    check.shape("cache_seqlens", cache_seqlens, (B,), "B")
    if rule == "ssd":
        if A is None:
            raise ValueError("A: required for rule 'ssd' ([HS] fp32, = -exp(A_log))")
        check.tensor("A", A, ndim=1, dims="HS", dtypes=(torch.float32,))
        check.shape("A", A, (HS,), "HS")
    elif A is not None:
        raise ValueError(f"A: only rule 'ssd' takes A, got rule {rule!r}")
    check.same_device("state", state, q=q, k_cache=k_cache, v_cache=v_cache, gates=gates, gates_new=gates_new,
                      cache_seqlens=cache_seqlens, A=A)
    # Reading positions from a GPU would sync every decode step; host tensors are free to check.
    if cache_seqlens.device.type == "cpu" and check.values_readable(cache_seqlens) and B \
            and int(cache_seqlens.min()) < 0:
        raise ValueError(f"cache_seqlens: positions must be >= 0, got {cache_seqlens.tolist()}")
    if scale is None:
        scale = 1.0 if rule == "ssd" else K ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a float or None, got {scale!r}")
    return torch.ops.ahn.ahn_evict_update(state, q, k_cache, v_cache, gates, gates_new, cache_seqlens,
                                          window_size, num_sinks, rule, float(scale), A)
