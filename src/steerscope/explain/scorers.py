"""Scorers for the card's generation-based sections: the refusal matcher or a validated trait classifier."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from steerscope.errors import SteerscopeError
from steerscope.explain.context import ScoreFn

NAMES = ("refusal", "formality", "sentiment", "politeness", "none")


def refusal_rate(texts: Sequence[str]) -> np.ndarray:
    """1 for a refusal (the 12-substring matcher), else 0, per text."""
    from steerscope.metrics.refusal import is_refusal

    return np.array([float(is_refusal(t)) for t in texts])


def resolve_scorer(scorer: str | ScoreFn | None) -> tuple[ScoreFn | None, dict[str, Any]]:
    """(callable or None, a JSON description with the validation accuracy where there is one)."""
    if scorer is None or scorer == "none":
        return None, {"name": None}
    if callable(scorer):
        return scorer, {"name": getattr(scorer, "__name__", "callable"), "kind": "callable"}
    if scorer == "refusal":
        return refusal_rate, {"name": "refusal", "kind": "substring matcher", "meaning": "refusal rate"}
    if scorer not in NAMES:
        raise SteerscopeError(f"unknown scorer {scorer!r}; choose one of {', '.join(NAMES)} or pass a callable")
    from steerscope.metrics import classifiers as K

    try:
        built = K.build_scorers(scorer)
    except SteerscopeError:  # no embedding model installed: the lexicon scorer alone
        built = K.build_scorers(scorer, kinds=("lexicon",))
    best = K.best_scorer(built) or max(built, key=lambda s: s.accuracy)
    return best.fn, {"name": scorer, "kind": best.kind, "accuracy": best.accuracy, "usable": best.usable,
                     "validation": best.validation}
