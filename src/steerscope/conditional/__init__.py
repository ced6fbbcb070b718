"""Conditional steering: gates read from the model's own activations (:mod:`.condition`), how they act in a
forward pass (:mod:`.gate`), rule lists (:mod:`.rules`), clamp specs (:mod:`.clamp`) and fitting a condition on contrast prompts (:mod:`.fit`).

Only the data and gate modules are imported here (they do not import :mod:`steerscope.steer`, which uses them);
import :mod:`steerscope.conditional.rules`, :mod:`.clamp` and :mod:`.fit` by their full names.

Example:
    >>> from steerscope.conditional import Condition
    >>> c = Condition(direction, layer=3, threshold=0.0)
"""

from steerscope.conditional.condition import And, Condition, Gate, Not, Or, gate_from_dict

__all__ = ["And", "Condition", "Gate", "Not", "Or", "gate_from_dict"]
