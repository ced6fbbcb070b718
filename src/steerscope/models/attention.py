"""A custom attention function, registered through transformers' attention interface.

While a pattern hook is attached to an attention module (attribute ``_steerscope_pattern``),
the function computes attention with the model's own eager implementation, hands the
probabilities [batch head query key] to the hook, and, if the hook returns a tensor, mixes the
values with those probabilities instead. Modules without a hook fall through to SDPA, so
switching a model to this implementation changes nothing else. No model code is copied.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "steerscope"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch kv_head key d_head] -> [batch head key d_head]."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def steerscope_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch head query d_head]
    key: torch.Tensor,  # [batch kv_head key d_head]
    value: torch.Tensor,  # [batch kv_head key d_head]
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention with a probability hook where one is attached, else SDPA."""
    hook = getattr(module, "_steerscope_pattern", None)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if hook is None:
        if kwargs.get("softcap") is not None:  # Gemma 2: SDPA has no logit soft-capping
            return eager(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, probs = eager(module, query, key, value, attention_mask, **kwargs)
    new = hook(probs)
    if new is None:
        return out, probs
    n_rep = query.shape[1] // value.shape[1]
    out = torch.matmul(new.to(value.dtype), _repeat_kv(value, n_rep)).transpose(1, 2).contiguous()
    return out, new


AttentionInterface.register(NAME, steerscope_attention)
# Masks must be additive floats for the eager path (SDPA accepts them too).
AttentionMaskInterface.register(NAME, eager_mask)
