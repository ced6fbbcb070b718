"""Per-head projection weights, post-sublayer norms and logit soft-capping, as the circuit code needs them.

TEMPORARY HOME (issue 10 §2): these accessors belong on ``LM`` (``models/layout.py``, helper
arch-core). They are the only place in ``steerscope.circuits`` that reaches through
``lm.family`` path strings for weights; swap each for the ``LM`` accessor at merge.
Only separate q/k/v projections are handled here (see :func:`missing_support`).
"""

from __future__ import annotations

from typing import Literal, cast

import torch

from steerscope.models.load import LM

Proj = Literal["q", "k", "v"]


def missing_support(lm: LM) -> list[str]:
    """What the circuit algorithms lack for this model's architecture (empty: supported)."""
    f, cfg = lm.family, lm.config
    missing = []
    if f.qkv != "separate":
        missing.append(f"per-head q/k/v weights of a fused qkv projection ({f.qkv})")
    if f.parallel_residual:
        missing.append("a parallel residual (attention and MLP read the same stream)")
    if getattr(cfg, "logit_scale", None):
        missing.append("scaled logits (logit_scale)")
    return missing


def n_proj_heads(lm: LM, which: Proj) -> int:
    """Heads of a projection: query heads for q, kv heads for k and v."""
    return lm.n_heads if which == "q" else lm.n_kv_heads


def proj_weight(lm: LM, layer: int, which: Proj) -> torch.Tensor:
    """Projection weights per head [n d_head d_model] for q/k/v (separate projections)."""
    w = cast(torch.Tensor, lm.module(layer, getattr(lm.family, f"{which}_proj")).weight).detach()
    return w.view(n_proj_heads(lm, which), lm.d_head, lm.d_model)


def proj_bias(lm: LM, layer: int, which: Proj) -> torch.Tensor | None:
    """Projection bias per head [n d_head], or None."""
    bias = getattr(lm.module(layer, getattr(lm.family, f"{which}_proj")), "bias", None)
    return None if bias is None else bias.detach().view(n_proj_heads(lm, which), lm.d_head)


def post_norm(lm: LM, layer: int, sublayer: Literal["attn", "mlp"]) -> torch.nn.Module | None:
    """The norm applied to a sublayer's output before it joins the residual (Gemma 2/3), or None."""
    path = lm.family.post_attn_norm if sublayer == "attn" else lm.family.post_mlp_norm
    return None if path is None else lm.module(layer, path)


def apply_unhooked(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module.forward(x)``: the module's own computation without its hooks (for use inside hooks)."""
    out: torch.Tensor = module.forward(x)
    return out


def mlp_write(lm: LM, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
    """The MLP's output before any post-MLP norm, from its (normed) input. [batch pos d_model]"""
    return apply_unhooked(lm.module(layer, lm.family.mlp), mlp_in)


def softcap(lm: LM) -> float | None:
    """The final logit soft-capping constant c (logits = c tanh(x / c)), or None."""
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def attn_write_sum(lm: LM, layer: int, z: torch.Tensor) -> torch.Tensor:
    """The attention sublayer's output before any post-attention norm, from z [batch pos head d_head]."""
    return apply_unhooked(lm.module(layer, lm.family.o_proj), z.flatten(2))


def post_norm_path(lm: LM, sublayer: Literal["attn", "mlp"]) -> str | None:
    """Module path (inside a block) of a sublayer's post-norm, or None."""
    return lm.family.post_attn_norm if sublayer == "attn" else lm.family.post_mlp_norm
