"""Mamba2 SSD: ``torch.ops.ahn.ssd_chunk_scan`` (+ backward) and ``torch.ops.ahn.ssd_state_update``."""

from __future__ import annotations

import torch

from .. import _backend, _validate as check
from . import reference

# dt, A, D and dt_bias are read as fp32 whatever their dtype (DESIGN §4).
GATE_DTYPES = check.FLOAT_DTYPES + (torch.float64,)
CHUNK_SIZES = (16, 32, 64, 128, 256)

# ----------------------------------------------------------------------------
# 1. schemas. dt_limit travels as (dt_min, dt_max); lag as (lag_window,
#    lag_sinks) with lag_window = 0 meaning no lag. The forward always returns
#    the final states; ssd_state_update writes the state and returns only out.
# ----------------------------------------------------------------------------
torch.library.define(
    "ahn::ssd_chunk_scan",
    "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, Tensor? z, "
    "Tensor? dt_bias, Tensor? initial_states, Tensor? cu_seqlens, bool dt_softplus, float dt_min, "
    "float dt_max, int lag_window, int lag_sinks) -> (Tensor, Tensor)",
)
torch.library.define(
    "ahn::ssd_chunk_scan_bwd",
    "(Tensor dout, Tensor dfinal_states, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, "
    "Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, Tensor? cu_seqlens, bool dt_softplus, "
    "float dt_min, float dt_max, int lag_window, int lag_sinks) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "ahn::ssd_state_update",
    "(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices) -> Tensor",
)


# ----------------------------------------------------------------------------
# 2. device implementations
# ----------------------------------------------------------------------------
def _lag(lag_window: int, lag_sinks: int):
    return (lag_window, lag_sinks) if lag_window else None


def _num_seqs(x, cu_seqlens) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _state_dtype(x) -> torch.dtype:
    """fp32; fp64 only where the raw op is fed fp64 (tests), as the reference then computes in fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common/dtype.h DType


def _gate(t):
    """A gate as the kernels read it: fp32 (DESIGN §4; a no-op for fp32, exact for fp16/bf16)."""
    return None if t is None else t.float()


def _D_strides(D) -> tuple[int, int]:
    """D [H] or [H, P] as the kernels index it, D[h * D_sh + p * D_sp]: [H] repeats over P."""
    return (D.stride(0), 0) if D.dim() == 1 else D.stride()


def _scan_params(x, dt, A, B, C, chunk_size, D, z, dt_bias, h0, cu, dt_softplus, dt_min, dt_max, lag_window,
                 lag_sinks):
    """The scan's inputs as the kernels' ``SsdScanParams``: gates fp32 (any strides), h0 fp32 contiguous, offsets
    int64. The caller keeps the tensors alive until the launch returns."""
    Bsz, T, H, P = x.shape
    p = _backend._C.SsdScanParams()
    p.x, p.dt, p.A, p.B_ptr, p.C_ptr = (t.data_ptr() for t in (x, dt, A, B, C))
    p.D, p.z, p.dt_bias, p.h0, p.cu_seqlens = (0 if t is None else t.data_ptr() for t in (D, z, dt_bias, h0, cu))
    p.B, p.T, p.N = Bsz, T, _num_seqs(x, cu)
    p.H, p.G, p.P, p.NS = H, B.shape[2], P, B.shape[3]
    p.C, p.W, p.S = chunk_size, lag_window, lag_sinks
    p.x_sb, p.x_st, p.x_sh = x.stride()[:3]
    p.dt_sb, p.dt_st, p.dt_sh = dt.stride()
    p.B_sb, p.B_st, p.B_sg = B.stride()[:3]
    p.C_sb, p.C_st, p.C_sg = C.stride()[:3]
    if z is not None:
        p.z_sb, p.z_st, p.z_sh = z.stride()[:3]
    if D is not None:
        p.D_sh, p.D_sp = _D_strides(D)
    p.dt_softplus, p.dt_min, p.dt_max = dt_softplus, dt_min, dt_max
    p.dtype = _DTYPE_CODE[x.dtype]
    return p


def _kernel_inputs(dt, A, D, dt_bias, initial_states, cu_seqlens):
    """dt, A, D, dt_bias, h0 and offsets in the kernels' contract (see ``_scan_params``)."""
    dt_bias = None if dt_bias is None else _gate(dt_bias).contiguous()
    h0 = None if initial_states is None else initial_states.float().contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.long()
    return _gate(dt), _gate(A).contiguous(), _gate(D), dt_bias, h0, cu


