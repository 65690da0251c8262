"""The GPU reliability suite (run by ``bench/gpu_suite.sh``): the failures parity tests miss.

Every test here is marked ``cuda`` and skipped without a GPU, except
``test_cases_pass_on_cpu``, which checks in CPU CI that the cases themselves
are sound, so that a lent GPU's minutes are never spent on a broken builder.

- ``test_tiny_run``: a tiny forward + backward + varlen + decode run of every op
  on every CUDA backend its ``KERNELS`` row lists, against the fp64 reference;
  small enough that ``compute-sanitizer`` (memcheck, racecheck, initcheck,
  synccheck) runs all of it in seconds.
- ``test_graph_*``: one AHN decode step (``AHNCache.step``: ``ahn_evict_update``
  + ``swa_decode``) and one varlen prefill (``swa_attention`` + lagged
  ``chunk_gated_delta_rule``) captured in a CUDA graph, then replayed after new
  contents (and new sequence lengths) are copied into the captured buffers:
  bitwise equal to eager runs.
- ``test_side_stream``: the same runs on a non-default stream whose inputs are
  written only after a GPU sleep on that stream; a kernel launched on any
  other stream reads the stale inputs and differs.
- ``test_past_2_31``: inputs (and a decode cache) whose far tokens sit past
  element 2^31 of one ~4 GiB bf16 buffer, bitwise equal to the same values in
  compact tensors (int32 offsets wrap there).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import ahn_kernels as ak
from ahn_kernels import _backend, _index, testing
from ahn_kernels.cache import reference as cache_ref
from ahn_kernels.delta_rule import reference as delta_ref
from ahn_kernels.ssd import reference as ssd_ref
from ahn_kernels.swa import reference as swa_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GATE_GRADS = {"dg", "dbeta", "ddt", "dA", "dD", "ddt_bias"}
# Packed sequences: an empty one, a decode-sized one, one inside a chunk, one across a chunk edge.
LENGTHS = (0, 1, 17, 70)
T_PACKED = sum(LENGTHS)
# AHN's grouped-KV heads (HQ, HK, HV); odd head dims exercise the masked tails.
HEADS = (4, 2, 2)
HS = max(HEADS)
K, V, D = 33, 20, 40
W, S = 8, 2  # window, sinks
AHN_RULES = ("delta", "gated_delta", "ssd")
DEV = "cuda"  # the device of every GPU test's tensors (the helpers also run on the CPU)


@dataclass(frozen=True)
class Case:
    """One op's tiny run: ``make(dtype)`` gives CPU inputs, ``run`` calls the public op, ``ref`` the fp64 oracle.

    ``run`` and ``ref`` take the inputs dict and return a dict of results; ops that
    mutate their arguments work on clones and return the mutated tensors too.
    """

    make: Callable[[torch.dtype], dict]
    run: Callable[[dict], dict]
    ref: Callable[[dict], dict]


def _delta_case(name: str, differentiable: bool) -> Case:
    gated = "gated" in name

    def make(dtype):
        return testing.make_delta_inputs(1, T_PACKED, HEADS, K, V, gated=gated, dtype=dtype, lengths=LENGTHS,
                                         initial_state=True, unit_keys=False, requires_grad=differentiable)

    def run(d):
        gates = (d["g"], d["beta"]) if gated else (d["beta"],)
        o, ht = getattr(ak, name)(d["q"], d["k"], d["v"], *gates, initial_state=d["initial_state"],
                                  output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=d["cu_seqlens"])
        return {"o": o, "final_state": ht}

    def ref(d):
        o, ht = delta_ref.recurrent(d["q"], d["k"], d["v"], d["beta"], d.get("g"), None, d["initial_state"],
                                    d["cu_seqlens"], use_qk_l2norm=True)
        return {"o": o, "final_state": ht}

    return Case(make, run, ref)


def _ssd_scan_case() -> Case:
    def make(dtype):
        return testing.make_ssd_inputs(1, T_PACKED, 4, 5, 7, 2, dtype=dtype, D="H", z=True, dt_bias=True,
                                       initial_states=True, lengths=LENGTHS, requires_grad=True)

    def run(d):
        kw = {n: t for n, t in d.items() if n not in ("x", "dt", "A", "B", "C")}
        y, ht = ak.ssd_chunk_scan(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size=64, return_final_states=True,
                                  **kw)
        return {"y": y, "final_states": ht}

    def ref(d):
        y, ht = ssd_ref.recurrent(**d)
        return {"y": y, "final_states": ht}

    return Case(make, run, ref)


def _ssd_update_case() -> Case:
    Bsz, H, P, N, G = 3, 4, 5, 7, 2

    def make(dtype):
        return dict(state=torch.randn(Bsz + 2, H, P, N),  # [N, H, P, N_state], rows picked by index
                    x=torch.randn(Bsz, H, P).to(dtype), dt=torch.rand(Bsz, H), A=-torch.rand(H) - 0.5,
                    B=torch.randn(Bsz, G, N).to(dtype), C=torch.randn(Bsz, G, N).to(dtype),
                    D=torch.rand(H), z=torch.randn(Bsz, H, P).to(dtype), dt_bias=torch.randn(H),
                    state_batch_indices=torch.tensor([4, 0, 2], dtype=torch.int32))

    def step(fn, d):
        state = d["state"].clone()
        y = fn(state, **{n: t for n, t in d.items() if n != "state"}, dt_softplus=True)
        return {"y": y, "state": state}

    return Case(make, lambda d: step(ak.ssd_state_update, d), lambda d: step(ssd_ref.state_update, d))


def _swa_attention_case() -> Case:
    def make(dtype):
        q, k, v = testing.swa_inputs(1, T_PACKED, HEADS[0], HEADS[1], D, dtype=dtype, requires_grad=True)
        return dict(q=q, k=k, v=v, cu_seqlens=testing.seqlens_to_cu(LENGTHS, dtype=torch.int32))

    def run(d):
        return {"o": ak.swa_attention(d["q"], d["k"], d["v"], W, S, cu_seqlens=d["cu_seqlens"])}

    def ref(d):
        return {"o": swa_ref.masked(d["q"], d["k"], d["v"], W, S, None, d["cu_seqlens"])[0]}

    return Case(make, run, ref)


# Decode rows: before any eviction, just before the ring wraps, long after it.
POSITIONS = (1, S + W - 1, 5 * W + 3)


def _decode_inputs(dtype) -> dict:
    Bsz, (HQ, HK, _) = len(POSITIONS), HEADS
    return dict(q=torch.randn(Bsz, 1, HQ, D).to(dtype),
                k_cache=torch.randn(Bsz, S + W, HK, D).to(dtype), v_cache=torch.randn(Bsz, S + W, HK, D).to(dtype),
                k_new=torch.randn(Bsz, 1, HK, D).to(dtype), v_new=torch.randn(Bsz, 1, HK, D).to(dtype),
                cache_seqlens=torch.tensor(POSITIONS, dtype=torch.int32))


def _swa_decode_case() -> Case:
    def step(fn, d, scale):
        kc, vc = d["k_cache"].clone(), d["v_cache"].clone()
        o = fn(d["q"], kc, vc, d["k_new"], d["v_new"], d["cache_seqlens"], W, S, scale)
        return {"o": o, "k_cache": kc, "v_cache": vc}

    return Case(_decode_inputs, lambda d: step(ak.swa_decode, d, None),
                lambda d: step(swa_ref.decode, d, D ** -0.5))


def _evict_case() -> Case:
    Bsz = len(POSITIONS)

    def make(dtype):
        d = _decode_inputs(dtype)
        d["state"] = torch.randn(Bsz, HS, D, D) * 0.1  # [B, HS, K, V]
        d["A"] = testing.ahn_A(HS)
        for rule in AHN_RULES:
            d[f"gates_{rule}"] = testing.ahn_gates(rule, Bsz, W, HS)  # [B, W, HS, n_gates]
            d[f"gates_new_{rule}"] = testing.ahn_gates(rule, Bsz, HS)  # [B, HS, n_gates]
        return d

    def step(fn, d, default_scale):
        out = {}
        for rule in AHN_RULES:
            state, gates = d["state"].clone(), d[f"gates_{rule}"].clone()
            scale = 1.0 if rule == "ssd" else default_scale
            out[f"o_mem_{rule}"] = fn(state, d["q"], d["k_cache"], d["v_cache"], gates, d[f"gates_new_{rule}"],
                                      d["cache_seqlens"], W, S, rule, scale, d["A"] if rule == "ssd" else None)
            out[f"state_{rule}"], out[f"gates_{rule}"] = state, gates
        return out

    return Case(make, lambda d: step(ak.ahn_evict_update, d, None), lambda d: step(cache_ref.evict_update, d, D ** -0.5))


# One case per op family: an op and its ``_bwd`` share the forward's case.
CASES = {
    "chunk_delta_rule": _delta_case("chunk_delta_rule", True),
    "chunk_gated_delta_rule": _delta_case("chunk_gated_delta_rule", True),
    "fused_recurrent_delta_rule": _delta_case("fused_recurrent_delta_rule", False),
    "fused_recurrent_gated_delta_rule": _delta_case("fused_recurrent_gated_delta_rule", False),
    "ssd_chunk_scan": _ssd_scan_case(),
    "ssd_state_update": _ssd_update_case(),
    "swa_attention": _swa_attention_case(),
    "swa_decode": _swa_decode_case(),
    "ahn_evict_update": _evict_case(),
}


def _family_ops(family: str) -> list[str]:
    return [op for op in _backend.KERNELS if op.removesuffix("_bwd") == family]


def _kernel_backends(*ops: str) -> list[str]:
    """The compiled CUDA-tensor backends any of ``ops`` lists, in ``BACKENDS`` order."""
    listed = {b for op in ops for b in _backend.KERNELS[op]["cuda"]}
    return [b for b in _backend.BACKENDS if b in listed]


FAMILY_BACKENDS = [(f, b) for f in CASES for b in _kernel_backends(*_family_ops(f))]


def _moved(inputs: dict, device, float_dtype=None) -> dict:
    """Copies of ``inputs`` on ``device`` (floats in ``float_dtype`` if given), each keeping its requires_grad."""
    out = {}
    for n, t in inputs.items():
        if isinstance(t, torch.Tensor):
            grad = t.requires_grad
            t = t.detach().to(device)
            if float_dtype is not None and t.is_floating_point():
                t = t.to(float_dtype)
            t = t.clone().requires_grad_(grad)
        out[n] = t
    return out


def _evaluate(fn, inputs: dict, upstream: dict) -> dict:
    """``fn``'s results and, for each ``upstream`` gradient, the gradients of every input that requires one."""
    return _with_grads(fn(inputs), inputs, upstream)


