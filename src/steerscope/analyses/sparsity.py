"""Sparsifying a steering vector by dimension-level attribution (paper A, §6).

Algorithm:
  1. From EAP-IG (attribution.py): the dimension-level effect of the steering node
     IE_vec = s ⊙ r, with r = IE_vec / s = alpha times the mean gradient at the steering site.
  2. Gradient-based (signed): zero dimension i when r_i < τ. For a target sparsity the threshold
     τ is the matching quantile of r (so k, the number of zeroed dimensions, is matched).
  3. Baselines with the same k: drop the bottom-k dimensions by |IE_vec| (IE-based), by |s|
     (norm-based), or k random dimensions.
  4. Agreement of the kept sets of two vectors (e.g. DIM and PO): IoU |A ∩ B| / |A ∪ B| and the
     hypergeometric p-value P(X >= |A ∩ B|) for X ~ Hypergeom(d, |A|, |B|), i.e. the chance that
     a random |B|-subset meets A at least that often.

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Sparsification", Tables 10-11.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerscope.errors import SteerscopeError
from steerscope.vector import SteeringVector

METHODS = ("gradient", "ie", "norm", "random")


def n_drop(d: int, sparsity: float) -> int:
    """Number of zeroed dimensions k for a sparsity in [0, 1)."""
    if not 0.0 <= sparsity < 1.0:
        raise SteerscopeError(f"sparsity must be in [0, 1), got {sparsity}; e.g. 0.9 keeps 10% of dimensions")
    return int(round(sparsity * d))


def keep_mask(method: str, sparsity: float, s: torch.Tensor, r: torch.Tensor | None = None, seed: int = 0
              ) -> torch.Tensor:
    """Which dimensions to keep (bool [d_model]) for one method at one sparsity.

    Args:
        method: ``gradient`` (keep the largest signed r), ``ie`` (largest |s ⊙ r|), ``norm`` (largest
            |s|) or ``random``.
        s: the steering vector [d_model]; r: the mean gradient IE_vec / s (needed by gradient, ie).

    Example:
        >>> keep_mask("ie", 0.9, s, r).sum()  # 10% of the dimensions
    """
    d = s.numel()
    k = n_drop(d, sparsity)
    if method in ("gradient", "ie") and r is None:
        raise SteerscopeError(f"method {method!r} needs the mean gradient r from attribution.eap_ig")
    if method == "gradient":
        score = r.float()  # type: ignore[union-attr]
    elif method == "ie":
        score = (s.float() * r.float()).abs()  # type: ignore[union-attr]
    elif method == "norm":
        score = s.float().abs()
    elif method == "random":
        score = torch.rand(d, generator=torch.Generator().manual_seed(seed))
    else:
        raise SteerscopeError(f"sparsification method {method!r} unknown; choose one of {', '.join(METHODS)}")
    keep = torch.ones(d, dtype=torch.bool)
    if k:
        keep[score.argsort()[:k]] = False  # ascending: drop the bottom k
    return keep


def threshold_mask(r: torch.Tensor, tau: float) -> torch.Tensor:
    """Gradient-based rule: keep dimension i iff r_i >= τ (signed). bool [d_model]"""
    return r >= tau


def tau_for(r: torch.Tensor, sparsity: float) -> float:
    """The threshold τ at which the gradient rule zeroes ``sparsity`` of the dimensions."""
    k = n_drop(r.numel(), sparsity)
    if k == 0:
        return float(r.min())
    return float(r.sort().values[k - 1 : k + 1].mean()) if k < r.numel() else float(r.max()) + 1.0


def apply(vector: SteeringVector, keep: torch.Tensor) -> SteeringVector:
    """A copy of a one-layer vector with the dropped dimensions set to zero."""
    layer, s = vector.single_layer(site=None, purpose="sparsification")
    return SteeringVector({layer: s * keep.to(s.dtype)}, site=vector.site, provenance=vector.provenance)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two bool masks."""
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


def hypergeom_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """P(X >= |A ∩ B|) for X ~ Hypergeom(population d, |A| successes, |B| draws)."""
    from scipy.stats import hypergeom

    d, na, nb, x = a.numel(), int(a.sum()), int(b.sum()), int((a & b).sum())
    return float(hypergeom.sf(x - 1, d, na, nb))


@dataclass
class Agreement:
    """Kept-set agreement of two vectors at one sparsity."""

    sparsity: float
    iou: float
    p_value: float
    expected_iou: float  # IoU expected for independent random sets of the same sizes


def agreement(a: torch.Tensor, b: torch.Tensor, sparsity: float) -> Agreement:
    d, na, nb = a.numel(), int(a.sum()), int(b.sum())
    ex = na * nb / d
    return Agreement(sparsity, iou(a, b), hypergeom_p(a, b), ex / max(na + nb - ex, 1e-9))
