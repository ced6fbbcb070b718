"""The card's verdict rules: every rule reaches each of its three outcomes on synthetic records, and
the intervals and records they read are checked against direct computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from steerscope.explain import intervals, rules
from steerscope.explain.records import (
    AttributionRecord,
    CircuitRecord,
    Claim,
    Estimate,
    FrozenPath,
    FrozenRecord,
    IdentifiabilityRecord,
    SparsityRecord,
    SpecificControl,
)

N = 8


def E(v: float, lo: float, hi: float, n: int = N) -> Estimate:
    return Estimate(v, (lo, hi), n)


def path(lo: float, hi: float) -> FrozenPath:
    return FrozenPath(E((lo + hi) / 2, lo, hi), 0.5, 0.2, None)


def frozen(qk: tuple[float, float], ov: tuple[float, float], svv=(0.9, 1.1), mlp=(0.9, 1.1)) -> FrozenRecord:
    return FrozenRecord(path(*qk), path(*ov), path(*svv), path(*mlp), None, 0.3, None, 12, {})


def attribution(shares: dict[str, tuple[float, float]], completeness: float = 1.0) -> AttributionRecord:
    return AttributionRecord({k: E((lo + hi) / 2, lo, hi) for k, (lo, hi) in shares.items()}, 1.0, 2.0, 1.0,
                             completeness, 100, 20, [], [], 3, 40)


def ident(vp: tuple[float, float, float, float], po: tuple[float, float]) -> IdentifiabilityRecord:
    lo, hi, lo90, hi90 = vp
    return IdentifiabilityRecord([0, 1], N, E((lo + hi) / 2, lo, hi), E(sum(po) / 2, *po), (lo90, hi90), 0.2, {},
                                 0.5, "covariance")


@pytest.mark.parametrize("excess, status", [((0.5, 2.0), "supported"), ((-3.0, -1.0), "contradicted"), ((-0.5, 1.5), "contradicted"),
                                            ((-0.5, 3.0), "undecided"), ((-1.0, 2.5), "undecided")])
def test_dose_effect_rule_reaches_each_outcome(excess, status) -> None:
    c = SpecificControl(4.0, E(10.0, 8.0, 12.0), E(9.0, 7.0, 11.0), E(sum(excess) / 2, *excess))
    claim = rules.specific(c, N)
    assert claim.status == status and claim.rule == "dose.effect"
    assert (claim.n_to_decide is not None) == (status == "undecided" and sum(excess) / 2 != 0)


@pytest.mark.parametrize("share, status", [((0.3, 0.5), "supported"), ((0.0, 0.15), "contradicted"),
                                           ((0.1, 0.3), "undecided")])
def test_path_share_rules_reach_each_outcome(share, status) -> None:
    claims = rules.shares(attribution({"v": share}))
    assert [(c.rule, c.status) for c in claims] == [("attr.v", status)]


def test_an_incomplete_integral_makes_every_share_claim_undecided() -> None:
    claims = rules.shares(attribution({"v": (0.3, 0.5), "mlp": (0.0, 0.1)}, completeness=0.6))
    assert {c.status for c in claims} == {"undecided"}
    assert all("incomplete" in c.evidence for c in claims)


@pytest.mark.parametrize("kept, status", [((0.1, 0.4), "supported"), ((0.6, 1.1), "contradicted"),
                                          ((0.3, 0.7), "undecided")])
def test_path_needed_rules_reach_each_outcome(kept, status) -> None:
    for mode in ("qk", "ov", "svv", "mlp"):
        assert rules.needed(path(*kept), mode).status == status


@pytest.mark.parametrize("qk, ov, status", [
    ((0.85, 1.0), (0.1, 0.4), "supported"),
    ((0.1, 0.4), (0.1, 0.4), "contradicted"),  # patterns needed too
    ((0.85, 1.0), (0.85, 1.1), "contradicted"),  # values not needed
    ((0.6, 0.95), (0.1, 0.4), "undecided"),  # QK-frozen's interval reaches below 0.8
    ((0.85, 1.0), (0.3, 0.7), "undecided"),
])
def test_values_not_patterns_needs_both_intervals(qk, ov, status) -> None:
    assert rules.values_not_patterns(frozen(qk, ov)).status == status


def test_the_worked_formality_card_no_longer_earns_the_values_verdict() -> None:
    """docs/explain.md's formality card: QK-frozen kept 0.58, OV-frozen 0.31; the old rule (OV < QK - 0.2)
    said "acts mainly through values"; QK-frozen losing 42 % is not "values, not patterns"."""
    claim = rules.values_not_patterns(frozen((0.45, 0.71), (0.15, 0.47)))
    assert claim.status != "supported"


def _circuit(faith: tuple[float, float]) -> CircuitRecord:
    return CircuitRecord(edge_fraction=0.05, sizes=[1], n_edges_pruned=[1], faithfulness=[0.9], m_full=2.0,
                         m_empty=0.0, n_edges_total=100, minimal_top_n=5, minimal_edges=5, minimal_fraction=0.05,
                         reached_threshold=True, threshold=0.85, edge_kinds={}, graph={}, complement=0.1,
                         random_2x=[0.1, 0.1], faithfulness_minimal=E(sum(faith) / 2, *faith))


@pytest.mark.parametrize("faith, status", [((0.7, 0.95), "supported"), ((0.1, 0.4), "contradicted"),
                                           ((0.3, 0.9), "undecided")])
def test_circuit_rule_reaches_each_outcome(faith, status) -> None:
    assert rules.circuit(_circuit(faith)).status == status


def _sparsity(frac: float, ci: tuple[float, float]) -> SparsityRecord:
    return SparsityRecord(frac, ci, 0.05, N, int(576 * frac), 0.9, "ie", [0.5], [0.5], {}, [])


@pytest.mark.parametrize("frac, ci, status", [(0.1, (0.05, 0.15), "supported"), (0.3, (0.25, 0.5), "contradicted"),
                                              (0.2, (0.1, 0.3), "undecided")])
def test_sparsity_rule_reaches_each_outcome(frac, ci, status) -> None:
    assert rules.sparse(_sparsity(frac, ci)).status == status


@pytest.mark.parametrize("vp, po, status", [
    ((0.85, 1.12, 0.88, 1.08), (-0.1, 0.3), "supported"),
    ((0.3, 0.6, 0.35, 0.55), (-0.1, 0.3), "contradicted"),
    ((0.6, 1.3, 0.65, 1.25), (-0.1, 0.3), "undecided"),  # interval wider than the margin: no equivalence
    ((0.85, 1.12, 0.88, 1.08), (0.5, 0.95), "undecided"),  # v_perp alone may do what s does
])
def test_not_identifiable_needs_equivalence_and_a_distinct_perp(vp, po, status) -> None:
    assert rules.not_identifiable(ident(vp, po)).status == status


def test_a_wider_interval_never_makes_not_identifiable_easier() -> None:
    """The old rule fired when the CI *included* 1, so more noise earned the label; TOST cannot."""
    narrow = rules.not_identifiable(ident((0.85, 1.1, 0.87, 1.08), (-0.1, 0.2)))
    wide = rules.not_identifiable(ident((0.4, 1.6, 0.5, 1.5), (-0.1, 0.2)))
    assert narrow.status == "supported" and wide.status == "undecided"


def test_n_to_decide_grows_with_the_interval_and_vanishes_on_the_threshold() -> None:
    a = rules.n_to_decide(E(0.75, 0.25, 1.25), 0.5)
    b = rules.n_to_decide(E(0.75, 0.0, 1.5), 0.5)
    assert a is not None and b is not None and b > a > N
    assert a == N * (0.5 / 0.25) ** 2
    assert rules.n_to_decide(E(0.5, 0.3, 0.7), 0.5) is None


def test_claims_round_trip_through_json() -> None:
    c = rules.values_not_patterns(frozen((0.85, 1.0), (0.1, 0.4)))
    assert Claim.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_records_round_trip_with_nested_records_tuples_and_nan() -> None:
    rec = frozen((0.1, 0.4), (0.2, 0.3))
    rec = FrozenRecord(rec.qk, rec.ov, rec.svv, FrozenPath(E(float("nan"), float("nan"), 1.0), 0.5, float("nan"),
                                                           None), None, 0.3, None, 12, {"none": ["a"]})
    from steerscope.explain.card import _clean

    back = FrozenRecord.from_dict(json.loads(json.dumps(_clean(rec.to_dict()), allow_nan=False)))
    assert back.qk == rec.qk and back.samples == rec.samples
    assert math.isnan(back.mlp.effect_retained.value) and back.mlp.effect_retained.ci95[1] == 1.0
    assert isinstance(back.qk.effect_retained.ci95, tuple) and back.mlp.scorer_mean is None
    with pytest.raises(TypeError, match="missing"):
        FrozenRecord.from_dict({"qk": rec.qk.to_dict()})


def test_interval_helpers_equal_direct_computations() -> None:
    rng = np.random.default_rng(0)
    x, steer, base = rng.normal(1, 1, 12), rng.normal(3, 1, 12), rng.normal(0, 1, 12)
    e = intervals.ratio(x, steer, base, n_boot=200)
    assert e.value == pytest.approx((x.mean() - base.mean()) / (steer.mean() - base.mean()))
    assert e.ci95[0] < e.value < e.ci95[1] and e.n == 12
    num, den = rng.normal(1, 0.3, 12), rng.normal(4, 0.3, 12)
    assert intervals.ratio_of_sums(num, den, 200).value == pytest.approx(num.sum() / den.sum())
    parts = [rng.exponential(1, k) for k in (5, 9, 3, 7)]
    q = intervals.pooled_quantile(parts, 0.95, 200)
    assert q.value == pytest.approx(np.quantile(np.concatenate(parts), 0.95)) and q.n == 4


def test_the_expanded_interval_covers_at_small_n_where_the_plain_percentile_does_not() -> None:
    """Coverage of the mean of n = 8 normal values over 400 simulated data sets: the plain 95 %
    percentile bootstrap undercovers; the expanded one (intervals.level_for) reaches about 95 %."""
    rng = np.random.default_rng(1)
    n, sims, boots = 8, 400, 2000
    data = rng.normal(0.0, 1.0, (sims, n))
    means = data[:, rng.integers(0, n, (boots, n))].mean(-1)  # [sims boots]

    def coverage(level: float) -> float:
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=1)
        return float(((lo < 0) & (hi > 0)).mean())
    assert coverage(0.95) < 0.92
    assert coverage(intervals.level_for(n)) >= 0.93
    assert intervals.level_for(10_000) == pytest.approx(0.95, abs=1e-3)


def test_the_cli_section_names_are_the_card_sections() -> None:
    from steerscope.cli import SECTION_NAMES
    from steerscope.explain.sections import SECTIONS

    assert SECTION_NAMES == tuple(s.name for s in SECTIONS)


def test_score_counts_right_undecided_wrong_and_missing() -> None:
    from steerscope.explain.validate import score, tally

    claims = [Claim("attr.v", "supported", "", "", "", N), Claim("attr.mlp", "undecided", "", "", "", N),
              Claim("dose.effect", "supported", "", "", "", N)]
    got = score(claims, {"attr.v": "supported", "attr.mlp": "contradicted", "dose.effect": "contradicted",
                         "frozen.ov.needed": "supported"})
    assert got == {"attr.v": "right", "attr.mlp": "undecided", "dose.effect": "wrong", "frozen.ov.needed": "missing"}
    from steerscope.explain.validate import CaseResult

    t = tally([CaseResult("m", "c", "quick", 1.0, {}, {}, {}, got, 1.0)])
    assert t["all"] == {"right": 1, "undecided": 1, "wrong": 1, "missing": 1} and t["attr.v"]["right"] == 1
