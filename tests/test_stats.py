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


def test_holm_matches_statsmodels_including_ties_and_a_single_p() -> None:
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(0)
    vectors = [rng.uniform(0, 1, 10), rng.uniform(0, 0.05, 7), np.round(rng.uniform(0, 0.2, 12), 2),
               np.array([0.01, 0.01, 0.04, 0.5, 0.04]), np.array([0.03]), np.array([0.0, 1.0, 0.6, 0.6])]
    for p in vectors:
        assert stats.holm(p.tolist()) == pytest.approx(multipletests(p, method="holm")[1], abs=1e-15)
    assert stats.holm([]) == []
    with pytest.raises(SteerscopeError, match=r"\[0, 1\]"):
        stats.holm([0.1, float("nan")])


def test_mcnemar_exact_matches_statsmodels_and_mcnemar_p_uses_it() -> None:
    from statsmodels.stats.contingency_tables import mcnemar

    for b in range(0, 26):
        for c in range(0, 26):
            ref = mcnemar([[7, b], [c, 3]], exact=True).pvalue
            assert stats.mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9, abs=1e-300), (b, c)
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(130, 90) == pytest.approx(mcnemar([[0, 130], [90, 0]], exact=True).pvalue, rel=1e-9)
    a = [0] * 9 + [1] * 2 + [1] * 5
    b = [1] * 9 + [0] * 2 + [1] * 5
    assert stats.mcnemar_p(a, b) == stats.mcnemar_exact(9, 2)
    with pytest.raises(SteerscopeError, match=">= 0"):
        stats.mcnemar_exact(-1, 2)


def _pooled_sd(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(((len(x) - 1) * np.var(x, ddof=1) + (len(y) - 1) * np.var(y, ddof=1)) / (len(x) + len(y) - 2)))


def test_tost_matches_statsmodels_ttost_ind_and_scipy_ttest_ind() -> None:
    from statsmodels.stats.weightstats import ttost_ind

    rng = np.random.default_rng(5)
    for nx, ny, shift, margin in [(40, 55, 0.1, 0.2), (200, 180, 0.0, 0.3), (12, 9, 0.9, 0.5), (300, 300, 0.4, 0.2),
                                  (25, 25, -0.3, 0.5), (500, 450, 0.05, 0.25)]:
        x, y = rng.normal(shift, 1.3, nx), rng.normal(0, 1.3, ny)
        r = stats.tost(x, y, margin=margin)
        sd = _pooled_sd(x, y)
        p, (_, p_low, _), (_, p_upp, _) = ttost_ind(x, y, -margin * sd, margin * sd, usevar="pooled")
        assert r.p_lower == pytest.approx(p_low, rel=1e-9) and r.p_upper == pytest.approx(p_upp, rel=1e-9)
        assert r.p == pytest.approx(p, rel=1e-9) and r.p == max(r.p_lower, r.p_upper)
        assert r.d == pytest.approx((x.mean() - y.mean()) / sd, rel=1e-12) and (r.n_x, r.n_y, r.margin) == (nx, ny, margin)
        p_two = scipy.stats.ttest_ind(x, y, equal_var=True).pvalue  # the verdict rule, from the references
        want = "equivalent" if p < 0.05 else "different" if p_two < 0.05 and abs(r.d) >= margin else "undecided"
        assert r.verdict == want


def _standardised(n: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=n)
    return (z - z.mean()) / z.std(ddof=1)  # mean 0, SD 1 exactly: Cohen's d of (z1 + s) over z2 is s


def test_tost_gives_each_of_the_three_verdicts() -> None:
    big_x, big_y = _standardised(2000, 1), _standardised(2000, 2)
    assert stats.tost(big_x + 0.02, big_y, margin=0.2).verdict == "equivalent"
    assert stats.tost(_standardised(200, 3) + 0.6, _standardised(200, 4), margin=0.2).verdict == "different"
    small = stats.tost(_standardised(6, 5) + 0.3, _standardised(6, 6), margin=0.2)
    assert small.verdict == "undecided" and small.p > 0.05  # too few to tell
    # significant (t = 2.4) but smaller than the margin and not shown equivalent: still undecided
    mid = stats.tost(_standardised(500, 7) + 0.15, _standardised(500, 8), margin=0.2)
    assert mid.d == pytest.approx(0.15) and mid.p > 0.05 and mid.verdict == "undecided"
    assert scipy.stats.ttest_ind(_standardised(500, 7) + 0.15, _standardised(500, 8)).pvalue < 0.05
    const = stats.tost([1.0, 1.0, 1.0], [2.0, 2.0])
    assert const.verdict == "different" and math.isnan(const.p)
    assert stats.tost([1.0, 1.0], [1.0, 1.0]).verdict == "undecided"
    with pytest.raises(SteerscopeError, match="margin"):
        stats.tost(big_x, big_y, margin=0.0)


