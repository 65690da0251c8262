"""``AHNAttention``: a Hugging Face Qwen2/Qwen3 attention with sliding-window + sinks attention and an AHN memory.

One definition for training, prefill and decode (DESIGN §1): query t attends
to the first S tokens and the last W tokens (itself included), and reads a
memory that absorbed tokens S .. t-W, added before ``o_proj``.

- training / no cache: ``swa_attention`` + the memory's lagged chunk op;
- prefill into an empty cache: ``AHNCache.prefill`` (the same two ops, and
  the cache keeps the sinks, the last W tokens' k/v/gates and the state);
- decode: ``AHNCache.step`` (``ahn_evict_update`` + ``swa_decode``, in place).

Padded batches (a 2D attention mask, left or right padding) are packed into
one varlen sequence per row (``cu_seqlens``) for training and prefill, so a
row's sinks and window count its real tokens only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from ..swa import swa_attention
from .cache import AHNModelCache


class AHNAttention(nn.Module):
    """Replaces a ``Qwen2Attention`` / ``Qwen3Attention``; keeps its projections (and parameter names).

    Args:
        attn: the model's attention module; its ``q_proj``, ``k_proj``, ``v_proj``,
            ``o_proj`` (and Qwen3's ``q_norm``, ``k_norm``) are reused as they are.
        memory: a ``DeltaNetMemory``, ``GatedDeltaNetMemory`` or ``Mamba2Memory``. It is
            registered by the caller where the released checkpoints keep it
            (``model.layers.{i}.ahn.fn``); this module only holds a reference.
        window_size: W, recent keys each query attends to (itself included, sinks excluded).
        num_sinks: S, leading tokens every query attends to.
    Set ``full_attention = True`` to run the base model's full causal attention
    without the memory (the distillation teacher).
    """

    def __init__(self, attn: nn.Module, memory: nn.Module, window_size: int, num_sinks: int):
        super().__init__()
        if window_size < 1 or num_sinks < 0:
            raise ValueError(f"window_size >= 1 and num_sinks >= 0 needed, got {window_size}, {num_sinks}")
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        # A plain attribute, not a submodule: the memory's parameters are registered once, at
        # model.layers.{i}.ahn.fn, so state dicts keep the released checkpoints' key layout.
        object.__setattr__(self, "memory", memory)
        self.window_size, self.num_sinks = window_size, num_sinks
        self.full_attention = False

    def _qkv(self, x, cos, sin):
        """x: [B, T, hidden], cos/sin: [B, T, D] -> post-RoPE q [B, T, HQ, D], k, v [B, T, HK, D]."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape)
        k = self.k_proj(x).view(shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q, k, self.v_proj(x).view(shape)

    def _layer(self, x, cos, sin, cu_seqlens, cache):
        """The layer over whole sequences (training, or prefill of an empty cache): [B, T, hidden] -> [B, T, HQ·D]."""
        q, k, v = self._qkv(x, cos, sin)
        if self.full_attention:
            return swa_attention(q, k, v, None, 0, self.scaling, cu_seqlens=cu_seqlens).flatten(2)
        gates = self.memory.gates(x)  # [B, T, HS, n_gates] fp32
        if cache is None:
            attn = swa_attention(q, k, v, self.window_size, self.num_sinks, self.scaling, cu_seqlens=cu_seqlens)
            mem = self.memory.readout(q, k, v, gates, (self.window_size, self.num_sinks), cu_seqlens)
        else:
            attn, mem = cache.prefill(q, k, v, gates, self.memory.A(), cu_seqlens=cu_seqlens)
        return attn.flatten(2) + self.memory.output(mem, x)

    def _decode(self, x, cos, sin, cache):
        """Tokens appended to a filled cache, one step each: [B, T, hidden] -> [B, T, HQ·D].

        Every appended column is a real token of every row (``generate`` appends ones to the mask);
        T > 1 (a second turn) steps token by token until ``AHNCache`` can continue a prefill.
        """
        q, k, v = self._qkv(x, cos, sin)
        gates = self.memory.gates(x)  # [B, T, HS, n_gates] fp32
        A = self.memory.A()
        out = []
        for t in range(x.shape[1]):
            attn, mem = cache.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], gates[:, t], A)
            out.append(attn.flatten(2) + self.memory.output(mem, x[:, t:t + 1]))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        """hidden_states: [B, T, hidden] (prenormed); position_embeddings: (cos, sin) [B, T, D];
        attention_mask: [B, T_seen + T] 2D padding mask (1 = token) or None; cache: an
        ``AHNModelCache`` or None. Returns ([B, T, hidden], None)."""
        if cache is not None and not isinstance(cache, AHNModelCache):
            raise TypeError(f"cache: AHN layers keep their state in an ahn_kernels.layers.AHNModelCache, got "
                            f"{type(cache).__name__}; pass use_cache=False or cache=AHNModelCache(model)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: AHN layers take the 2D padding mask [B, T], got shape "
                             f"{tuple(attention_mask.shape)} (patch_model registers the 'ahn' mask function)")
        if cache is not None and self.full_attention:
            raise ValueError("cache: full_attention (the distillation teacher) runs without a cache")
        cos, sin = position_embeddings
        layer_cache = None if cache is None else cache.layer(self.layer_idx)
        if layer_cache is not None and layer_cache.seen:
            out = self._decode(hidden_states, cos, sin, layer_cache.ahn)
        else:
            ahn = None if layer_cache is None else layer_cache.allocate(self, hidden_states)
            out = self._packed(hidden_states, cos, sin, attention_mask, ahn)
        if layer_cache is not None:
            layer_cache.seen += hidden_states.shape[1]
        return self.o_proj(out), None

    def _packed(self, x, cos, sin, attention_mask, ahn):
        """``_layer`` on the real tokens of each row only (one varlen sequence per row) when there is padding."""
        B, T = x.shape[:2]
        mask = None if attention_mask is None else attention_mask[:, -T:].bool()
        # One host sync per prefill/training step; decode never comes here.
        if mask is None or bool(mask.all()):
            return self._layer(x, cos, sin, None, ahn)
        idx = mask.flatten().nonzero().squeeze(1)  # [N_tok] real tokens, row-major
        lengths = mask.sum(1)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))  # [B+1]
        pick = lambda t: t.expand(B, T, -1).flatten(0, 1)[idx][None]  # [B, T, C] -> [1, N_tok, C]
        packed = self._layer(pick(x), pick(cos), pick(sin), cu, ahn)  # [1, N_tok, HQ·D]
        out = packed.new_zeros(B * T, packed.shape[-1])  # [B·T, HQ·D]; padding rows stay 0
        out[idx] = packed[0]
        return out.view(B, T, -1)
