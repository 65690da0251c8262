"""Index width of a GPU launch: 32-bit element offsets unless one can reach 2^31.

The Triton kernels and the CUDA kernel compute element offsets in int32 when no
offset they form can reach 2^31, and in int64 otherwise (a constexpr ``INT64``
in Triton, a template parameter in CUDA): 64-bit offsets cost each live offset
a second register and each multiply-add a second instruction. The fused
recurrent Triton kernel is the exception, int64 always (its module says why). Pointers are
64-bit either way; an int32 offset is sign-extended when it meets one, so a
base pointer plus an int32 offset below 2^31 elements is exact.

The launcher decides, per launch, from every tensor the kernel touches (inputs,
outputs and scratch, index tables aside): an offset from a tensor's first
element is at most its ``reach``, Σ (size - 1)·|stride|. A size-1 dim adds
nothing whatever its stride (its index is 0; Triton passes an integer argument
>= 2^31 as int64, so such a stride's product is 64-bit on either path) and an
empty tensor is never read. Every offset a kernel forms indexes one tensor of
its launch, flat products over a scratch buffer included (((b·T + t)·H + h)·D
into a contiguous [B, T, H, D] is at most its numel - 1), so no launch forms a
larger one; offsets of masked-off lanes (padding rows past T, the slot after a
sequence's last chunk) may wrap in int32, and are never dereferenced.

The C++ CPU kernels always use int64 (free on x86-64).
"""

from __future__ import annotations

LIMIT = 2**31


def reach(t) -> int:
    """The largest element offset from ``t``'s first element to another of its elements; -1 if empty."""
    if t.numel() == 0:
        return -1
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def needs_int64(*tensors) -> bool:
    """Whether a launch touching ``tensors`` (None entries skipped) can form an element offset >= 2^31."""
    return any(reach(t) >= LIMIT for t in tensors if t is not None)
