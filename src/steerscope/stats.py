"""Effect sizes, intervals and tests: pure functions of numbers, each checked against scipy in the tests.

- :func:`cohens_d` — standardised mean difference with the pooled SD (Cohen 1988).
- :func:`bootstrap_ci` — percentile bootstrap CI of any two-sample statistic, independent or paired
  resampling (Efron & Tibshirani 1993).
- :func:`jsd`, :func:`histogram_jsd` — Jensen-Shannon divergence (base 2) of histograms.
- :func:`wilson` — Wilson score interval of a proportion (Wilson 1927).
- :func:`paired_diff` — mean paired difference with its normal-approximation interval.
- :func:`mcnemar_p` — exact two-sided McNemar test of paired 0/1 outcomes.
- :func:`fit_logistic` — L2-regularised logistic regression by L-BFGS.

Example:
    >>> cohens_d([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    1.0
    >>> wilson(30, 100)
    (0.219..., 0.396...)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from steerscope.errors import SteerscopeError

Numbers = Sequence[float] | np.ndarray
Stat = Callable[[np.ndarray, np.ndarray], float]


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
    if len(x) < 2 or len(y) < 2:
        raise SteerscopeError("Cohen's d needs at least two scores per group; use more prompts or seeds")
    na, nb = len(x), len(y)
    pooled = float(np.sqrt(((na - 1) * x.var(ddof=1) + (nb - 1) * y.var(ddof=1)) / (na + nb - 2)))
    diff = float(x.mean() - y.mean())
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
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    q = (1 - level) / 2
    return float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))


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


def mcnemar_p(a: Sequence[int], b: Sequence[int]) -> float:
    """Exact two-sided McNemar p-value of paired 0/1 outcomes (binomial test on the discordant pairs).

    Example:
        >>> mcnemar_p([1, 0], [1, 0])
        1.0
    """
    n01 = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    n10 = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(n01, n10) + 1)) / (1 << n)
    return min(1.0, 2 * tail)


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
