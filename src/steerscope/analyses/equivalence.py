"""Equivalence of two steering conditions, decided: a TOST on Cohen's d with a cluster bootstrap over prompts.

Algorithm (paper C's criterion |d| < 0.2, made a test; Schuirmann 1987, Efron & Tibshirani 1993):
  1. Scores of conditions A and B come as tables [prompts seeds], paired: cell (i, j) of both is the
     same prompt sampled with the same seed. The statistic is Cohen's d of A over B on all cells
     (pooled SD, :func:`steerscope.stats.cohens_d`).
  2. Cluster bootstrap: resample prompts (a prompt's row of seeds is one cluster, A and B together)
     and recompute d, ``n_boot`` times (:func:`steerscope.stats.cluster_bootstrap_values`).
  3. Bootstrap p-values: p_lower = P*(d* <= -margin) (H0: d <= -margin), p_upper = P*(d* >= +margin),
     p_equiv = max of the two (the TOST p-value: below alpha exactly when the central 1 - 2 alpha
     percentile interval lies inside (-margin, +margin)); p_diff = 2 min(P*(d* <= 0), P*(d* >= 0))
     (H0: d = 0). Each is floored at 1 / (n_boot + 1).
  4. :func:`decide`: Holm-adjusted over the caller's family of tests (:func:`steerscope.stats.holm`),
     *equivalent* when p_equiv < alpha; *different* when p_diff < alpha and |d| >= margin; otherwise
     *undecided*.
  5. :func:`tost_power` / :func:`tost_sample_size`: the sample size that gives a TOST the wanted power
     (normal approximation of two one-sided tests, two independent groups of n; a design effect scales
     n for clustering or pairing).

Small n: a percentile bootstrap is anti-conservative with few clusters (under ~20 prompts); the study
reports n with every verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from steerscope.analyses.records import Record
from steerscope.errors import SteerscopeError
from steerscope.stats import cluster_bootstrap_values, cohens_d, holm

VERDICTS = ("equivalent", "different", "undecided")


@dataclass(frozen=True)
class ClusterTost(Record):
    """A cluster-bootstrap TOST of A against B (see the module docstring); intervals are percentile ones."""

    d: float
    margin: float
    ci90: tuple[float, float]  # the TOST's interval at alpha 0.05
    ci95: tuple[float, float]
    p_lower: float
    p_upper: float
    p_equiv: float
    p_diff: float
    n_prompts: int
    n_seeds: int


def _tables(a: np.ndarray | list[list[float]], b: np.ndarray | list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, float), np.asarray(b, float)
    x, y = (x[:, None] if x.ndim == 1 else x), (y[:, None] if y.ndim == 1 else y)
    if x.shape != y.shape or x.ndim != 2 or x.shape[0] < 2:
        raise SteerscopeError(f"paired score tables [prompts seeds] of one shape with >= 2 prompts are needed; "
                              f"got {np.shape(a)} and {np.shape(b)}")
    return x, y


def cluster_tost(a: np.ndarray | list[list[float]], b: np.ndarray | list[list[float]], margin: float = 0.2,
                 n_boot: int = 2000, seed: int = 0) -> ClusterTost:
    """Cluster-bootstrap TOST of Cohen's d(A over B) within ±``margin``; prompts (rows) are resampled.

    Args:
        a, b: paired scores [prompts seeds] (or [prompts]); row i of both is prompt i.
        margin: equivalence margin in Cohen's d units (paper C: 0.2).
        n_boot, seed: bootstrap resamples and the numpy generator's seed.

    Returns:
        a :class:`ClusterTost` (p-values unadjusted; :func:`decide` applies Holm over a family).

    Example:
        >>> r = cluster_tost(np.random.randn(200, 3), np.random.randn(200, 3))
        >>> r.p_equiv < 0.05
        True
    """
    if margin <= 0:
        raise SteerscopeError(f"the equivalence margin must be > 0 (Cohen's d units); got {margin}")
    x, y = _tables(a, b)

    def d_of(idx: np.ndarray) -> float:
        return cohens_d(x[idx].ravel(), y[idx].ravel())

    vals = cluster_bootstrap_values(d_of, len(x), n_boot, seed)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise SteerscopeError("every bootstrap resample gave a non-finite d (constant scores?); the test is undefined")
    floor = 1 / (len(vals) + 1)

    def frac(mask: np.ndarray) -> float:
        return max(float(mask.mean()), floor)

    p_lo, p_up = frac(vals <= -margin), frac(vals >= margin)
    q = np.quantile(vals, [0.025, 0.05, 0.95, 0.975])
    return ClusterTost(d_of(np.arange(len(x))), margin, (float(q[1]), float(q[2])), (float(q[0]), float(q[3])),
                       p_lo, p_up, max(p_lo, p_up), min(1.0, 2 * min(frac(vals <= 0), frac(vals >= 0))),
                       x.shape[0], x.shape[1])


def decide(tests: list[ClusterTost], alpha: float = 0.05) -> list[tuple[str, float, float]]:
    """Verdicts of a family of tests: Holm over all 2m p-values (each test's p_equiv and p_diff).

    Returns:
        per test (verdict, Holm-adjusted p_equiv, Holm-adjusted p_diff), in input order.

    Example:
        >>> decide([cluster_tost(np.random.randn(300, 2), np.random.randn(300, 2))])[0][0]
        'equivalent'
    """
    adj = holm([t.p_equiv for t in tests] + [t.p_diff for t in tests]) if tests else []
    m = len(tests)
    out = []
    for i, t in enumerate(tests):
        pe, pd = adj[i], adj[m + i]
        v = "equivalent" if pe < alpha else "different" if pd < alpha and abs(t.d) >= t.margin else "undecided"
        out.append((v, pe, pd))
    return out


def tost_power(n: float, margin: float = 0.2, alpha: float = 0.05, d: float = 0.0, design_effect: float = 1.0) -> float:
    """Power of a TOST at ``margin`` (Cohen's d units) with n per group when the true effect is ``d``.

    Normal approximation: SE(d) = sqrt(2 deff / n); power = max(0, Phi((m - d)/SE - z) + Phi((m + d)/SE - z) - 1),
    z = Phi^-1(1 - alpha). ``design_effect``: 1 for independent groups; (1 - rho) for pairs with score
    correlation rho; times 1 + (k - 1) ICC for k seeds per prompt with intra-prompt correlation ICC.

    Example:
        >>> round(tost_power(429), 3)
        0.8
    """
    se = math.sqrt(2 * design_effect / n)
    z = float(norm.ppf(1 - alpha))
    return max(0.0, float(norm.cdf((margin - abs(d)) / se - z) + norm.cdf((margin + abs(d)) / se - z) - 1))


def tost_sample_size(margin: float = 0.2, power: float = 0.8, alpha: float = 0.05, d: float = 0.0,
                     design_effect: float = 1.0) -> int:
    """Smallest n per group whose :func:`tost_power` reaches ``power``.

    Example:
        >>> tost_sample_size()  # margin 0.2, 80 % power, true d = 0
        429
    """
    if not 0 <= abs(d) < margin:
        raise SteerscopeError(f"a TOST has power only when |d| < margin; got d={d}, margin={margin}")
    n = 2
    while tost_power(n, margin, alpha, d, design_effect) < power:
        n = n * 2 if tost_power(n * 2, margin, alpha, d, design_effect) < power else n + 1
    return n
