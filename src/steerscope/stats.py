"""Effect sizes, intervals and tests: pure functions of numbers, each checked against scipy in the tests.

- :func:`cohens_d` — standardised mean difference with the pooled SD (Cohen 1988).
- :func:`bootstrap_ci` — percentile bootstrap CI of any two-sample statistic, independent or paired
  resampling (Efron & Tibshirani 1993).
- :func:`jsd`, :func:`histogram_jsd` — Jensen-Shannon divergence (base 2) of histograms.
- :func:`wilson` — Wilson score interval of a proportion (Wilson 1927).
- :func:`paired_diff` — mean paired difference with its normal-approximation interval.
- :func:`mcnemar_exact`, :func:`mcnemar_p` — exact two-sided McNemar test from the discordant counts, or
  of paired 0/1 outcomes (McNemar 1947).
- :func:`holm` — Holm-Bonferroni adjusted p-values (Holm 1979).
- :func:`tost`, :class:`Tost` — two one-sided pooled t-tests of equivalence within ±margin in Cohen's d
  units, with a three-way verdict (Schuirmann 1987).
- :func:`cluster_bootstrap` — percentile bootstrap resampling whole clusters (e.g. a prompt with its seeds);
  :func:`mean_ci` and :func:`ratio_of_means_ci` apply it to a mean and to a paired ratio of mean shifts.
- :func:`fit_logistic` — L2-regularised logistic regression by L-BFGS.

Example:
    >>> cohens_d([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    1.0
    >>> wilson(30, 100)
    (0.219..., 0.396...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from steerscope.errors import SteerscopeError

Numbers = Sequence[float] | np.ndarray
Table = Numbers | Sequence[Sequence[float]]  # [n] or [n k]: prompts × seeds
Stat = Callable[[np.ndarray, np.ndarray], float]


def _pooled_sd(x: np.ndarray, y: np.ndarray) -> float:
    """Pooled SD (ddof=1) of two samples of at least two values each."""
    if len(x) < 2 or len(y) < 2:
        raise SteerscopeError("Cohen's d needs at least two scores per group; use more prompts or seeds")
    ss = (len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)
    return float(np.sqrt(ss / (len(x) + len(y) - 2)))


def cohens_d(a: Numbers, b: Numbers) -> float:
    """Cohen's d of ``a`` over ``b``: (mean a - mean b) / pooled SD (ddof=1).

    Args:
        a, b: two samples, at least two values each.

    Returns:
        d; 0.0 when both samples are constant and equal, ±inf when constant and different.

    Example:
        >>> cohens_d([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
        1.0
    """
    x, y = np.asarray(a, float), np.asarray(b, float)
    pooled, diff = _pooled_sd(x, y), float(x.mean() - y.mean())
    if pooled == 0:
        return 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    return diff / pooled


def bootstrap_ci(a: Numbers, b: Numbers, stat: Stat = cohens_d, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, paired: bool = False) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(a, b)``.

    Args:
        a, b: the samples; with ``paired`` of equal length, resampled with the same indices.
        stat: the statistic of two samples (default :func:`cohens_d`).
        n_boot: resamples; non-finite statistics are dropped.
        level: coverage of the interval.
        seed: seed of the resampling (numpy's default generator).

    Returns:
        (low, high); (nan, nan) when no resample gave a finite statistic.

    Example:
        >>> bootstrap_ci(np.random.randn(40) + 1, np.random.randn(40), n_boot=500)
    """
    x, y = np.asarray(a, float), np.asarray(b, float)
    if paired and len(x) != len(y):
        raise SteerscopeError("a paired bootstrap needs groups of equal length")
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for i in range(n_boot):
        ia = rng.integers(0, len(x), len(x))
        ib = ia if paired else rng.integers(0, len(y), len(y))
        vals[i] = stat(x[ia], y[ib])
    return _percentile_interval(vals, level)


def _percentile_interval(vals: np.ndarray, level: float) -> tuple[float, float]:
    """Central ``level`` percentile interval of the finite values; (nan, nan) when there are none."""
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    q = (1 - level) / 2
    return float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))


