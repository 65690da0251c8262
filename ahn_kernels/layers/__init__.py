"""Model glue: AHN memory modules, the AHN attention layer, Hugging Face Qwen2/Qwen3 integration, distillation."""

from .attention import AHNAttention
from .cache import AHNLayerCache, AHNModelCache
from .distill import distill_loss
from .hf import ahn_parameters, full_attention, load_ahn_weights, patch_model
from .memory import DeltaNetMemory, GatedDeltaNetMemory, GroupLinear, Mamba2Memory

__all__ = [
    "AHNAttention",
    "AHNLayerCache",
    "AHNModelCache",
    "DeltaNetMemory",
    "GatedDeltaNetMemory",
    "GroupLinear",
    "Mamba2Memory",
    "ahn_parameters",
    "distill_loss",
    "full_attention",
    "load_ahn_weights",
    "patch_model",
]
