"""``AHNModelCache``: a Hugging Face ``Cache`` whose layers are ``AHNCache`` objects, so ``generate`` works unchanged.

Each decoder layer's slot allocates its ``AHNCache`` (sinks + W-token ring,
gate ring, fp32 memory state; DESIGN §2) at the prompt's prefill and never
grows or reallocates it afterwards. ``get_seq_length`` counts the columns of
the (possibly padded) input consumed so far, which is what ``generate`` and
the mask helpers expect; the per-row token counts live in
``AHNCache.positions``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import AHNCache


class AHNLayerCache(CacheLayerMixin):
    """One decoder layer's slot: an ``AHNCache`` (allocated by the first prefill) and the columns seen."""

    supports_early_init = False  # sizes come from the layer at prefill, not from (num_heads, head_dim)

    def __init__(self):
        super().__init__()
        self.ahn: AHNCache | None = None
        self.seen = 0

    def allocate(self, layer, x: torch.Tensor) -> AHNCache:
        """The empty ``AHNCache`` for ``layer`` (an ``AHNAttention``) and a batch like x [B, T, hidden]."""
        mem = layer.memory
        self.ahn = AHNCache.empty(x.shape[0], layer.window_size, layer.num_sinks, layer.k_proj.out_features //
                                  layer.head_dim, layer.head_dim, mem.num_heads, mem.rule, x.dtype, x.device)
        self.is_initialized = True
        return self.ahn

    def lazy_initialization(self, key_states, value_states):
        raise NotImplementedError("AHNLayerCache: AHNAttention allocates it (allocate)")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("AHNLayerCache: AHNAttention writes it through AHNCache.prefill / step")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.ahn, self.seen, self.is_initialized = None, 0, False

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("AHNModelCache: beam search is not supported (greedy and sampling are)")

    def nbytes(self) -> int:
        """Bytes held by this layer's buffers (0 before the prefill)."""
        if self.ahn is None:
            return 0
        return sum(t.nbytes for t in (self.ahn.k, self.ahn.v, self.ahn.gates, self.ahn.state, self.ahn.positions))


class AHNModelCache(Cache):
    """The cache of a model patched by ``patch_model``: one ``AHNLayerCache`` per decoder layer.

    ``generate`` creates one by itself; pass ``cache=AHNModelCache(model)`` to keep it
    across calls. Beam search and cropping are not supported.
    """

    def __init__(self, model):
        super().__init__(layers=[AHNLayerCache() for _ in range(model.config.num_hidden_layers)])

    def layer(self, layer_idx: int) -> AHNLayerCache:
        return self.layers[layer_idx]

    def nbytes(self) -> int:
        """Bytes held by every layer's buffers."""
        return sum(layer.nbytes() for layer in self.layers)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("AHNModelCache: the memory cannot forget tokens, so the cache cannot be cropped")
