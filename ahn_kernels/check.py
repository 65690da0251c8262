"""``python -m ahn_kernels check``: every available backend of every op against the fp64 reference.

Random non-zero inputs at a small awkward shape (T = 65, odd head dims, grouped
heads, initial state); fp32 through the public op on each backend, fp64
through the token-loop / masked-attention oracles; forward outputs, states and,
for ops with a backward, every gradient under random upstream gradients.
Bars: the DESIGN §4 relative-RMSE table (``testing.TOLERANCES``).
"""

from __future__ import annotations

import torch

from . import _backend, testing
from .cache import reference as cache_ref
from .delta_rule import reference as delta_ref
from .ssd import reference as ssd_ref
from .swa import reference as swa_ref

F32 = torch.float32


def _rand(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=F32).requires_grad_(requires_grad)


def _grads(outs: dict, inputs: dict, upstream: dict) -> dict:
    loss = sum((outs[n].double() * upstream[n]).sum() for n in upstream)
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    gs = torch.autograd.grad(loss, [inputs[n] for n in names])
    return {f"d{n}": g for n, g in zip(names, gs)}


def _f64(inputs: dict) -> dict:
    return {n: (t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                and t.is_floating_point() else t) for n, t in inputs.items()}


def _delta_case(op: str, differentiable: bool):
    import ahn_kernels as ak

    gated = "gated" in op
    B, T, HQ, HK, HV, K, V = 1, 65, 4, 2, 2, 60, 33
    HS = 4

    def make():
        d = dict(q=_rand(B, T, HQ, K, requires_grad=differentiable), k=_rand(B, T, HK, K, requires_grad=differentiable),
                 v=_rand(B, T, HV, V, requires_grad=differentiable),
                 beta=torch.rand(B, T, HS).requires_grad_(differentiable),
                 initial_state=_rand(B, HS, K, V, requires_grad=differentiable))
        if gated:
            d["g"] = torch.nn.functional.logsigmoid(torch.randn(B, T, HS) + 2).requires_grad_(differentiable)
        return d

    def ours(d):
        fn = getattr(ak, op)
        args = (d["q"], d["k"], d["v"]) + ((d["g"],) if gated else ()) + (d["beta"],)
        o, ht = fn(*args, initial_state=d["initial_state"], output_final_state=True, use_qk_l2norm_in_kernel=True)
        return {"o": o, "final_state": ht}

    def ref(d):
        o, ht = delta_ref.recurrent(d["q"], d["k"], d["v"], d["beta"], d.get("g"), None, d["initial_state"],
                                    use_qk_l2norm=True)
        return {"o": o, "final_state": ht}

    return make, ours, ref


def _ssd_case(op: str):
    import ahn_kernels as ak

    B, T, H, P, N, G = 1, 65, 4, 5, 7, 2
    if op == "ssd_chunk_scan":
        def make():
            return testing.make_ssd_inputs(B, T, H, P, N, G, D="H", z=True, dt_bias=True, initial_states=True,
                                           requires_grad=True)

        def ours(d):
            kw = {n: t for n, t in d.items() if n not in ("x", "dt", "A", "B", "C")}
            y, hT = ak.ssd_chunk_scan(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size=16,
                                      return_final_states=True, **kw)
            return {"y": y, "final_states": hT}

        def ref(d):
            y, hT = ssd_ref.recurrent(**d)
            return {"y": y, "final_states": hT}

        return make, ours, ref

    def make():
        return dict(state=_rand(B + 2, H, P, N), x=_rand(B, H, P), dt=torch.rand(B, H), A=-torch.rand(H) - 0.5,
                    B=_rand(B, G, N), C=_rand(B, G, N), D=torch.rand(H), dt_bias=torch.randn(H),
                    state_batch_indices=torch.tensor([2]))

    def ours(d):
        s = d["state"].clone()
        y = ak.ssd_state_update(s, **{n: t for n, t in d.items() if n != "state"}, dt_softplus=True)
        return {"y": y, "state": s}

    def ref(d):
        s = d["state"].clone()
        y = ssd_ref.state_update(s, **{n: t for n, t in d.items() if n != "state"}, dt_softplus=True)
        return {"y": y, "state": s}

    return make, ours, ref


def _swa_case(op: str):
    import ahn_kernels as ak

    W, S, HQ, HK, D = 16, 3, 4, 2, 60
    if op == "swa_attention":
        def make():
            return dict(q=_rand(1, 65, HQ, D, requires_grad=True), k=_rand(1, 65, HK, D, requires_grad=True),
                        v=_rand(1, 65, HK, D, requires_grad=True))

        def ours(d):
            return {"o": ak.swa_attention(d["q"], d["k"], d["v"], W, S)}

        def ref(d):
            return {"o": swa_ref.masked(d["q"], d["k"], d["v"], W, S)[0]}

        return make, ours, ref

    B = 3

    def make():
        return dict(q=_rand(B, 1, HQ, D), k_cache=_rand(B, S + W, HK, D), v_cache=_rand(B, S + W, HK, D),
                    k_new=_rand(B, 1, HK, D), v_new=_rand(B, 1, HK, D),
                    cache_seqlens=torch.tensor([1, S + W - 1, 5 * W], dtype=torch.int32))

    def run(fn, d, scale):
        kc, vc = d["k_cache"].clone(), d["v_cache"].clone()
        o = fn(d["q"], kc, vc, d["k_new"], d["v_new"], d["cache_seqlens"], W, S, scale)
        return {"o": o, "k_cache": kc, "v_cache": vc}

    return make, (lambda d: run(ak.swa_decode, d, None)), (lambda d: run(swa_ref.decode, d, D ** -0.5))


