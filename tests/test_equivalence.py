"""The cluster-bootstrap TOST and the TOST sample size (steerscope.analyses.equivalence), against known effects,
statsmodels' power and a simulation with the independent pooled-t TOST (steerscope.stats.tost)."""

import numpy as np
import pytest

from steerscope import stats
from steerscope.analyses.equivalence import ClusterTost, cluster_tost, decide, tost_power, tost_sample_size
from steerscope.errors import SteerscopeError


def _paired(n: int, k: int, d: float, seed: int, icc: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two [n k] tables with unit SD and a true Cohen's d of ``d``; a prompt effect of variance ``icc``."""
    rng = np.random.default_rng(seed)
    pa, pb = rng.normal(0, np.sqrt(icc), (n, 1)), rng.normal(0, np.sqrt(icc), (n, 1))
    e = np.sqrt(1 - icc)
    return pa + rng.normal(0, e, (n, k)) + d, pb + rng.normal(0, e, (n, k))


def test_cluster_tost_gives_each_verdict_on_data_with_a_known_d():
    eq = cluster_tost(*_paired(300, 3, 0.0, 0), n_boot=1000)
    assert eq.p_equiv < 0.05 and -0.2 < eq.ci90[0] and eq.ci90[1] < 0.2 and (eq.n_prompts, eq.n_seeds) == (300, 3)
    diff = cluster_tost(*_paired(200, 2, 0.6, 1), n_boot=1000)
    assert diff.p_diff < 0.05 and diff.p_equiv > 0.5 and diff.d == pytest.approx(0.6, abs=0.15)
    small = cluster_tost(*_paired(8, 2, 0.0, 2), n_boot=1000)
    assert small.p_equiv > 0.05 and small.ci90[0] < -0.2  # too few prompts to show equivalence
    assert [v for v, _, _ in decide([eq, diff, small])] == ["equivalent", "different", "undecided"]


def test_tost_p_value_agrees_with_its_90_percent_interval():
    for seed, d in ((3, 0.0), (4, 0.1), (5, 0.15), (6, 0.3)):
        r = cluster_tost(*_paired(150, 2, d, seed), n_boot=2000, seed=seed)
        inside = -0.2 < r.ci90[0] and r.ci90[1] < 0.2
        assert (r.p_equiv < 0.05) == inside or abs(r.p_equiv - 0.05) < 0.005, (d, r)


def test_clustering_widens_the_interval_when_seeds_of_a_prompt_are_correlated():
    x, y = _paired(60, 4, 0.0, 7, icc=0.8)
    clustered = cluster_tost(x, y, n_boot=1000)
    a, b = x.reshape(-1, 1), y.reshape(-1, 1)  # every cell its own cluster: ignores the correlation
    naive = cluster_tost(a, b, n_boot=1000)
    assert (clustered.ci90[1] - clustered.ci90[0]) > 1.5 * (naive.ci90[1] - naive.ci90[0])


def test_holm_over_the_family_can_turn_an_equivalence_undecided():
    t = ClusterTost(0.0, 0.2, (-0.1, 0.1), (-0.12, 0.12), 0.02, 0.02, 0.02, 0.9, 100, 2)
    assert decide([t])[0][0] == "equivalent"  # family of 2 (p_equiv, p_diff): 0.02 x 2 < 0.05
    verdicts = decide([t] * 3)  # 6 tests: 0.02 x 6 > 0.05
    assert [v for v, _, _ in verdicts] == ["undecided"] * 3 and verdicts[0][1] == pytest.approx(0.12)


def test_tost_power_matches_statsmodels_one_sided_power_and_gives_429_per_group():
    from statsmodels.stats.power import NormalIndPower

    for n in (100, 250, 429, 800):
        one_sided = NormalIndPower().power(effect_size=0.2, nobs1=n, alpha=0.05, alternative="larger")
        assert tost_power(n) == pytest.approx(max(0.0, 2 * one_sided - 1), abs=1e-9)
    assert tost_sample_size() == 429
    assert tost_power(428) < 0.8 <= tost_power(429)
    assert tost_sample_size(design_effect=0.5) == 215 and tost_sample_size(d=0.05) > 429
    with pytest.raises(SteerscopeError, match="margin"):
        tost_sample_size(d=0.2)


def test_tost_sample_size_gives_its_power_in_a_simulation_with_the_pooled_t_tost():
    rng = np.random.default_rng(11)
    n = tost_sample_size()
    hits = [stats.tost(rng.normal(size=n), rng.normal(size=n), margin=0.2).verdict == "equivalent" for _ in range(300)]
    assert 0.72 < np.mean(hits) < 0.88  # 0.80 +- 3.5 binomial SE at 300 runs
