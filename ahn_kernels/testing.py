"""Shared test and bench cases: tolerance table, error metrics, shape tables, input factories.

Tests (``tests/``), benches (``bench/``) and ``python -m ahn_kernels check``
import this module so that all of them run the same cases with the same bars.
"""

from __future__ import annotations

import torch

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


def red_zone(shape: tuple, dtype: torch.dtype, device="cpu", pad: int = 256, fill=float("nan")):
    """A tensor of ``shape`` living inside a larger buffer whose ``pad`` elements on each side hold ``fill``.

    Returns ``(view, check)``; ``check()`` asserts that the guard regions are untouched.
    Under ``TRITON_INTERPRET=1`` this is the only out-of-bounds detector.
    """
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * pad,), fill, dtype=dtype, device=device)
    view = buf[pad:pad + n].view(shape)
    guard = buf.clone()

    def check() -> None:
        for side, sl in (("front", slice(0, pad)), ("back", slice(pad + n, None))):
            a, b = buf[sl], guard[sl]
            same = (a == b) | (a.isnan() & b.isnan())
            assert same.all(), f"red zone ({side}) overwritten"

    return view, check


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
