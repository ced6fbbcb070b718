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
