"""Sparsifying a steering vector by dimension-level attribution (paper A, §6).

Algorithm:
  1. From EAP-IG (:mod:`steerscope.circuits.eap_ig`): the dimension-level effect of the steering
     node IE_vec = (alpha s) ⊙ g, g the IG mean gradient at the steering site (summed over
     positions, averaged over samples).
  2. Two gradient rules, both signed (zero dimension i when its ratio is below τ):
     - paper A's rule (:func:`paper_ratio`, :func:`paper_mask`): r = IE_vec / (alpha s) = g, the mean
       gradient itself, thresholded on the fixed grid ``PAPER_TAUS`` = {0, .1, .3, .5, 1, 1.5, 2, 2.5};
       the sparsity each τ gives depends on the model's gradient scale and is reported, not chosen;
     - the matched-k variant (``keep_mask("gradient", ...)``, :func:`tau_for`): r = IE_vec / s =
       alpha g (the stored ``mean_grad``), with τ the quantile of r that zeroes a chosen fraction.
     For alpha > 0 the two ratios are the same vector; for alpha < 0 (bypass) they have opposite
     signs, so the two rules keep different dimensions, not only different numbers of them.
  3. Baselines with the same k: drop the bottom-k dimensions by |IE_vec| (IE-based), by |s|
     (norm-based), or k random dimensions.
  4. Agreement of the kept sets of two vectors (e.g. DIM and PO): IoU |A ∩ B| / |A ∪ B| and
     - the hypergeometric p-value P(X >= |A ∩ B|) for X ~ Hypergeom(d, |A|, |B|), i.e. the chance
       that a uniformly random |B|-subset meets A at least that often;
     - a random-vector null (:func:`null_p`): B's rule applied to random vectors (whose kept sets
       need not be uniform: the mean gradient is largely the model's, whatever the vector), and
       p = (1 + #{IoU_null >= IoU}) / (1 + n_null).

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Sparsification", Tables 10-11.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from steerscope.analyses.records import Record
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


PAPER_TAUS: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5)
"""Paper A's signed threshold grid for the gradient rule (Tables 10-11)."""


def paper_ratio(ie_vec: torch.Tensor, s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Paper A's r = IE_vec / s with s the applied steering (alpha s): the mean gradient. [d_model]

    Dimensions where s is zero have no defined ratio and get -inf (never kept by any τ).

    Example:
        >>> paper_ratio(att.ie_vec, s, -1.0)  # == att.mean_grad / -1.0 where s != 0
    """
    applied = alpha * s.double()
    r = ie_vec.double() / torch.where(applied == 0, torch.ones_like(applied), applied)
    return torch.where(applied == 0, torch.full_like(r, float("-inf")), r).float()


def paper_mask(r: torch.Tensor, tau: float) -> torch.Tensor:
    """Paper A's gradient rule: keep dimension i iff r_i >= τ (zero it when r_i < τ). bool [d_model]"""
    return threshold_mask(r, tau)


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


@dataclass(frozen=True)
class Agreement(Record):
    """Kept-set agreement of two vectors at one sparsity."""

    sparsity: float
    iou: float
    p_value: float
    expected_iou: float  # IoU expected for independent random sets of the same sizes


def agreement(a: torch.Tensor, b: torch.Tensor, sparsity: float) -> Agreement:
    d, na, nb = a.numel(), int(a.sum()), int(b.sum())
    ex = na * nb / d
    return Agreement(sparsity, iou(a, b), hypergeom_p(a, b), ex / max(na + nb - ex, 1e-9))


def random_vectors(like: torch.Tensor, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` Gaussian vectors with the norm of ``like`` (the random-vector null's draws). Each [d_model]"""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.randn(like.numel(), generator=g, dtype=torch.float64)
        out.append((v * like.double().norm() / v.norm()).to(like.dtype))
    return out


@dataclass(frozen=True)
class NullTest(Record):
    """IoU of A's kept set with B's, against the IoUs of A's with the kept sets of random vectors."""

    iou: float
    null_mean: float
    null_q95: float  # 95th percentile of the null IoUs
    p_value: float  # (1 + #{null >= iou}) / (1 + n_null)
    n_null: int


def null_p(observed: float, null: Sequence[float]) -> float:
    """Monte-Carlo p-value (1 + #{null >= observed}) / (1 + n): valid (never below the true p under the null)."""
    return (1 + sum(x >= observed - 1e-12 for x in null)) / (1 + len(null))


def null_test(a: torch.Tensor, b: torch.Tensor, null_masks: Sequence[torch.Tensor]) -> NullTest:
    """IoU(A, B) tested against IoU(A, R_j) for the kept sets R_j of random vectors (same rule as B).

    Example:
        >>> null_test(keep_dim, keep_po, [keep_mask("ie", 0.9, v, r_v) for v, r_v in draws]).p_value
    """
    obs = iou(a, b)
    vals = sorted(iou(a, m) for m in null_masks)
    if not vals:
        raise SteerscopeError("the random-vector null needs at least one random vector (n_null >= 1)")
    q = vals[min(len(vals) - 1, int(0.95 * len(vals)))]
    return NullTest(obs, sum(vals) / len(vals), q, null_p(obs, vals), len(vals))
