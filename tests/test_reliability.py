"""Reliability checks every op passes on every backend it has here (DESIGN §4, issue 7).

- layouts: transposed, sliced (storage offset != 0) and stride-0-expanded
  inputs give bitwise the same outputs and gradients as ``.contiguous()`` ones,
  and the fake kernel predicts the real output strides;
- gate extremes (g = -1e4, g = 0, a jump inside one chunk, β in {0, 1}, |q|,
  |k| about 1e2 through the in-kernel L2 norm, dt at the softplus threshold,
  saturated softmax) in fp32, fp16 and bf16: finite, and within DESIGN §4 of
  the fp64 oracle;
- NaN containment: a NaN planted in one input element reaches only the outputs
  that depend on that element (forward), and a NaN planted in one upstream
  gradient element only the input gradients of its causal predecessors
  (backward). "Depends" is measured, not assumed: the fp64 oracle is run with
  that element perturbed, and every output it leaves unchanged must stay
  bitwise clean in the kernel's run, up to the kernel's tile along T
  (``_block``: 0 · NaN = NaN inside a tile product is IEEE, not a bug);
- determinism: five forward+backward runs bitwise equal; 1 and 2 CPU threads
  bitwise equal; 8 Python threads x 20 mixed calls equal to serial calls.

Triton kernels run here through the interpreter (``use_backend("triton")``).
"""

import concurrent.futures
import dataclasses
from typing import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ahn_kernels as ak
from ahn_kernels import _backend, testing
from ahn_kernels.delta_rule import reference as delta_ref
from ahn_kernels.ssd import reference as ssd_ref
from ahn_kernels.swa import reference as swa_ref

