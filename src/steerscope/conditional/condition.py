"""Conditions: per-row gates read from the model's own residual stream (conditional activation steering).

A :class:`Condition` is a linear probe on ``resid_pre`` of one layer (``hidden_states[layer]``):

1. project each real (non-pad) token: ``s_t = ((h_t - center) · d̂) / scale`` (``center`` and ``scale`` are the
   normalisation the probe was fitted with; none by default);
2. reduce the projections: ``mean`` / ``max`` over the real tokens, or the ``last`` real token's;
3. the gate is open when the reduced score is strictly greater than ``threshold``.

``on="prompt"``: the reduction runs over the prompt's real tokens once per request (at the call that starts the
sequence) and the decision is kept for every generated token, with or without the KV cache. ``on="token"``: the
gate of each position is re-evaluated from the tokens up to and including it (``mean`` / ``max`` running over
prompt and generated real tokens, ``last`` the position's own projection).

Conditions compose into gates: ``~c`` (:class:`Not`), ``a | b`` (:class:`Or`), ``a & b`` (:class:`And`). Every gate
is plain data (:meth:`Gate.to_dict` / :func:`gate_from_dict`, JSON-able) so an engine in another process can take it.
How a gate acts inside a forward pass (a per-row 0/1 multiplier on alpha) is :mod:`steerscope.conditional.gate`.

Example:
    >>> c = Condition(direction, layer=3, threshold=0.5)
    >>> with ss.steering(lm, vec, alpha=4.0, condition=c | ~other):
    ...     out = lm.model.generate(**batch)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from steerscope.errors import ConditionError

if TYPE_CHECKING:
    from steerscope.conditional.fit import FitReport
    from steerscope.models.lm import LM

REDUCE = ("mean", "last", "max")
ON = ("prompt", "token")


class Gate:
    """A per-row open/shut decision built from :class:`Condition` leaves with ``~``, ``|`` and ``&``."""

    def __invert__(self) -> Gate:
        return Not(self)

    def __or__(self, other: Gate) -> Gate:
        return Or(self, _gate(other))

    def __and__(self, other: Gate) -> Gate:
        return And(self, _gate(other))

    def leaves(self) -> list[Condition]:
        """The conditions this gate reads, each once, in first-appearance order."""
        raise NotImplementedError

    def open(self, values: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Combine the leaves' decisions (``values[id(leaf)]``, bool [batch 1] or [batch pos]) into this gate's."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The gate as JSON-able data (:func:`gate_from_dict` reads it back)."""
        raise NotImplementedError


def _gate(x: Any) -> Gate:
    if not isinstance(x, Gate):
        raise ConditionError(f"conditions combine with other conditions only, got {type(x).__name__}")
    return x


def unique_leaves(gates: Sequence[Gate]) -> list[Condition]:
    """The conditions that ``gates`` read, each once (by identity), in first-appearance order."""
    seen: dict[int, Condition] = {}
    for g in gates:
        for leaf in g.leaves():
            seen.setdefault(id(leaf), leaf)
    return list(seen.values())


@dataclass(frozen=True, eq=False)
class Not(Gate):
    """Open where ``of`` is shut. Example: ``~harmful``."""

    of: Gate

    def leaves(self) -> list[Condition]:
        return self.of.leaves()

    def open(self, values: Mapping[int, torch.Tensor]) -> torch.Tensor:
        return ~self.of.open(values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "not", "of": self.of.to_dict()}


@dataclass(frozen=True, eq=False)
class Or(Gate):
    """Open where either side is. Example: ``harmful | jailbreak``."""

    a: Gate
    b: Gate

    def leaves(self) -> list[Condition]:
        return unique_leaves([self.a, self.b])

    def open(self, values: Mapping[int, torch.Tensor]) -> torch.Tensor:
        return self.a.open(values) | self.b.open(values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "or", "a": self.a.to_dict(), "b": self.b.to_dict()}


