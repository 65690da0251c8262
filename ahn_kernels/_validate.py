"""Argument checks shared by every public op.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong
rank, shape, device, value) whose message starts with the argument's name.
They run once, in the public function, before any kernel.

Checks that read tensor values (``cu_seqlens`` contents) need the data on the
host: they run only where that costs no device sync, i.e. not while
``torch.compile`` traces (fake tensors carry no data) and not during CUDA-graph
capture (a sync would break the capture). Everything shape-based always runs.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _fmt(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def values_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values now is free of tracing and of a capture-breaking sync."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def tensor(name: str, t, *, ndim: int, dims: str, dtypes=FLOAT_DTYPES, last_contiguous: bool = True):
    """Check type, rank, dtype and last-dim stride of ``t``; ``dims`` names the axes, e.g. ``"B T H K"``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [{', '.join(dims.split())}], got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims [{', '.join(dims.split())}], got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported; expected one of {_fmt(dtypes)}")
    if last_contiguous and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must have stride 1 (got strides {t.stride()}); "
                         "pass a view whose last dim is contiguous")
    return t


def shape(name: str, t: torch.Tensor, expected: tuple, dims: str) -> None:
    """Check ``t.shape`` against ``expected`` (``None`` matches anything), naming the first wrong dim."""
    names = dims.split()
    for i, (got, want) in enumerate(zip(t.shape, expected)):
        if want is not None and got != want:
            raise ValueError(f"{name}: dim {i} ({names[i]}) must be {want}, got {got} "
                             f"(shape {tuple(t.shape)}, expected [{', '.join(names)}])")


def same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: on {t.device}, but {ref_name} is on {ref.device}; all tensors must share a device")


def head_dim(name: str, value: int) -> None:
    if not 1 <= value <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim must be in 1..{MAX_HEAD_DIM}, got {value}")


def state_heads(HQ: int, HK: int, HV: int) -> int:
    """HS = max(HQ, HK, HV); each head count must divide it."""
    HS = max(HQ, HK, HV)
    for name, h in (("q", HQ), ("k", HK), ("v", HV)):
        if HS % h:
            raise ValueError(f"{name}: its {h} heads must divide the state heads HS = max(HQ, HK, HV) = {HS} "
                             f"(got HQ={HQ}, HK={HK}, HV={HV})")
    return HS


def cu_seqlens(cu, ref: torch.Tensor, B: int, T: int, ref_name: str = "q") -> int:
    """Validate ``cu_seqlens`` ([N+1] int32/int64, 0 .. T non-decreasing, B = 1) against ``ref``; return N."""
    if cu is None:
        return B
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected a torch.Tensor [N+1], got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: dtype must be int32 or int64, got {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens: expected 1 dim [N+1] with N >= 0, got shape {tuple(cu.shape)}")
    same_device(ref_name, ref, cu_seqlens=cu)
    if B != 1:
        raise ValueError(f"cu_seqlens: given, so the batch dim B must be 1 (sequences are packed along T), got B={B}")
    if values_readable(cu):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"cu_seqlens: must start at 0, got {c[0]}")
        if c[-1] != T:
            raise ValueError(f"cu_seqlens: must end at T = {T} (the packed length), got {c[-1]}")
        for i in range(1, len(c)):
            if c[i] < c[i - 1]:
                raise ValueError(f"cu_seqlens: must be non-decreasing, got {c[i - 1]} then {c[i]} at index {i}")
    return cu.shape[0] - 1


def lag(value):
    """Check ``lag=(window_size, num_sinks)``; return it as a pair of ints or None."""
    if value is None:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(x, int) for x in value)):
        raise TypeError(f"lag: expected (window_size, num_sinks) as two ints, got {value!r}")
    window_size, num_sinks = value
    window(window_size)
    sinks(num_sinks)
    return int(window_size), int(num_sinks)


def window(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"window_size: expected an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"window_size: must be >= 1, got {value}")


def sinks(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"num_sinks: expected an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"num_sinks: must be >= 0, got {value}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Check that every tensor in ``others`` (None skipped) has ``ref``'s dtype."""
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} differs from {ref_name}'s "
                            f"{str(ref.dtype).replace('torch.', '')}; they must match")


def number(name: str, value) -> float:
    """Check that ``value`` is a finite real number (not a bool); return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: must be finite, got {value}")
    return float(value)


def one_of(name: str, value, allowed: tuple) -> None:
    """Check that ``value`` is one of ``allowed`` (ints are not bools)."""
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(map(str, allowed))}, got {value!r}")


def chunk_size(value, allowed: tuple) -> None:
    """Check that ``chunk_size`` is one of the ``allowed`` ints."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"chunk_size: expected an int, one of {allowed}, got {value!r}")
    if value not in allowed:
        raise ValueError(f"chunk_size: must be one of {allowed}, got {value}")


def indices(name: str, t, count: int, limit: int, ref: torch.Tensor, ref_name: str) -> None:
    """Check a [count] int32/int64 index tensor on ``ref``'s device with values in 0 .. limit-1.

    The range check reads values, so it runs only where ``values_readable`` allows.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [{count}], got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: dtype must be int32 or int64, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 1 or t.shape[0] != count:
        raise ValueError(f"{name}: expected shape [{count}], got {tuple(t.shape)}")
    same_device(ref_name, ref, **{name: t})
    if count and values_readable(t):
        lo, hi = t.min().item(), t.max().item()
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name}: values must be in 0..{limit - 1}, got min {lo}, max {hi}")