def run_chunk_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min,
                   dt_max, lag_window, lag_sinks, out, final_states):
    """Run the compiled CPU scan (token-serial), writing ``out`` and ``final_states`` in place.

    The kernel has no chunks to compute; ``chunk_size`` says where it renormalises its
    state, so that a scan split at a multiple of it continues bitwise (DESIGN §4).

    out: [B, T, H, P] contiguous in x's dtype; final_states: [N, H, P, N_state] fp32 contiguous.
    Exposed so that tests can hand the kernel outputs inside red zones.
    """
    dt, A, D, dt_bias, h0, cu = _kernel_inputs(dt, A, D, dt_bias, initial_states, cu_seqlens)
    p = _scan_params(x, dt, A, B, C, chunk_size, D, z, dt_bias, h0, cu, dt_softplus, dt_min, dt_max, lag_window,
                     lag_sinks)
    p.y, p.ht = out.data_ptr(), final_states.data_ptr()
    _backend._C.launch_ssd_scan_fwd_cpu(p, torch.get_num_threads())


def run_chunk_scan_bwd(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens,
                       dt_softplus, dt_min, dt_max, lag_window, lag_sinks, grads):
    """Run the compiled CPU scan backward (two token-serial passes), writing ``grads`` in place.

    dout: [B, T, H, P] in x's dtype, last dim contiguous; dfinal_states: [N, H, P, N_state] fp32 contiguous.
    grads: dx [B, T, H, P], ddt [B, T, H] fp32, dA [H] fp32, dB, dC [B, T, G, N_state], dD (D's shape, fp32),
    dz [B, T, H, P], ddt_bias [H] fp32, dinitial_states [N, H, P, N_state] fp32; all contiguous, x's dtype where
    not said; dD, dz, ddt_bias None exactly when D, z, dt_bias are. Exposed for the red-zone tests.
    """
    dt, A, D, dt_bias, h0, cu = _kernel_inputs(dt, A, D, dt_bias, initial_states, cu_seqlens)
    q = _backend._C.SsdScanBwdParams()
    q.scan = _scan_params(x, dt, A, B, C, chunk_size, D, z, dt_bias, h0, cu, dt_softplus, dt_min, dt_max,
                          lag_window, lag_sinks)
    q.dout, q.dht = dout.data_ptr(), dfinal_states.data_ptr()
    q.dout_sb, q.dout_st, q.dout_sh = dout.stride()[:3]
    q.dx, q.ddt, q.dA, q.dB, q.dC, q.dD, q.dz, q.ddt_bias, q.dh0 = (0 if g is None else g.data_ptr() for g in grads)
    _backend._C.launch_ssd_scan_bwd_cpu(q, torch.get_num_threads())


