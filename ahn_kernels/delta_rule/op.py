"""DeltaNet and Gated DeltaNet ops: ``torch.ops.ahn.chunk_{,gated_}delta_rule`` (forward and
backward) and ``torch.ops.ahn.fused_recurrent_{,gated_}delta_rule`` (forward only).

DeltaNet is the gated rule with g = 0: every implementation below is written once
for the gated rule and takes ``g=None`` for DeltaNet. Semantics: ``reference.py``.
"""

from __future__ import annotations

import functools

import torch

from .. import _backend, _index, _validate as check
from . import reference

CHUNK_SIZES = (16, 32, 64)

# ----------------------------------------------------------------------------
# 1. Schemas. The forward always returns (o, final_state); lag_window = 0 means no lag.
# ----------------------------------------------------------------------------
_CONFIG = "float scale, Tensor? initial_state, Tensor? cu_seqlens, bool use_qk_l2norm"
_CHUNK_CONFIG = f"{_CONFIG}, int chunk_size, int lag_window, int lag_sinks"
torch.library.define("ahn::chunk_delta_rule",
                     f"(Tensor q, Tensor k, Tensor v, Tensor beta, {_CHUNK_CONFIG}) -> (Tensor, Tensor)")
torch.library.define("ahn::chunk_delta_rule_bwd",
                     f"(Tensor grad_o, Tensor grad_ht, Tensor q, Tensor k, Tensor v, Tensor beta, {_CHUNK_CONFIG})"
                     " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
torch.library.define("ahn::chunk_gated_delta_rule",
                     f"(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, {_CHUNK_CONFIG}) -> (Tensor, Tensor)")
torch.library.define("ahn::chunk_gated_delta_rule_bwd",
                     f"(Tensor grad_o, Tensor grad_ht, Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, "
                     f"{_CHUNK_CONFIG}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
torch.library.define("ahn::fused_recurrent_delta_rule",
                     f"(Tensor q, Tensor k, Tensor v, Tensor beta, {_CONFIG}) -> (Tensor, Tensor)")
torch.library.define("ahn::fused_recurrent_gated_delta_rule",
                     f"(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, {_CONFIG}) -> (Tensor, Tensor)")


def _lag(lag_window: int, lag_sinks: int):
    return (lag_window, lag_sinks) if lag_window else None


def _sizes(q, k, v, beta, cu_seqlens):
    """(B, T, HS, K, V, N) of a call."""
    B, T, _, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return B, T, beta.shape[-1], K, v.shape[-1], N


# ----------------------------------------------------------------------------
# 2. Device implementations (one function for CPU and CUDA).
# ----------------------------------------------------------------------------
def _chunk(op, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks):
    backend = _backend.choose(op, q.device.type)
    if backend in ("cpu", "triton"):
        B, T, HS, K, V, N = _sizes(q, k, v, beta, cu_seqlens)
        o = q.new_empty(B, T, HS, V)  # [B, T, HS, V]
        ht = q.new_empty(N, HS, K, V, dtype=torch.float32)  # [N, HS, K, V]
        run = run_chunk if backend == "cpu" else run_chunk_triton
        run(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks,
            o, ht)
        return o, ht
    o, ht = reference.chunked(q, k, v, beta, g, scale, initial_state, cu_seqlens, use_qk_l2norm,
                              _lag(lag_window, lag_sinks), chunk_size)
    return o.contiguous(), ht.contiguous()


def _chunk_bwd(op, grad_o, grad_ht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
               chunk_size, lag_window, lag_sinks):
    """(dq, dk, dv, [dg,] dbeta, dh0); dh0 also without an initial state (the gradient w.r.t. zeros)."""
    backend = _backend.choose(op + "_bwd", q.device.type)
    if backend in ("cpu", "triton"):
        B, T, HS, K, V, N = _sizes(q, k, v, beta, cu_seqlens)
        # The kernel reads upstream gradients as o's dtype with a unit last stride, the state's as fp32.
        grad_o = grad_o.to(q.dtype)
        grad_o = grad_o if grad_o.stride(-1) == 1 else grad_o.contiguous()
        grad_ht = grad_ht.float().contiguous()
        dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # like q, k, v
        dbeta = q.new_empty(B, T, HS, dtype=torch.float32)  # [B, T, HS]
        dg = None if g is None else q.new_empty(B, T, HS, dtype=torch.float32)  # [B, T, HS]
        dh0 = q.new_empty(N, HS, K, V, dtype=torch.float32)  # [N, HS, K, V]
        run = run_chunk_bwd if backend == "cpu" else run_chunk_bwd_triton
        run(grad_o, grad_ht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size,
            lag_window, lag_sinks, dq, dk, dv, dbeta, dg, dh0)
        dbeta = dbeta.to(beta.dtype)  # gate gradients in the gates' dtypes, as the reference returns them
        dg = None if g is None else dg.to(g.dtype)
    else:
        dq, dk, dv, dbeta, dg, dh0 = reference.chunked_bwd(grad_o, grad_ht, q, k, v, beta, g, scale, initial_state,
                                                           cu_seqlens, use_qk_l2norm, _lag(lag_window, lag_sinks),
                                                           chunk_size)
    grads = (dq, dk, dv, dbeta) if g is None else (dq, dk, dv, dg, dbeta)
    return (*(x.contiguous() for x in grads), dh0.contiguous())


def _chunk_delta_rule(q, k, v, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size,
                      lag_window, lag_sinks):
    return _chunk("chunk_delta_rule", q, k, v, None, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
                  chunk_size, lag_window, lag_sinks)


def _chunk_delta_rule_bwd(grad_o, grad_ht, q, k, v, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
                          chunk_size, lag_window, lag_sinks):
    return _chunk_bwd("chunk_delta_rule", grad_o, grad_ht, q, k, v, None, beta, scale, initial_state, cu_seqlens,
                      use_qk_l2norm, chunk_size, lag_window, lag_sinks)


def _chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size,
                            lag_window, lag_sinks):
    return _chunk("chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
                  chunk_size, lag_window, lag_sinks)


def _chunk_gated_delta_rule_bwd(grad_o, grad_ht, q, k, v, g, beta, scale, initial_state, cu_seqlens,
                                use_qk_l2norm, chunk_size, lag_window, lag_sinks):
    return _chunk_bwd("chunk_gated_delta_rule", grad_o, grad_ht, q, k, v, g, beta, scale, initial_state,
                      cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks)


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common/dtype.h DType


def _kernel_inputs(g, beta, initial_state, cu_seqlens):
    """The kernels' contract: gates fp32 (any strides), h0 fp32 contiguous, offsets int64.

    The caller keeps the returned tensors alive until the launch returns (on CUDA, stream
    order then keeps their memory from being reused before the kernel has read it).
    """
    return (None if g is None else g.float(), beta.float(),
            None if initial_state is None else initial_state.contiguous(),
            None if cu_seqlens is None else cu_seqlens.long())


def run_fused_recurrent(backend, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, o, final_state):
    """Run the compiled ("cpu", "cuda") or Triton kernel, writing ``o`` and ``final_state`` in place.

    o: [B, T, HS, V] contiguous in q's dtype; final_state: [N, HS, K, V] fp32 contiguous.
    Exposed so that tests can hand the kernel outputs inside red zones.
    """
    g, beta, h0, cu = _kernel_inputs(g, beta, initial_state, cu_seqlens)
    if backend == "triton":
        from .triton_recurrent import fused_recurrent_fwd
        fused_recurrent_fwd(q, k, v, g, beta, scale, h0, cu, use_qk_l2norm, o, final_state)
        return
    B, T, HS, K, V, N = _sizes(q, k, v, beta, cu)
    p = _backend._C.FusedRecurrentParams()
    p.q, p.k, p.v, p.beta, p.o, p.ht = (t.data_ptr() for t in (q, k, v, beta, o, final_state))
    p.g = 0 if g is None else g.data_ptr()
    p.h0 = 0 if h0 is None else h0.data_ptr()
    p.cu_seqlens = 0 if cu is None else cu.data_ptr()
    p.B, p.T, p.N = B, T, N
    p.HQ, p.HK, p.HV, p.HS = q.shape[2], k.shape[2], v.shape[2], HS
    p.K, p.V = K, V
    p.q_sb, p.q_st, p.q_sh = q.stride()[:3]
    p.k_sb, p.k_st, p.k_sh = k.stride()[:3]
    p.v_sb, p.v_st, p.v_sh = v.stride()[:3]
    if g is not None:
        p.g_sb, p.g_st, p.g_sh = g.stride()
    p.beta_sb, p.beta_st, p.beta_sh = beta.stride()
    p.scale = scale
    p.l2norm = use_qk_l2norm
    p.dtype = _DTYPE_CODE[q.dtype]
    if backend == "cpu":
        _backend._C.launch_fused_recurrent_fwd_cpu(p, torch.get_num_threads())
    else:
        with torch.cuda.device(q.device):  # the launcher targets the current device: make it the tensors'
            _backend._C.launch_fused_recurrent_fwd_cuda(p, _index.needs_int64(q, k, v, g, beta, h0, o, final_state),
                                                        torch.cuda.current_stream(q.device).cuda_stream)


def _chunk_params(q, k, v, g, beta, scale, h0, cu, use_qk_l2norm, chunk_size, lag_window, lag_sinks):
    """The forward's ``ChunkParams`` (o and ht unset); g, beta fp32, h0 fp32 contiguous, cu int64."""
    B, T, HS, K, V, N = _sizes(q, k, v, beta, cu)
    p = _backend._C.ChunkParams()
    p.q, p.k, p.v, p.beta = (t.data_ptr() for t in (q, k, v, beta))
    p.g = 0 if g is None else g.data_ptr()
    p.h0 = 0 if h0 is None else h0.data_ptr()
    p.cu_seqlens = 0 if cu is None else cu.data_ptr()
    p.B, p.T, p.N = B, T, N
    p.HQ, p.HK, p.HV, p.HS = q.shape[2], k.shape[2], v.shape[2], HS
    p.K, p.V = K, V
    p.C, p.W, p.S = chunk_size, lag_window, lag_sinks
    p.q_sb, p.q_st, p.q_sh = q.stride()[:3]
    p.k_sb, p.k_st, p.k_sh = k.stride()[:3]
    p.v_sb, p.v_st, p.v_sh = v.stride()[:3]
    if g is not None:
        p.g_sb, p.g_st, p.g_sh = g.stride()
    p.beta_sb, p.beta_st, p.beta_sh = beta.stride()
    p.scale = scale
    p.l2norm = use_qk_l2norm
    p.dtype = _DTYPE_CODE[q.dtype]
    return p


def run_chunk(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks,
              o, final_state):
    """Run the compiled CPU chunk kernel, writing ``o`` and ``final_state`` in place.

    o: [B, T, HS, V] contiguous in q's dtype; final_state: [N, HS, K, V] fp32 contiguous.
    Exposed so that tests can hand the kernel outputs inside red zones.
    """
    g, beta, h0, cu = _kernel_inputs(g, beta, initial_state, cu_seqlens)
    p = _chunk_params(q, k, v, g, beta, scale, h0, cu, use_qk_l2norm, chunk_size, lag_window, lag_sinks)
    p.o, p.ht = o.data_ptr(), final_state.data_ptr()
    _backend._C.launch_chunk_fwd_cpu(p, torch.get_num_threads())


def run_chunk_triton(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window,
                     lag_sinks, o, final_state):
    """Run the Triton chunk forward; arguments and outputs as ``run_chunk``."""
    from .triton_chunk import chunk_fwd
    g, beta, h0, cu = _kernel_inputs(g, beta, initial_state, cu_seqlens)
    chunk_fwd(q, k, v, g, beta, scale, h0, cu, use_qk_l2norm, chunk_size, lag_window, lag_sinks, o, final_state)


def run_chunk_bwd(grad_o, grad_ht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size,
                  lag_window, lag_sinks, dq, dk, dv, dbeta, dg, dh0):
    """Run the compiled CPU chunk backward, writing the gradients in place.

    grad_o: [B, T, HS, V] in q's dtype, last dim contiguous; grad_ht: [N, HS, K, V] fp32 contiguous.
    dq, dk, dv: like q, k, v, contiguous; dbeta, dg: [B, T, HS] fp32 contiguous (dg None without g);
    dh0: [N, HS, K, V] fp32 contiguous. Exposed so that tests can hand the outputs inside red zones.
    """
    g, beta, h0, cu = _kernel_inputs(g, beta, initial_state, cu_seqlens)
    pb = _backend._C.ChunkBwdParams()
    pb.fwd = _chunk_params(q, k, v, g, beta, scale, h0, cu, use_qk_l2norm, chunk_size, lag_window, lag_sinks)
    pb.grad_o, pb.grad_ht = grad_o.data_ptr(), grad_ht.data_ptr()
    pb.do_sb, pb.do_st, pb.do_sh = grad_o.stride()[:3]
    pb.dq, pb.dk, pb.dv, pb.dbeta, pb.dh0 = (t.data_ptr() for t in (dq, dk, dv, dbeta, dh0))
    pb.dg = 0 if dg is None else dg.data_ptr()
    _backend._C.launch_chunk_bwd_cpu(pb, torch.get_num_threads())


def run_chunk_bwd_triton(grad_o, grad_ht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
                         chunk_size, lag_window, lag_sinks, dq, dk, dv, dbeta, dg, dh0):
    """Run the Triton chunk backward; arguments and outputs as ``run_chunk_bwd``."""
    from .triton_chunk_bwd import chunk_bwd
    g, beta, h0, cu = _kernel_inputs(g, beta, initial_state, cu_seqlens)
    chunk_bwd(grad_o, grad_ht, q, k, v, g, beta, scale, h0, cu, use_qk_l2norm, chunk_size, lag_window, lag_sinks,
              dq, dk, dv, dbeta, dg, dh0)


def _fused_recurrent(op, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm):
    backend = _backend.choose(op, q.device.type)
    if backend == "reference":  # the token loop is the oracle, not a fallback: run the chunked form
        o, ht = reference.chunked(q, k, v, beta, g, scale, initial_state, cu_seqlens, use_qk_l2norm)
        return o.contiguous(), ht.contiguous()
    B, T, HS, K, V, N = _sizes(q, k, v, beta, cu_seqlens)
    o = q.new_empty(B, T, HS, V)  # [B, T, HS, V]
    ht = q.new_empty(N, HS, K, V, dtype=torch.float32)  # [N, HS, K, V]
    run_fused_recurrent(backend, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, o, ht)
    return o, ht


def _fused_recurrent_delta_rule(q, k, v, beta, scale, initial_state, cu_seqlens, use_qk_l2norm):
    return _fused_recurrent("fused_recurrent_delta_rule", q, k, v, None, beta, scale, initial_state, cu_seqlens,
                            use_qk_l2norm)


def _fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm):
    return _fused_recurrent("fused_recurrent_gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens,
                            use_qk_l2norm)