F32, F64 = torch.float32, torch.float64
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to drive one public op: inputs, the call, its fp64 oracle and its [B, T, H, D] inputs."""

    make: Callable  # (dtype, lengths, T=, heads=) -> kwargs dict; lengths packs sequences (B = 1) or is None
    call: Callable  # kwargs -> list of output tensors
    oracle: Callable  # fp64 kwargs -> list of output tensors
    acts: tuple  # names of the [B, T, H, D] activations
    plant: str  # the activation a NaN is planted in
    differentiable: bool


def _delta_spec(gated: bool, chunked: bool) -> Spec:
    name = ("chunk_" if chunked else "fused_recurrent_") + ("gated_" if gated else "") + "delta_rule"
    chunk = {"chunk_size": 16} if chunked else {}

    def make(dtype, lengths, T=70, heads=(4, 2, 2)):
        d = testing.make_delta_inputs(1 if lengths else 2, sum(lengths) if lengths else T, heads, 33, 20,
                                      gated=gated, dtype=dtype, lengths=lengths, initial_state=True,
                                      unit_keys=False, decay=0.5, requires_grad=chunked)
        return d

    def split(d):
        args = (d["q"], d["k"], d["v"]) + ((d["g"],) if gated else ()) + (d["beta"],)
        return args, {"initial_state": d["initial_state"], "cu_seqlens": d["cu_seqlens"]}

    def call(d):
        args, kw = split(d)
        o, ht = getattr(ak, name)(*args, **kw, output_final_state=True, use_qk_l2norm_in_kernel=True, **chunk)
        return [o, ht]

    def oracle(d):
        o, ht = delta_ref.recurrent(d["q"], d["k"], d["v"], d["beta"], d.get("g"), None, d["initial_state"],
                                    d["cu_seqlens"], use_qk_l2norm=True)
        return [o, ht]

    return Spec(make, call, oracle, ("q", "k", "v"), "k", chunked)


def _ssd_make(dtype, lengths, T=70, heads=(4, 2)):
    return testing.make_ssd_inputs(1 if lengths else 2, sum(lengths) if lengths else T, heads[0], 5, 6, heads[1],
                                   dtype=dtype, D="H", z=True, dt_bias=True, initial_states=True, lengths=lengths,
                                   requires_grad=True)


def _ssd_call(d):
    y, hT = ak.ssd_chunk_scan(**d, chunk_size=16, return_final_states=True)
    return [y, hT]


def _ssd_oracle(d):
    return list(ssd_ref.recurrent(**d))


W, S = 16, 3


def _swa_make(dtype, lengths, T=70, heads=(4, 2)):
    B, T = (1, sum(lengths)) if lengths else (2, T)
    q, k, v = testing.swa_inputs(B, T, *heads, 20, dtype=dtype, requires_grad=True)
    return {"q": q, "k": k, "v": v, "cu_seqlens": None if lengths is None else testing.seqlens_to_cu(lengths)}


def _swa_call(d):
    return [ak.swa_attention(d["q"], d["k"], d["v"], W, S, cu_seqlens=d["cu_seqlens"])]


def _swa_oracle(d):
    return [swa_ref.masked(d["q"], d["k"], d["v"], W, S, cu_seqlens=d["cu_seqlens"])[0]]


SPECS = {
    "chunk_delta_rule": _delta_spec(gated=False, chunked=True),
    "chunk_gated_delta_rule": _delta_spec(gated=True, chunked=True),
    "fused_recurrent_delta_rule": _delta_spec(gated=False, chunked=False),
    "fused_recurrent_gated_delta_rule": _delta_spec(gated=True, chunked=False),
    "ssd_chunk_scan": Spec(_ssd_make, _ssd_call, _ssd_oracle, ("x", "B", "C", "z"), "x", True),
    "swa_attention": Spec(_swa_make, _swa_call, _swa_oracle, ("q", "k", "v"), "k", True),
}


def _backends(op):
    """Every backend that serves ``op`` on CPU tensors here, the reference included."""
    out = set(_backend.available(op, "cpu"))
    if "triton" in _backend.KERNELS[op]["cuda"] and _backend.triton_interpret():
        out.add("triton")
    return sorted(out)


# Under the interpreter the DeltaNet twins add nothing: they run the gated kernels with the gate off.
CASES = [(op, b) for op in SPECS for b in _backends(op)
         if not (b == "triton" and op in ("chunk_delta_rule", "fused_recurrent_delta_rule"))]

def _ids(case):
    return f"{case[0]}-{case[1]}"


def _leaves(d):
    return [t for t in d.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _run(spec, backend, d, upstream=None):
    """Outputs and, with ``upstream`` (one tensor per output), gradients of every leaf input."""
    with _backend.use_backend(backend):
        outs = spec.call(d)
        if upstream is None or not spec.differentiable:
            return [o.detach() for o in outs], []
        leaves = _leaves(d)
        grads = torch.autograd.grad(outs, leaves, upstream, allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _upstream(outs):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]


def _bitwise(x, y):
    """Equal bit for bit, NaNs in the same places counting as equal."""
    return torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))


def _same(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"{what}[{i}]: shape {tuple(x.shape)} != {tuple(y.shape)}"
        if not _bitwise(x, y):
            raise AssertionError(f"{what}[{i}]: not bitwise equal (max |diff| {(x - y).abs().nan_to_num(0).max():.3e})")


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
def _relayout(t, how):
    """The same values as ``t`` [B, T, H, D] in another memory layout, last dim contiguous."""
    B, T, H, D = t.shape
    with torch.no_grad():
        if how == "transposed":  # [B, H, T, D] storage
            out = t.transpose(1, 2).contiguous().transpose(1, 2)
        elif how == "sliced":  # inside a longer buffer: storage offset and a T stride that is not H*D
            big = torch.full((B, T + 3, H + 1, D), float("nan"), dtype=t.dtype)
            big[:, 2:T + 2, 1:] = t
            out = big[:, 2:T + 2, 1:]
        elif how == "expanded":  # stride 0 along B (every row the same sequence)
            out = t[:1].expand(B, T, H, D)
        else:
            raise ValueError(how)
    return out.requires_grad_(t.requires_grad)


# The Triton interpreter is slow: its kernels get the sliced layout (offset and gaps at once), fp32
# extremes and two repeats; the compiled CPU kernels get every variant.
LAYOUT_CASES = [(op, b, how) for op, b in CASES if b != "reference"
                for how in (("sliced",) if b == "triton" else ("transposed", "sliced", "expanded"))]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_layouts_bitwise(case):
    op, backend, how = case
    spec = SPECS[op]
    base = spec.make(F32, None)
    if how == "expanded":  # both batch rows equal, so that the contiguous copy is the same values
        base = {n: (t.detach()[:1].expand_as(t).clone().requires_grad_(t.requires_grad) if n in spec.acts
                    and t is not None else t) for n, t in base.items()}
    strided = {n: (_relayout(t, how) if n in spec.acts and t is not None else t) for n, t in base.items()}
    for n in spec.acts:
        if base[n] is not None:
            assert not strided[n].is_contiguous() and torch.equal(strided[n], base[n]), n
    outs, _ = _run(spec, backend, base)
    up = _upstream(outs)
    want = _run(spec, backend, base, up)
    got = _run(spec, backend, strided, up)
    _same(got[0], want[0], f"{op}/{backend} {how} outputs")
    _same(got[1], want[1], f"{op}/{backend} {how} gradients")


@pytest.mark.parametrize("op", list(SPECS))
def test_fake_strides_match_real(op):
    spec = SPECS[op]
    real = spec.make(F32, None)
    real = {n: (_relayout(t, "sliced") if n in spec.acts and t is not None else t) for n, t in real.items()}
    real = {n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in real.items()}
    with torch.no_grad():
        outs = spec.call(real)
        with FakeTensorMode() as mode:
            fake = {n: (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t) for n, t in real.items()}
            fouts = spec.call(fake)
    for i, (o, f) in enumerate(zip(outs, fouts)):
        assert (tuple(f.shape), f.stride(), f.dtype) == (tuple(o.shape), o.stride(), o.dtype), f"{op} output {i}"


# ---------------------------------------------------------------------------------------------
# Gate extremes
# ---------------------------------------------------------------------------------------------
def _extreme(op, kind, d):
    """Turn random inputs ``d`` into the extreme case ``kind`` in place (before requires_grad matters)."""
    with torch.no_grad():
        if kind == "g=-1e4":
            d["g"].fill_(-1e4)
        elif kind == "g=0":
            d["g"].zero_()
        elif kind == "g jump":  # -1e4 then 0 inside one 16-token chunk
            d["g"].fill_(-1e4)
            d["g"][:, 37:] = 0.0
        elif kind == "beta 0/1":
            d["beta"].copy_((torch.rand_like(d["beta"]) < 0.5).float())
        elif kind == "|q|,|k|=1e2":
            d["q"].mul_(1e2)
            d["k"].mul_(1e2)
        elif kind == "dt at softplus threshold":  # dt + dt_bias straddles 20, A strongly negative
            d["dt"].copy_(20.0 - d["dt_bias"] + 0.5 * torch.randn_like(d["dt"]))
            d["A"].mul_(10.0)
        elif kind == "saturated softmax":
            d["q"].mul_(30.0)
            d["k"].mul_(30.0)
        else:
            raise ValueError(kind)


EXTREMES = {
    "chunk_delta_rule": ("beta 0/1", "|q|,|k|=1e2"),
    "chunk_gated_delta_rule": ("g=-1e4", "g=0", "g jump", "beta 0/1", "|q|,|k|=1e2"),
    "fused_recurrent_gated_delta_rule": ("g=-1e4", "g jump", "beta 0/1"),
    "ssd_chunk_scan": ("dt at softplus threshold",),
    "swa_attention": ("saturated softmax",),
}
# Under the interpreter: fp32, no DeltaNet twin, and for the gated rule the two kinds that hold the others
# (the jump passes through g = -1e4 and g = 0 in one chunk; |q|, |k| = 1e2 stresses the L2 norm).
TRITON_EXTREMES = {"chunk_gated_delta_rule": ("g jump", "|q|,|k|=1e2")}
EXTREME_CASES = [(op, b, kind, dt) for op, kinds in EXTREMES.items() for b in _backends(op)
                 if b != "reference" and (b != "triton" or (op, b) in CASES)
                 for kind in (TRITON_EXTREMES.get(op, kinds) if b == "triton" else kinds)
                 for dt in ((F32,) if b == "triton" else DTYPES)]


def _kind(name):
    return "gate" if name in ("g", "beta", "dt", "A", "D", "dt_bias") else "grad"


@pytest.mark.parametrize("case", EXTREME_CASES,
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{str(c[3])[6:]}")
def test_gate_extremes(case):
    op, backend, kind, dtype = case
    spec = SPECS[op]
    d = spec.make(dtype, None)
    _extreme(op, kind, d)
    names = [n for n, t in d.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    d64 = testing.fp64_leaves(d, requires_grad=spec.differentiable)
    want = spec.oracle(d64)
    up = _upstream(want)
    outs, grads = _run(spec, backend, d, [u.to(o.dtype) for u, o in zip(up, want)])
    # Attention (DESIGN §4): the bar is also 2x (3x for gradients) the error of the PyTorch reference
    # run in the test's dtype (saturated softmax gradients cancel in any fp32 code).
    same = _run(spec, "reference", d, [u.to(o.dtype) for u, o in zip(up, want)]) if op == "swa_attention" else None

    def bar(kind_, ref_err):
        tol = testing.tolerance(dtype, kind_)
        return tol if ref_err is None else max(tol, (2 if kind_ == "out" else 3) * ref_err)

    for i, (o, w) in enumerate(zip(outs, want)):
        ref_err = None if same is None else testing.rel_rmse(same[0][i], w)
        testing.assert_close(f"{op} {kind} output {i}", o, w, bar("out", ref_err))
    if spec.differentiable:
        wgrads = torch.autograd.grad(want, [d64[n] for n in names], up, allow_unused=True)
        for i, (n, g, w) in enumerate(zip(names, grads, wgrads)):
            w = torch.zeros_like(d64[n]) if w is None else w
            ref_err = None if same is None else testing.rel_rmse(same[1][i], w)
            testing.assert_close(f"{op} {kind} d{n}", g, w, bar(_kind(n), ref_err))


# ---------------------------------------------------------------------------------------------
# NaN containment
# ---------------------------------------------------------------------------------------------
LENGTHS = (40, 0, 33)  # the NaN goes into the first sequence; the last must stay clean
PLANT_T = 21  # inside the second 16-token chunk of the first sequence


def _block(op, backend):
    """Token granularity at which a kernel may spread a NaN along T inside its own sequence.

    IEEE says 0 · NaN = NaN, and a tiled kernel multiplies whole tiles: a NaN at token t
    reaches the other rows of t's chunk (chunked delta rule and SSD: chunk 16 here) or
    attention tile (up to 128 rows) through products with exactly-zero masked entries,
    as in every GEMM-based kernel (fla's and flash-attention's included). It must never
    cross a block boundary the wrong way in time, a sequence boundary or a head it does
    not feed. Token-serial kernels are exact."""
    if op == "swa_attention":
        return 128
    if op.startswith("fused_recurrent"):
        return 64 if backend == "reference" else 1  # the reference is the chunked form, chunk 64
    return 16


def _changed(a, b):
    return [(x != y) | (torch.isnan(x) != torch.isnan(y)) for x, y in zip(a, b)]


def _widen(dep, block, T):
    """``dep`` grown along T (dim 1 of a [1, T, ...] tensor) to whole blocks; sequence 0 starts at 0."""
    if block == 1 or dep.dim() < 2 or dep.shape[0] != 1 or dep.shape[1] != T:
        return dep
    pad = (-T) % block
    grown = torch.nn.functional.pad(dep.movedim(1, -1), (0, pad)).unflatten(-1, (-1, block))
    grown = grown.any(-1, keepdim=True).expand_as(grown).flatten(-2)[..., :T]
    return grown.movedim(-1, 1)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_nan_forward_reaches_only_dependents(case):
    op, backend = case
    spec = SPECS[op]
    d = spec.make(F32, LENGTHS)
    T = sum(LENGTHS)
    d64 = testing.fp64_leaves(d)
    poked = dict(d64, **{spec.plant: d64[spec.plant].detach().clone()})
    poked[spec.plant][0, PLANT_T, 0, 0] += 3.0
    depends = _changed(spec.oracle(poked), spec.oracle(d64))
    clean, _ = _run(spec, backend, d)
    planted = dict(d, **{spec.plant: d[spec.plant].detach().clone()})
    planted[spec.plant][0, PLANT_T, 0, 0] = float("nan")
    got, _ = _run(spec, backend, planted)
    for i, (g, c, dep) in enumerate(zip(got, clean, depends)):
        assert dep.any() and not dep.all(), f"output {i}: the perturbation test is vacuous"
        allowed = _widen(dep, _block(op, backend), T)
        assert _bitwise(g[~allowed], c[~allowed]), f"{op}/{backend} output {i}: NaN leaked outside its dependents"
        assert torch.isnan(g[dep]).any(), f"{op}/{backend} output {i}: the planted NaN vanished"


@pytest.mark.parametrize("case", [c for c in CASES if SPECS[c[0]].differentiable], ids=_ids)
def test_nan_backward_reaches_only_predecessors(case):
    op, backend = case
    spec = SPECS[op]
    d = spec.make(F32, LENGTHS)
    T = sum(LENGTHS)
    names = [n for n, t in d.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    outs, _ = _run(spec, backend, d)
    up = _upstream(outs)
    d64 = testing.fp64_leaves(d, requires_grad=True)
    want = spec.oracle(d64)
    up64 = [u.double() for u in up]
    poked = [u.clone() for u in up64]
    poked[0][0, PLANT_T, 0, 0] += 3.0
    g0 = torch.autograd.grad(want, [d64[n] for n in names], up64, retain_graph=True, allow_unused=True)
    g1 = torch.autograd.grad(want, [d64[n] for n in names], poked, allow_unused=True)
    depends = _changed([torch.zeros(0) if g is None else g for g in g1],
                       [torch.zeros(0) if g is None else g for g in g0])
    _, clean = _run(spec, backend, d, up)
    planted = [u.clone() for u in up]
    planted[0][0, PLANT_T, 0, 0] = float("nan")
    _, got = _run(spec, backend, d, planted)
    for n, g, c, dep in zip(names, got, clean, depends):
        if dep.numel() == 0:
            continue
        allowed = _widen(dep, _block(op, backend), T)
        assert _bitwise(g[~allowed], c[~allowed]), f"{op}/{backend} d{n}: NaN leaked outside the causal predecessors"
    tokens = [dep for n, dep in zip(names, depends) if n in spec.acts]
    assert any(dep.any() and not dep.all() for dep in tokens), "the perturbation test is vacuous"


# ---------------------------------------------------------------------------------------------
# Determinism and threads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if c[1] != "reference"], ids=_ids)
def test_repeated_runs_bitwise(case):
    op, backend = case
    spec = SPECS[op]
    d = spec.make(F32, LENGTHS)
    outs, _ = _run(spec, backend, d)
    up = _upstream(outs)
    first = _run(spec, backend, d, up)
    for _ in range(1 if backend == "triton" else 4):
        again = _run(spec, backend, d, up)
        _same(again[0], first[0], f"{op}/{backend} outputs")
        _same(again[1], first[1], f"{op}/{backend} gradients")


def _bitwise_across_threads(op, d, threads: int, repeats: int):
    """Outputs and gradients of the CPU kernel at ``threads`` threads, ``repeats`` times, bitwise those at 1."""
    spec = SPECS[op]
    outs, _ = _run(spec, "cpu", d)
    up = _upstream(outs)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(spec, "cpu", d, up)
        torch.set_num_threads(threads)
        for _ in range(repeats):
            again = _run(spec, "cpu", d, up)
            _same(again[0], one[0], f"{op} outputs, {threads} threads vs 1")
            _same(again[1], one[1], f"{op} gradients, {threads} threads vs 1")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("op", [op for op in SPECS if "cpu" in _backends(op)])
def test_one_and_two_threads_bitwise(op):
    _bitwise_across_threads(op, SPECS[op].make(F32, LENGTHS), threads=2, repeats=1)


# Heads per op where four heads feed one input head's gradient (q/k of the delta rules, B/C of SSD, k/v of
# attention): a sum of two terms is commutative, so only three or more expose a reduction order.
CONTENDED_HEADS = {"ssd_chunk_scan": (4, 1), "swa_attention": (4, 1)}


@pytest.mark.parametrize("op", [op for op in SPECS if "cpu" in _backends(op)])
def test_contended_runs_bitwise(op):
    # A reduction whose order follows thread scheduling (atomics, a shared sum under a dynamic schedule)
    # stays invisible at the small T above: each task ends before the next starts. At T = 1000 with four
    # threads on fewer cores, tasks overlap and get preempted, so such an order changes between runs
    # (measured on a planted atomic sum of the delta rule's shared-head gradients: 10 of 10 runs differ
    # at T = 1000, none at T = 70 or 300).
    d = SPECS[op].make(F32, None, T=1000, heads=CONTENDED_HEADS.get(op, (1, 1, 4)))
    _bitwise_across_threads(op, d, threads=4, repeats=5)


def test_python_threads_match_serial():
    # 8 threads x 20 calls over every op, three shapes and three dtypes, against the same calls made serially.
    ops = list(SPECS)
    jobs = []
    for i in range(8 * 20):
        torch.manual_seed(i)
        op = ops[i % len(ops)]
        jobs.append((op, SPECS[op].make(DTYPES[i // len(ops) % 3], None, T=(1, 40, 70)[i // (3 * len(ops)) % 3])))
    serial = [_run(SPECS[op], _backend.choose(op, "cpu"), d, None)[0] for op, d in jobs]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda j: _run(SPECS[j[0]], _backend.choose(j[0], "cpu"), j[1], None)[0], jobs))
    for (op, _), a, b in zip(jobs, threaded, serial):
        _same(a, b, f"{op} in a thread")


# ---------------------------------------------------------------------------------------------
# Poison and red zones: the guards every kernel test relies on must bite
# ---------------------------------------------------------------------------------------------
def test_poison_fills_library_allocations():
    # tests/conftest.py holds testing.poisoned_allocations open for the session.
    probe = {"__name__": "ahn_kernels.probe", "torch": torch}
    exec("def alloc(x):\n    return torch.empty(3, 4), torch.empty_like(x), x.new_empty(2, 5)", probe)
    for t in probe["alloc"](torch.zeros(7, dtype=torch.bfloat16)):
        assert torch.isnan(t).all(), "an uninitialised library allocation escaped the poison"


@pytest.mark.parametrize("case", [c for c in CASES if c[1] != "reference"], ids=_ids)
def test_every_buffer_inside_red_zones(case):
    # The kernel tests guard the buffers they hand to launchers; here every input of the public op and every
    # buffer the library allocates on the way (outputs, gradients, scratch) sits between NaN guards, forward
    # and backward. Allocations start as NaN too, so finite results also mean every element was written.
    op, backend = case
    spec = SPECS[op]
    d = spec.make(F32, LENGTHS)
    zoned, checks = {}, []
    for n, t in d.items():
        if isinstance(t, torch.Tensor):
            zoned[n], check = testing.red_zone(tuple(t.shape), t.dtype,
                                               fill=float("nan") if t.is_floating_point() else 1 << 40)
            zoned[n].copy_(t.detach()).requires_grad_(t.requires_grad)
            checks.append(check)
        else:
            zoned[n] = t
    with testing.red_zoned_allocations() as allocated, _backend.use_backend(backend):
        outs = spec.call(zoned)
        up = _upstream(outs)
        leaves = _leaves(zoned) if spec.differentiable else []
        grads = torch.autograd.grad(outs, leaves, up, allow_unused=True) if leaves else []
    assert allocated, "the library allocated nothing: the interception is broken"
    for check in (*checks, *allocated):
        check()
    for i, t in enumerate([*outs, *(g for g in grads if g is not None)]):
        assert torch.isfinite(t).all(), f"{op}/{backend} result {i}: non-finite values"


@pytest.mark.parametrize("shape", [(3, 5), (2, 40, 4, 8)])
def test_red_zone_bites(shape):
    n = torch.Size(shape).numel()
    view, check = testing.red_zone(shape, torch.float32)
    guard = view.untyped_storage().nbytes() // 4 - n
    assert view.storage_offset() * 2 == guard >= 2 * max(testing.RED_ZONE, n, 256), "each guard: >= 256 elements and the view"
    view.fill_(1.0)
    check()
    for off in (-guard // 2, -1, n, n + guard // 2 - 1):  # the first and last element of each guard
        view, check = testing.red_zone(shape, torch.float32)
        view.as_strided((1,), (1,), view.storage_offset() + off).fill_(0.0)
        with pytest.raises(AssertionError, match="red zone"):
            check()