@dataclass(frozen=True, eq=False)
class And(Gate):
    """Open where both sides are. Example: ``harmful & ~fiction``."""

    a: Gate
    b: Gate

    def leaves(self) -> list[Condition]:
        return unique_leaves([self.a, self.b])

    def open(self, values: Mapping[int, torch.Tensor]) -> torch.Tensor:
        return self.a.open(values) & self.b.open(values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "and", "a": self.a.to_dict(), "b": self.b.to_dict()}


def _finite_vector(t: Any, name: str) -> torch.Tensor:
    try:
        v = torch.as_tensor(t).detach().to("cpu", torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ConditionError(f"{name} must be a 1-D tensor or list of floats") from None
    if v.dim() != 1 or v.numel() == 0 or not bool(torch.isfinite(v).all()):
        raise ConditionError(f"{name} must be a finite 1-D vector [d_model], got shape {tuple(v.shape)}")
    return v


@dataclass(frozen=True, eq=False)
class Condition(Gate):
    """A linear probe gate on ``resid_pre`` of ``layer`` (see the module docstring for the definition).

    Args:
        direction: [d_model]; only its direction counts (it is normalised to unit length).
        layer: the layer whose residual input is read (``hidden_states[layer]``).
        threshold: the gate is open when the reduced score is strictly greater.
        reduce: ``mean``, ``max`` (over the real tokens) or ``last`` (the last real token).
        on: ``prompt`` (decided once per request from the prompt) or ``token`` (per position).
        center: [d_model] subtracted before projecting (None: nothing).
        scale: the projection is divided by it (> 0).
        report: how it was fitted (:meth:`fit`), or None for a hand-made condition.

    Example:
        >>> harmful = Condition(direction, layer=6, threshold=0.0, reduce="mean")
        >>> ss.generate(lm, prompts, vector=refusal, alpha=4.0, condition=harmful)
    """

    direction: torch.Tensor
    layer: int
    threshold: float
    reduce: str = "mean"
    on: str = "prompt"
    center: torch.Tensor | None = None
    scale: float = 1.0
    report: FitReport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        d = _finite_vector(self.direction, "a condition's direction")
        if float(d.norm()) == 0:
            raise ConditionError("a condition's direction must be non-zero")
        object.__setattr__(self, "direction", d)
        if self.center is not None:
            c = _finite_vector(self.center, "a condition's center")
            if c.shape != d.shape:
                raise ConditionError(f"center has shape {tuple(c.shape)}, the direction {tuple(d.shape)}")
            object.__setattr__(self, "center", c)
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ConditionError(f"a condition's layer must be a non-negative int, got {self.layer!r}")
        if self.reduce not in REDUCE:
            raise ConditionError(f"reduce {self.reduce!r} not known; use one of {', '.join(REDUCE)}")
        if self.on not in ON:
            raise ConditionError(f"on {self.on!r} not known; use 'prompt' (once per request) or 'token'")
        for name in ("threshold", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConditionError(f"a condition's {name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.scale <= 0:
            raise ConditionError(f"a condition's scale must be > 0, got {self.scale}")

    @property
    def unit(self) -> torch.Tensor:
        """The unit direction d̂ [d_model] (float32)."""
        u: torch.Tensor = self.direction / self.direction.norm()
        return u

    def leaves(self) -> list[Condition]:
        return [self]

    def open(self, values: Mapping[int, torch.Tensor]) -> torch.Tensor:
        return values[id(self)]

    def check(self, lm: LM) -> None:
        """Raise :class:`ConditionError` when this condition does not fit ``lm`` (width, layer)."""
        if self.direction.shape[0] != lm.d_model:
            raise ConditionError(f"the condition's direction has {self.direction.shape[0]} dims, the model "
                                 f"{lm.d_model}; fit it on this model")
        if self.layer >= lm.n_layers:
            raise ConditionError(f"the condition reads layer {self.layer}, the model has {lm.n_layers} layers")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised projections [batch pos] (float32) of residuals x [batch pos d_model]."""
        u = self.unit.to(x.device)
        h = x.float() if self.center is None else x.float() - self.center.to(x.device)
        return (h @ u) / self.scale

    def with_report(self, report: FitReport) -> Condition:
        """A copy carrying ``report`` (what :meth:`fit` returns)."""
        return Condition(self.direction, self.layer, self.threshold, self.reduce, self.on, self.center,
                         self.scale, report)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "condition", "direction": self.direction.tolist(), "layer": self.layer,
                "threshold": self.threshold, "reduce": self.reduce, "on": self.on,
                "center": None if self.center is None else self.center.tolist(), "scale": self.scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Gate:
        """Read a gate written by :meth:`to_dict` (a condition, or ``not`` / ``or`` / ``and`` of them)."""
        return gate_from_dict(data)

    @classmethod
    def fit(cls, lm: LM, positive: Sequence[str], negative: Sequence[str], layers: Sequence[int] | None = None,
            reduce: str = "mean", on: str = "prompt", seed: int = 0, **options: Any) -> Condition:
        """Fit a condition that opens on prompts like ``positive`` and stays shut on ones like ``negative``.

        The procedure (split, difference-in-means or logistic direction per layer, layer and threshold by balanced accuracy
        on validation, or by the true-positive rate at a false-positive budget ``max_fpr``, test figure with
        intervals) is :func:`steerscope.conditional.fit.fit_probe`; its record is the returned condition's ``report``.

        Args:
            lm: the model.
            positive, negative: user prompts (chat template applied, as ``ss.generate`` does).
            layers: candidate layers (None: every layer).
            reduce, on: as for the constructor.
            seed: seed of the split.
            options: ``system``, ``chat``, ``batch_size``, ``fractions``, ``max_fpr``, ``probe`` (``dim`` or
                ``logistic``), ``Cs`` (see ``fit_probe``).

        Example:
            >>> harmful = ss.Condition.fit(lm, harmful_prompts, harmless_prompts, layers=range(4, 12))
            >>> harmful.report.test_balanced_accuracy, harmful.report.test_ci95
        """
        from steerscope.conditional.fit import fit_probe

        if reduce not in REDUCE or on not in ON:
            raise ConditionError(f"reduce must be one of {', '.join(REDUCE)} and on one of {', '.join(ON)}")
        p = fit_probe(lm, positive, negative, layers=layers, reduce=reduce, seed=seed, **options)
        return cls(p.direction, p.report.layer, p.report.threshold, reduce, on, p.center, p.scale, p.report)


def gate_from_dict(data: Mapping[str, Any]) -> Gate:
    """A gate from :meth:`Gate.to_dict` data; :class:`ConditionError` names what is wrong.

    Example:
        >>> gate_from_dict({"kind": "not", "of": harmful.to_dict()})
    """
    if not isinstance(data, Mapping):
        raise ConditionError(f"a condition must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind", "condition")
    try:
        if kind == "not":
            return Not(gate_from_dict(data["of"]))
        if kind in ("or", "and"):
            return (Or if kind == "or" else And)(gate_from_dict(data["a"]), gate_from_dict(data["b"]))
        if kind == "condition":
            keys = ("direction", "layer", "threshold", "reduce", "on", "center", "scale")
            extra = sorted(set(data) - set(keys) - {"kind"})
            if extra:
                raise ConditionError(f"unknown condition field(s) {extra}; known: {', '.join(keys)}")
            return Condition(**{k: data[k] for k in keys if k in data})
    except KeyError as e:
        raise ConditionError(f"a {kind!r} condition needs the field {e.args[0]!r}") from None
    except TypeError as e:
        raise ConditionError(f"bad condition: {e}") from None
    raise ConditionError(f"condition kind {kind!r} not known; use condition, not, or, and")
