"""The card's verdict rules: each claim is a named, three-way decision on interval estimates.

A rule says **supported** when the interval clears its threshold, **contradicted** when it clears
the opposite one, and **undecided** when it straddles, with the n that would likely decide it.
No rule reads a point estimate alone. Rules and thresholds (docs/explain.md explains each):

- ``dose.effect`` — the vector changes behaviour more than a random direction of the same norm
  at the alpha used: supported when the per-prompt excess (s minus random) has its 95 % interval
  above 0; contradicted when its upper end is below 0.2 of the vector's own effect (a random
  direction does at least 80 % of what s does).
- ``attr.<path>`` (heads, qk, v, mlp, direct) — the path carries at least 20 % of the steering
  node's EAP-IG effect: supported when the share's interval lies above 0.2, contradicted when
  below; undecided whenever the integral is incomplete (|s_node / (m_clean - m_corrupt) - 1| > 0.25).
- ``frozen.<m>.needed`` (qk, ov, svv, mlp) — cutting the path removes most of the effect:
  supported when the effect retained lies below 0.5, contradicted when above.
- ``frozen.values_not_patterns`` — paper A's finding: supported when QK-frozen keeps > 0.8 and
  OV-frozen < 0.5 (both intervals); contradicted when QK-frozen keeps < 0.5 or OV-frozen > 0.8.
  OV freezing also freezes every indirect change of the values, so this speaks of all value
  changes, not of heads reading s directly (that is ``frozen.svv.needed``).
- ``circuit.faithful`` — the minimal circuit found carries most of the effect: its faithfulness
  interval above 0.5 (supported) or below (contradicted).
- ``sparsity.sparse`` — under 20 % of the dimensions keep the target effect: the bootstrap
  interval of the fraction below 0.2 (supported) or above (contradicted), at the bisection's resolution.
- ``ident.not_identifiable`` — s + v_perp is equivalent to s: supported when the 90 % interval
  of s + v_perp's relative effect lies within 1 ± margin (TOST at level 0.05, margin 0.2) and
  v_perp alone is distinguishable from s (95 % upper end below 1 - margin); contradicted when
  the 95 % interval of s + v_perp lies outside 1 ± margin.

Example:
    >>> needed(FrozenPath(Estimate(0.3, (0.2, 0.4), 8), 0.5, 0.2, None), "ov").status
    'supported'
"""

from __future__ import annotations

import math

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

SUPPORTED, CONTRADICTED, UNDECIDED = "supported", "contradicted", "undecided"
SHARE, NEEDED, SURVIVES, FAITHFUL, SPARSE, MARGIN, COMPLETE = 0.2, 0.5, 0.8, 0.5, 0.2, 0.2, 0.25
PATH_WORDS = {"heads": "attention heads (queries, keys and values)", "qk": "head queries and keys",
              "v": "head values", "mlp": "MLP inputs", "direct": "the logits directly"}
CUT_WORDS = {"qk": "freezing attention patterns (QK)", "ov": "freezing attention values (OV, direct and indirect)",
             "svv": "removing the steering value vectors (heads reading s directly)",
             "mlp": "removing s from the MLP inputs"}


def fmt(e: Estimate) -> str:
    """``0.58 [0.41, 0.77], n = 8``."""
    def f(x: float) -> str:
        return "n/a" if not math.isfinite(x) else f"{x:.2f}"
    return f"{f(e.value)} [{f(e.ci95[0])}, {f(e.ci95[1])}], n = {e.n}"


def n_to_decide(e: Estimate, threshold: float) -> int | None:
    """The n at which the interval would likely clear ``threshold`` if the estimate stayed where it is
    (half-width shrinks as 1/sqrt(n)); None when the estimate sits on the threshold or is undefined."""
    if not e.finite or e.n <= 0:
        return None
    half = (e.ci95[1] - e.ci95[0]) / 2
    gap = abs(e.value - threshold)
    if gap < 1e-9 or half <= 0:
        return None
    return max(e.n + 1, int(math.ceil(e.n * (half / gap) ** 2)))


def above_below(rule: str, e: Estimate, threshold: float, statement: str, test: str, evidence: str,
                below: bool = False) -> Claim:
    """Supported when ``e``'s interval lies above ``threshold`` (``below``: below it), contradicted on the other side."""
    above, under = e.finite and e.ci95[0] > threshold, e.finite and e.ci95[1] < threshold
    if above or under:
        status = SUPPORTED if above != below else CONTRADICTED
    else:
        status = UNDECIDED
    return Claim(rule, status, statement, test, evidence, e.n,
                 n_to_decide(e, threshold) if status == UNDECIDED else None)


def specific(c: SpecificControl, n: int) -> Claim:
    """``dose.effect``: s's effect exceeds a random direction's at ``c.alpha``."""
    ex, eff = c.excess, c.effect
    floor = SHARE * abs(eff.value) if math.isfinite(eff.value) else float("nan")
    if ex.finite and ex.ci95[0] > 0:
        status = SUPPORTED
    elif ex.finite and math.isfinite(floor) and ex.ci95[1] < floor:
        status = CONTRADICTED
    else:
        status = UNDECIDED
    return Claim("dose.effect", status,
                 f"At alpha {c.alpha:.3g} the vector changes behaviour more than a random direction of the same norm.",
                 "supported: 95 % interval of the per-prompt excess (s minus random) above 0; contradicted: its "
                 "upper end below 0.2 of s's own effect",
                 f"effect {fmt(eff)}; random direction {fmt(c.random_effect)}; excess {fmt(ex)}", n,
                 n_to_decide(ex, 0.0) if status == UNDECIDED else None)


