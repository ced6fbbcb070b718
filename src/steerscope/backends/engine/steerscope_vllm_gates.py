"""Per-request conditions and projection clamps inside the vLLM worker (engine side; never imports steerscope).

The engine-side mirror of ``steerscope.conditional`` (``gate.py``) and ``steerscope.steer.clip_along`` for the
flattened token layout of one engine step (each request's tokens a contiguous slice):

1. A gate arrives as the JSON of ``Gate.to_dict`` and is parsed (:func:`parse_gate`) into :class:`Leaf` s and
   ``("not", g)`` / ``("or", a, b)`` / ``("and", a, b)`` tuples.
2. At the eager pre-hook of a leaf's layer, before that layer's additions, the request's tokens are projected:
   ``s_t = ((x_t - center) · d̂) / scale`` in float32, x the resid_pre (``hidden + residual``; hidden at layer 0).
3. The scores are reduced with a per-request carry (running sum, count, max) kept across engine steps
   (:func:`leaf_decision`): ``on="prompt"`` over the prompt's tokens, decided in the step that holds the last
   prompt token and kept for the request's life; ``on="token"`` running over every token so far, each
   position its own decision. A carry restarts when a request's step starts at position 0 (a new or a
   preempted-and-recomputed request).
4. Rules resolve by first match wins (:func:`rule_weights`): a 0/1 weight per token, multiplied into the rule's
   delta; a clamp (:func:`clip_rows`) replaces the rows where its positions and gate allow.

A prompt condition needs its whole prompt before the prompt's own tokens are steered: when the scheduler
splits a prompt over steps (chunked prefill) the earlier chunks cannot be decided: they are left unsteered,
whatever the gate (``~c`` too), and the worker reports it (``steerscope_stats()["bad"]``). Prompts that fit one
step (or an engine started with ``enable_chunked_prefill=False``) never split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from steerscope_vllm_plugin import LEAVES as COMPILED_LEAVES  # the gate slots' size in the compiled graph
from steerscope_vllm_plugin import RULES as COMPILED_RULES

REDUCE = ("mean", "last", "max")
ON = ("prompt", "token")
POSITIONS = ("all", "prompt", "generated")


@dataclass(frozen=True, eq=False)
class Leaf:
    """One condition: unit direction [d_model] (float32), its layer, threshold, reduce, on, center, scale."""

    unit: torch.Tensor
    layer: int
    threshold: float
    reduce: str
    on: str
    center: torch.Tensor | None
    scale: float


def _number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(x).__name__}")
    try:
        v = float(x)
    except OverflowError:
        raise ValueError(f"{what} is too large for a float") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {x!r}")
    return v


def _vector(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, list) or not x:
        raise ValueError(f"{what} must be a non-empty list of numbers")
    return torch.tensor([_number(v, what) for v in x], dtype=torch.float32)


def _leaf(raw: dict[str, Any]) -> Leaf:
    keys = {"kind", "direction", "layer", "threshold", "reduce", "on", "center", "scale"}
    if set(raw) - keys:
        raise ValueError(f"unknown condition field(s) {sorted(set(raw) - keys)}; known: {', '.join(sorted(keys))}")
    for k in ("direction", "layer", "threshold"):
        if k not in raw:
            raise ValueError(f"a condition needs the field {k!r}")
    d = _vector(raw["direction"], "a condition's direction")
    if float(d.norm()) == 0:
        raise ValueError("a condition's direction must be non-zero")
    layer = raw["layer"]
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"a condition's layer must be a whole number >= 0, got {layer!r}")
    reduce, on = raw.get("reduce", "mean"), raw.get("on", "prompt")
    if reduce not in REDUCE or on not in ON:
        raise ValueError(f"a condition's reduce is one of {', '.join(REDUCE)} and on one of {', '.join(ON)}")
    center = None if raw.get("center") is None else _vector(raw["center"], "a condition's center")
    if center is not None and center.shape != d.shape:
        raise ValueError(f"a condition's center has {center.shape[0]} numbers, its direction {d.shape[0]}")
    scale = _number(raw.get("scale", 1.0), "a condition's scale")
    if scale <= 0:
        raise ValueError(f"a condition's scale must be > 0, got {scale}")
    return Leaf(d / d.norm(), layer, _number(raw["threshold"], "a condition's threshold"), reduce, on, center, scale)


def parse_gate(raw: Any, depth: int = 0) -> Any:
    """A gate (``Gate.to_dict`` JSON) as a :class:`Leaf` or a ``not`` / ``or`` / ``and`` tuple; ValueError."""
    if depth > 32:
        raise ValueError("a condition is nested more than 32 deep")
    if not isinstance(raw, dict):
        raise ValueError("a condition must be an object (Condition.to_dict())")
    kind = raw.get("kind", "condition")
    if kind == "not":
        if set(raw) != {"kind", "of"}:
            raise ValueError("a 'not' condition is {\"kind\": \"not\", \"of\": {...}}")
        return ("not", parse_gate(raw["of"], depth + 1))
    if kind in ("or", "and"):
        if set(raw) != {"kind", "a", "b"}:
            raise ValueError(f"an {kind!r} condition is {{\"kind\": \"{kind}\", \"a\": {{...}}, \"b\": {{...}}}}")
        return (kind, parse_gate(raw["a"], depth + 1), parse_gate(raw["b"], depth + 1))
    if kind == "condition":
        return _leaf(raw)
    raise ValueError(f"condition kind {kind!r} not known; use condition, not, or, and")


def leaves(gate: Any) -> list[Leaf]:
    """The leaves of a parsed gate (None: none), each once, in first-appearance order."""
    if gate is None:
        return []
    if isinstance(gate, Leaf):
        return [gate]
    out: list[Leaf] = []
    for g in gate[1:]:
        out += [leaf for leaf in leaves(g) if all(leaf is not o for o in out)]
    return out


def gate_open(gate: Any, values: dict[int, torch.Tensor], n: int) -> torch.Tensor:
    """bool [n]: the gate over one request's tokens from its leaves' decisions (``values[id(leaf)]``)."""
    if gate is None:
        return torch.ones(n, dtype=torch.bool)
    if isinstance(gate, Leaf):
        return values.get(id(gate), torch.zeros(n, dtype=torch.bool))
    if gate[0] == "not":
        return ~gate_open(gate[1], values, n)
    a, b = gate_open(gate[1], values, n), gate_open(gate[2], values, n)
    return a | b if gate[0] == "or" else a & b


def rule_weights(gates: list[Any], values: dict[int, torch.Tensor], n: int) -> list[torch.Tensor]:
    """One 0/1 float weight [n] per rule: where its gate is open and no earlier rule's is (first match wins)."""
    taken = torch.zeros(n, dtype=torch.bool)
    out = []
    for g in gates:
        opened = gate_open(g, values, n)
        out.append((opened & ~taken).float())
        taken = taken | opened
    return out