def run_chunk_scan_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus,
                          dt_min, dt_max, lag_window, lag_sinks, out, final_states):
    """``run_chunk_scan`` on the Triton kernels (chunked; CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    from .triton_chunk_scan import ssd_chunk_scan_fwd
    from .triton_chunk_state import on_device

    dt_bias = None if dt_bias is None else _gate(dt_bias).contiguous()
    h0 = None if initial_states is None else initial_states.float().contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.long()
    with on_device(x):
        ssd_chunk_scan_fwd(x, _gate(dt), _gate(A).contiguous(), B, C, chunk_size, _gate(D), z, dt_bias, h0, cu,
                           dt_softplus, dt_min, dt_max, lag_window, lag_sinks, out, final_states)


def run_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, out):
    """Run the compiled CPU decode step: ``state`` [N, H, P, N_state] fp32 in place, ``out`` [B, H, P] contiguous."""
    dt, A, D, dt_bias = _gate(dt), _gate(A).contiguous(), _gate(D), _gate(dt_bias)
    dt_bias = None if dt_bias is None else dt_bias.contiguous()
    idx = None if state_batch_indices is None else state_batch_indices.long()
    Bsz, H, P = x.shape
    p = _backend._C.SsdStateUpdateParams()
    p.state, p.x, p.dt, p.A, p.B_ptr, p.C_ptr, p.y = (t.data_ptr() for t in (state, x, dt, A, B, C, out))
    p.D, p.z, p.dt_bias, p.idx = (0 if t is None else t.data_ptr() for t in (D, z, dt_bias, idx))
    p.B, p.NB, p.H, p.G, p.P, p.NS = Bsz, state.shape[0], H, B.shape[1], P, B.shape[2]
    p.state_sb, p.state_sh, p.state_sp = state.stride()[:3]
    p.x_sb, p.x_sh = x.stride()[:2]
    p.dt_sb, p.dt_sh = dt.stride()
    p.B_sb, p.B_sg = B.stride()[:2]
    p.C_sb, p.C_sg = C.stride()[:2]
    if z is not None:
        p.z_sb, p.z_sh = z.stride()[:2]
    if D is not None:
        p.D_sh, p.D_sp = _D_strides(D)
    p.dt_softplus = dt_softplus
    p.dtype = _DTYPE_CODE[x.dtype]
    _backend._C.launch_ssd_state_update_cpu(p, torch.get_num_threads())


def run_chunk_scan_bwd_triton(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                              cu_seqlens, dt_softplus, dt_min, dt_max, lag_window, lag_sinks):
    """The Triton backward: reference.chunked_bwd's results (an empty tensor for an absent D, z or dt_bias)."""
    from .triton_chunk_scan_bwd import ssd_chunk_scan_bwd
    from .triton_chunk_state import on_device

    dt_bias = None if dt_bias is None else _gate(dt_bias).contiguous()
    h0 = None if initial_states is None else initial_states.float().contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.long()
    with on_device(x):
        grads = ssd_chunk_scan_bwd(dout, dfinal_states, x, _gate(dt), _gate(A).contiguous(), B, C, chunk_size,
                                   _gate(D), z, dt_bias, h0, cu, dt_softplus, dt_min, dt_max, lag_window,
                                   lag_sinks)
    inputs = (x, dt, A, B, C, D, z, dt_bias, None)
    return tuple(x.new_empty(0) if g is None else g.to(t.dtype if t is not None else g.dtype).contiguous()
                 for g, t in zip(grads, inputs))


