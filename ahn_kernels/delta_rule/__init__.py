"""DeltaNet and Gated DeltaNet: chunked (training, prefill) and fused recurrent (decode) ops."""

from .op import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
]