def _exact_quantile(values: list[float], q: float) -> float:
    """Inverse CDF of the uniform distribution on ``values`` (smallest v with F(v) >= q)."""
    v = sorted(values)
    return v[max(0, math.ceil(q * len(v)) - 1)]


def _within_exact(mc: float, values: list[float], q: float, slack: float = 0.006) -> bool:
    return _exact_quantile(values, q - slack) - 1e-12 <= mc <= _exact_quantile(values, q + slack) + 1e-12


def test_cluster_intervals_match_the_exact_bootstrap_distribution() -> None:
    import itertools

    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, (4, 3)) + rng.normal(0, 2, (4, 1))  # 4 prompts × 3 seeds
    steer, base = rng.normal(3, 0.5, 4), rng.normal(0, 0.5, 4)
    means, ratios = [], []
    for tup in itertools.product(range(4), repeat=4):  # all 4**4 equally likely resamples
        cells = [x[i, j] for i in tup for j in range(3)]
        means.append(sum(cells) / len(cells))
        mx, ms, mb = sum(cells) / len(cells), sum(steer[i] for i in tup) / 4, sum(base[i] for i in tup) / 4
        ratios.append((mx - mb) / (ms - mb))
    point, lo, hi = stats.mean_ci(x, n_boot=20000, seed=1)
    assert point == pytest.approx(x.mean()) and _within_exact(lo, means, 0.025) and _within_exact(hi, means, 0.975)
    point, lo, hi = stats.ratio_of_means_ci(x, steer, base, n_boot=20000, seed=2)
    assert point == pytest.approx((x.mean() - base.mean()) / (steer.mean() - base.mean()))
    assert _within_exact(lo, ratios, 0.025) and _within_exact(hi, ratios, 0.975)
    lo, hi = stats.cluster_bootstrap(lambda idx: float(x[idx].mean()), 4, n_boot=20000, level=0.8, seed=3)
    assert _within_exact(lo, means, 0.1) and _within_exact(hi, means, 0.9)


def test_mean_ci_of_one_value_per_prompt_matches_scipy_percentile_bootstrap() -> None:
    x = np.random.default_rng(4).normal(0.5, 1, 50)
    point, lo, hi = stats.mean_ci(x, n_boot=10000, seed=0)
    ref = scipy.stats.bootstrap((x,), np.mean, method="percentile", confidence_level=0.95, n_resamples=10000,
                                rng=np.random.default_rng(1)).confidence_interval
    assert point == pytest.approx(x.mean()) and lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)


def test_cluster_interval_is_wider_than_a_cell_bootstrap_when_seeds_are_correlated() -> None:
    rng = np.random.default_rng(6)
    n, k = 30, 6
    x = rng.normal(0, 1, (n, 1)) + rng.normal(0, 0.1, (n, k))  # seeds of a prompt nearly agree
    _, lo, hi = stats.mean_ci(x, seed=0)
    flat = x.reshape(-1)
    nlo, nhi = stats.cluster_bootstrap(lambda idx: float(flat[idx].mean()), n * k, seed=0)  # every cell independent
    assert hi - lo > 1.8 * (nhi - nlo)  # about sqrt(k) wider
    assert stats.mean_ci(x, seed=0) == stats.mean_ci(x.mean(axis=1), seed=0)  # a cluster is its row


def test_ratio_of_means_ci_edge_cases() -> None:
    same = np.array([0.2, 0.4, 0.6])
    point, lo, hi = stats.ratio_of_means_ci(same, same, same)
    assert math.isnan(point) and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in stats.cluster_bootstrap(lambda idx: float("nan"), 3, n_boot=10))
    with pytest.raises(SteerscopeError, match="steer and base"):
        stats.ratio_of_means_ci(same, same[:2], same)
    with pytest.raises(SteerscopeError, match=r"\[n, k\]"):
        stats.mean_ci(np.zeros((2, 2, 2)))
    with pytest.raises(SteerscopeError, match="at least one cluster"):
        stats.cluster_bootstrap(lambda idx: 0.0, 0)