def shares(a: AttributionRecord) -> list[Claim]:
    """``attr.<path>`` for each path of the EAP-IG shares."""
    out = []
    complete = math.isfinite(a.completeness) and abs(a.completeness - 1) <= COMPLETE
    for path, e in a.share.items():
        c = above_below(f"attr.{path}", e, SHARE,
                        f"At least 20 % of the steering node's effect enters through {PATH_WORDS[path]}.",
                        "share's 95 % interval above 0.2 (supported) or below (contradicted); undecided when "
                        f"the EAP-IG integral is incomplete (|completeness - 1| > {COMPLETE})",
                        f"share {fmt(e)}; completeness {a.completeness:.2f} at T = {a.ig_steps}")
        if not complete and c.status != UNDECIDED:
            c = Claim(c.rule, UNDECIDED, c.statement, c.test, c.evidence + " (incomplete: more IG steps needed)", c.n)
        out.append(c)
    return out


def needed(p: FrozenPath, mode: str) -> Claim:
    """``frozen.<mode>.needed`` of a card's frozen path."""
    return needed_estimate(p.effect_retained, mode)


def needed_estimate(e: Estimate, mode: str) -> Claim:
    """``frozen.<mode>.needed`` on any estimate of the effect retained (e.g. a study's per-prompt ASR)."""
    return above_below(f"frozen.{mode}.needed", e, NEEDED, f"Cutting the path by {CUT_WORDS[mode]} removes most "
                    "of the effect.", "effect retained: 95 % interval below 0.5 (supported) or above (contradicted)",
                    f"effect retained {fmt(e)}", below=True)


def values_not_patterns(f: FrozenRecord) -> Claim:
    """``frozen.values_not_patterns`` (paper A: QK-frozen keeps the effect, OV-frozen removes it)."""
    return values_not_patterns_estimates(f.qk.effect_retained, f.ov.effect_retained)


def values_not_patterns_estimates(qk: Estimate, ov: Estimate) -> Claim:
    """``frozen.values_not_patterns`` on any estimates of the effect QK-frozen and OV-frozen retain."""
    if qk.finite and ov.finite and qk.ci95[0] > SURVIVES and ov.ci95[1] < NEEDED:
        status = SUPPORTED
    elif (qk.finite and qk.ci95[1] < NEEDED) or (ov.finite and ov.ci95[0] > SURVIVES):
        status = CONTRADICTED
    else:
        status = UNDECIDED
    decide = [n_to_decide(qk, SURVIVES), n_to_decide(ov, NEEDED)]
    return Claim("frozen.values_not_patterns", status,
                 "As paper A reports, the effect needs the change of attention values (direct and indirect) but not "
                 "the change of where heads look.",
                 "supported: QK-frozen keeps > 0.8 and OV-frozen < 0.5 (95 % intervals); contradicted: QK-frozen "
                 "< 0.5 or OV-frozen > 0.8", f"QK frozen {fmt(qk)}; OV frozen {fmt(ov)}", qk.n,
                 max((d for d in decide if d is not None), default=None) if status == UNDECIDED else None)


def circuit(c: CircuitRecord) -> Claim | None:
    """``circuit.faithful``: the minimal circuit found carries most of the effect."""
    if c.faithfulness_minimal is None:
        return None
    return above_below("circuit.faithful", c.faithfulness_minimal, FAITHFUL,
                       f"A circuit of {c.minimal_edges} edges ({100 * c.edge_fraction:.1f} % of "
                       f"{c.n_edges_total}) carries most of the effect.",
                       "faithfulness 95 % interval above 0.5 (supported) or below (contradicted)",
                       f"faithfulness {fmt(c.faithfulness_minimal)}; complement {c.complement:.2f}")


def sparse(s: SparsityRecord) -> Claim:
    """``sparsity.sparse``: under 20 % of the dimensions keep the target effect."""
    e = Estimate(s.fraction_needed, s.fraction_ci95, s.n)
    return above_below("sparsity.sparse", e, SPARSE, f"Under 20 % of the dimensions keep {s.target:.0%} of the effect "
                    "(|IE| rule).", "95 % bootstrap interval of the fraction needed below 0.2 (supported) or above "
                    f"(contradicted), at a resolution of {100 * s.resolution:.1f} % of the dimensions",
                    f"fraction needed {fmt(e)}", below=True)


def not_identifiable(i: IdentifiabilityRecord) -> Claim:
    """``ident.not_identifiable``: s + v_perp equivalent to s (TOST) while v_perp alone is not."""
    vp, po, m = i.v_plus_perp, i.perp_only, i.margin
    lo90, hi90 = i.v_plus_perp_ci90
    equivalent = vp.finite and 1 - m < lo90 and hi90 < 1 + m
    distinct = po.finite and po.ci95[1] < 1 - m
    if equivalent and distinct:
        status = SUPPORTED
    elif vp.finite and (vp.ci95[1] < 1 - m or vp.ci95[0] > 1 + m):
        status = CONTRADICTED
    else:
        status = UNDECIDED
    return Claim("ident.not_identifiable", status,
                 f"s + a random orthogonal v_perp (|v_perp| = |s|) does what s does (within ±{m:g} of its effect), "
                 "while v_perp alone does not: the behaviour does not identify the vector.",
                 f"supported: 90 % interval of s + v_perp within 1 ± {m:g} (TOST, level 0.05) and v_perp alone's "
                 f"95 % upper end below {1 - m:g}; contradicted: 95 % interval of s + v_perp outside 1 ± {m:g}",
                 f"s + v_perp {fmt(vp)} (90 %: {lo90:.2f} to {hi90:.2f}); v_perp alone {fmt(po)}; "
                 f"{len(i.seeds)} v_perp draws", vp.n,
                 n_to_decide(vp, 1 - m if vp.value < 1 else 1 + m) if status == UNDECIDED else None)

