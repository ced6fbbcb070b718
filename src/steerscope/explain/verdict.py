"""Card section ``verdict``: the claims (three-way rules of :mod:`.rules` applied to every section's
record) and a short paragraph generated from them and the figures (no model).

Example:
    >>> [c.rule for c in claims_of(card)][:2]
    ['dose.effect', 'attr.qk']
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from steerscope.explain import rules
from steerscope.explain.html import token
from steerscope.explain.records import Claim, DoseRecord

if TYPE_CHECKING:
    from steerscope.explain.card import Explanation


def claims_of(card: Explanation) -> list[Claim]:
    """Every rule's decision on the card's records, dose first, in section order."""
    from steerscope.explain.sections import SECTIONS

    out: list[Claim] = []
    if card.dose is not None:
        ctl = card.dose.control_at(card.dose.chosen_alpha)
        if ctl is not None:
            out.append(rules.specific(ctl, card.vector.n_prompts))
    for sec in SECTIONS:
        rec = getattr(card, sec.name)
        if rec is not None:
            out += sec.claims(rec)
    return out


def _f(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def dose_sentence(d: DoseRecord) -> str:
    """What alpha the card used, and why; the recommended range or why there is none."""
    used = f"The card uses alpha {d.chosen_alpha:.3g} ({d.chosen_reason})."
    if d.range is not None:
        lo, hi = d.range
        return (f"{used} Recommended alpha from {lo:.3g} (half the maximum effect) to {hi:.3g} (KL of the worst "
                f"{100 * (1 - d.quantile):.0f} % of neutral positions within {d.kl_budget:g} nat).")
    if d.range_withheld:
        return f"{used} No recommended range: {d.range_withheld}."
    if d.alpha_kl_max is None:
        return f"{used} Every alpha tried exceeds the KL budget of {d.kl_budget:g} nat on neutral prompts."
    return f"{used} No alpha within the KL budget reaches half the maximum effect."


def verdict(card: Explanation) -> str:
    """The paragraph for a card: dose, lens, the EAP-IG summary, then the claims by status."""
    parts: list[str] = []
    if card.dose is not None:
        parts.append(dose_sentence(card.dose))
    if card.lens is not None:
        parts.append("Logit lens of the added vector: " + ", ".join(f"“{token(t)}”" for t in card.lens.top_positive["raw"][:5])
                     + ".")
    if card.attribution is not None:
        sh = card.attribution.share
        parts.append(f"EAP-IG: {rules.fmt(sh['heads'])} of the steering node's effect enters through attention heads "
                     f"({_f(sh['v'].value)} via values), {_f(sh['mlp'].value)} through MLPs and "
                     f"{_f(sh['direct'].value)} directly to the logits.")
    for status in (rules.SUPPORTED, rules.CONTRADICTED, rules.UNDECIDED):
        these = [c for c in card.claims if c.status == status]
        if these:
            parts.append(f"{status.capitalize()}: " + " ".join(
                f"[{c.rule}] {c.statement} ({c.evidence}" + (f"; n ≈ {c.n_to_decide} would likely decide it"
                                                             if c.n_to_decide else "") + ")" for c in these))
    if card.unsupported:
        parts.append("Not computed for this model: " + ", ".join(card.unsupported) + ".")
    return " ".join(parts)
