"""The card's sections after ``vector`` and ``dose``, in order: one entry each.

Each :class:`Section` names its record type, what it needs (other sections), how it computes
(an analysis call on the shared :class:`~steerscope.explain.context.Context` and the reference
:class:`~steerscope.explain.behaviour.Behaviour` batch), its verdict rules (:mod:`.rules`) and how
it renders (:mod:`.html`). **Adding a section is one new entry here** plus its record (in
:mod:`.records`), its compute function and its renderer; ``card.py``, the verdict and the HTML
iterate this tuple.

Example:
    >>> [s.name for s in SECTIONS]
    ['lens', 'attribution', 'frozen', 'circuit', 'sparsity', 'identifiability']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from steerscope.analyses.records import Record
from steerscope.explain import attribution, circuit, frozen, html, identifiability, lens, rules, sparsity
from steerscope.explain.behaviour import Behaviour
from steerscope.explain.context import Context
from steerscope.explain.records import (
    AttributionRecord,
    CircuitRecord,
    Claim,
    FrozenRecord,
    IdentifiabilityRecord,
    LensRecord,
    SparsityRecord,
)
from steerscope.report.html import Report


@dataclass(frozen=True)
class Section:
    """One card section: its name (the ``card.json`` key), record type, needs, compute, claims and renderer."""

    name: str
    record: type[Record]
    compute: Callable[[Context, Behaviour], Record]
    claims: Callable[[Any], list[Claim]]
    render: Callable[[Report, Any], None]
    needs: tuple[str, ...] = ()


def _frozen_claims(f: FrozenRecord) -> list[Claim]:
    return [*(rules.needed(f.path(m), m) for m in frozen.ABLATIONS), rules.values_not_patterns(f)]


def _circuit_claims(c: CircuitRecord) -> list[Claim]:
    claim = rules.circuit(c)
    return [] if claim is None else [claim]


SECTIONS: tuple[Section, ...] = (
    Section("lens", LensRecord, lambda ctx, _beh: lens.section(ctx), lambda _r: [], html.lens),
    Section("attribution", AttributionRecord, attribution.section, rules.shares, html.attribution),
    Section("frozen", FrozenRecord, frozen.section, _frozen_claims, html.frozen),
    Section("circuit", CircuitRecord, circuit.section, _circuit_claims, html.circuit, needs=("attribution",)),
    Section("sparsity", SparsityRecord, sparsity.section, lambda s: [rules.sparse(s)], html.sparsity,
            needs=("attribution",)),
    Section("identifiability", IdentifiabilityRecord, identifiability.section,
            lambda i: [rules.not_identifiable(i)], html.identifiability),
)

__all__ = ["SECTIONS", "Section"]
