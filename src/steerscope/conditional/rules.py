"""Rule lists: ``[(gate, vector, alpha), ...]`` — a different vector per branch, one policy for conflicts.

Conflict policy: **first match wins**, per row (and per position for ``on="token"`` gates). Rule i acts where
its gate is open and every earlier rule's gate is shut; a ``None`` gate is always open, so a last
``(None, v, a)`` is an ``else``. Rows where no rule matches are not steered (bit-identical to unsteered).

Example:
    >>> rules = [(harmful, refusal, 4.0), (~harmful & rude, polite, 2.0)]
    >>> with conditional_steering(lm, rules):
    ...     out = lm.model.generate(**batch)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from steerscope.conditional.condition import Gate
from steerscope.errors import ConditionError, VectorError
from steerscope.hooks import Call, attached
from steerscope.models.lm import LM
from steerscope.steer import Positions, VectorLike, as_vectors, check_positions, gated_additions, per_row_deltas


@dataclass(frozen=True, eq=False)
class Rule:
    """``if condition: add alpha * vector`` (``condition=None``: always).

    Args:
        condition: a gate (:class:`~steerscope.conditional.condition.Condition` or a combination), or None.
        vector: a vector-like (:data:`steerscope.steer.VectorLike`), or one per batch row.
        alpha: a float, or one per batch row.

    Example:
        >>> Rule(harmful, refusal, 4.0)
    """

    condition: Gate | None
    vector: VectorLike | Sequence[VectorLike]
    alpha: float | Sequence[float] = 1.0


def as_rule(rule: Rule | tuple[Any, ...]) -> Rule:
    """A :class:`Rule` from a rule or a ``(condition, vector, alpha)`` tuple.

    Example:
        >>> as_rule((harmful, refusal, 4.0)).alpha
        4.0
    """
    if isinstance(rule, Rule):
        r = rule
    elif isinstance(rule, tuple) and len(rule) == 3:
        r = Rule(*rule)
    else:
        raise ConditionError("a rule is Rule(condition, vector, alpha) or a (condition, vector, alpha) tuple")
    if r.condition is not None and not isinstance(r.condition, Gate):
        raise ConditionError(f"a rule's condition is a Condition (or ~, |, & of them) or None, "
                             f"got {type(r.condition).__name__}")
    return r


@contextmanager
def conditional_steering(lm: LM, rules: Sequence[Rule | tuple[Any, ...]], positions: Positions = "all",
                         layer: int | None = None) -> Iterator[Call]:
    """Steer each row with the first rule whose gate is open for it (module docstring: the conflict policy).

    Args:
        lm: the model.
        rules: :class:`Rule` s or ``(condition, vector, alpha)`` tuples, in priority order.
        positions: where the vectors are added (as for :func:`steerscope.steering`).
        layer: the layer of raw-tensor vectors.

    Yields:
        The :class:`~steerscope.hooks.Call` record.

    Example:
        >>> with conditional_steering(lm, [(harmful, refusal, 4.0), (None, helpful, 1.0)]):
        ...     lm.model.generate(**batch, max_new_tokens=32)
    """
    made = [as_rule(r) for r in rules]
    if not made:
        raise ConditionError("no rules given; pass [(condition, vector, alpha), ...]")
    positions = check_positions(positions)
    parts: list[tuple[Gate | None, str, dict[int, torch.Tensor]]] = []
    for r in made:
        got = as_vectors(r.vector, lm, layer)
        if isinstance(got, list) and any(v is None for v in got):
            raise VectorError("a per-row vector of a rule is None; use alpha=0 for rows it should leave alone")
        vecs = got if not isinstance(got, list) else [v for v in got if v is not None]
        site, deltas = per_row_deltas(vecs, r.alpha, lm)
        parts.append((r.condition, site, deltas))
    with attached(lm, gated_additions(lm, parts, positions)) as call:
        yield call
