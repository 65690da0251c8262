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

__all__ = [
    "AHNCache",
    "ahn_evict_update",
    "build_info",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "ssd_chunk_scan",
    "ssd_state_update",
    "swa_attention",
    "swa_decode",
    "use_backend",
]
