"""Self-distillation (the paper's recipe): the frozen base model with full attention teaches its AHN version."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hf import full_attention


def distill_loss(model, input_ids, attention_mask=None) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over the positions >= W of each sequence.

    The teacher is ``model`` itself under ``full_attention`` (the base model's full causal
    attention, no memory, no gradients); the student is the AHN model. Positions < W see
    their whole prefix in both, so they carry no signal and are left out, as in the paper.

    Args:
        model: a causal LM patched by ``patch_model``.
        input_ids: [B, T] int64.
        attention_mask: [B, T] padding mask (1 = token), or None.
    Returns:
        A scalar fp32 loss (0 when no position reaches W).
    """
    W = model.config.ahn["window_size"]
    with torch.no_grad(), full_attention(model):
        teacher = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, vocab]
    student = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, vocab]
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    position = mask.long().cumsum(1) - 1  # [B, T] index among the row's real tokens
    valid = mask & (position >= W)  # [B, T]
    log_t = F.log_softmax(teacher.float(), dim=-1)
    log_s = F.log_softmax(student.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, T]
    return (kl * valid).sum() / valid.sum().clamp(min=1)
