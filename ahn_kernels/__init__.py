"""ahn_kernels: fast, exact kernels for Artificial Hippocampus Networks.

Public ops (DESIGN §2); each is also ``torch.ops.ahn.<name>``.
"""

from ._backend import build_info, use_backend
from .delta_rule import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)
from .ssd import ssd_chunk_scan, ssd_state_update
from .swa import swa_attention, swa_decode
from .cache import AHNCache, ahn_evict_update

_MODEL_GLUE = ("load_ahn_weights", "patch_model")  # need transformers: imported on first use


def __getattr__(name):
    if name in _MODEL_GLUE:
        from . import layers
        return getattr(layers, name)
    raise AttributeError(f"module 'ahn_kernels' has no attribute {name!r}")


__all__ = [
    "AHNCache",
    "ahn_evict_update",
    "build_info",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "load_ahn_weights",
    "patch_model",
    "ssd_chunk_scan",
    "ssd_state_update",
    "swa_attention",
    "swa_decode",
    "use_backend",
]