for _name, _impl in (("chunk_delta_rule", _chunk_delta_rule),
                     ("chunk_delta_rule_bwd", _chunk_delta_rule_bwd),
                     ("chunk_gated_delta_rule", _chunk_gated_delta_rule),
                     ("chunk_gated_delta_rule_bwd", _chunk_gated_delta_rule_bwd),
                     ("fused_recurrent_delta_rule", _fused_recurrent_delta_rule),
                     ("fused_recurrent_gated_delta_rule", _fused_recurrent_gated_delta_rule)):
    for _device in ("CPU", "CUDA"):
        torch.library.impl(f"ahn::{_name}", _device, _impl)


# ----------------------------------------------------------------------------
# 3. Fakes: the same allocations as the implementations.
# ----------------------------------------------------------------------------
def _fake_forward(q, k, v, beta, cu_seqlens):
    B, T, HS, K, V, N = _sizes(q, k, v, beta, cu_seqlens)
    return (q.new_empty(B, T, HS, V),  # o: [B, T, HS, V]
            q.new_empty(N, HS, K, V, dtype=torch.float32))  # final state: [N, HS, K, V]


def _fake_grads(q, k, v, gates, beta, cu_seqlens):
    """dq, dk, dv and the gate gradients like their inputs, dh0 [N, HS, K, V] fp32; all contiguous."""
    B, T, HS, K, V, N = _sizes(q, k, v, beta, cu_seqlens)
    return (*(x.new_empty(x.shape) for x in (q, k, v, *gates)), q.new_empty(N, HS, K, V, dtype=torch.float32))


