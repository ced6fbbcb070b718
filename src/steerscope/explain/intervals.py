"""Intervals for the card's figures: every figure measured over prompts becomes an
:class:`~steerscope.explain.records.Estimate` with a 95 % percentile bootstrap interval over
prompts (clusters: a prompt's row of seeds or draws is resampled whole; :func:`steerscope.stats.cluster_bootstrap`).
Resampling reuses stored per-prompt values: no forward pass is repeated.

Small n: a percentile bootstrap interval over 8 prompts is too narrow (it ignores that the spread
itself is estimated). Every interval here is Hesterberg's *expanded* percentile interval: the
bootstrap quantiles are taken at the level whose normal quantile equals sqrt(n / (n - 1)) times
Student's t quantile with n - 1 degrees of freedom (:func:`level_for`; Hesterberg 2015, "What
teachers should know about the bootstrap", §4.6). For n = 8 the nominal 95 % interval uses the
0.6 % and 99.4 % bootstrap quantiles; for large n the adjustment vanishes.

Example:
    >>> mean(np.array([1.0, 2.0, 3.0]), n_boot=200).value
    2.0
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as sps

from steerscope import stats
from steerscope.explain.records import Estimate


def level_for(n: int, level: float = 0.95) -> float:
    """The bootstrap level of the expanded percentile interval for ``n`` clusters (see the module docstring)."""
    if n < 2:
        return level
    z = math.sqrt(n / (n - 1)) * float(sps.t.ppf((1 + level) / 2, n - 1))
    return float(2 * sps.norm.cdf(z) - 1)


def _est(point: float, lo: float, hi: float, n: int) -> Estimate:
    return Estimate(float(point), (float(lo), float(hi)), int(n))


def mean(x: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Mean of ``x`` [n] or [n k] (prompts x seeds; a prompt's row is one cluster)."""
    a = np.asarray(x, float)
    return _est(*stats.mean_ci(a, n_boot=n_boot, level=level_for(len(a)), seed=seed), len(a))


def ratio(x: np.ndarray, steer: np.ndarray, base: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Effect retained (mean x - mean base) / (mean steer - mean base); x [n] or [n k], steer/base [n]."""
    a = np.asarray(x, float)
    return _est(*stats.ratio_of_means_ci(a, np.asarray(steer, float), np.asarray(base, float), n_boot=n_boot,
                                         level=level_for(len(a)), seed=seed), len(a))


def ratio_of_sums(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """sum num / sum den over prompts (num, den [n]), resampling prompts together (e.g. a path's share)."""
    a, b = np.asarray(num, float), np.asarray(den, float)

    def stat(idx: np.ndarray) -> float:
        d = b[idx].sum()
        return float(a[idx].sum() / d) if abs(d) > 1e-12 else float("nan")
    lo, hi = stats.cluster_bootstrap(stat, len(a), n_boot=n_boot, level=level_for(len(a)), seed=seed)
    return _est(stat(np.arange(len(a))), lo, hi, len(a))


def pooled_quantile(per_prompt: Sequence[np.ndarray], q: float, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """The ``q`` quantile of all prompts' values pooled (e.g. KL per position), prompts resampled whole."""
    parts = [np.asarray(p, float) for p in per_prompt]

    def stat(idx: np.ndarray) -> float:
        vals = np.concatenate([parts[i] for i in idx])
        return float(np.quantile(vals, q)) if vals.size else float("nan")
    lo, hi = stats.cluster_bootstrap(stat, len(parts), n_boot=n_boot, level=level_for(len(parts)), seed=seed)
    return _est(stat(np.arange(len(parts))), lo, hi, len(parts))
