"""Hugging Face integration: ``patch_model`` (Qwen2 / Qwen3), ``load_ahn_weights``, the teacher switch.

Supported: transformers 5.x Qwen2 and Qwen3 causal LMs (``Qwen2ForCausalLM``,
``Qwen3ForCausalLM`` or their ``model``), tested with transformers 5.24.
"""

from __future__ import annotations

import contextlib
import re
import types
from pathlib import Path

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import AHNAttention
from .cache import AHNModelCache
from .memory import MEMORIES

SUPPORTED_ATTENTIONS = ("Qwen2Attention", "Qwen3Attention")
ATTN_IMPLEMENTATION = "ahn"


def _padding_mask(*, attention_mask=None, **kwargs):
    """The model's mask for AHN layers: the 2D padding mask itself (or None), never a [B, 1, T, T] matrix."""
    return attention_mask


def _never_called(*args, **kwargs):
    raise RuntimeError("the 'ahn' attention implementation is AHNAttention itself; nothing dispatches to it")


# Registering a mask function under our name keeps transformers from building a dense or flex mask
# per forward; the attention entry only makes the name a valid _attn_implementation.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _padding_mask)
ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _never_called)


class AHN(nn.Module):
    """The per-layer container the released checkpoints name ``model.layers.{i}.ahn``; the memory is ``fn``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn


def _decoder(model):
    """The ``Qwen2Model`` / ``Qwen3Model`` inside ``model``."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise TypeError(f"model: expected a Qwen2/Qwen3 causal LM or base model, got {type(model).__name__}")
    return inner


def patch_model(model, memory: str = "gdn", window_size: int = 32640, num_sinks: int = 128):
    """Turn a Qwen2 / Qwen3 model into its AHN version, in place, and return it.

    Every decoder layer's attention becomes an ``AHNAttention`` (sliding window W +
    S sinks + a memory of the tokens in between); the memory module is added at
    ``model.layers.{i}.ahn.fn`` (the released checkpoints' layout), its ``o_proj``
    zero so the patched model starts equal to the base model on T <= W + S.
    Base parameters are frozen (``requires_grad = False``): only AHN parameters
    train, as in the paper. ``model.generate`` then decodes through an
    ``AHNModelCache``; plain forwards default to no cache (``config.use_cache = False``).

    Args:
        model: a transformers ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (or their base model).
        memory: "gdn" (Gated DeltaNet), "dn" (DeltaNet) or "mamba2".
        window_size: W >= 1 recent tokens attended (the query included, sinks excluded).
        num_sinks: S >= 0 leading tokens always attended.
    """
    if memory not in MEMORIES:
        raise ValueError(f"memory: must be one of {tuple(MEMORIES)}, got {memory!r}")
    for name, value, low in (("window_size", window_size, 1), ("num_sinks", num_sinks, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    decoder = _decoder(model)
    config = decoder.config
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in decoder.layers:
        attn = layer.self_attn
        if type(attn).__name__ not in SUPPORTED_ATTENTIONS:
            raise TypeError(f"model: layer {attn.layer_idx} has {type(attn).__name__}; supported: "
                            f"{SUPPORTED_ATTENTIONS} (is the model already patched?)")
        weight = attn.q_proj.weight
        fn = MEMORIES[memory](config.hidden_size, config.num_attention_heads, attn.head_dim)
        layer.ahn = AHN(fn.to(device=weight.device, dtype=weight.dtype))
        layer.self_attn = AHNAttention(attn, fn, window_size, num_sinks)
    config._attn_implementation = ATTN_IMPLEMENTATION
    config.use_cache = False
    config.ahn = {"memory": memory, "window_size": window_size, "num_sinks": num_sinks}
    if hasattr(model, "generate"):
        model._prepare_cache_for_generation = types.MethodType(_prepare_ahn_cache, model)
    return model


def _prepare_ahn_cache(self, generation_config, model_kwargs, *args, **kwargs):
    """``generate``'s cache factory for a patched model: an ``AHNModelCache`` unless the caller gave one."""
    if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
        model_kwargs["cache"] = AHNModelCache(self)


def ahn_parameters(model):
    """The trainable AHN parameters of a patched model (name, parameter), base ones excluded."""
    return [(n, p) for n, p in model.named_parameters() if re.search(r"(^|\.)ahn\.fn\.", n)]


@contextlib.contextmanager
def full_attention(model):
    """Within the block, the patched model is its base model: full causal attention, no memory."""
    layers = [m for m in model.modules() if isinstance(m, AHNAttention)]
    for m in layers:
        m.full_attention = True
    try:
        yield model
    finally:
        for m in layers:
            m.full_attention = False


def load_ahn_weights(model, path) -> None:
    """Load AHN-only weights (the released checkpoints' keys ``model.layers.{i}.ahn.fn.*``) into a patched model.

    Args:
        model: a model patched by ``patch_model`` with the checkpoint's memory kind.
        path: a ``.safetensors`` file, or a directory of them (sharded checkpoints).
            Pickle formats are refused.
    Raises:
        ValueError: listing the missing and unexpected keys when they differ from the model's
        AHN parameters, or on a shape mismatch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".safetensors" or not f.is_file() for f in files):
        raise ValueError(f"path: expected a .safetensors file or a directory holding some, got {str(path)!r}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    params = dict(ahn_parameters(model))
    if not any(n.startswith("model.") for n in params):  # a bare Qwen2Model: drop the causal LM's prefix
        state = {k.removeprefix("model."): v for k, v in state.items()}
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"load_ahn_weights: {len(missing)} missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                         f"; {len(unexpected)} unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (was the model patched with the "
                         f"checkpoint's memory kind?)")
    with torch.no_grad():
        for name, tensor in state.items():
            p = params[name]
            if p.shape != tensor.shape:
                raise ValueError(f"load_ahn_weights: {name} has shape {tuple(tensor.shape)} in the file, "
                                 f"{tuple(p.shape)} in the model")
            p.copy_(tensor)