@torch.library.register_fake("ahn::chunk_delta_rule")
def _(q, k, v, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks):
    return _fake_forward(q, k, v, beta, cu_seqlens)


@torch.library.register_fake("ahn::chunk_gated_delta_rule")
def _(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks):
    return _fake_forward(q, k, v, beta, cu_seqlens)


@torch.library.register_fake("ahn::chunk_delta_rule_bwd")
def _(grad_o, grad_ht, q, k, v, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size,
      lag_window, lag_sinks):
    return _fake_grads(q, k, v, (beta,), beta, cu_seqlens)


@torch.library.register_fake("ahn::chunk_gated_delta_rule_bwd")
def _(grad_o, grad_ht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size,
      lag_window, lag_sinks):
    return _fake_grads(q, k, v, (g, beta), beta, cu_seqlens)


@torch.library.register_fake("ahn::fused_recurrent_delta_rule")
def _(q, k, v, beta, scale, initial_state, cu_seqlens, use_qk_l2norm):
    return _fake_forward(q, k, v, beta, cu_seqlens)


@torch.library.register_fake("ahn::fused_recurrent_gated_delta_rule")
def _(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm):
    return _fake_forward(q, k, v, beta, cu_seqlens)


# ----------------------------------------------------------------------------
# 4. Autograd. The fused_recurrent ops are forward-only (like fla's): their Autograd
#    kernel runs the op below autograd, so outputs never require grad and a
#    backward through them fails loudly instead of silently dropping gradients.
# ----------------------------------------------------------------------------
def _forward_only(op):
    def run(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return run


torch.library.impl("ahn::fused_recurrent_delta_rule", "Autograd",
                   _forward_only(torch.ops.ahn.fused_recurrent_delta_rule))
torch.library.impl("ahn::fused_recurrent_gated_delta_rule", "Autograd",
                   _forward_only(torch.ops.ahn.fused_recurrent_gated_delta_rule))


def _setup_chunk(ctx, inputs, output):
    *tensors, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size, lag_window, lag_sinks = inputs
    ctx.save_for_backward(*tensors, initial_state, cu_seqlens)  # (q, k, v, [g,] beta, h0, cu)
    ctx.config = (scale, use_qk_l2norm, chunk_size, lag_window, lag_sinks)
    ctx.has_initial_state = initial_state is not None


def _backward_chunk(bwd_op, ctx, grad_o, grad_ht):
    *tensors, initial_state, cu_seqlens = ctx.saved_tensors
    scale, use_qk_l2norm, chunk_size, lag_window, lag_sinks = ctx.config
    *grads, dh0 = bwd_op(grad_o, grad_ht, *tensors, scale, initial_state, cu_seqlens, use_qk_l2norm, chunk_size,
                         lag_window, lag_sinks)
    return (*grads, None, dh0 if ctx.has_initial_state else None, None, None, None, None, None)


torch.library.register_autograd("ahn::chunk_delta_rule",
                                functools.partial(_backward_chunk, torch.ops.ahn.chunk_delta_rule_bwd),
                                setup_context=_setup_chunk)
torch.library.register_autograd("ahn::chunk_gated_delta_rule",
                                functools.partial(_backward_chunk, torch.ops.ahn.chunk_gated_delta_rule_bwd),
                                setup_context=_setup_chunk)


# ----------------------------------------------------------------------------
# 5. Public functions (flash-linear-attention's names and argument order).
# ----------------------------------------------------------------------------
def _check(q, k, v, gates: dict, scale, initial_state, cu_seqlens) -> float:
    """Validate every argument shared by the four ops (``gates``: name -> tensor); return the scale."""
    check.tensor("q", q, ndim=4, dims="B T HQ K")
    check.tensor("k", k, ndim=4, dims="B T HK K")
    check.tensor("v", v, ndim=4, dims="B T HV V")
    check.same_dtype("q", q, k=k, v=v)
    B, T, HQ, K = q.shape
    check.shape("k", k, (B, T, None, K), "B T HK K")
    check.shape("v", v, (B, T), "B T HV V")
    check.head_dim("q", K)
    check.head_dim("v", v.shape[-1])
    HS = check.state_heads(HQ, k.shape[2], v.shape[2])
    for name, gate in gates.items():
        check.tensor(name, gate, ndim=3, dims="B T HS", last_contiguous=False)
        check.shape(name, gate, (B, T, HS), "B T HS")
    check.same_device("q", q, k=k, v=v, initial_state=initial_state, **gates)
    N = check.cu_seqlens(cu_seqlens, q, B, T)
    if initial_state is not None:
        check.tensor("initial_state", initial_state, ndim=4, dims="N HS K V", dtypes=(torch.float32,),
                     last_contiguous=False)
        check.shape("initial_state", initial_state, (N, HS, K, v.shape[-1]), "N HS K V")
    return K ** -0.5 if scale is None else check.number("scale", scale)


def _check_chunk(chunk_size, lag) -> tuple[int, int]:
    """Validate chunk_size and lag; return lag as the schema's (lag_window, lag_sinks)."""
    check.one_of("chunk_size", chunk_size, CHUNK_SIZES)
    lag = check.lag(lag)
    return lag if lag is not None else (0, 0)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, *, cu_seqlens=None, chunk_size=64, lag=None):
    """Gated DeltaNet, chunked: S_t = exp(g_t)(I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

    Args:
        q: [B, T, HQ, K]; k: [B, T, HK, K]; v: [B, T, HV, V] (fp32, fp16 or bf16, one dtype).
            HS = max(HQ, HK, HV), each dividing HS; state head h reads q head h // (HS // HQ), etc.
        g: [B, T, HS] log-decay (<= 0), read as fp32.
        beta: [B, T, HS], read as fp32.
        scale: readout scale, default K ** -0.5.
        initial_state: [N, HS, K, V] fp32, or None (zeros).
        output_final_state: return the final state (else None).
        use_qk_l2norm_in_kernel: L2-normalise q and k per head (eps 1e-6).
        cu_seqlens: [N+1] int32/int64 offsets of packed sequences (then B = 1), or None (N = B).
        chunk_size: C in {16, 32, 64}.
        lag: (window_size W, num_sinks S): row t reads the state after tokens S .. t-W of its
            sequence (AHN's memory), rows with t - W < S are 0. None: row t reads the state after token t.
    Returns:
        o: [B, T, HS, V] in q's dtype; final_state: [N, HS, K, V] fp32 or None.
    """
    scale = _check(q, k, v, {"g": g, "beta": beta}, scale, initial_state, cu_seqlens)
    lag_window, lag_sinks = _check_chunk(chunk_size, lag)
    o, ht = torch.ops.ahn.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, cu_seqlens,
                                                 use_qk_l2norm_in_kernel, chunk_size, lag_window, lag_sinks)
    return o, (ht if output_final_state else None)


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, *, cu_seqlens=None, chunk_size=64, lag=None):
    """DeltaNet, chunked: S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

    Arguments and returns as ``chunk_gated_delta_rule`` without g.
    q: [B, T, HQ, K]; k: [B, T, HK, K]; v: [B, T, HV, V]; beta: [B, T, HS];
    initial_state: [N, HS, K, V] fp32; returns o [B, T, HS, V] and final_state [N, HS, K, V] or None.
    """
    scale = _check(q, k, v, {"beta": beta}, scale, initial_state, cu_seqlens)
    lag_window, lag_sinks = _check_chunk(chunk_size, lag)
    o, ht = torch.ops.ahn.chunk_delta_rule(q, k, v, beta, scale, initial_state, cu_seqlens,
                                           use_qk_l2norm_in_kernel, chunk_size, lag_window, lag_sinks)
    return o, (ht if output_final_state else None)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     use_qk_l2norm_in_kernel=False, *, cu_seqlens=None):
    """Gated DeltaNet, token-serial (decode and short prefills); forward only, use the chunk op to train.

    q: [B, T, HQ, K]; k: [B, T, HK, K]; v: [B, T, HV, V]; g, beta: [B, T, HS];
    initial_state: [N, HS, K, V] fp32; cu_seqlens: [N+1]. Semantics as ``chunk_gated_delta_rule``
    without lag. Returns o [B, T, HS, V] and final_state [N, HS, K, V] fp32 or None.
    """
    scale = _check(q, k, v, {"g": g, "beta": beta}, scale, initial_state, cu_seqlens)
    o, ht = torch.ops.ahn.fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, cu_seqlens,
                                                           use_qk_l2norm_in_kernel)
    return o, (ht if output_final_state else None)


def fused_recurrent_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, *, cu_seqlens=None):
    """DeltaNet, token-serial (decode and short prefills); forward only, use the chunk op to train.

    q: [B, T, HQ, K]; k: [B, T, HK, K]; v: [B, T, HV, V]; beta: [B, T, HS];
    initial_state: [N, HS, K, V] fp32; cu_seqlens: [N+1]. Semantics as ``chunk_delta_rule``
    without lag. Returns o [B, T, HS, V] and final_state [N, HS, K, V] fp32 or None.
    """
    scale = _check(q, k, v, {"beta": beta}, scale, initial_state, cu_seqlens)
    o, ht = torch.ops.ahn.fused_recurrent_delta_rule(q, k, v, beta, scale, initial_state, cu_seqlens,
                                                     use_qk_l2norm_in_kernel)
    return o, (ht if output_final_state else None)
