"""Shared test and bench cases: tolerance table, error metrics, shape tables, input factories.

Tests (``tests/``), benches (``bench/``) and ``python -m ahn_kernels check``
import this module so that all of them run the same cases with the same bars.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.utils._device

# ----------------------------------------------------------------------------
# Tolerances (DESIGN §4): relative RMSE ||out - ref|| / ||ref|| of a kernel
# against the fp64 reference on random non-zero inputs.
#   "out":  outputs and states
#   "grad": gradients of q, k, v, initial state (and x, B, C for SSD)
#   "gate": gradients of gates (beta, g, dt, A, dt_bias, D)
# The compiled CPU kernels are held to CPU_KERNEL_FP32 in fp32.
# ----------------------------------------------------------------------------
TOLERANCES = {
    torch.float32: {"out": 1e-5, "grad": 5e-5, "gate": 2e-4},
    torch.float16: {"out": 5e-3, "grad": 8e-3, "gate": 2e-2},
    torch.bfloat16: {"out": 1e-2, "grad": 1.6e-2, "gate": 4e-2},
}
CPU_KERNEL_FP32 = 1e-6
# mamba's allclose (rtol, atol) per dtype, a second bar for SSD.
MAMBA_ALLCLOSE = {
    torch.float32: (3e-4, 1e-3),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


def rel_rmse(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| computed in fp64; 0 when both are exactly zero."""
    got, ref = got.double(), ref.double()
    num = (got - ref).norm().item()
    den = ref.norm().item()
    if den == 0.0:
        return num
    return num / den


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Fail unless ``got`` is finite, has ``ref``'s shape and is within relative RMSE ``tol``."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_rmse(got, ref)
    assert err <= tol, f"{name}: relative RMSE {err:.3e} > {tol:.1e}"


def tolerance(dtype: torch.dtype, kind: str) -> float:
    return TOLERANCES[dtype][kind]


RED_ZONE = 1 << 16  # elements: a 128 x 512 tile


def red_zone(shape: tuple, dtype: torch.dtype, device="cpu", fill=float("nan")):
    """A tensor of ``shape`` living inside a larger buffer whose guard regions on each side hold ``fill``.

    Returns ``(view, check)``; ``check()`` asserts that the guard regions are untouched.
    Under ``TRITON_INTERPRET=1`` this is the only out-of-bounds detector. Each guard holds
    RED_ZONE elements or the tensor's own size, whichever is larger: an unmasked store
    overruns by up to a tile (the SWA forward with its store mask dropped wrote up to
    3,595 elements past a 2,904-element bf16 o), and an overrun that leaves the guard
    corrupts the heap (the run aborts) instead of failing the check.
    """
    n = 1
    for s in shape:
        n *= s
    pad = max(RED_ZONE, n)
    buf = torch.full((n + 2 * pad,), fill, dtype=dtype, device=device)
    view = buf[pad:pad + n].view(shape)
    guard = buf.clone()

    def check() -> None:
        for side, sl in (("front", slice(0, pad)), ("back", slice(pad + n, None))):
            a, b = buf[sl], guard[sl]
            same = (a == b) | (a.isnan() & b.isnan())
            assert same.all(), f"red zone ({side}) overwritten"

    return view, check


def fp64_leaves(inputs: dict, requires_grad: bool = False) -> dict:
    """The same keyword inputs with floating tensors as fp64 leaves (fp16/bf16 values upcast as rounded)."""
    out = {}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().double().requires_grad_(requires_grad)
        out[name] = x
    return out


def seqlens_to_cu(lengths, device="cpu", dtype=torch.int64) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype, device=device)


# ----------------------------------------------------------------------------
# Awkward lengths every kernel is tried at (DESIGN §5, reliability §5.4).
# ----------------------------------------------------------------------------
AWKWARD_T = (1, 63, 64, 65, 200)
# Varlen batches: an empty sequence, sequences shorter than a chunk, one longer.
VARLEN_LENGTHS = ((0, 1, 63, 64, 65, 130), (17, 0, 5))


# ----------------------------------------------------------------------------
# swa + cache: sliding-window attention with sinks, AHN ring-buffer decode.
# ----------------------------------------------------------------------------
SWA_WINDOWS = (1, 16, 64, 300)  # 300 > every AWKWARD_T: the whole sequence is in the window
SWA_HEADS = ((1, 1), (4, 2), (8, 1))  # (HQ, HK)
SWA_HEAD_DIMS = (7, 60, 64)
# (W, S) of the decode-loop tests: no sinks, fewer sinks than the window, more.
CACHE_WINDOWS = ((4, 0), (4, 2), (3, 7))
AHN_RULES = ("delta", "gated_delta", "ssd")


def swa_sinks(window_size: int) -> tuple[int, ...]:
    """Sink counts tried with a window: none, a few, more than the window."""
    return (0, 3, window_size + 2)