def score(leaf: Leaf, x: torch.Tensor) -> torch.Tensor:
    """Normalised projections [n] (float32, CPU) of residual rows x [n d_model], as ``Condition.project``."""
    u = leaf.unit.to(x.device)
    h = x.float() if leaf.center is None else x.float() - leaf.center.to(x.device)
    return ((h @ u) / leaf.scale).cpu()


@dataclass
class LeafState:
    """One request's running reduction of one leaf: sum, count, max (float32 0-d), and a kept prompt decision."""

    total: torch.Tensor
    count: torch.Tensor
    top: torch.Tensor
    decided: bool | None = None


def fresh() -> LeafState:
    return LeafState(torch.zeros(()), torch.zeros(()), torch.tensor(-math.inf))


def leaf_decision(leaf: Leaf, p: torch.Tensor, pos: torch.Tensor, prompt_len: int, st: LeafState
                  ) -> torch.Tensor | None:
    """bool [n] decisions for one request's tokens in this step (scores p [n], positions pos [n]), updating ``st``.

    None: a prompt condition whose prompt does not end in this step and was not decided before (a chunk).
    """
    if leaf.on == "token":
        ones = torch.ones_like(p)
        sums, counts = st.total + torch.cumsum(p, 0), st.count + torch.cumsum(ones, 0)
        tops = torch.maximum(st.top, torch.cummax(p, 0).values)
        st.total, st.count, st.top = sums[-1], counts[-1], tops[-1]
        scores = sums / counts if leaf.reduce == "mean" else tops if leaf.reduce == "max" else p
        return scores > leaf.threshold
    if st.decided is None:
        in_prompt = pos < prompt_len
        q = p[in_prompt]
        if q.numel():
            st.total, st.count = st.total + q.sum(), st.count + q.numel()
            st.top = torch.maximum(st.top, q.max())
        if not bool((pos == prompt_len - 1).any()):
            return None
        s = st.total / st.count if leaf.reduce == "mean" else st.top if leaf.reduce == "max" else q[-1]
        st.decided = bool(s > leaf.threshold)
    return torch.full((p.shape[0],), st.decided, dtype=torch.bool)


