"""Which implementation serves each op: one table, one choice function.

Backends:
- ``cpu``: the compiled C++ kernel in ``ahn_kernels._C`` (CPU tensors).
- ``cuda``: the compiled CUDA kernel in ``ahn_kernels._C`` (CUDA tensors).
- ``triton``: the Triton kernel (CUDA tensors; CPU tensors too when
  ``TRITON_INTERPRET=1`` is set and the user asks for it with ``use_backend``).
- ``reference``: the vectorised PyTorch reference of the op. It is the fallback
  while an op has no compiled kernel for a device, and we say so once.

``use_backend(name)`` forces one backend inside a ``with`` block (per thread).
An op that lacks the forced backend keeps its default and warns once.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings

# torch first: _C links the system OpenMP runtime under the same soname as torch's
# bundled one, and whichever loads first serves both; torch's must be that one.
import torch  # noqa: F401

try:
    _C = importlib.import_module(f"{__package__}._C")
    _C_ERROR = None
except ImportError as exc:  # built without a compiler: every op runs its reference
    _C = None
    _C_ERROR = str(exc)

BACKENDS = ("cpu", "cuda", "triton", "reference")

# op -> device type -> kernels written for it, in order of preference.
# The reference is always there and always last.
KERNELS: dict[str, dict[str, tuple[str, ...]]] = {
    "chunk_delta_rule": {"cpu": ("cpu",), "cuda": ("triton",)},
    "chunk_delta_rule_bwd": {"cpu": ("cpu",), "cuda": ("triton",)},
    "chunk_gated_delta_rule": {"cpu": ("cpu",), "cuda": ("triton",)},
    "chunk_gated_delta_rule_bwd": {"cpu": ("cpu",), "cuda": ("triton",)},
    "fused_recurrent_delta_rule": {"cpu": ("cpu",), "cuda": ("cuda", "triton")},
    "fused_recurrent_gated_delta_rule": {"cpu": ("cpu",), "cuda": ("cuda", "triton")},
    "ssd_chunk_scan": {"cpu": ("cpu",), "cuda": ("triton",)},
    "ssd_chunk_scan_bwd": {"cpu": ("cpu",), "cuda": ("triton",)},
    "ssd_state_update": {"cpu": ("cpu",), "cuda": ("triton",)},
    "swa_attention": {"cpu": ("cpu",), "cuda": ("triton",)},
    "swa_attention_bwd": {"cpu": ("cpu",), "cuda": ("triton",)},
    "swa_decode": {"cpu": ("cpu",), "cuda": ("triton",)},
    "ahn_evict_update": {"cpu": ("cpu",), "cuda": ("triton",)},
}

_local = threading.local()
_warned: set[tuple[str, str, str]] = set()
_warn_lock = threading.Lock()


def build_info() -> dict:
    """What the compiled extension holds (empty dict and the import error if it is missing)."""
    if _C is None:
        return {"cpu": False, "cuda": False, "error": _C_ERROR}
    return dict(_C.build_info())


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(op: str, device_type: str) -> tuple[str, ...]:
    """Backends that can serve ``op`` on ``device_type`` in this installation."""
    info = build_info()
    out = []
    for name in KERNELS[op].get(device_type, ()):
        if name == "cpu" and info.get("cpu"):
            out.append(name)
        elif name == "cuda" and info.get("cuda"):
            out.append(name)
        elif name == "triton" and _triton_available():
            out.append(name)
    if device_type == "cpu" and "triton" in KERNELS[op]["cuda"] and triton_interpret() and _triton_available():
        out.append("triton")
    out.append("reference")
    return tuple(out)


def _say_once(op: str, device_type: str, msg: str) -> None:
    key = (op, device_type, msg)
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def choose(op: str, device_type: str) -> str:
    """The backend that will run ``op`` for tensors on ``device_type``."""
    backends = available(op, device_type)
    forced = getattr(_local, "forced", None)
    if forced is not None:
        if forced in backends:
            return forced
        _say_once(op, device_type, f"ahn_kernels: {op} has no '{forced}' backend for {device_type} tensors "
                  f"here; using '{backends[0]}'")
    if backends[0] == "reference":
        _say_once(op, device_type, f"ahn_kernels: {op} has no compiled kernel for {device_type} tensors yet; "
                  "running the PyTorch reference (correct, not fast)")
    return backends[0]


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` (one of ``BACKENDS``) for the ops called inside the block, in this thread."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous
