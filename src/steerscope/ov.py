"""Steering value vectors (svv) of attention heads and their logit lens (paper A, §5).

Algorithm:
  1. With RMSNorm, a head's input is D_c (h ⊙ γ) for c = 1/rms(h). Adding alpha*s to the
     residual adds D_c (alpha s ⊙ γ) to every position's normed input, so through the value path
     each head's output gains D_c^h svv_h(alpha s) (its attention rows sum to one), with
     svv_h(s) = (s ⊙ γ) W_V^h W_O^h  [d_model]; W_V^h is the head's (kv-group's, GQA) value map.
  2. Gemma 2/3 apply a post-attention norm to the attention output: the svv then also gets that
     norm's weight γ' (svv ⊙ γ'), again up to a per-position scale.
  3. Logit lens: rank heads by EAP-IG node score, map each svv through the final norm's weight
     and the unembedding, and list the top-k (and bottom-k, i.e. the sign-flipped) tokens.

Exactness: svv_h is exactly the change of head h's output when s ⊙ γ is added directly to the
value-projection input (tested); the change from adding s to the residual equals it only up to
the positive per-position scale c (and the attention pattern's own change, which is QK).
Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Steering value vector".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerscope.models.load import LM


def svv(lm: LM, layer: int, s: torch.Tensor, post_norm: bool = True) -> torch.Tensor:
    """Steering value vectors of every head of ``layer``: (s ⊙ γ) W_V^h W_O^h. [head d_model]

    Args:
        s: the steering direction [d_model] (scale it by alpha yourself).
        post_norm: multiply by the post-attention norm weight where the family has one (Gemma 2/3).

    Example:
        >>> svv(lm, 14, vec[12]).shape
        torch.Size([9, 576])
    """
    fam = lm.family
    g = lm.norm_weight(layer, fam.input_norm)
    x = s.float().to(g.device) * g  # [d]
    out = torch.einsum("d,hde,hef->hf", x, lm.W_V(layer).float(), lm.W_O(layer).float())
    if post_norm and fam.post_attn_norm:
        out = out * lm.norm_weight(layer, fam.post_attn_norm)
    return out


def all_svvs(lm: LM, s: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: [head d_model]} for the given layers."""
    return {layer: svv(lm, layer, s) for layer in layers}


@dataclass
class LensRow:
    """Logit-lens tokens of one head's svv."""

    head: str
    score: float
    norm: float
    top: list[str]
    bottom: list[str]


def logit_lens(lm: LM, x: torch.Tensor, k: int = 10) -> tuple[list[str], list[str]]:
    """Top-k and bottom-k tokens of W_U (γ_final ⊙ x) (the rms scale does not change a ranking)."""
    g = lm.norm_weight(None, lm.family.final_norm)
    logits = lm.W_U().float() @ (x.float() * g)
    tok = lm.tokenizer

    def names(ids: torch.Tensor) -> list[str]:
        return [tok.decode([int(i)]) for i in ids]
    return names(logits.topk(k).indices), names((-logits).topk(k).indices)


def lens_table(lm: LM, s: torch.Tensor, node_scores: dict[str, float], n_heads: int = 8, k: int = 10
               ) -> list[LensRow]:
    """Logit lens of the svvs of the ``n_heads`` heads with the largest |node score|.

    Args:
        node_scores: ``{"L14.H3": score}`` (e.g. from EAP-IG); other keys are ignored.
    """
    heads = [(n, v) for n, v in node_scores.items() if ".H" in n and n.count(".") == 1]
    heads.sort(key=lambda t: -abs(t[1]))
    rows = []
    for name, score in heads[:n_heads]:
        layer, h = int(name.split(".")[0][1:]), int(name.split(".H")[1])
        vec = svv(lm, layer, s)[h]
        top, bottom = logit_lens(lm, vec, k)
        rows.append(LensRow(name, float(score), float(vec.norm()), top, bottom))
    return rows