def _with_grads(outs: dict, inputs: dict, upstream: dict) -> dict:
    if upstream:
        leaves = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        loss = sum((outs[n].double() * upstream[n].to(outs[n].device)).sum() for n in upstream)
        grads = torch.autograd.grad(loss, [inputs[n] for n in leaves])
        outs.update({f"d{n}": g for n, g in zip(leaves, grads)})
    return {n: t.detach() for n, t in outs.items()}


@functools.cache  # backends share it; callers copy the inputs (``_moved``) and never write into the dicts
def _oracle(family: str, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """(CPU inputs, fp64 reference results with gradients, upstream gradients) for a family's case, seeded."""
    case = CASES[family]
    torch.manual_seed(0)
    inputs = case.make(dtype)
    ref_in = _moved(inputs, "cpu", torch.float64)
    outs = case.ref(ref_in)
    upstream = {n: torch.randn_like(t) for n, t in outs.items() if t.requires_grad}
    return inputs, _with_grads(outs, ref_in, upstream), upstream


def _assert_matches_oracle(got: dict, expected: dict, dtype: torch.dtype) -> None:
    assert got.keys() == expected.keys(), f"results {sorted(got)} != reference {sorted(expected)}"
    for name, want in expected.items():
        kind = "gate" if name in GATE_GRADS else ("grad" if name.startswith("d") else "out")
        testing.assert_close(name, got[name].cpu(), want, testing.tolerance(dtype, kind))


def _assert_equal(what: str, got: dict, want: dict) -> None:
    for name in want:
        a, b = got[name], want[name]
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item()
            raise AssertionError(f"{what}: {name} differs (max |diff| {diff:.3e})")


def _require_kernels(ops, backend: str) -> None:
    """Fail unless every op listing ``backend`` has it built here, and check it is the one chosen."""
    for op in ops:
        if backend in _backend.KERNELS[op]["cuda"]:
            if backend not in _backend.available(op, "cuda"):
                pytest.fail(f"{backend} backend missing for {op} on this GPU build: {_backend.build_info()}")
            assert _backend.choose(op, "cuda") == backend


# ----------------------------------------------------------------------------
# (a) tiny runs: the sanitizer stage of bench/gpu_suite.sh runs exactly these.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("family, backend", FAMILY_BACKENDS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_run(family, backend, dtype):
    inputs, expected, upstream = _oracle(family, dtype)
    with ak.use_backend(backend):
        _require_kernels(_family_ops(family), backend)
        got = _evaluate(CASES[family].run, _moved(inputs, DEV), upstream)
    torch.cuda.synchronize()
    _assert_matches_oracle(got, expected, dtype)


@pytest.mark.parametrize("family", CASES)
def test_cases_pass_on_cpu(family):
    """The GPU cases, run on the CPU backends: every KERNELS op has a case and each case is sound."""
    assert set(CASES) == {op.removesuffix("_bwd") for op in _backend.KERNELS}
    inputs, expected, upstream = _oracle(family, torch.float32)
    _assert_matches_oracle(_evaluate(CASES[family].run, _moved(inputs, "cpu"), upstream), expected, torch.float32)


# ----------------------------------------------------------------------------
# (c) a side stream: kernels must run on the caller's current stream.
# ----------------------------------------------------------------------------
SLEEP_CYCLES = 200_000_000  # ~0.1 s at 2 GHz, far longer than launching one tiny op from Python


@pytest.mark.parametrize("family, backend", FAMILY_BACKENDS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_side_stream(family, backend):
    """Inputs are written on the side stream after a GPU sleep there; the op runs on that stream.

    torch's side streams do not synchronise with the legacy default stream, so
    a kernel launched on any stream but the current one runs during the sleep,
    reads the stale inputs, and its results differ from the default-stream run.
    """
    case = CASES[family]
    fresh = _moved(case.make(torch.float32), DEV)
    torch.manual_seed(1)
    stale = _moved(case.make(torch.float32), DEV)
    outs = case.run(_moved(fresh, DEV))
    upstream = {n: torch.randn_like(t) for n, t in outs.items() if t.requires_grad}
    with ak.use_backend(backend):
        _require_kernels(_family_ops(family), backend)
        want = _evaluate(case.run, _moved(fresh, DEV), upstream)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(SLEEP_CYCLES)
            with torch.no_grad():
                for n, t in stale.items():
                    if isinstance(t, torch.Tensor):
                        t.copy_(fresh[n])
            got = _evaluate(case.run, stale, upstream)
    torch.cuda.synchronize()
    _assert_equal(f"{family} on a side stream", got, want)


# ----------------------------------------------------------------------------
# (b) CUDA graphs: decode step and varlen prefill, replayed with new contents.
# ----------------------------------------------------------------------------
def _require_compiled(ops, backend: str) -> None:
    """A captured step needs a kernel for every op: the reference reads lengths on the host."""
    _require_kernels(ops, backend)
    for op in ops:
        chosen = _backend.choose(op, "cuda")
        if chosen == "reference":
            pytest.fail(f"{op} has no compiled CUDA kernel, so this step cannot be captured")


def _capture(fn):
    """Warm ``fn`` up on a side stream (JIT compilation, lazy init), then capture it; returns (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(warmup=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn(warmup=False)
    return graph, outs


DECODE_OPS = ("ahn_evict_update", "swa_decode")
# Positions per round: fresh rows, rows evicting sinks-adjacent slots, rows long past the window.
DECODE_ROUNDS = ((0, S + W - 1, 5 * W + 3), (S, S + W, 2 * W + S + 1))
DECODE_STEPS = 3


def _fill_decode(cache: ak.AHNCache, step_in: dict, positions) -> None:
    """Copy new random contents into an AHN cache and a step's inputs, in place."""
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    cache.gates.copy_(testing.ahn_gates(cache.rule, *cache.gates.shape[:3], device=cache.gates.device))
    cache.state.copy_(torch.randn_like(cache.state) * 0.1)
    cache.positions.copy_(torch.tensor(positions, dtype=torch.int32))
    for n in ("q", "k", "v"):
        step_in[n].copy_(torch.randn_like(step_in[n]))
    step_in["gates_new"].copy_(testing.ahn_gates(cache.rule, *step_in["gates_new"].shape[:2],
                                                 device=cache.gates.device))


def _clone_cache(cache: ak.AHNCache) -> ak.AHNCache:
    return dataclasses.replace(cache, k=cache.k.clone(), v=cache.v.clone(), gates=cache.gates.clone(),
                               state=cache.state.clone(), positions=cache.positions.clone())


def _cache_contents(cache: ak.AHNCache) -> dict:
    return {n: getattr(cache, n) for n in ("k", "v", "gates", "state", "positions")}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", _kernel_backends(*DECODE_OPS))
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_decode_step(backend, dtype):
    Bsz, (HQ, HK, _) = len(DECODE_ROUNDS[0]), HEADS
    cache = ak.AHNCache.empty(Bsz, W, S, HK, D, HS, "gated_delta", dtype, DEV)
    step_in = dict(q=torch.empty(Bsz, 1, HQ, D, dtype=dtype, device=DEV),  # [B, 1, HQ, D]
                   k=torch.empty(Bsz, 1, HK, D, dtype=dtype, device=DEV),  # [B, 1, HK, D]
                   v=torch.empty(Bsz, 1, HK, D, dtype=dtype, device=DEV),  # [B, 1, HK, D]
                   gates_new=torch.empty(Bsz, HS, 2, device=DEV))  # [B, HS, 2]
    _fill_decode(cache, step_in, DECODE_ROUNDS[0])
    with ak.use_backend(backend):
        _require_compiled(DECODE_OPS, backend)

        def step(warmup):
            c = _clone_cache(cache) if warmup else cache  # warm-up must not advance the captured cache
            return c.step(step_in["q"], step_in["k"], step_in["v"], step_in["gates_new"])

        graph, (attn, mem) = _capture(step)
        for positions in DECODE_ROUNDS:
            _fill_decode(cache, step_in, positions)
            eager = _clone_cache(cache)
            for i in range(DECODE_STEPS):
                want_attn, want_mem = eager.step(step_in["q"], step_in["k"], step_in["v"], step_in["gates_new"])
                graph.replay()
                torch.cuda.synchronize()
                what = f"decode step {i} from positions {positions}"
                _assert_equal(what, {"attn": attn, "mem": mem, **_cache_contents(cache)},
                              {"attn": want_attn, "mem": want_mem, **_cache_contents(eager)})


PREFILL_OPS = ("swa_attention", "chunk_gated_delta_rule")
# Same N and packed length per round: the graph's shapes are fixed, the lengths are data.
PREFILL_ROUNDS = ((0, 1, 17, 70), (70, 17, 1, 0), (22, 22, 22, 22))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", _kernel_backends(*PREFILL_OPS))
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_varlen_prefill(backend, dtype):
    """swa_attention + lagged chunk_gated_delta_rule (one AHN layer's prefill) under a graph, new lengths each round."""
    HQ, HK, _ = HEADS
    buf = dict(q=torch.empty(1, T_PACKED, HQ, D, dtype=dtype, device=DEV),  # [1, T, HQ, D]
               k=torch.empty(1, T_PACKED, HK, D, dtype=dtype, device=DEV),  # [1, T, HK, D]
               v=torch.empty(1, T_PACKED, HK, D, dtype=dtype, device=DEV),  # [1, T, HK, D]
               g=torch.empty(1, T_PACKED, HS, device=DEV),  # [1, T, HS]
               beta=torch.empty(1, T_PACKED, HS, device=DEV),  # [1, T, HS]
               h0=torch.empty(len(LENGTHS), HS, D, D, device=DEV),  # [N, HS, K, V]
               cu=torch.empty(len(LENGTHS) + 1, dtype=torch.int32, device=DEV))  # [N + 1]

    def fill(lengths):
        d = testing.make_delta_inputs(1, T_PACKED, (HQ, HK, HK), D, D, dtype=dtype, lengths=lengths,
                                      initial_state=True, unit_keys=False)
        for n, src in (("q", d["q"]), ("k", d["k"]), ("v", d["v"]), ("g", d["g"]), ("beta", d["beta"]),
                       ("h0", d["initial_state"]), ("cu", d["cu_seqlens"])):
            buf[n].copy_(src)

    def layer(b):
        attn = ak.swa_attention(b["q"], b["k"], b["v"], W, S, cu_seqlens=b["cu"])
        mem, ht = ak.chunk_gated_delta_rule(b["q"], b["k"], b["v"], b["g"], b["beta"], initial_state=b["h0"],
                                            output_final_state=True, use_qk_l2norm_in_kernel=True,
                                            cu_seqlens=b["cu"], lag=(W, S))
        return {"attn": attn, "mem": mem, "final_state": ht}

    fill(PREFILL_ROUNDS[0])
    with ak.use_backend(backend):
        _require_compiled(PREFILL_OPS, backend)
        graph, outs = _capture(lambda warmup: layer(buf))
        for lengths in PREFILL_ROUNDS:
            fill(lengths)
            want = layer({n: t.clone() for n, t in buf.items()})
            graph.replay()
            torch.cuda.synchronize()
            _assert_equal(f"prefill with lengths {lengths}", outs, want)


# ----------------------------------------------------------------------------
# (d) past 2^31 elements: one real run with 64-bit offsets.
# ----------------------------------------------------------------------------
GAP = 2 ** 30  # T stride of the far views: token 2 starts at element 2^31
BIG_T = 3
BIG_OPS = ("fused_recurrent_gated_delta_rule", "chunk_gated_delta_rule", "swa_attention", "swa_decode")


def _big_run(op: str, t: dict) -> dict:
    if op == "swa_decode":
        kc, vc = t["k_cache"], t["v_cache"]
        o = ak.swa_decode(t["q"], kc, vc, t["k_new"], t["v_new"], t["cache_seqlens"], W, S)
        return {"o": o, "k_cache": kc, "v_cache": vc}
    if op == "swa_attention":
        outs = {"o": ak.swa_attention(t["q"], t["k"], t["v"], 2, 1)}
    else:
        gates = (t["g"], t["beta"])
        o, ht = getattr(ak, op)(t["q"], t["k"], t["v"], *gates, initial_state=t["h0"], output_final_state=True,
                                use_qk_l2norm_in_kernel=True)
        outs = {"o": o, "final_state": ht}
    if op != "fused_recurrent_gated_delta_rule":
        dq, dk, dv = torch.autograd.grad(outs["o"].float().square().sum(), [t["q"], t["k"], t["v"]])
        outs.update(dq=dq, dk=dk, dv=dv)
    return {n: x.detach() for n, x in outs.items()}


def _big_inputs(op: str, gap: int) -> tuple[dict, dict]:
    """(compact, far) inputs of ``op`` holding the same bf16 values; far ones sit up to 2 * gap elements apart."""
    HQ, HK, _ = HEADS
    dt = torch.bfloat16
    big = torch.empty(2 * gap + 2 ** 16, dtype=dt, device=DEV)  # [2 gap + 2^16]; only the views are written
    if op == "swa_decode":
        Bsz, L = 2, S + W
        compact = dict(q=torch.randn(Bsz, 1, HQ, D), k_cache=torch.randn(Bsz, L, HK, D),
                       v_cache=torch.randn(Bsz, L, HK, D), k_new=torch.randn(Bsz, 1, HK, D),
                       v_new=torch.randn(Bsz, 1, HK, D))
        compact = {n: x.to(DEV, dt) for n, x in compact.items()}
        compact["cache_seqlens"] = torch.tensor([3, 4 * W + 1], dtype=torch.int32, device=DEV)
        far = dict(compact)
        for i, n in enumerate(("k_cache", "v_cache")):  # row 1 of each cache starts at element 2 * gap
            far[n] = big.as_strided((Bsz, L, HK, D), (2 * gap, HK * D, D, 1), i * L * HK * D)
            far[n].copy_(compact[n])
        return compact, far
    compact, far, offset = {}, {}, 0
    for n, h in zip("qkv", (HQ, HK, HK)):  # token t of q, k, v side by side at element t * gap
        compact[n] = torch.randn(1, BIG_T, h, D, dtype=dt, device=DEV)
        far[n] = big.as_strided((1, BIG_T, h, D), (BIG_T * gap, gap, D, 1), offset)
        far[n].copy_(compact[n])
        offset += h * D
    grad = op != "fused_recurrent_gated_delta_rule"
    for d in (compact, far):
        for n in "qkv":
            d[n] = d[n].detach().requires_grad_(grad)  # detach keeps the far strides and offset
    gates = dict(g=-torch.rand(1, BIG_T, HS, device=DEV), beta=torch.rand(1, BIG_T, HS, device=DEV),
                 h0=torch.randn(1, HS, D, D, device=DEV))
    return {**compact, **gates}, {**far, **gates}


@pytest.mark.parametrize("op, backend", [(op, b) for op in BIG_OPS for b in _kernel_backends(*_family_ops(op))])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_past_2_31(op, backend):
    """Far tokens (or the second decode row's cache) start at element 2^31 of one ~4 GiB buffer: the
    kernels' int64 offsets (ahn_kernels/_index.py) against their int32 ones on the compact inputs."""
    compact, far = _big_inputs(op, GAP)
    assert not any(_index.needs_int64(t) for t in compact.values()) and any(_index.needs_int64(t) for t in far.values())
    with ak.use_backend(backend):
        _require_kernels(_family_ops(op), backend)
        want = _big_run(op, compact)
        got = _big_run(op, far)
    torch.cuda.synchronize()
    _assert_equal(f"{op} with offsets past 2^31", got, want)
