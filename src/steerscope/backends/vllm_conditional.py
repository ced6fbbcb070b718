"""Conditions and projection clamps as vLLM request specs (the client side of ``engine/steerscope_vllm_gates.py``).

A gated request's spec is JSON the worker extension evaluates on that request's own activations, per step:
``{"rules": [{"condition": Gate.to_dict() | null, "vectors": [[name, alpha]]}, ...], "positions": ...,
"clamp": {"vector": name, "lo": x | null, "hi": x | null, "positions": ..., "condition": ...}}``
(docs/conditional.md, "On vLLM"). What the engine would only find out mid-step is refused here, before anything
is sent: a gate that reads a layer above the lowest layer it gates (it would read a steered residual), a
condition of another width, per-row clamp ranges (on vLLM each request carries its own range), and on the compiled
engine what its graph cannot run (:func:`compiled_refusal`: it runs up to :data:`COMPILED_RULES` rules and a clamp
gated by up to :data:`COMPILED_LEAVES` conditions, ``on="prompt"`` or ``on="token"``).

Example:
    >>> gated_spec(engine.register, 30, [(harmful, refusal, 4.0), (None, helpful, 1.0)], "all")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from steerscope.errors import BackendError, ConditionError
from steerscope.vector import SteeringVector, check_finite

if TYPE_CHECKING:
    from steerscope.conditional.clamp import Clamp
    from steerscope.conditional.condition import Gate

POSITIONS = ("all", "prompt", "generated")
COMPILED_LEAVES = 4  # engine/steerscope_vllm_plugin.LEAVES
COMPILED_RULES = 3  # engine/steerscope_vllm_plugin.RULES
RuleLike = tuple["Gate | None", SteeringVector, float]


def _count_leaves(gate: Gate) -> int:
    """The conditions in a gate's tree, repeats counted (as the engine, which parses each one on its own, does)."""
    parts = [getattr(gate, k) for k in ("of", "a", "b") if hasattr(gate, k)]
    return sum(_count_leaves(g) for g in parts) if parts else 1


def compiled_refusal(gates: Sequence[Gate | None], clamp: Clamp | None) -> str | None:
    """Why the compiled engine cannot run a gated request (its rules' gates in order, None for an ``else``, and
    its clamp), or None when it can: the client's copy of ``steerscope_vllm_gates.compiled_refusal``, so the
    request is refused before it is sent.

    Example:
        >>> compiled_refusal([harmful], None) is None
        True
    """
    why = []
    if len(gates) > COMPILED_RULES:
        why.append(f"{len(gates)} rules")
    real = [g for g in [*gates, None if clamp is None else clamp.condition] if g is not None]
    n = sum(_count_leaves(g) for g in real)
    if n > COMPILED_LEAVES:
        why.append(f"{n} conditions in one gate")
    if not why:
        return None
    return (f"the compiled engine runs up to {COMPILED_RULES} rules and a clamp gated by up to {COMPILED_LEAVES} "
            f"conditions together; this request has {' and '.join(why)}: use the eager engine (compiled=False; "
            "serve without --compiled)")


def check_gate(gate: Gate | None, vector: SteeringVector, n_layers: int) -> None:
    """ConditionError when ``gate`` cannot gate ``vector`` (resid_pre): a width, a layer past the model, or a
    leaf above the vector's lowest layer (as ``GateState`` refuses it on HF)."""
    for leaf in [] if gate is None else gate.leaves():
        if leaf.direction.shape[0] != vector.d_model:
            raise ConditionError(f"the condition's direction has {leaf.direction.shape[0]} dims, the vector "
                                 f"{vector.d_model}; fit it on this model")
        if leaf.layer >= n_layers:
            raise ConditionError(f"the condition reads layer {leaf.layer}, the model has {n_layers} layers")
        if leaf.layer > min(vector.layers):
            raise ConditionError(f"a condition reads layer {leaf.layer} but steering starts at layer "
                                 f"{min(vector.layers)}; the gate must read an unsteered residual: use a "
                                 "condition layer <= the steering layers")


def _bound(b: Any, name: str) -> float | None:
    if b is None or isinstance(b, (int, float)):
        return None if b is None else check_finite(float(b), f"clamp {name}")
    raise BackendError(f"clamp {name}: the vLLM backend takes one number per request (each request carries its own "
                       "clamp); give every request its own Clamp instead of a per-row list")


def clamp_spec(register: Callable[[SteeringVector], str], n_layers: int, clamp: Clamp) -> dict[str, Any]:
    """The ``clamp`` object of a spec (the vector registered with the engine)."""
    if clamp.vector.site != "resid_pre":
        raise BackendError(f"the vLLM backend clamps at resid_pre only; this clamp's vector is at {clamp.vector.site!r}")
    if not isinstance(clamp.positions, str) or clamp.positions not in POSITIONS:
        raise BackendError(f"clamp positions {clamp.positions!r}: the vLLM backend supports {', '.join(POSITIONS)}")
    check_gate(clamp.condition, clamp.vector, n_layers)
    return {"vector": register(clamp.vector), "lo": _bound(clamp.lo, "lo"), "hi": _bound(clamp.hi, "hi"),
            "positions": clamp.positions,
            "condition": None if clamp.condition is None else clamp.condition.to_dict()}


def gated_spec(register: Callable[[SteeringVector], str], n_layers: int, rules: Sequence[RuleLike],
               positions: str = "all", clamp: Clamp | None = None) -> dict[str, Any] | None:
    """A gated request's spec: ``rules`` ``[(gate or None, vector at resid_pre, alpha), ...]`` in priority order
    (first match wins, as ``ss.conditional_steering``), and an optional projection clamp. None when both are empty.

    Args:
        register: the engine's vector registration (``Engine.register``): vector -> engine-side name.
        n_layers: the model's number of layers.
        rules: the branches; a None gate is always open (an ``else``).
        positions: where the rules add (all / prompt / generated).
        clamp: a :class:`steerscope.conditional.clamp.Clamp` (its own positions and condition).

    Example:
        >>> gated_spec(engine.register, lm.n_layers, [(harmful, refusal, 4.0)], clamp=Clamp(cap, hi=3.0))
    """
    if positions not in POSITIONS:
        raise BackendError(f"positions {positions!r}: the vLLM backend supports {', '.join(POSITIONS)}")
    out: dict[str, Any] = {"positions": positions}
    made = []
    for gate, vector, alpha in rules:
        if vector.site != "resid_pre":
            raise BackendError(f"the vLLM backend steers resid_pre; a rule's vector is at {vector.site!r}")
        check_gate(gate, vector, n_layers)
        made.append({"condition": None if gate is None else gate.to_dict(),
                     "vectors": [[register(vector), check_finite(float(alpha), "alpha")]]})
    if made:
        out["rules"] = made
    if clamp is not None:
        out["clamp"] = clamp_spec(register, n_layers, clamp)
    return out if made or clamp is not None else None