def swa_inputs(B, T, HQ, HK, D, dtype=torch.float32, device="cpu", requires_grad=False):
    """Random q [B, T, HQ, D] and k, v [B, T, HK, D]."""
    q = torch.randn(B, T, HQ, D, dtype=dtype, device=device)
    k = torch.randn(B, T, HK, D, dtype=dtype, device=device)
    v = torch.randn(B, T, HK, D, dtype=dtype, device=device)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def ahn_gates(rule: str, *shape, device="cpu") -> torch.Tensor:
    """Random arrival-time gates [*shape, n_gates] fp32: β in (0, 1), log-decay g < 0, dt > 0 (softplus'ed)."""
    beta = torch.sigmoid(torch.randn(*shape, device=device))
    if rule == "delta":
        return beta[..., None]
    if rule == "gated_delta":
        return torch.stack([beta, torch.nn.functional.logsigmoid(torch.randn(*shape, device=device))], dim=-1)
    if rule == "ssd":
        return torch.nn.functional.softplus(torch.randn(*shape, device=device) - 1)[..., None]
    raise ValueError(f"rule: unknown {rule!r}")


def ahn_A(HS: int, device="cpu") -> torch.Tensor:
    """A = -exp(A_log) [HS] fp32 for the SSD rule, in [-1.5, -0.5)."""
    return -(torch.rand(HS, device=device) + 0.5)


# ----------------------------------------------------------------------------
# ssd: Mamba2 SSD chunked scan and decode step.
# ----------------------------------------------------------------------------
# (H, P, N_state, G): odd dims with one group, two groups, a group per head; then AHN-like.
SSD_SHAPES = ((4, 5, 7, 1), (4, 5, 7, 2), (4, 5, 7, 4), (2, 16, 16, 2))
SSD_CHUNK_SIZES = (64, 256)
# lag=(window_size, num_sinks): a window of 1, window and sinks, a whole chunk, nothing absorbed.
SSD_LAGS = ((1, 0), (10, 3), (64, 0), (150, 100))


def make_ssd_inputs(B, T, H, P, N_state, G=1, *, dtype=torch.float32, gate_dtype=torch.float32, D=None,
                    z=False, dt_bias=False, initial_states=False, lengths=None, dt_softplus=True, device="cpu",
                    requires_grad=False) -> dict:
    """Random non-zero keyword arguments of ``ssd_chunk_scan`` and of ``ssd.reference.recurrent/chunked``.

    x [B, T, H, P], z [B, T, H, P] and B, C [B, T, G, N_state] in ``dtype``; dt [B, T, H],
    A [H], D ([H] for D="H", [H, P] for D="HP"), dt_bias [H] in ``gate_dtype``;
    initial_states [N, H, P, N_state] fp32. ``lengths`` packs sequences of those
    lengths (B must be 1 and T their sum) and adds ``cu_seqlens``.
    The decay per token, exp(dt A), is about 0.95-0.99, so a state carries
    across several chunks and the initial state stays visible.
    """
    if lengths is not None:
        assert B == 1 and T == sum(lengths), "lengths: needs B = 1 and T = sum(lengths)"
    N = B if lengths is None else len(lengths)

    def rand(*shape, kind=dtype, scale=1.0, shift=0.0, uniform=False):
        t = torch.rand(*shape, device=device) if uniform else torch.randn(*shape, device=device)
        return (t * scale + shift).to(kind)

    if dt_softplus:  # raw values: softplus(N(-3, 0.5)) is about 0.02 .. 0.15
        dt, bias = rand(B, T, H, kind=gate_dtype, scale=0.5, shift=-3.0), rand(H, kind=gate_dtype, scale=0.3)
    else:  # already positive step sizes
        dt = rand(B, T, H, kind=gate_dtype, scale=0.1, shift=0.01, uniform=True)
        bias = rand(H, kind=gate_dtype, scale=0.02, uniform=True)
    out = {
        "x": rand(B, T, H, P),
        "dt": dt,
        "A": rand(H, kind=gate_dtype, scale=-0.9, shift=-0.1, uniform=True),
        "B": rand(B, T, G, N_state),
        "C": rand(B, T, G, N_state),
        "D": None if D is None else rand(*((H,) if D == "H" else (H, P)), kind=gate_dtype),
        "z": rand(B, T, H, P) if z else None,
        "dt_bias": bias if dt_bias else None,
        "initial_states": rand(N, H, P, N_state, kind=torch.float32) if initial_states else None,
        "cu_seqlens": None if lengths is None else seqlens_to_cu(lengths, device),
        "dt_softplus": dt_softplus,
    }
    for t in out.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.requires_grad_(requires_grad)
    return out


