"""Pure math of contrast extraction: activations in, direction out. No model here.

All functions take ``pos`` [n d_model] and ``neg`` [m d_model] (one row per example, positions
already averaged) and return a direction [d_model]: each is an :data:`Aggregator`, and any function
of that type can be passed to ``extract(method=...)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from steerscope.errors import DataError
from steerscope.stats import fit_logistic

Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pos [n d_model], neg [m d_model]) -> [d_model]


def diff_in_means(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(pos) - mean(neg) (Arditi et al.; paper A's DIM)."""
    return pos.double().mean(0).float() - neg.double().mean(0).float()


def _paired(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    if pos.shape != neg.shape:
        raise DataError(f"paired methods need as many positives as negatives, got {pos.shape[0]} and {neg.shape[0]}")
    return pos - neg


def mean_paired_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """CAA: the mean over pairs of (matching - non-matching) activations (Rimsky et al.)."""
    return _paired(pos, neg).double().mean(0).float()


def _scale_like_dim(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Orient ``u`` so positives project higher, and scale it to the DIM vector's projection on it."""
    dim = diff_in_means(pos, neg)
    proj = float(dim @ u)
    if proj < 0:
        u, proj = -u, -proj
    return u * proj


def _top_direction(x: torch.Tensor) -> torch.Tensor:
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    top: torch.Tensor = vh[0].float()
    return top


def pca_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """First principal direction (uncentred SVD) of the paired differences, oriented and scaled
    so its projection equals the DIM vector's (repeng's ``pca_diff``; paper C's PCA variant)."""
    return _scale_like_dim(_top_direction(_paired(pos, neg)), pos, neg)


def pca_center(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """First principal direction of both sides after centring each pair on its own mean."""
    d = _paired(pos, neg)
    centred = torch.cat([d / 2, -d / 2])
    return _scale_like_dim(_top_direction(centred), pos, neg)


def pca_centred_unit(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Paper C's PCA variant: the first principal component of the per-pair differences *after centring
    them* (scikit-learn's ``PCA(1).fit(diffs)``), unit norm, sign as the SVD returns it (not oriented).

    Centring removes the mean difference (DIM), so this is the direction along which the pairs'
    differences vary most, which can be far from DIM (paper C's cosines -0.54 to +0.32)."""
    d = _paired(pos, neg).double()
    top = _top_direction(d - d.mean(0))
    unit: torch.Tensor = top / top.norm()
    return unit


def logistic_probe(pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-2, steps: int = 200) -> torch.Tensor:
    """Logistic-regression weight direction separating pos (1) from neg (0), L-BFGS with an L2
    penalty on standardised features, mapped back to the raw basis, oriented and scaled like DIM."""
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    w, _ = fit_logistic((x - mu) / sd, y, l2, steps)
    raw = (w / sd).float()
    return _scale_like_dim(raw / raw.norm(), pos, neg)


def actadd(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """ActAdd (Turner et al.): the activation difference of a single prompt pair."""
    if pos.shape[0] != 1 or neg.shape[0] != 1:
        raise DataError(f"actadd takes exactly one positive and one negative prompt, got {pos.shape[0]} and {neg.shape[0]}")
    return (pos - neg)[0]


METHODS: dict[str, Aggregator] = {
    "dim": diff_in_means,
    "caa": mean_paired_difference,
    "pca": pca_diff,
    "pca_diff": pca_diff,
    "pca_center": pca_center,
    "pca_paper": pca_centred_unit,
    "probe": logistic_probe,
    "actadd": actadd,
}
