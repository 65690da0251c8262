"""Mamba2 SSD: the chunked scan (training, prefill) and the decode step."""

from .op import ssd_chunk_scan, ssd_state_update

__all__ = ["ssd_chunk_scan", "ssd_state_update"]
