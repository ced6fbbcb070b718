"""Steering value vectors (svv) of attention heads and their logit lens (paper A, §5).

Algorithm:
  1. With RMSNorm, a head's input is D_c (h ⊙ γ) for c = 1/rms(h). Adding alpha*s to the
     residual adds D_c (alpha s ⊙ γ) to every position's normed input, so through the value path
     each head's output gains D_c^h svv_h(alpha s) (its attention rows sum to one), with
     svv_h(s) = (s ⊙ γ) W_V^h W_O^h  [d_model]; W_V^h is the head's (kv-group's, GQA) value map.
  2. Gemma 2/3 apply a post-attention norm to the attention output: the svv then also gets that
     norm's weight γ' (svv ⊙ γ'), again up to a per-position scale.
  3. Logit lens: rank heads by EAP-IG node score, map each svv through the final norm and the
     unembedding (:func:`steerscope.analyses.lens.logit_lens`, the one lens), and list the top-k (and
     bottom-k, i.e. the sign-flipped) tokens.

Exactness: svv_h is exactly the change of head h's output when s ⊙ γ is added directly to the
value-projection input (tested); the change from adding s to the residual equals it only up to
the positive per-position scale c (and the attention pattern's own change, which is QK).
Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Steering value vector".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from steerscope.analyses.lens import LensTop, logit_lens
from steerscope.circuits.graph import Node
from steerscope.models.lm import LM


def svv(lm: LM, layer: int, s: torch.Tensor, post_norm: bool = True) -> torch.Tensor:
    """Steering value vectors of every head of ``layer``: (s ⊙ γ) W_V^h W_O^h. [head d_model]

    Args:
        s: the steering direction [d_model] (scale it by alpha yourself).
        post_norm: multiply by the post-attention norm weight where the family has one (Gemma 2/3).

    Example:
        >>> svv(lm, 14, vec[12]).shape
        torch.Size([9, 576])
    """
    g = lm.gamma(layer, "input")
    x = s.float().to(g.device) * g  # [d]
    out = torch.einsum("d,hde,hef->hf", x, lm.W_V(layer).float(), lm.W_O(layer).float())
    if post_norm and lm.norm(layer, "post_attn") is not None:
        out = out * lm.gamma(layer, "post_attn")
    return out


@dataclass
class LensRow:
    """Logit lens of one head's svv: its node, EAP-IG score, |svv|, and top / bottom tokens."""

    node: Node
    score: float
    norm: float
    top: LensTop
    bottom: LensTop

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the node as :meth:`Node.to_dict`, tokens as lists."""
        return {"node": self.node.to_dict(), "score": self.score, "norm": self.norm,
                "top": asdict(self.top), "bottom": asdict(self.bottom)}


def lens_table(lm: LM, s: torch.Tensor, node_scores: Mapping[Node, float], n_heads: int = 8, k: int = 10
               ) -> list[LensRow]:
    """Logit lens of the svvs of the ``n_heads`` heads with the largest |node score|.

    Args:
        s: the steering vector times alpha [d_model].
        node_scores: ``{Node: score}`` (e.g. from EAP-IG); nodes that are not heads are ignored.
        k: tokens per list; the lens is :func:`steerscope.analyses.lens.logit_lens` after the final norm.

    Example:
        >>> lens_table(lm, alpha * vec[12], {g.upstream[i]: float(att.nodes[i]) for i in range(U)})
    """
    heads = sorted(((n, v) for n, v in node_scores.items() if n.kind == "head"), key=lambda t: -abs(t[1]))
    rows = []
    for node, score in heads[:n_heads]:
        vec = svv(lm, node.layer, s)[int(node.head or 0)]
        top = logit_lens(lm, vec, k, final_norm=True)[0]
        bottom = logit_lens(lm, vec, k, final_norm=True, largest=False)[0]
        rows.append(LensRow(node, float(score), float(vec.norm()), top, bottom))
    return rows
