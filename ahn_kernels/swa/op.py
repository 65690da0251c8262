"""Sliding-window attention with sinks: ``torch.ops.ahn.swa_attention`` (+ backward) and ``swa_decode``."""

from __future__ import annotations

import torch

from .. import _backend, _validate as check
from . import reference

# ----------------------------------------------------------------------------
# 1. schemas. window_size None = full causal. The forward returns lse, which
#    the backward needs; swa_decode writes the new token into the cache.
# ----------------------------------------------------------------------------
torch.library.define(
    "ahn::swa_attention",
    "(Tensor q, Tensor k, Tensor v, int? window_size, int num_sinks, float softmax_scale, "
    "Tensor? cu_seqlens) -> (Tensor, Tensor)",
)
torch.library.define(
    "ahn::swa_attention_bwd",
    "(Tensor do, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, int? window_size, "
    "int num_sinks, float softmax_scale, Tensor? cu_seqlens) -> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "ahn::swa_decode",
    "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens, "
    "int window_size, int num_sinks, float softmax_scale) -> Tensor",
)


# ----------------------------------------------------------------------------
# 2. device implementations
# ----------------------------------------------------------------------------
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common/dtype.h DType


def _fwd(q, k, v, window_size, num_sinks, softmax_scale, cu_seqlens):
    backend = _backend.choose("swa_attention", q.device.type)
    # fp64 reaches the op only from tests (the public function rejects it): the reference serves it.
    if backend in ("cpu", "triton") and q.dtype in _DTYPE_CODE:
        B, T, HQ, D = q.shape
        o = q.new_empty(B, T, HQ, D)  # [B, T, HQ, D]
        lse = q.new_empty(B, HQ, T, dtype=torch.float32)  # [B, HQ, T]
        run = run_cpu if backend == "cpu" else run_triton
        run(q, k, v, window_size, num_sinks, softmax_scale, cu_seqlens, o, lse)
        return o, lse
    return reference.blockwise(q, k, v, window_size, num_sinks, softmax_scale, cu_seqlens)


def _params(q, k, v, window_size, num_sinks, softmax_scale, cu, o, lse):
    """The forward's SwaParams (o and lse are written by the forward, read by the backward)."""
    B, T, HQ, D = q.shape
    p = _backend._C.SwaParams()
    p.q, p.k, p.v, p.o, p.lse = (t.data_ptr() for t in (q, k, v, o, lse))
    p.cu_seqlens = 0 if cu is None else cu.data_ptr()
    p.B, p.T, p.N = B, T, B if cu is None else cu.shape[0] - 1
    p.HQ, p.HK, p.D = HQ, k.shape[2], D
    p.W = 0 if window_size is None else window_size  # 0: full causal
    p.S = num_sinks
    p.q_sb, p.q_st, p.q_sh = q.stride()[:3]
    p.k_sb, p.k_st, p.k_sh = k.stride()[:3]
    p.v_sb, p.v_st, p.v_sh = v.stride()[:3]
    p.scale = softmax_scale
    p.dtype = _DTYPE_CODE[q.dtype]
    return p


def run_cpu(q, k, v, window_size, num_sinks, softmax_scale, cu_seqlens, o, lse):
    """Run the compiled CPU forward, writing ``o`` and ``lse`` in place.

    o: [B, T, HQ, D] contiguous in q's dtype; lse: [B, HQ, T] fp32 contiguous.
    Exposed so that tests can hand the kernel outputs inside red zones.
    """
    cu = None if cu_seqlens is None else cu_seqlens.long()  # the kernel reads int64 offsets; owned until it returns
    p = _params(q, k, v, window_size, num_sinks, softmax_scale, cu, o, lse)
    _backend._C.launch_swa_fwd_cpu(p, torch.get_num_threads())


def run_triton(q, k, v, window_size, num_sinks, softmax_scale, cu_seqlens, o, lse):
    """Run the Triton forward, writing ``o`` and ``lse`` in place (shapes as ``run_cpu``)."""
    from .triton_fwd import swa_fwd
    swa_fwd(q, k, v, window_size, num_sinks, softmax_scale, cu_seqlens, o, lse)


def _bwd(do, dlse, q, k, v, o, lse, window_size, num_sinks, softmax_scale, cu_seqlens):
    backend = _backend.choose("swa_attention_bwd", q.device.type)
    if backend == "triton" and q.dtype in _DTYPE_CODE:
        from .triton_bwd import swa_bwd
        return swa_bwd(do, dlse, q, k, v, o, lse, window_size, num_sinks, softmax_scale, cu_seqlens)
    if backend == "cpu" and q.dtype in _DTYPE_CODE:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, T, HQ, D]
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)  # [B, T, HK, D]
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)  # [B, T, HK, D]
        run_cpu_bwd(do, dlse, q, k, v, o, lse, window_size, num_sinks, softmax_scale, cu_seqlens, dq, dk, dv)
        return dq, dk, dv
    return reference.blockwise_bwd(do, dlse, q, k, v, o, lse, window_size, num_sinks, softmax_scale, cu_seqlens)


