"""The AHN decode cache: ring-buffer KV window with sinks, arrival-time gates, and the memory state."""

from .cache import AHNCache
from .op import ahn_evict_update

__all__ = ["AHNCache", "ahn_evict_update"]
