"""A projection clamp as plain data: what a request (or a server body) carries, and how to apply it on HF.

``Clamp(vector, lo, hi, positions, condition)`` is :func:`steerscope.clamping` with a range, written down:
:meth:`Clamp.to_dict` / :meth:`Clamp.from_dict` give JSON (the vector as ``{layer: [floats]}`` and its site, the
condition as :meth:`steerscope.conditional.condition.Gate.to_dict`), and :meth:`Clamp.active` opens the clamp.

Example:
    >>> spec = Clamp(vec.select([8]), lo=-2.0, hi=2.0)
    >>> with Clamp.from_dict(json.loads(json.dumps(spec.to_dict()))).active(lm):
    ...     lm.model.generate(**batch)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Mapping, Sequence

from steerscope.conditional.condition import Gate, gate_from_dict
from steerscope.errors import ConditionError, SteerscopeError
from steerscope.models.lm import LM
from steerscope.steer import clamping
from steerscope.vector import SteeringVector

Range = float | Sequence[float] | None


def _range(x: Any, name: str) -> Range:
    if x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)):
        return None if x is None else float(x)
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
        return [float(v) for v in x]
    raise ConditionError(f"clamp {name} is a number, a list of numbers (one per row) or null, got {x!r}")


@dataclass(frozen=True, eq=False)
class Clamp:
    """Hold the projection on each layer's direction of ``vector`` inside [lo, hi] (see :func:`steerscope.clamping`).

    Args:
        vector: the directions (their layers and site are where the clamp acts).
        lo, hi: bounds: a number, one per batch row, or None (that side open); at least one is given.
        positions: which positions (as for steering).
        condition: clamp only where this gate is open (None: everywhere).

    Example:
        >>> Clamp(vec, hi=3.0).to_dict()["hi"]
        3.0
    """

    vector: SteeringVector
    lo: Range = None
    hi: Range = None
    positions: str | Sequence[int] = "all"
    condition: Gate | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise ConditionError("a clamp's vector is a SteeringVector")
        object.__setattr__(self, "lo", _range(self.lo, "lo"))
        object.__setattr__(self, "hi", _range(self.hi, "hi"))
        if self.lo is None and self.hi is None:
            raise ConditionError("a clamp needs lo, hi or both")
        if self.condition is not None and not isinstance(self.condition, Gate):
            raise ConditionError("a clamp's condition is a Condition (or ~, |, & of them) or None")

    def active(self, lm: LM) -> ContextManager[Any]:
        """The clamp's context on ``lm`` (:func:`steerscope.clamping` with this range)."""
        return clamping(lm, self.vector, positions=self.positions, lo=self.lo, hi=self.hi, condition=self.condition)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data (:meth:`from_dict` reads it back)."""
        return {"kind": "clamp", "site": self.vector.site,
                "vector": {str(k): self.vector[k].float().tolist() for k in self.vector.layers},
                "lo": self.lo, "hi": self.hi,
                "positions": self.positions if isinstance(self.positions, str) else list(self.positions),
                "condition": None if self.condition is None else self.condition.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Clamp:
        """A clamp from :meth:`to_dict` data; :class:`ConditionError` names what is wrong."""
        if not isinstance(data, Mapping) or data.get("kind", "clamp") != "clamp":
            raise ConditionError("a clamp is a JSON object with kind 'clamp'")
        extra = sorted(set(data) - {"kind", "site", "vector", "lo", "hi", "positions", "condition"})
        if extra:
            raise ConditionError(f"unknown clamp field(s) {extra}")
        if not isinstance(data.get("vector"), Mapping):
            raise ConditionError("a clamp needs 'vector': {layer: [floats]}")
        try:
            vec = SteeringVector({int(k): v for k, v in data["vector"].items()}, site=data.get("site", "resid_pre"))
        except (SteerscopeError, TypeError, ValueError) as e:
            raise ConditionError(f"bad clamp vector: {e}") from None
        cond = data.get("condition")
        return cls(vec, data.get("lo"), data.get("hi"), data.get("positions", "all"),
                   None if cond is None else gate_from_dict(cond))
