"""Index width of a GPU launch: 32-bit element offsets unless one can reach 2^31.

The Triton kernels and the CUDA kernel compute element offsets in int32 when no
offset they form can reach 2^31, and in int64 otherwise (a constexpr ``INT64``
in Triton, a template parameter in CUDA): 64-bit offsets cost each live offset
a second register and each multiply-add a second instruction. Pointers are
64-bit either way; an int32 offset is sign-extended when it meets one, so a
base pointer plus an int32 offset below 2^31 elements is exact.

The launcher decides, from the tensors the launch touches: an offset from a
tensor's first element is at most its ``reach``, Σ (size - 1)·|stride|. A size-1
dim adds nothing whatever its stride (its index is 0; Triton passes a stride
>= 2^31 as int64 anyway, so that product is 64-bit on either path), and an empty
tensor is never read. A kernel that forms a larger offset by its own arithmetic
(a flat index over padded rows, say) passes it as ``span``. Offsets of masked-off
lanes may wrap in int32: they are never dereferenced.

The C++ CPU kernels always use int64 (free on x86-64).
"""

from __future__ import annotations

LIMIT = 2**31


def reach(t) -> int:
    """The largest element offset from ``t``'s first element to another of its elements; -1 if empty."""
    if t.numel() == 0:
        return -1
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def needs_int64(*tensors, span: int = 0) -> bool:
    """Whether a launch touching ``tensors`` (None entries skipped) can form an offset >= 2^31 elements.

    ``span``: the largest offset the kernel forms by its own index arithmetic
    beyond the tensors' reach (0 if none).
    """
    return max([span, *(reach(t) for t in tensors if t is not None)]) >= LIMIT
