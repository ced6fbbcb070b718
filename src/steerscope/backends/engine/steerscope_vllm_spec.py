"""Per-request steering specs for the vLLM worker: parsing and validation (engine side; never imports steerscope).

A spec is what a request carries in ``sampling_params.extra_args["steerscope"]`` (JSON):
``{"vectors": [[name, alpha], ...], "positions": "all" | "prompt" | "generated"}``, or ``{"ablate": name}``;
gated: ``{"vectors": [...], "condition": GATE}`` (one rule) or ``{"rules": [{"condition": GATE | null,
"vectors": [...]}, ...]}`` (first match wins), and ``"clamp": {"vector": name, "lo": x | null, "hi": x | null,
"positions": ..., "condition": GATE | null}``; GATE is ``steerscope.Condition.to_dict()`` JSON
(``steerscope_vllm_gates.parse_gate``). :func:`parse_spec` refuses a malformed one with a one-line ValueError.

Example:
    >>> parse_spec({"vectors": [["formal", 4.0]], "condition": harmful.to_dict()}, known={"formal"}).gated
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

POSITIONS = ("all", "prompt", "generated")


def finite_alpha(alpha: Any, what: str = "alpha") -> float:
    """``alpha`` as a finite float; ValueError for a bool, a non-number, NaN/inf, or an integer too large
    for a float (a 400-digit JSON integer parses as a Python int; ``float()`` of it overflows)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{what} must be a finite number, got a {type(alpha).__name__}")
    try:
        value = float(alpha)
    except OverflowError:
        raise ValueError(f"{what} must be a finite number; an integer of about {int(int(alpha).bit_length() * 0.30103)} "
                         "digits is too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {alpha!r}")
    return value


@dataclass(frozen=True, eq=False)
class ClampSpec:
    """A projection clamp: hold the projection on each layer's direction of vector ``name`` in [lo, hi]."""

    name: str
    lo: float | None
    hi: float | None
    positions: str = "all"
    gate: Any = None


@dataclass(frozen=True, eq=False)
class Spec:
    """One request's steering: named vectors with alphas at ``positions``, or one ablated direction; gated
    rules ``((gate, vectors), ...)`` (first match wins) and a projection clamp (steerscope_vllm_gates)."""

    vectors: tuple[tuple[str, float], ...] = ()
    positions: str = "all"
    ablate: str | None = None
    rules: tuple[tuple[Any, tuple[tuple[str, float], ...]], ...] = ()
    clamp: ClampSpec | None = None

    @property
    def gated(self) -> bool:
        return bool(self.rules) or self.clamp is not None


def _pairs(raw: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, (list, tuple)):
        raise ValueError("vectors must be a list of [name, alpha] pairs")
    pairs = []
    for item in raw:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError("vectors must be a list of [name, alpha] pairs")
        name, alpha = item
        pairs.append((name, finite_alpha(alpha, f"alpha for vector {name!r}")))
    return tuple(pairs)


def _gate(raw: Any) -> Any:
    from steerscope_vllm_gates import parse_gate

    return None if raw is None else parse_gate(raw)


def _rules(raw: dict[str, Any]) -> tuple[tuple[Any, tuple[tuple[str, float], ...]], ...]:
    """``condition`` + ``vectors`` (one rule) or ``rules: [{condition, vectors}, ...]`` as parsed rules."""
    if "rules" in raw and ("vectors" in raw or "condition" in raw):
        raise ValueError("give rules, or vectors with an optional condition, not both")
    if "condition" in raw:
        if not raw.get("vectors"):
            raise ValueError("a condition gates vectors: give vectors with it (or a clamp its own condition)")
        return ((_gate(raw["condition"]), _pairs(raw["vectors"])),)
    items = raw.get("rules") or []
    if not isinstance(items, list):
        raise ValueError("rules must be a list of {condition, vectors} objects")
    out = []
    for r in items:
        if not isinstance(r, dict) or set(r) - {"condition", "vectors"} or not r.get("vectors"):
            raise ValueError("each rule is {\"condition\": {...} or null, \"vectors\": [[name, alpha], ...]}")
        out.append((_gate(r.get("condition")), _pairs(r["vectors"])))
    return tuple(out)


def _clamp(raw: Any) -> ClampSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"vector", "lo", "hi", "positions", "condition"}:
        raise ValueError("clamp is {\"vector\": name, \"lo\": x or null, \"hi\": x or null, \"positions\", "
                         "\"condition\"}")
    if not isinstance(raw.get("vector"), str):
        raise ValueError("clamp.vector must be a vector name")
    lo, hi = (None if raw.get(k) is None else finite_alpha(raw[k], f"clamp {k}") for k in ("lo", "hi"))
    if lo is None and hi is None:
        raise ValueError("a clamp needs lo, hi or both")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"clamp lo {lo} is above hi {hi}")
    positions = raw.get("positions", "all")
    if positions not in POSITIONS:
        raise ValueError(f"clamp positions {positions!r} not supported; use one of {', '.join(POSITIONS)}")
    return ClampSpec(raw["vector"], lo, hi, positions, _gate(raw.get("condition")))


def parse_spec(raw: Any, known: set[str] | None = None) -> Spec | None:
    """Validate a steering spec (dict or JSON string); ValueError with a one-line reason."""
    if raw is None or raw == "" or raw == {}:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
            raise ValueError("steering spec is not valid JSON (or is nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ValueError("steering spec must be an object")
    unknown = set(raw) - {"vectors", "positions", "ablate", "condition", "rules", "clamp"}
    if unknown:
        raise ValueError(f"unknown steering field(s) {sorted(unknown)}; use vectors, positions, ablate, condition, "
                         "rules, clamp")
    rules, clamp = _rules(raw), _clamp(raw.get("clamp"))
    pairs = () if rules else _pairs(raw.get("vectors") or [])
    positions = raw.get("positions", "all")
    if positions not in POSITIONS:
        raise ValueError(f"positions {positions!r} not supported here; use one of {', '.join(POSITIONS)}")
    ablate = raw.get("ablate")
    if ablate is not None and not isinstance(ablate, str):
        raise ValueError("ablate must be a vector name")
    if ablate is not None and (pairs or rules or clamp):
        raise ValueError("a request either adds vectors (gated or not, clamped or not) or ablates a direction")
    names = [n for n, _ in pairs] + [n for _, ps in rules for n, _ in ps] + ([ablate] if ablate else []) + \
        ([clamp.name] if clamp else [])
    if known is not None:
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"unknown vector name(s) {missing}; registered: {sorted(known)}")
    if not names:
        return None
    return Spec(pairs, positions, ablate, rules, clamp)
