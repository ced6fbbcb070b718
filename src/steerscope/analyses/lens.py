"""Logit lens of arbitrary residual-space vectors (steering vectors, value vectors, ...).

Algorithm (nostalgebraist, 2020; applied to steering vectors by Sinii et al., 2025):
    1. Optionally pass each vector v through the final norm as if it were a residual:
       v ↦ γ ⊙ v / rms(v) (RMSNorm; Gemma's 1 + w included through ``lm.norm_weight``).
       Sinii et al. use no final norm; with it, only the direction matters, scaled by γ.
    2. Scores: W_U v [vocab] as a dot product, or the cosine between v and each row of W_U.
    3. The top-k tokens by score (``largest=False`` for the bottom-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerscope.analyses.records import Record
from steerscope.errors import VectorError
from steerscope.models.lm import LM


@dataclass(frozen=True)
class LensTop(Record):
    """The top tokens of one vector."""

    tokens: list[str]
    ids: list[int]
    scores: list[float]


def apply_final_norm(vectors: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """γ ⊙ v / rms(v) per row. vectors [n d_model]; gamma [d_model]. Returns [n d_model]."""
    v = vectors.float()
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * gamma.float()


def lens_scores(W_U: torch.Tensor, vectors: torch.Tensor, metric: str = "dot") -> torch.Tensor:
    """Scores of every token for every vector. W_U [vocab d_model]; vectors [n d_model] -> [n vocab]."""
    W, v = W_U.float(), vectors.float().to(W_U.device)
    if metric == "dot":
        return v @ W.T
    if metric == "cosine":
        return torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(W, dim=-1).T
    raise VectorError(f"unknown lens metric {metric!r}; use 'dot' or 'cosine'")


def logit_lens(lm: LM, vectors: torch.Tensor, k: int = 10, final_norm: bool = False, metric: str = "dot",
               largest: bool = True) -> list[LensTop]:
    """Top-k tokens of W_U·v for each vector (optionally after the final norm).

    Args:
        lm: the model (its unembedding and final norm are used).
        vectors: [n d_model] or [d_model].
        k: tokens per vector.
        final_norm: apply the model's final norm first.
        metric: ``"dot"`` or ``"cosine"``.
        largest: False for the most negative tokens.

    Returns:
        One :class:`LensTop` per vector.

    Example:
        >>> logit_lens(lm, vec[29][None], k=5)[0].tokens
    """
    v = vectors[None] if vectors.dim() == 1 else vectors
    if v.shape[-1] != lm.d_model:
        raise VectorError(f"vectors have size {v.shape[-1]} but the model has d_model {lm.d_model}")
    if final_norm:
        v = apply_final_norm(v, lm.final_gamma.to(v.device))
    scores = lens_scores(lm.W_U(), v, metric)
    top = scores.topk(k, dim=-1, largest=largest)
    out = []
    for vals, ids in zip(top.values.tolist(), top.indices.tolist()):
        out.append(LensTop([lm.tokenizer.decode([i]) for i in ids], ids, vals))
    return out