def run_cpu_bwd(do, dlse, q, k, v, o, lse, window_size, num_sinks, softmax_scale, cu_seqlens, dq, dk, dv):
    """Run the compiled CPU backward, writing ``dq``, ``dk``, ``dv`` in place.

    do: [B, T, HQ, D] last dim contiguous; dlse: [B, HQ, T] or None; o, lse: the forward's outputs.
    dq: [B, T, HQ, D], dk, dv: [B, T, HK, D], contiguous in q's dtype.
    """
    cu = None if cu_seqlens is None else cu_seqlens.long()  # int64 offsets, owned until the kernel returns
    # o and lse come from the forward, contiguous (no copy); dlse is the small fp32 [B, HQ, T].
    o, lse = o.contiguous(), lse.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    do = do if do.stride(-1) == 1 else do.contiguous()
    p = _backend._C.SwaBwdParams()
    p.fwd = _params(q, k, v, window_size, num_sinks, softmax_scale, cu, o, lse)
    p.dout, p.dq, p.dk, p.dv = (t.data_ptr() for t in (do, dq, dk, dv))
    p.dlse = 0 if dlse is None else dlse.data_ptr()
    p.do_sb, p.do_st, p.do_sh = do.stride()[:3]
    _backend._C.launch_swa_bwd_cpu(p, torch.get_num_threads())


def _decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks, softmax_scale):
    backend = _backend.choose("swa_decode", q.device.type)
    if backend in ("cpu", "triton") and q.dtype in _DTYPE_CODE:
        o = q.new_empty(q.shape)  # [B, 1, HQ, D]
        if backend == "cpu":
            run_decode_cpu(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks, softmax_scale,
                           o)
        else:
            from .triton_decode import swa_decode as run_triton_decode
            run_triton_decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks,
                              softmax_scale, o)
        return o
    return reference.decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks,
                            softmax_scale)


def run_decode_cpu(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks, softmax_scale, o):
    """Run the compiled CPU decode step: writes k_new/v_new into the caches and ``o`` [B, 1, HQ, D] (contiguous).

    Reads only pointers, sizes and strides: no copy, no sync. Exposed so that tests can
    hand the kernel outputs inside red zones.
    """
    B, _, HQ, D = q.shape
    p = _backend._C.SwaDecodeParams()
    p.q, p.k_cache, p.v_cache, p.k_new, p.v_new, p.cache_seqlens, p.o = (
        t.data_ptr() for t in (q, k_cache, v_cache, k_new, v_new, cache_seqlens, o))
    p.B, p.HQ, p.HK, p.D, p.W, p.S = B, HQ, k_cache.shape[2], D, window_size, num_sinks
    p.q_sb, _, p.q_sh = q.stride()[:3]
    p.kc_sb, p.kc_st, p.kc_sh = k_cache.stride()[:3]
    p.vc_sb, p.vc_st, p.vc_sh = v_cache.stride()[:3]
    p.kn_sb, _, p.kn_sh = k_new.stride()[:3]
    p.vn_sb, _, p.vn_sh = v_new.stride()[:3]
    p.scale = softmax_scale
    p.dtype = _DTYPE_CODE[q.dtype]
    _backend._C.launch_swa_decode_cpu(p, torch.get_num_threads())


for _key in ("CPU", "CUDA"):
    torch.library.impl("ahn::swa_attention", _key, _fwd)
    torch.library.impl("ahn::swa_attention_bwd", _key, _bwd)
    torch.library.impl("ahn::swa_decode", _key, _decode)


# ----------------------------------------------------------------------------
# 3. fakes (allocate as the implementations do: fresh, contiguous)
# ----------------------------------------------------------------------------
@torch.library.register_fake("ahn::swa_attention")
def _(q, k, v, window_size, num_sinks, softmax_scale, cu_seqlens):
    B, T, HQ, D = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, T, HQ, D), q.new_empty(B, HQ, T, dtype=lse_dtype)