def run_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, out):
    """``run_state_update`` on the Triton kernel (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    from .triton_state_update import ssd_state_update

    dt_bias = None if dt_bias is None else _gate(dt_bias).contiguous()
    ssd_state_update(state, x, _gate(dt), _gate(A).contiguous(), B, C, _gate(D), z, dt_bias, dt_softplus,
                     state_batch_indices, out)


def _fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min, dt_max,
         lag_window, lag_sinks):
    # fp64 reaches the raw op only from tests (gradcheck); the kernels are fp32 inside, so the reference serves it.
    backend = _backend.choose("ssd_chunk_scan", x.device.type)
    if backend in ("cpu", "triton") and x.dtype in _DTYPE_CODE:
        _, _, H, P = x.shape
        out = x.new_empty(x.shape)  # [B, T, H, P]
        N = _num_seqs(x, cu_seqlens)
        final_states = x.new_empty(N, H, P, B.shape[3], dtype=torch.float32)  # [N, H, P, N_state]
        run = run_chunk_scan_triton if backend == "triton" else run_chunk_scan
        run(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min,
            dt_max, lag_window, lag_sinks, out, final_states)
        return out, final_states
    out, final_states = reference.chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens,
                                          dt_softplus, (dt_min, dt_max), _lag(lag_window, lag_sinks))
    return out.contiguous(), final_states.contiguous()


def _bwd_cpu(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens,
             dt_softplus, dt_min, dt_max, lag_window, lag_sinks):
    """The CPU kernel's gradients, in the op's output convention (see ``_bwd``)."""
    def fp32(t):
        return None if t is None else torch.empty(t.shape, dtype=torch.float32)

    # autograd may hand an expanded (stride-0) gradient: the kernel reads rows with unit stride
    dout = dout.to(x.dtype)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    grads = (x.new_empty(x.shape),  # dx [B, T, H, P]
             fp32(dt), fp32(A),  # ddt [B, T, H], dA [H]
             B.new_empty(B.shape), C.new_empty(C.shape),  # dB, dC [B, T, G, N_state]
             fp32(D),  # dD [H] or [H, P]
             None if z is None else z.new_empty(z.shape),  # dz [B, T, H, P]
             fp32(dt_bias),  # ddt_bias [H]
             torch.empty(_num_seqs(x, cu_seqlens), *x.shape[2:], B.shape[3]))  # dinitial [N, H, P, N_state] fp32
    run_chunk_scan_bwd(dout, dfinal_states.float().contiguous(), x, dt, A, B, C, chunk_size, D, z, dt_bias,
                       initial_states, cu_seqlens, dt_softplus, dt_min, dt_max, lag_window, lag_sinks, grads)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial = grads
    return (dx, ddt.to(dt.dtype), dA.to(A.dtype), dB, dC, x.new_empty(0) if D is None else dD.to(D.dtype),
            x.new_empty(0) if z is None else dz, x.new_empty(0) if dt_bias is None else ddt_bias.to(dt_bias.dtype),
            dinitial)


def _bwd(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus,
         dt_min, dt_max, lag_window, lag_sinks):
    backend = _backend.choose("ssd_chunk_scan_bwd", x.device.type)
    if backend == "cpu" and x.dtype in _DTYPE_CODE:
        return _bwd_cpu(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens,
                        dt_softplus, dt_min, dt_max, lag_window, lag_sinks)
    if backend == "triton" and x.dtype in _DTYPE_CODE:
        return run_chunk_scan_bwd_triton(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias,
                                         initial_states, cu_seqlens, dt_softplus, dt_min, dt_max, lag_window,
                                         lag_sinks)
    grads = reference.chunked_bwd(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                  cu_seqlens, dt_softplus, (dt_min, dt_max), _lag(lag_window, lag_sinks))
    # an absent D, z or dt_bias has no gradient: an empty tensor holds its slot
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)


def _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    backend = _backend.choose("ssd_state_update", x.device.type)
    if backend in ("cpu", "triton") and x.dtype in _DTYPE_CODE and state.dtype == torch.float32:
        out = x.new_empty(x.shape)  # [B, H, P]
        run = run_state_update_triton if backend == "triton" else run_state_update
        run(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, out)
        return out
    return reference.state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


for _key in ("CPU", "CUDA"):
    torch.library.impl("ahn::ssd_chunk_scan", _key, _fwd)
    torch.library.impl("ahn::ssd_chunk_scan_bwd", _key, _bwd)
    torch.library.impl("ahn::ssd_state_update", _key, _state_update)


# ----------------------------------------------------------------------------
# 3. fakes (allocate as the implementations do: fresh, contiguous)
# ----------------------------------------------------------------------------
@torch.library.register_fake("ahn::ssd_chunk_scan")
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min, dt_max,
      lag_window, lag_sinks):
    _, _, H, P = x.shape
    final_states = x.new_empty(_num_seqs(x, cu_seqlens), H, P, B.shape[3], dtype=_state_dtype(x))
    return x.new_empty(x.shape), final_states


@torch.library.register_fake("ahn::ssd_chunk_scan_bwd")
def _(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus,
      dt_min, dt_max, lag_window, lag_sinks):
    def like(t):
        return x.new_empty(0) if t is None else t.new_empty(t.shape)

    dinitial = x.new_empty(_num_seqs(x, cu_seqlens), x.shape[2], x.shape[3], B.shape[3], dtype=_state_dtype(x))
    return like(x), like(dt), like(A), like(B), like(C), like(D), like(z), like(dt_bias), dinitial


@torch.library.register_fake("ahn::ssd_state_update")
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------
# 4. autograd (ssd_state_update has none: it is an inference op)
# ----------------------------------------------------------------------------
def _setup(ctx, inputs, output):
    x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, *flags = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens)
    ctx.chunk_size, ctx.flags = chunk_size, flags


def _backward(ctx, dout, dfinal_states):
    # autograd materialises the gradient of an unused output as zeros, so neither is None
    x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial = torch.ops.ahn.ssd_chunk_scan_bwd(
        dout, dfinal_states, x, dt, A, B, C, ctx.chunk_size, D, z, dt_bias, initial_states, cu_seqlens, *ctx.flags)

    def present(t, g):
        return None if t is None else g

    return (dx, ddt, dA, dB, dC, None, present(D, dD), present(z, dz), present(dt_bias, ddt_bias),
            present(initial_states, dinitial), None, None, None, None, None, None)


torch.library.register_autograd("ahn::ssd_chunk_scan", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------
# 5. public functions
# ----------------------------------------------------------------------------
def _check_groups(H: int, G: int) -> None:
    if G < 1 or H % G:
        raise ValueError(f"B: its {G} groups (dim G) must divide the {H} heads of x (dim H)")


def _check_D(D, H: int, P: int) -> None:
    if isinstance(D, torch.Tensor) and D.dim() == 2:
        check.tensor("D", D, ndim=2, dims="H P", dtypes=GATE_DTYPES)
        check.shape("D", D, (H, P), "H P")
    else:
        check.tensor("D", D, ndim=1, dims="H", dtypes=GATE_DTYPES)
        check.shape("D", D, (H,), "H")


def _check_params(x, A, B, C, D, z, dt_bias, lead: str) -> None:
    """A, B, C, D, z, dt_bias against x [*lead, H, P] (the checks the scan and the decode step share)."""
    H, P = x.shape[-2:]
    n = x.dim() - 2
    check.tensor("A", A, ndim=1, dims="H", dtypes=GATE_DTYPES)
    check.shape("A", A, (H,), "H")
    for name, t in (("B", B), ("C", C)):
        check.tensor(name, t, ndim=n + 2, dims=f"{lead} G N_state")
        check.shape(name, t, (*x.shape[:n], None, None), f"{lead} G N_state")
    check.shape("C", C, tuple(B.shape), f"{lead} G N_state")
    _check_groups(H, B.shape[-2])
    check.head_dim("B", B.shape[-1])
    if D is not None:
        _check_D(D, H, P)
    if z is not None:
        check.tensor("z", z, ndim=n + 2, dims=f"{lead} H P")
        check.shape("z", z, tuple(x.shape), f"{lead} H P")
    if dt_bias is not None:
        check.tensor("dt_bias", dt_bias, ndim=1, dims="H", dtypes=GATE_DTYPES)
        check.shape("dt_bias", dt_bias, (H,), "H")
    check.same_dtype("x", x, B=B, C=C, z=z)


def _check_dt_limit(dt_limit) -> tuple[float, float]:
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit)):
        raise TypeError(f"dt_limit: expected (dt_min, dt_max) as two floats, got {dt_limit!r}")
    dt_min, dt_max = float(dt_limit[0]), float(dt_limit[1])
    if not dt_min <= dt_max:  # also rejects NaN
        raise ValueError(f"dt_limit: needs dt_min <= dt_max, got {dt_limit!r}")
    return dt_min, dt_max


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def ssd_chunk_scan(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, initial_states=None,
                   cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                   *, lag=None):
    """Mamba2 SSD chunked scan, ``mamba_chunk_scan_combined`` semantics.

    Head h reads B/C group h // (H // G) and keeps a fp32 state [P, N_state]:
    dt_t = clamp(softplus(dt_t + dt_bias), dt_limit) (softplus only if
    ``dt_softplus``, threshold 20; the clamp always applies, as in mamba);
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ; out_t = (h_t C_t + D x_t) · silu(z_t).

    Args:
        x: [B, T, H, P], fp32/fp16/bf16; P in 1..256.
        dt: [B, T, H]. A: [H]. Any float dtype; read as fp32.
        B, C: [B, T, G, N_state], x's dtype; G divides H; N_state in 1..256.
        chunk_size: a power of two in 16..256.
        D: [H] or [H, P], or None. z: [B, T, H, P] in x's dtype, or None. dt_bias: [H] or None.
        initial_states: [N, H, P, N_state] fp32, or None (zeros).
        cu_seqlens: [N+1] int32/int64 offsets of a packed batch (B = 1), or None (N = B).
            Empty sequences are allowed.
        dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: (dt_min, dt_max), dt_min <= dt_max.
        return_final_states: also return the state after each sequence.
        lag: (window_size, num_sinks) or None. Per sequence, row t reads (with C_t)
            the state that absorbed tokens num_sinks .. t - window_size; rows with
            t - window_size < num_sinks have an empty memory. D x_t and silu(z_t)
            still apply to row t. initial_states is the state before token
            num_sinks; the final state is after token T_seq - 1 - window_size.
    Returns:
        out [B, T, H, P] in x's dtype, and with ``return_final_states`` also
        final_states [N, H, P, N_state] fp32.
    """
    check.tensor("x", x, ndim=4, dims="B T H P")
    Bsz, T, H, P = x.shape
    check.head_dim("x", P)
    check.tensor("dt", dt, ndim=3, dims="B T H", dtypes=GATE_DTYPES)
    check.shape("dt", dt, (Bsz, T, H), "B T H")
    _check_params(x, A, B, C, D, z, dt_bias, "B T")
    check.same_device("x", x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    check.chunk_size(chunk_size, CHUNK_SIZES)
    N = check.cu_seqlens(cu_seqlens, x, Bsz, T, ref_name="x")
    if initial_states is not None:
        check.tensor("initial_states", initial_states, ndim=4, dims="N H P N_state", dtypes=(torch.float32,))
        check.shape("initial_states", initial_states, (N, H, P, B.shape[3]), "N H P N_state")
    _check_flag("dt_softplus", dt_softplus)
    _check_flag("return_final_states", return_final_states)
    dt_min, dt_max = _check_dt_limit(dt_limit)
    lag_window, lag_sinks = check.lag(lag) or (0, 0)
    out, final_states = torch.ops.ahn.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                                     cu_seqlens, dt_softplus, dt_min, dt_max, lag_window, lag_sinks)
    return (out, final_states) if return_final_states else out


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     state_batch_indices=None):
    """One SSD decode step, ``selective_state_update`` semantics; ``state`` is updated in place.

    Per row b and head h (B/C group h // (H // G)), with s = state[state_batch_indices[b]]:
    dt = softplus(dt + dt_bias) (if ``dt_softplus``; threshold 20; no dt_limit, as mamba);
    s <- exp(dt A) s + dt x Bᵀ; out = (s C + D x) · silu(z).

    Args:
        state: [N, H, P, N_state] fp32, updated in place (N = B without state_batch_indices).
        x: [B, H, P], fp32/fp16/bf16; P in 1..256.
        dt: [B, H]. A: [H]. Any float dtype; read as fp32.
        B, C: [B, G, N_state], x's dtype; G divides H; N_state in 1..256.
        D: [H] or [H, P], or None. z: [B, H, P] in x's dtype, or None. dt_bias: [H] or None.
        dt_softplus: apply softplus to dt + dt_bias.
        state_batch_indices: [B] int32/int64 in 0..N-1, or None; rows must name distinct slots.
    Returns:
        out [B, H, P] in x's dtype.
    """
    check.tensor("x", x, ndim=3, dims="B H P")
    Bsz, H, P = x.shape
    check.head_dim("x", P)
    check.tensor("state", state, ndim=4, dims="N H P N_state", dtypes=(torch.float32,))
    check.tensor("dt", dt, ndim=2, dims="B H", dtypes=GATE_DTYPES)
    check.shape("dt", dt, (Bsz, H), "B H")
    _check_params(x, A, B, C, D, z, dt_bias, "B")
    check.shape("state", state, (Bsz if state_batch_indices is None else None, H, P, B.shape[2]),
                "N H P N_state")
    check.same_device("x", x, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if state_batch_indices is not None:
        check.indices("state_batch_indices", state_batch_indices, Bsz, state.shape[0], x, "x")
    _check_flag("dt_softplus", dt_softplus)
    return torch.ops.ahn.ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