# ----------------------------------------------------------------------------
# delta_rule: DeltaNet and Gated DeltaNet, chunked and fused recurrent.
# ----------------------------------------------------------------------------
# (HQ, HK, HV): fla's grouped values (HQ = HK < HV) and AHN's grouped k/v (HK = HV < HQ).
DELTA_HEADS = ((2, 2, 4), (4, 2, 2))
DELTA_DIMS = (7, 60, 100)  # odd K and V, as fla tests them
DELTA_CHUNK_SIZES = (16, 32, 64)
# fused_recurrent: lengths around a chunk, head dims up to the 256 limit.
DELTA_RECURRENT_T = (1, 63, 64, 65)
DELTA_RECURRENT_DIMS = (7, 60, 128, 256)
# lag=(window_size, num_sinks): the smallest window, window and sinks, a window longer
# than every sequence, more sinks than tokens (the last two absorb nothing).
DELTA_LAGS = ((1, 0), (10, 3), (300, 0), (5, 250))


def make_delta_inputs(B, T, heads=(2, 2, 4), K=16, V=16, *, gated=True, dtype=torch.float32, lengths=None,
                      initial_state=False, unit_keys=True, decay=1.0, device="cpu", requires_grad=False) -> dict:
    """Random non-zero keyword arguments of the delta-rule ops and of ``delta_rule.reference``.

    q [B, T, HQ, K], k [B, T, HK, K], v [B, T, HV, V] in ``dtype``; beta [B, T, HS]
    uniform in (0, 1) and, when ``gated``, g [B, T, HS] uniform in [-decay, 0], both fp32
    (no "g" key otherwise, so the dict also fits the DeltaNet ops); initial_state
    [N, HS, K, V] fp32 or None; cu_seqlens [N+1] int64 when ``lengths`` packs sequences
    (B must be 1 and T their sum), else None. ``unit_keys`` L2-normalises k, which keeps
    the delta rule stable (β‖k‖² < 2); pass False with ``use_qk_l2norm_in_kernel``.
    """
    if lengths is not None:
        assert B == 1 and T == sum(lengths), "lengths: needs B = 1 and T = sum(lengths)"
    HQ, HK, HV = heads
    HS = max(heads)
    N = B if lengths is None else len(lengths)
    k = torch.randn(B, T, HK, K, device=device)
    if unit_keys:
        k = torch.nn.functional.normalize(k, dim=-1)
    out = {
        "q": torch.randn(B, T, HQ, K, device=device).to(dtype),
        "k": k.to(dtype),
        "v": torch.randn(B, T, HV, V, device=device).to(dtype),
        "beta": torch.rand(B, T, HS, device=device),
        "initial_state": torch.randn(N, HS, K, V, device=device) if initial_state else None,
        "cu_seqlens": None if lengths is None else seqlens_to_cu(lengths, device),
    }
    if gated:
        out["g"] = -decay * torch.rand(B, T, HS, device=device)
    for t in out.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.requires_grad_(requires_grad)
    return out


# ----------------------------------------------------------------------------
# Poison and guards for what the library allocates itself (outputs, gradients,
# scratch): the kernel tests' red zones only cover the buffers they pass in.
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def _library_allocations(treat):
    """Within the block, each floating tensor that ``torch.empty``, ``torch.empty_like`` or
    ``Tensor.new_empty`` returns to ``ahn_kernels`` code is replaced by ``treat(tensor)``.

    The library allocates nothing else uninitialised (tests/test_hygiene.py). Calls from
    outside the library (tests reserving address space, users) are left alone, and so is
    tracing under ``torch.compile``.
    """
    # ``with torch.device(...)`` knows its factory functions by identity, from a set built
    # once on first use: build it from the originals, or it would hold the wrappers and stop
    # applying to the calls they make (a model built on "meta" would allocate for real).
    torch.utils._device._device_constructors()
    originals = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def intercept(alloc):
        def wrapper(*args, **kwargs):
            out = alloc(*args, **kwargs)
            if out.is_floating_point() and not torch.compiler.is_compiling() and _called_from_library():
                return treat(out)
            return out

        return functools.wraps(alloc)(wrapper)

    torch.empty, torch.empty_like, torch.Tensor.new_empty = (intercept(a) for a in originals)
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals


def _called_from_library() -> bool:
    # Frame 0 is this function, 1 the wrapper, 2 the allocating code.
    return sys._getframe(2).f_globals.get("__name__", "").startswith("ahn_kernels.")


def poisoned_allocations():
    """Context manager: what the library allocates uninitialised starts as NaN.

    A kernel that leaves an output, gradient or scratch element unwritten then returns NaN
    there instead of whatever the allocator handed back: often zeros from fresh pages or
    the previous call's identical result, which hide the bug. tests/conftest.py holds it
    open for the whole session.
    """
    return _library_allocations(lambda t: t.fill_(float("nan")))


@contextlib.contextmanager
def red_zoned_allocations():
    """Within the block, what the library allocates uninitialised lives inside ``red_zone``
    guards (and starts as NaN); yields a list of their checks, to run after the calls.

    Covers the kernels whose launchers allocate their own outputs, and every scratch buffer.
    Real tensors only: the views have a storage offset, which fake kernels do not predict.
    """
    checks = []

    def zone(t):
        if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
            return t
        view, check = red_zone((t.numel(),), t.dtype, t.device)
        checks.append(check)
        return view.as_strided(t.shape, t.stride())

    with _library_allocations(zone):
        yield checks
