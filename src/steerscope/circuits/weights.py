"""The model facts the circuit code needs, read through the ``LM`` accessors (never family path strings).

Per-head q/k/v weights in the [n d_head d_model] orientation the receivers use, the norms in
front of and behind each sublayer, the sublayers' own outputs (before any post-norm), the final
logit soft-capping, and what an architecture lacks for these algorithms.
"""

from __future__ import annotations

from typing import Literal

import torch

from steerscope.models.lm import LM

Proj = Literal["q", "k", "v"]
Sublayer = Literal["attn", "mlp"]


def missing_support(lm: LM) -> list[str]:
    """What the circuit algorithms lack for this model's architecture (empty: supported)."""
    missing = []
    if getattr(lm.config, "logit_scale", None):
        missing.append("scaled logits (logit_scale)")
    return missing


def n_proj_heads(lm: LM, which: Proj) -> int:
    """Heads of a projection: query heads for q, kv heads for k and v."""
    return lm.n_heads if which == "q" else lm.n_kv_heads


def proj_weight(lm: LM, layer: int, which: Proj) -> torch.Tensor:
    """Projection weights per head [n d_head d_model] for q/k/v (k, v: per kv head)."""
    w = lm.W_Q(layer) if which == "q" else lm.W_K(layer, repeat=False) if which == "k" else lm.W_V(layer, repeat=False)
    return w.transpose(1, 2)


def proj_bias(lm: LM, layer: int, which: Proj) -> torch.Tensor | None:
    """Projection bias per head [n d_head], or None."""
    return lm.b_Q(layer) if which == "q" else lm.b_K(layer, repeat=False) if which == "k" else lm.b_V(layer, repeat=False)


def input_norm(lm: LM, layer: int, sublayer: Sublayer) -> tuple[torch.nn.Module, torch.Tensor]:
    """(module, effective γ [d_model]) of the norm in front of a sublayer."""
    kind: Literal["input", "pre_mlp"] = "input" if sublayer == "attn" else "pre_mlp"
    norm = lm.norm(layer, kind)
    if norm is None:  # pragma: no cover - every family has both
        raise KeyError(f"no {kind} norm")
    return norm, lm.gamma(layer, kind).to(lm.device)


def post_norm(lm: LM, layer: int, sublayer: Sublayer) -> torch.nn.Module | None:
    """The norm applied to a sublayer's output before it joins the residual (Gemma 2/3), or None."""
    return lm.norm(layer, "post_attn" if sublayer == "attn" else "post_mlp")


def post_norm_gamma(lm: LM, layer: int, sublayer: Sublayer) -> torch.Tensor:
    """Effective γ [d_model] of a sublayer's post-norm (Gemma 2/3)."""
    return lm.gamma(layer, "post_attn" if sublayer == "attn" else "post_mlp").to(lm.device)


def has_post_norms(lm: LM) -> bool:
    """Whether sublayer outputs are normalised before they join the residual (Gemma 2/3)."""
    return lm.norm(0, "post_attn") is not None or lm.norm(0, "post_mlp") is not None


def apply_unhooked(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module.forward(x)``: the module's own computation without its hooks (for use inside hooks)."""
    out: torch.Tensor = module.forward(x)
    return out


def mlp_write(lm: LM, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
    """The MLP's output before any post-MLP norm, from its (normed) input. [batch pos d_model]"""
    return apply_unhooked(lm.mlp(layer), mlp_in)


def attn_write_sum(lm: LM, layer: int, z: torch.Tensor) -> torch.Tensor:
    """The attention sublayer's output before any post-attention norm, from z [batch pos head d_head]."""
    return apply_unhooked(lm.proj(layer, "o"), z.flatten(2))


def softcap(lm: LM) -> float | None:
    """The final logit soft-capping constant c (logits = c tanh(x / c)), or None."""
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return float(cap) if cap else None