@torch.library.register_fake("ahn::swa_attention_bwd")
def _(do, dlse, q, k, v, o, lse, window_size, num_sinks, softmax_scale, cu_seqlens):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("ahn::swa_decode")
def _(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks, softmax_scale):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------
# 4. autograd (swa_decode has none: it is an inference op)
# ----------------------------------------------------------------------------
def _setup(ctx, inputs, output):
    q, k, v, window_size, num_sinks, softmax_scale, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.window_size, ctx.num_sinks, ctx.softmax_scale = window_size, num_sinks, softmax_scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    if do is None:  # only lse was used
        do = torch.zeros_like(o)
    dq, dk, dv = torch.ops.ahn.swa_attention_bwd(do, dlse, q, k, v, o, lse, ctx.window_size, ctx.num_sinks,
                                                 ctx.softmax_scale, cu_seqlens)
    return dq, dk, dv, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("swa_attention: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("ahn::swa_attention", _backward, setup_context=_setup)
# Without an autograd formula of its own, a second backward through the bwd op
# would silently return nothing (PyTorch only warns): fail loudly instead.
torch.library.register_autograd("ahn::swa_attention_bwd", _no_double_backward)


# ----------------------------------------------------------------------------
# 5. public functions
# ----------------------------------------------------------------------------
def _scale(softmax_scale, D: int) -> float:
    if softmax_scale is None:
        return D ** -0.5
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale: expected a float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def swa_attention(q, k, v, window_size, num_sinks=0, softmax_scale=None, *, cu_seqlens=None, return_lse=False):
    """Causal sliding-window attention with sink tokens, GQA and variable-length batches.

    Key ``j`` is visible to query ``i`` (positions within one sequence) iff
    ``j <= i`` and (``i - j < window_size`` or ``j < num_sinks``).

    Args:
        q: [B, T, HQ, D]
        k, v: [B, T, HK, D], HK divides HQ (grouped query heads share k/v; nothing is repeated).
        window_size: W >= 1 recent keys (the query's own key included, sinks excluded), or None for full causal.
        num_sinks: S, the first S tokens of each sequence are visible to every later query.
        softmax_scale: default D^-0.5.
        cu_seqlens: [N+1] int32/int64 offsets of a packed batch (B = 1); empty sequences allowed.
        return_lse: also return the softmax log-sum-exp.
    Returns:
        o [B, T, HQ, D] in q.dtype; with ``return_lse``, (o, lse [B, HQ, T] fp32).
    Differentiable in q, k, v (and through lse).
    """
    check.tensor("q", q, ndim=4, dims="B T HQ D")
    B, T, HQ, D = q.shape
    check.tensor("k", k, ndim=4, dims="B T HK D")
    check.tensor("v", v, ndim=4, dims="B T HK D")
    check.same_dtype("q", q, k=k, v=v)
    check.same_device("q", q, k=k, v=v)
    check.shape("k", k, (B, T, None, D), "B T HK D")
    if HQ % k.shape[2]:
        raise ValueError(f"k: its {k.shape[2]} heads (HK) must divide the {HQ} query heads (HQ)")
    check.shape("v", v, tuple(k.shape), "B T HK D")
    check.head_dim("q", D)
    if window_size is not None:
        check.window(window_size)
    check.sinks(num_sinks)
    scale = _scale(softmax_scale, D)
    check.cu_seqlens(cu_seqlens, q, B, T)
    o, lse = torch.ops.ahn.swa_attention(q, k, v, window_size, num_sinks, scale, cu_seqlens)
    return (o, lse) if return_lse else o


def swa_decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks=0, softmax_scale=None):
    """One decode step of sliding-window attention over the AHN ring-buffer KV cache.

    Token p lives in slot p if p < S, else in slot S + (p - S) mod W. The step
    writes k_new/v_new into slot(cache_seqlens[b]) in place (overwriting the
    token that left the window: fold it into the memory first, see
    ``ahn_evict_update``), then attends over the sinks and the window. It does
    not advance ``cache_seqlens``. No host sync, no data-dependent shape.

    Args:
        q: [B, 1, HQ, D]
        k_cache, v_cache: [B, S + W, HK, D], mutated.
        k_new, v_new: [B, 1, HK, D]
        cache_seqlens: [B] int32, the position of the new token (= tokens already seen).
        window_size: W >= 1. num_sinks: S >= 0. softmax_scale: default D^-0.5.
    Returns:
        o [B, 1, HQ, D] in q.dtype.
    """
    check.tensor("q", q, ndim=4, dims="B 1 HQ D")
    B, _, HQ, D = q.shape
    check.window(window_size)
    check.sinks(num_sinks)
    check.shape("q", q, (B, 1, HQ, D), "B 1 HQ D")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check.tensor(name, t, ndim=4, dims="B S+W HK D")
    HK = k_cache.shape[2]
    check.shape("k_cache", k_cache, (B, num_sinks + window_size, HK, D), "B S+W HK D")
    check.shape("v_cache", v_cache, (B, num_sinks + window_size, HK, D), "B S+W HK D")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check.tensor(name, t, ndim=4, dims="B 1 HK D")
        check.shape(name, t, (B, 1, HK, D), "B 1 HK D")
    check.same_dtype("q", q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    if HQ % HK:
        raise ValueError(f"k_cache: its {HK} heads (HK) must divide the {HQ} query heads (HQ)")
    check.head_dim("q", D)
    check.tensor("cache_seqlens", cache_seqlens, ndim=1, dims="B", dtypes=(torch.int32,))
    check.shape("cache_seqlens", cache_seqlens, (B,), "B")
    check.same_device("q", q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new,
                      cache_seqlens=cache_seqlens)
    # Reading positions from a GPU would sync every decode step; host tensors are free to check.
    if cache_seqlens.device.type == "cpu" and check.values_readable(cache_seqlens) and B \
            and int(cache_seqlens.min()) < 0:
        raise ValueError(f"cache_seqlens: positions must be >= 0, got {cache_seqlens.tolist()}")
    scale = _scale(softmax_scale, D)
    return torch.ops.ahn.swa_decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, window_size, num_sinks,
                                    scale)
