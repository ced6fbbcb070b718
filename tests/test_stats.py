"""steerscope.stats against scipy (or an exact formula written out independently)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.spatial.distance
import scipy.stats
import torch

from steerscope import stats
from steerscope.errors import SteerscopeError


def test_cohens_d_is_the_pooled_t_statistic_rescaled() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 30), rng.normal(0, 2, 45)
    t = scipy.stats.ttest_ind(a, b, equal_var=True).statistic
    assert stats.cohens_d(a, b) == pytest.approx(t * np.sqrt(1 / 30 + 1 / 45), rel=1e-10)
    assert stats.cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0 and stats.cohens_d([2.0, 2.0], [1.0, 1.0]) == math.inf
    with pytest.raises(SteerscopeError, match="at least two"):
        stats.cohens_d([1.0], [1.0, 2.0])


def test_bootstrap_ci_matches_scipy_percentile_bootstrap() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.8, 1, 60), rng.normal(0, 1, 60)
    diff = lambda x, y: float(np.mean(x) - np.mean(y))
    lo, hi = stats.bootstrap_ci(a, b, diff, n_boot=4000, seed=0)
    ref = scipy.stats.bootstrap((a, b), lambda x, y: np.mean(x) - np.mean(y), n_resamples=4000, method="percentile",
                                random_state=1, vectorized=False).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.04) and hi == pytest.approx(ref.high, abs=0.04)
    b2 = a + 0.5 + rng.normal(0, 0.1, 60)
    plo, phi = stats.bootstrap_ci(a, b2, diff, n_boot=4000, paired=True)
    pref = scipy.stats.bootstrap((a, b2), lambda x, y: np.mean(x) - np.mean(y), paired=True, n_resamples=4000,
                                 method="percentile", random_state=1, vectorized=False).confidence_interval
    assert plo == pytest.approx(pref.low, abs=0.01) and phi == pytest.approx(pref.high, abs=0.01)
    assert phi - plo < 0.1  # pairing removes the between-item spread
    with pytest.raises(SteerscopeError, match="equal length"):
        stats.bootstrap_ci(a, b[:10], paired=True)


def test_jsd_and_histogram_jsd_match_scipy() -> None:
    p, q = np.array([1, 2, 3, 0, 4.0]), np.array([2, 2, 0, 1, 1.0])
    assert stats.jsd(p, q) == pytest.approx(scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2, rel=1e-9)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200), rng.normal(1, 1, 200)
    edges = np.histogram_bin_edges(np.concatenate([a, b]), bins=7)
    ref = scipy.spatial.distance.jensenshannon(np.histogram(a, edges)[0], np.histogram(b, edges)[0], base=2) ** 2
    assert stats.histogram_jsd(a, b, bins=7) == pytest.approx(ref, rel=1e-9)
    assert stats.histogram_jsd([1.0, 1.0], [1.0]) == 0.0


def test_wilson_matches_statsmodels_formula_via_scipy_quantile() -> None:
    z = scipy.stats.norm.ppf(0.975)
    for k, n in [(30, 100), (0, 10), (10, 10), (7, 13)]:
        p = k / n  # the score interval: solve |p - pi| = z sqrt(pi (1 - pi) / n) for pi
        roots = np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p])
        lo, hi = stats.wilson(k, n, z=z)
        assert lo == pytest.approx(max(0.0, roots.min()), abs=1e-9) and hi == pytest.approx(min(1.0, roots.max()), abs=1e-9)
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_paired_diff_interval_is_the_normal_interval_of_the_differences() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    m, lo, hi = stats.paired_diff(a.tolist(), b.tolist())
    d = b - a
    se = scipy.stats.sem(d)
    assert m == pytest.approx(d.mean()) and lo == pytest.approx(d.mean() - 1.96 * se) and hi == pytest.approx(
        d.mean() + 1.96 * se)
    assert stats.paired_diff([1], [0])[1] == -math.inf


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs() -> None:
    a = [0] * 14 + [1] * 4 + [1] * 5 + [0] * 3
    b = [1] * 14 + [0] * 4 + [1] * 5 + [0] * 3
    ref = scipy.stats.binomtest(4, 18, 0.5).pvalue
    assert stats.mcnemar_p(a, b) == pytest.approx(ref, rel=1e-12)
    assert stats.mcnemar_p([1, 0], [1, 0]) == 1.0


def test_fit_logistic_reaches_the_scipy_optimum_of_the_same_objective() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4))
    y = (x @ np.array([1.0, -2, 0.5, 0]) + rng.normal(0, 0.5, 120) > 0).astype(float)
    l2 = 0.01

    def objective(theta: np.ndarray) -> float:
        z = x @ theta[:-1] + theta[-1]
        return float(np.mean(np.logaddexp(0, z) - y * z) + l2 * theta[:-1] @ theta[:-1])

    ref = scipy.optimize.minimize(objective, np.zeros(5), method="BFGS", options={"gtol": 1e-10}).x
    w, b = stats.fit_logistic(torch.tensor(x), torch.tensor(y), l2=l2)
    assert np.allclose(w.numpy(), ref[:-1], atol=1e-4) and b == pytest.approx(ref[-1], abs=1e-4)
    w2, b2 = stats.fit_logistic(x, y, l2=l2)  # numpy in, same answer
    assert torch.allclose(w, w2) and b == b2
