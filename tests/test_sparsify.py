"""Sparsification rules and the hypergeometric agreement test (pure functions)."""

from __future__ import annotations

from math import comb

import pytest
import torch

import steerscope as ss
from steerscope.analyses import sparsity as S
from steerscope.errors import SteerscopeError


def _p_exact(d: int, na: int, nb: int, x: int) -> float:
    """P(X >= x) by direct counting: choose |B| of d with i elements inside A."""
    return sum(comb(na, i) * comb(d - na, nb - i) for i in range(x, min(na, nb) + 1)) / comb(d, nb)


@pytest.mark.parametrize("d,na,nb,x", [(50, 10, 12, 5), (576, 58, 58, 20), (30, 5, 5, 0), (100, 40, 50, 40)])
def test_hypergeometric_p_value_matches_direct_counting(d: int, na: int, nb: int, x: int) -> None:
    a = torch.zeros(d, dtype=torch.bool)
    b = torch.zeros(d, dtype=torch.bool)
    a[:na] = True
    b[na - x : na - x + nb] = True
    assert int((a & b).sum()) == x
    assert S.hypergeom_p(a, b) == pytest.approx(_p_exact(d, na, nb, x), rel=1e-9, abs=1e-300)


def test_methods_keep_the_matched_number_of_dimensions_and_the_right_ones() -> None:
    s = torch.tensor([1.0, -4.0, 0.5, 3.0, -0.1, 2.0])
    r = torch.tensor([0.2, -1.0, 3.0, 0.1, 5.0, -0.3])
    for m in S.METHODS:
        assert int(S.keep_mask(m, 0.5, s, r).sum()) == 3
    assert S.keep_mask("norm", 0.5, s, r).tolist() == [False, True, False, True, False, True]
    assert S.keep_mask("gradient", 0.5, s, r).tolist() == [True, False, True, False, True, False]
    ie = (s * r).abs()  # [0.2, 4, 1.5, 0.3, 0.5, 0.6]
    assert S.keep_mask("ie", 0.5, s, r).tolist() == [False, True, True, False, False, True]
    assert ie.argmax() == 1


def test_signed_threshold_and_tau_for_sparsity_agree() -> None:
    r = torch.randn(200, generator=torch.Generator().manual_seed(0))
    for sp in (0.0, 0.5, 0.9):
        tau = S.tau_for(r, sp)
        assert int((~S.threshold_mask(r, tau)).sum()) == S.n_drop(200, sp)
        assert torch.equal(S.threshold_mask(r, tau), S.keep_mask("gradient", sp, torch.ones(200), r))


def test_apply_zeroes_dropped_dimensions_and_iou() -> None:
    v = ss.SteeringVector({3: torch.arange(1.0, 7.0)})
    keep = torch.tensor([True, False, True, False, True, False])
    out = S.apply(v, keep)
    assert out[3].tolist() == [1.0, 0.0, 3.0, 0.0, 5.0, 0.0] and v[3][1] == 2.0
    assert S.iou(keep, keep) == 1.0 and S.iou(keep, ~keep) == 0.0
    with pytest.raises(SteerscopeError):
        S.keep_mask("ie", 0.5, torch.ones(4))
    with pytest.raises(SteerscopeError):
        S.n_drop(10, 1.0)


def test_paper_rule_divides_ie_by_the_applied_vector_and_thresholds_on_the_fixed_grid() -> None:
    # hand-computed: s = [2, -1, 0.5, 4, 0], alpha = -1, mean gradient g = [0.3, -2, 1.2, 0.05, 9]
    # IE_vec = (alpha s) ⊙ g = [-0.6, -2, -0.6, -0.2, 0]; r = IE / (alpha s) = g (s = 0: undefined -> -inf)
    s = torch.tensor([2.0, -1.0, 0.5, 4.0, 0.0])
    g = torch.tensor([0.3, -2.0, 1.2, 0.05, 9.0])
    ie = -1.0 * s * g
    r = S.paper_ratio(ie, s, -1.0)
    assert r[:4].tolist() == pytest.approx([0.3, -2.0, 1.2, 0.05]) and r[4] == float("-inf")
    assert S.PAPER_TAUS == (0.0, 0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5)
    kept = {tau: S.paper_mask(r, tau).tolist() for tau in S.PAPER_TAUS}
    assert kept[0.0] == [True, False, True, True, False]  # signed: g = -2 is dropped at τ = 0
    assert kept[0.1] == [True, False, True, False, False]
    assert kept[0.5] == kept[1.0] == [False, False, True, False, False]
    assert kept[1.5] == [False] * 5
    # the matched-k variant ranks r' = IE / s = alpha g: for alpha < 0 it keeps the opposite end
    assert S.keep_mask("gradient", 0.6, s, -g).tolist() == [False, True, False, True, False]


def test_random_vectors_have_the_norm_of_the_template_and_differ_by_seed() -> None:
    like = torch.arange(1.0, 9.0)
    vs = S.random_vectors(like, 3, seed=1)
    assert all(float(v.norm()) == pytest.approx(float(like.norm())) for v in vs)
    assert not torch.equal(vs[0], vs[1]) and torch.equal(vs[0], S.random_vectors(like, 1, seed=1)[0])


def test_random_vector_null_is_calibrated_when_b_is_itself_a_random_draw() -> None:
    """Under the null (B is one more draw from the null's distribution) P(p <= a) <= a; here the rule
    has a fixed model-like gradient field, so kept sets are far from uniform and the hypergeometric
    test, which assumes uniform subsets, rejects far too often."""
    d, n_null, trials = 64, 19, 300
    gen = torch.Generator().manual_seed(0)
    field = torch.randn(d, generator=gen).abs() * 3  # shared by every vector: the "model's" gradient
    keep = lambda v: S.keep_mask("ie", 0.8, v, field)
    a = keep(torch.randn(d, generator=gen))
    ps, hyper = [], []
    for t in range(trials):
        draws = S.random_vectors(torch.ones(d), n_null + 1, seed=1000 + t)
        b, null = keep(draws[0]), [keep(v) for v in draws[1:]]
        ps.append(S.null_test(a, b, null).p_value)
        hyper.append(S.hypergeom_p(a, b))
    for alpha in (0.05, 0.1, 0.2):
        assert sum(p <= alpha for p in ps) / trials <= alpha + 0.05
    assert sum(p <= 0.05 for p in hyper) / trials > 0.25  # nominal 0.05: the uniform-subset null is miscalibrated here
    assert S.null_p(1.0, [0.2] * 19) == pytest.approx(0.05) and S.null_p(0.0, [0.2] * 19) == 1.0


def test_null_test_reports_the_observed_iou_and_refuses_an_empty_null() -> None:
    a = torch.tensor([True, True, False, False])
    res = S.null_test(a, a, [torch.tensor([False, False, True, True])] * 4)
    assert res.iou == 1.0 and res.null_mean == 0.0 and res.p_value == pytest.approx(0.2) and res.n_null == 4
    with pytest.raises(SteerscopeError):
        S.null_test(a, a, [])