def cluster_bootstrap(stat: Callable[[np.ndarray], float], n_clusters: int, n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval resampling whole clusters (e.g. a prompt with all its seeds).

    Each resample draws ``n_clusters`` indices with replacement; the caller maps clusters to its rows.

    Args:
        stat: statistic of an int array ``idx`` [n_clusters] of cluster indices.
        n_clusters: number of clusters (>= 1).
        n_boot, level, seed: resamples (non-finite statistics are dropped), coverage, numpy generator seed.

    Returns:
        (low, high); (nan, nan) when no resample gave a finite statistic.

    Example:
        >>> x = np.random.randn(20, 3)  # prompts × seeds
        >>> cluster_bootstrap(lambda idx: float(x[idx].mean()), 20)
    """
    return _percentile_interval(cluster_bootstrap_values(stat, n_clusters, n_boot, seed), level)


def cluster_bootstrap_values(stat: Callable[[np.ndarray], float], n_clusters: int, n_boot: int = 2000,
                             seed: int = 0) -> np.ndarray:
    """The ``n_boot`` resampled values behind :func:`cluster_bootstrap` (non-finite ones included). [n_boot]."""
    if n_clusters < 1:
        raise SteerscopeError("a cluster bootstrap needs at least one cluster (prompt)")
    rng = np.random.default_rng(seed)
    return np.array([stat(rng.integers(0, n_clusters, n_clusters)) for _ in range(n_boot)], dtype=float)


def _row_means(x: Table) -> np.ndarray:
    """[n] values per cluster: x itself when 1-D, the mean of each row when 2-D [n k]."""
    a = np.asarray(x, float)
    if a.ndim not in (1, 2) or a.shape[0] == 0:
        raise SteerscopeError(f"expected scores [n] or [n, k] (prompts × seeds) with n >= 1; got shape {a.shape}")
    return a.mean(axis=1) if a.ndim == 2 else a


def mean_ci(x: Table, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean with its cluster-bootstrap interval; clusters are the rows (prompts) of a [n k] table.

    Args:
        x: [n] one value per prompt, or [n k] prompts × seeds.
        n_boot, level, seed: as in :func:`cluster_bootstrap`.

    Returns:
        (point, low, high).

    Example:
        >>> mean_ci(np.random.randn(30, 4))
    """
    m = _row_means(x)
    lo, hi = cluster_bootstrap(lambda idx: float(m[idx].mean()), len(m), n_boot, level, seed)
    return float(m.mean()), lo, hi


def ratio_of_means_ci(x: Table, steer: Numbers, base: Numbers, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean x - mean base) / (mean steer - mean base) with a paired cluster-bootstrap interval.

    Rows (prompts) are resampled together (paired); a resample with |denominator| < 1e-12 is dropped.

    Args:
        x: [n] or [n k] (prompts × seeds; a prompt's value is the mean of its row).
        steer, base: [n].
        n_boot, level, seed: as in :func:`cluster_bootstrap`.

    Returns:
        (point, low, high); point is nan when the denominator is ~0.

    Example:
        >>> ratio_of_means_ci([0.5, 0.6], [1.0, 1.1], [0.0, 0.1])[0]
        0.5
    """
    m, s, b = _row_means(x), np.asarray(steer, float), np.asarray(base, float)
    if s.shape != m.shape or b.shape != m.shape:
        raise SteerscopeError(f"steer and base must be [n] with n = {len(m)} rows of x; got {s.shape}, {b.shape}")

    def ratio(idx: np.ndarray) -> float:
        den = float(s[idx].mean() - b[idx].mean())
        return float(m[idx].mean() - b[idx].mean()) / den if abs(den) >= 1e-12 else float("nan")

    lo, hi = cluster_bootstrap(ratio, len(m), n_boot, level, seed)
    return ratio(np.arange(len(m))), lo, hi


def jsd(p: Numbers, q: Numbers) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two histograms (normalised here).

    Example:
        >>> jsd([1, 0], [0, 1])
        1.0
    """
    x, y = np.asarray(p, float), np.asarray(q, float)
    x, y = x / x.sum(), y / y.sum()
    m = (x + y) / 2

    def kl(u: np.ndarray, v: np.ndarray) -> float:
        nz = u > 0
        return float(np.sum(u[nz] * np.log2(u[nz] / v[nz])))

    return 0.5 * kl(x, m) + 0.5 * kl(y, m)


def histogram_jsd(a: Numbers, b: Numbers, bins: int = 10, value_range: tuple[float, float] | None = None) -> float:
    """JSD of the histograms of two samples on shared bins (default range: both samples together).

    Example:
        >>> histogram_jsd([0, 0, 0.1], [1, 1, 0.9], bins=4)
        1.0
    """
    x, y = np.asarray(a, float), np.asarray(b, float)
    lo, hi = value_range if value_range is not None else (min(x.min(), y.min()), max(x.max(), y.max()))
    if hi <= lo:
        return 0.0
    ha, edges = np.histogram(x, bins=bins, range=(lo, hi))
    hb, _ = np.histogram(y, bins=edges)
    return jsd(ha, hb)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (95% at the default ``z``); (0, 1) when n = 0.

    Example:
        >>> wilson(30, 100)
        (0.219..., 0.396...)
    """
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def paired_diff(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of b - a over paired items and its normal-approximation interval: (mean, low, high).

    The interval is infinite with fewer than two pairs.

    Example:
        >>> paired_diff([0, 0, 1, 1], [1, 1, 1, 0])[0]
        0.25
    """
    d = np.array([float(y) - float(x) for x, y in zip(a, b)])
    n = len(d)
    m = float(d.mean()) if n else 0.0
    se = float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    return m, m - z * se, m + z * se


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the two discordant counts (binomial test of b vs c at 1/2).

    Args:
        b, c: the discordant counts of the 2×2 table (only-first succeeds, only-second succeeds).

    Returns:
        min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)]); 1.0 when b = c = 0.

    Example:
        >>> mcnemar_exact(4, 14)
        0.0309...
    """
    if b < 0 or c < 0:
        raise SteerscopeError(f"McNemar counts must be >= 0; got b={b}, c={c}")
    n = b + c  # n = 0: tail = 1, p = 1
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / (1 << n)
    return min(1.0, 2 * tail)


def mcnemar_p(a: Sequence[int], b: Sequence[int]) -> float:
    """Exact two-sided McNemar p-value of paired 0/1 outcomes (:func:`mcnemar_exact` of the discordant pairs).

    Example:
        >>> mcnemar_p([1, 0], [1, 0])
        1.0
    """
    n01 = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    n10 = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    return mcnemar_exact(n01, n10)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values: sorted ascending, min(1, max_{j <= i} (m - j) p_(j)), input order.

    Args:
        pvalues: m p-values in [0, 1].

    Returns:
        the m adjusted p-values, same order as the input.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, float).reshape(-1)
    if not np.all((p >= 0) & (p <= 1)):
        raise SteerscopeError("Holm needs p-values in [0, 1] (no nan); check the tests that produced them")
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(len(p), 0, -1)))
    return [float(v) for v in adjusted]


@dataclass(frozen=True)
class Tost:
    """Equivalence test of two samples within ±``margin`` in Cohen's d units (see :func:`tost`).

    Attributes:
        d: Cohen's d of x over y.
        margin: the equivalence margin in units of the pooled SD.
        p_lower, p_upper: one-sided p of H0 "d <= -margin" and of H0 "d >= +margin".
        p: max(p_lower, p_upper), the TOST p-value (nan when both samples are constant).
        verdict: "equivalent" | "different" | "undecided".
        n_x, n_y: sample sizes.
    """

    d: float
    margin: float
    p_lower: float
    p_upper: float
    p: float
    verdict: str
    n_x: int
    n_y: int


def tost(x: Numbers, y: Numbers, margin: float = 0.2, alpha: float = 0.05) -> Tost:
    """Two one-sided pooled-variance t-tests of equivalence of x and y within ±margin × pooled SD.

    Verdict: "equivalent" when the TOST p < ``alpha``; "different" when the ordinary two-sided pooled t-test
    p < ``alpha`` and |d| >= ``margin``; otherwise "undecided".

    Args:
        x, y: the two samples, at least two values each.
        margin: equivalence margin in Cohen's d units (> 0).
        alpha: level of the tests.

    Returns:
        a :class:`Tost` record.

    Example:
        >>> tost(np.random.randn(500), np.random.randn(500), margin=0.3).verdict
        'equivalent'
    """
    from scipy.stats import t as student_t

    if margin <= 0:
        raise SteerscopeError(f"the equivalence margin must be > 0 (in Cohen's d units); got {margin}")
    a, b = np.asarray(x, float), np.asarray(y, float)
    sd, d = _pooled_sd(a, b), cohens_d(a, b)
    df, scale = len(a) + len(b) - 2, math.sqrt(1 / len(a) + 1 / len(b))  # scale = SE / pooled SD
    if sd > 0:
        p_lower = float(student_t.sf((d + margin) / scale, df))
        p_upper = float(student_t.cdf((d - margin) / scale, df))
        p_two = float(2 * student_t.sf(abs(d) / scale, df))
    else:  # constant samples: equivalence is untestable; a difference is certain
        p_lower = p_upper = float("nan")
        p_two = 0.0 if d != 0 else 1.0
    p = max(p_lower, p_upper)
    verdict = ("equivalent" if p < alpha else "different" if p_two < alpha and abs(d) >= margin
               else "undecided")
    return Tost(d, margin, p_lower, p_upper, p, verdict, len(a), len(b))


def fit_logistic(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, l2: float = 1e-2,
                 steps: int = 200) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression by L-BFGS in float64.

    Minimises mean BCE(x w + b, y) + ``l2`` * |w|^2 (the bias is not penalised).

    Args:
        x: [n e] features.
        y: [n] labels in {0, 1}.
        l2: penalty weight.
        steps: L-BFGS iterations at most.

    Returns:
        (w [e] float64, b).

    Example:
        >>> w, b = fit_logistic(torch.randn(50, 3), torch.randint(0, 2, (50,)))
    """
    xt, yt = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w @ w)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return w.detach(), float(b.detach())