def _evict_case():
    import ahn_kernels as ak

    W, S, HQ, HK, D, B = 8, 2, 4, 2, 33, 3

    def make():
        return dict(state=_rand(B, HQ, D, D), q=_rand(B, 1, HQ, D), k_cache=_rand(B, S + W, HK, D),
                    v_cache=_rand(B, S + W, HK, D), gates=testing.ahn_gates("gated_delta", B, W, HQ),
                    gates_new=testing.ahn_gates("gated_delta", B, HQ),
                    cache_seqlens=torch.tensor([1, S + W, 4 * W + 1], dtype=torch.int32))

    def run(fn, d, scale):
        state, gates = d["state"].clone(), d["gates"].clone()
        o = fn(state, d["q"], d["k_cache"], d["v_cache"], gates, d["gates_new"], d["cache_seqlens"], W, S,
               "gated_delta", scale)
        return {"o_mem": o, "state": state, "gates": gates}

    return make, (lambda d: run(ak.ahn_evict_update, d, None)), (lambda d: run(cache_ref.evict_update, d, D ** -0.5))


def _cases():
    return {
        "chunk_delta_rule": _delta_case("chunk_delta_rule", True),
        "chunk_gated_delta_rule": _delta_case("chunk_gated_delta_rule", True),
        # A backward runs only behind its forward: these check gradients through the forward's case.
        "chunk_delta_rule_bwd": _delta_case("chunk_delta_rule", True),
        "chunk_gated_delta_rule_bwd": _delta_case("chunk_gated_delta_rule", True),
        "fused_recurrent_delta_rule": _delta_case("fused_recurrent_delta_rule", False),
        "fused_recurrent_gated_delta_rule": _delta_case("fused_recurrent_gated_delta_rule", False),
        "ssd_chunk_scan": _ssd_case("ssd_chunk_scan"),
        "ssd_chunk_scan_bwd": _ssd_case("ssd_chunk_scan"),
        "ssd_state_update": _ssd_case("ssd_state_update"),
        "swa_attention": _swa_case("swa_attention"),
        "swa_attention_bwd": _swa_case("swa_attention"),
        "swa_decode": _swa_case("swa_decode"),
        "ahn_evict_update": _evict_case(),
    }


GATE_GRADS = {"dg", "dbeta", "ddt", "dA", "dD", "ddt_bias"}


def check_op(op: str, device_type: str = "cpu") -> list[tuple[str, str, float, float, bool]]:
    """Rows (backend, quantity, relative RMSE, bar, ok) for every backend of ``op`` here."""
    make, ours, ref = _cases()[op]
    torch.manual_seed(0)
    inputs = make()
    ref_in = _f64(inputs)
    expected = ref(ref_in)
    upstream = {n: torch.randn_like(t) for n, t in expected.items() if t.requires_grad}
    if upstream:
        expected.update(_grads(expected, ref_in, upstream))
    rows = []
    for backend in _backend.available(op, device_type):
        with _backend.use_backend(backend):
            got = ours(inputs)
            if upstream:
                got.update(_grads(got, inputs, upstream))
        for name, want in expected.items():
            kind = "gate" if name in GATE_GRADS else ("grad" if name.startswith("d") else "out")
            bar = testing.tolerance(F32, kind)
            if backend in ("cpu", "cuda") and kind == "out":
                bar = testing.CPU_KERNEL_FP32 if backend == "cpu" else bar
            err = testing.rel_rmse(got[name], want)
            ok = bool(torch.isfinite(got[name]).all()) and err <= bar
            rows.append((backend, name, err, bar, ok))
    return rows


def run_checks() -> int:
    failed = 0
    print(f"{'op':34s} {'backend':10s} {'quantity':14s} {'rel RMSE':>10s} {'bar':>8s}  result")
    for op in _backend.KERNELS:
        for backend, name, err, bar, ok in check_op(op):
            failed += not ok
            print(f"{op:34s} {backend:10s} {name:14s} {err:10.2e} {bar:8.0e}  {'pass' if ok else 'FAIL'}")
    print(f"\n{'all checks passed' if not failed else f'{failed} checks FAILED'} "
          "(fp32 through each backend vs fp64 reference, CPU tensors)")
    return 1 if failed else 0