def position_keep(positions: str, pos: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """bool [n]: which of a request's tokens ``positions`` (all / prompt / generated) selects."""
    if positions == "all":
        return torch.ones(pos.shape[0], dtype=torch.bool)
    in_prompt = pos < prompt_len
    return in_prompt if positions == "prompt" else ~in_prompt


def clip_rows(x: torch.Tensor, r_hat: torch.Tensor, lo: float | None, hi: float | None, keep: torch.Tensor
              ) -> torch.Tensor:
    """x + (clip(x·r̂, lo, hi) − x·r̂) r̂ where ``keep`` (bool [n]), x elsewhere; x [n d_model], r̂ unit [d_model]
    (``steerscope.steer.clip_along`` and ``clamping``'s ``torch.where``)."""
    r = r_hat.to(x.device, x.dtype)
    p = x @ r
    c = p if lo is None else torch.clamp(p, min=lo)
    c = c if hi is None else torch.clamp(c, max=hi)
    new = x + (c - p)[..., None] * r
    return torch.where(keep.to(x.device)[:, None], new, x)


def spec_leaves(spec: Any) -> list[Leaf]:
    """Every leaf a request spec (``steerscope_vllm_adapter.Spec``) reads: its rules' gates, then its clamp's."""
    out: list[Leaf] = []
    for g in [g for g, _ in spec.rules] + ([spec.clamp.gate] if spec.clamp is not None else []):
        out += [leaf for leaf in leaves(g) if all(leaf is not o for o in out)]
    return out


NO_GATE_SITES = ("this compiled engine was built without gate sites, so it cannot run conditions or clamps: "
                 "start it with STEERSCOPE_VLLM_GRAPH='<arch>;gates' (steerscope's launchers do), or use the eager "
                 "engine (compiled=False; serve without --compiled)")


def compiled_refusal(spec: Any, gate_sites: bool = True) -> str | None:
    """Why a compiled engine's graph cannot run this gated spec, or None when it can: at most
    :data:`COMPILED_RULES` rules (each a gate and its vectors; first match wins) and a clamp, their gates built
    from at most :data:`COMPILED_LEAVES` conditions together (``on="prompt"`` or ``on="token"``); nothing gated
    without ``gate_sites``."""
    if spec is None or not spec.gated:
        return None
    if not gate_sites:
        return NO_GATE_SITES
    why = []
    if len(spec.rules) > COMPILED_RULES:
        why.append(f"{len(spec.rules)} rules")
    found = spec_leaves(spec)
    if len(found) > COMPILED_LEAVES:
        why.append(f"{len(found)} conditions in one gate")
    if not why:
        return None
    return (f"the compiled engine runs up to {COMPILED_RULES} rules and a clamp gated by up to {COMPILED_LEAVES} "
            f"conditions together; this request has {' and '.join(why)}: use the eager engine (compiled=False; "
            "serve without --compiled)")


def truth_table(gate: Any, found: list[Leaf], k: int = COMPILED_LEAVES) -> list[float]:
    """The gate over its leaves' decisions: entry ``b`` is 1.0 when the gate is open with leaf i decided open
    exactly where bit i of ``b`` is set (``found`` in bit order; bits past ``len(found)`` are ignored)."""
    out = []
    for b in range(2**k):
        values = {id(leaf): torch.tensor([bool(b >> i & 1)]) for i, leaf in enumerate(found)}
        out.append(float(gate_open(gate, values, 1)[0]))
    return out


def check_spec(spec: Any, vectors: dict[str, dict[int, torch.Tensor]], n_layers: int, d_model: int) -> None:
    """ValueError when a gated spec does not fit the model, or a gate would read a residual already steered:
    every rule's leaves at layers <= the lowest rule layer, the clamp's leaves <= the lowest clamp layer
    (as ``steerscope.conditional.gate.GateState`` requires on HF)."""
    rule_layers = [k for _, pairs in spec.rules for name, _ in pairs for k in vectors[name]]
    clamp_layers = list(vectors[spec.clamp.name]) if spec.clamp is not None else []
    for layers, gates in ((rule_layers, [g for g, _ in spec.rules]),
                          (clamp_layers, [spec.clamp.gate] if spec.clamp is not None else [])):
        for leaf in [leaf for g in gates for leaf in leaves(g)]:
            if leaf.unit.shape[0] != d_model or leaf.layer >= n_layers:
                raise ValueError(f"a condition of {leaf.unit.shape[0]} dims at layer {leaf.layer} does not fit a model "
                                 f"of width {d_model} with {n_layers} layers")
            if layers and leaf.layer > min(layers):
                raise ValueError(f"a condition reads layer {leaf.layer} but steering starts at layer {min(layers)}; "
                                 "use a condition layer <= the steering layers")


@dataclass
class Row:
    """One gated request in this step: its token slice of the flattened batch, its positions [count], its prompt
    length, its spec, its leaves' running states (kept across steps) and this step's decisions."""

    start: int
    count: int
    pos: torch.Tensor
    prompt_len: int
    spec: Any
    states: dict[int, LeafState]
    values: dict[int, torch.Tensor]
    undecided: bool = False  # a prompt condition whose prompt does not end in this step: no steering this step


def rule_delta(row: Row, layer: int, vectors: dict[str, dict[int, torch.Tensor]]) -> torch.Tensor | None:
    """[count d_model] (float32): each rule's ``sum alpha * v[layer]`` times its first-match weight and the
    positions' mask; None when no rule has this layer."""
    per = []
    for _, pairs in row.spec.rules:
        vs = [alpha * vectors[name][layer] for name, alpha in pairs if layer in vectors[name]]
        per.append(None if not vs else torch.stack(vs).sum(0) if len(vs) > 1 else vs[0])
    if all(d is None for d in per):
        return None
    weights = rule_weights([g for g, _ in row.spec.rules], row.values, row.count)
    keep = position_keep(row.spec.positions, row.pos, row.prompt_len).float()
    total = None
    for w, d in zip(weights, per):
        if d is not None:
            term = (w * keep)[:, None] * d
            total = term if total is None else total + term
    return total


def _steers_prompt(spec: Any) -> bool:
    return (bool(spec.rules) and spec.positions != "generated") or \
        (spec.clamp is not None and spec.clamp.positions != "generated")


def apply_rows(rows: list[Row], layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
               vectors: dict[str, dict[int, torch.Tensor]], bad: list[str]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """At layer ``layer``'s pre-hook: read each gated row's leaves here, add its open rules' deltas, clamp it.

    resid_pre is ``hidden + residual`` (``hidden`` at layer 0); additions go into ``residual`` (as plain steering
    does); a clamped row is written whole into ``residual`` with ``hidden`` zeroed there (the layer's fused
    add then gives exactly the clamped stream)."""
    copied = False
    for row in rows:
        here = [leaf for leaf in spec_leaves(row.spec) if leaf.layer == layer]
        cl = row.spec.clamp
        clamp_here = cl is not None and layer in vectors[cl.name]
        sl = slice(row.start, row.start + row.count)
        if here:
            x = hidden[sl] if residual is None else hidden[sl] + residual[sl]
            for leaf in here:
                got = leaf_decision(leaf, score(leaf, x), row.pos, row.prompt_len, row.states[id(leaf)])
                if got is None:  # harmless when only generated tokens are steered
                    row.undecided = True
                    if _steers_prompt(row.spec):
                        bad.append(f"a prompt condition's prompt was split over engine steps (chunked prefill); "
                                   f"a chunk of {row.count} prompt tokens was left unsteered")
                else:
                    row.values[id(leaf)] = got
        delta = rule_delta(row, layer, vectors) if row.spec.rules and not row.undecided else None
        clamp_here = clamp_here and not row.undecided
        if delta is None and not clamp_here:
            continue
        if not copied:
            hidden, residual, copied = hidden.clone(), None if residual is None else residual.clone(), True
        if delta is not None:
            target = hidden if residual is None else residual
            target[sl] = target[sl] + delta.to(target.device, target.dtype)
        if clamp_here:
            assert cl is not None
            x = hidden[sl] if residual is None else hidden[sl] + residual[sl]
            keep = position_keep(cl.positions, row.pos, row.prompt_len)
            keep = keep & gate_open(cl.gate, row.values, row.count)
            v = vectors[cl.name][layer]
            new = clip_rows(x, (v / v.norm()).to(torch.float32), cl.lo, cl.hi, keep)
            if residual is None:
                hidden[sl] = new
            else:
                hidden[sl], residual[sl] = 0, new
    return hidden, residual
