"""Sliding-window attention with sink tokens (training, prefill and ring-buffer decode)."""

from .op import swa_attention, swa_decode

__all__ = ["swa_attention", "swa_decode"]
