"""Is the card right? Score its claims on models whose mechanism is known by construction.

Each :class:`~steerscope.analyses.planted.PlantedCase` is a weight surgery on a real model that
settles some claims (``expected``: claim id -> supported / contradicted). :func:`run_case` builds
the planted model, makes the card of the same vector on it, and :func:`score` compares: a claim is
**right** when the card's status equals the expected one, **undecided** when the card says so, and
**wrong** otherwise (**missing** when the card could not compute the section). The benchmark
``benchmarks/validate_card.py`` runs every case at ``--quick`` and default settings and prints the
table of docs/explain.md.

Example:
    >>> res = run_case(lm, vec, CASES[0], Settings.quick())
    >>> res.outcomes  # {"attr.heads": "right", ...}
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

from steerscope.analyses.planted import PlantedCase
from steerscope.analyses.records import Record
from steerscope.errors import FingerprintWarning
from steerscope.explain.card import explain
from steerscope.explain.context import Settings
from steerscope.explain.records import Claim
from steerscope.models.load import LM
from steerscope.vector import SteeringVector

OUTCOMES = ("right", "undecided", "wrong", "missing")
# the sections whose claims the planted cases settle (dose always runs)
SECTIONS = ("attribution", "frozen", "identifiability")


def score(claims: Sequence[Claim], expected: Mapping[str, str]) -> dict[str, str]:
    """{claim id: right | undecided | wrong | missing} for each expected claim.

    Example:
        >>> score([Claim("attr.v", "undecided", "", "", "", 8)], {"attr.v": "supported"})
        {'attr.v': 'undecided'}
    """
    status = {c.rule: c.status for c in claims}
    out = {}
    for rule, want in expected.items():
        got = status.get(rule)
        out[rule] = ("missing" if got is None else "right" if got == want else
                     "undecided" if got == "undecided" else "wrong")
    return out


@dataclass(frozen=True)
class CaseResult(Record):
    """One planted case on one model at one setting: every claim's status and its score."""

    model: str
    case: str
    setting: str
    alpha: float
    expected: dict[str, str]
    got: dict[str, str]
    evidence: dict[str, str]
    outcomes: dict[str, str]
    seconds: float


def run_case(lm: LM, vector: SteeringVector, case: PlantedCase, settings: Settings, setting: str = "",
             prompts: Sequence[str] | None = None, sections: Sequence[str] = SECTIONS) -> CaseResult:
    """Plant ``case`` into (a copy of) ``lm``, explain ``vector`` on it and score the card's claims."""
    t0 = time.time()
    planted = case.surgery(lm, vector)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FingerprintWarning)  # untying the head changes the fingerprint
        card = explain(planted, vector, prompts, settings=settings, sections=sections, show_progress=False)
    got = {c.rule: c.status for c in card.claims}
    return CaseResult(lm.name, case.name, setting, card.vector.alpha, dict(case.expected),
                      {r: got.get(r, "missing") for r in case.expected},
                      {c.rule: c.evidence for c in card.claims if c.rule in case.expected},
                      score(card.claims, case.expected), round(time.time() - t0, 1))


def tally(results: Sequence[CaseResult]) -> dict[str, dict[str, int]]:
    """{claim id: {outcome: count}} over results, plus ``"all"``."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        for rule, o in r.outcomes.items():
            for key in (rule, "all"):
                out.setdefault(key, dict.fromkeys(OUTCOMES, 0))[o] += 1
    return out


__all__ = ["CaseResult", "OUTCOMES", "run_case", "score", "tally"]
