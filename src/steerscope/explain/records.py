"""The card's typed records: one frozen dataclass per section, and :class:`Estimate` for every figure
measured over prompts (its value, its 95 % interval from a bootstrap over prompts, and n).

The HTML, the verdict rules and the refusal-mechanisms study read these attributes; ``card.json``
is their ``to_dict()``.

Example:
    >>> e = Estimate(0.58, (0.41, 0.77), 8)
    >>> e.excludes(0.8), e.straddles(0.5)
    (True, True)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from steerscope.analyses.records import Record


@dataclass(frozen=True)
class Estimate(Record):
    """A figure measured over ``n`` prompts with its 95 % bootstrap interval ``ci95`` (NaN when undefined)."""

    value: float
    ci95: tuple[float, float]
    n: int

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.value, *self.ci95))

    def excludes(self, x: float) -> bool:
        """Whether the interval lies entirely on one side of ``x``."""
        return self.finite and (self.ci95[0] > x or self.ci95[1] < x)

    def straddles(self, x: float) -> bool:
        return not self.excludes(x)


@dataclass(frozen=True)
class Sample(Record):
    """One prompt's steered and unsteered response."""

    prompt: str
    steered: str
    unsteered: str


@dataclass(frozen=True)
class VectorRecord(Record):
    """Section ``vector``: the vector, its norm relative to the residual stream, and the run's facts."""

    site: str
    layers: list[int]
    d_model: int
    norm: dict[str, float]
    mean_resid_norm: dict[str, float]
    relative_norm: dict[str, float]
    analysed_layer: int
    provenance: dict[str, Any]
    model: str = ""
    name: str = ""
    alpha: float = float("nan")
    n_prompts: int = 0
    scorer: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    metric_gap: Estimate | None = None
    scored_positions: int = 0
    timings: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class SpecificControl(Record):
    """The vector's effect at ``alpha`` against a random direction of the same norm, per prompt."""

    alpha: float
    effect: Estimate  # the vector's effect (per-prompt values, mean)
    random_effect: Estimate  # a random direction orthogonal to s, |r| = |s|, same alpha
    excess: Estimate  # paired per-prompt difference effect - random_effect


@dataclass(frozen=True)
class DoseRecord(Record):
    """Section ``dose``: effect and KL against alpha, the recommended range and the alpha used."""

    alphas: list[float]
    effect: list[Estimate]
    effect_kind: str
    metric_gap: list[float]
    scored_positions: list[int]
    kl_quantile: list[Estimate]
    kl_mean: list[float]
    quantile: float
    kl_budget: float
    n_neutral_positions: int
    n_neutral_prompts: int
    alpha_half_effect: float | None
    alpha_kl_max: float | None
    range: tuple[float, float] | None
    max_effect: float
    chosen_alpha: float
    alpha_given: bool
    chosen_reason: str
    controls: list[SpecificControl]
    samples: list[Sample]
    scorer_delta: list[float] | None = None
    base_score: float | None = None
    range_withheld: str = ""  # why a range meeting both rules was not recommended

    def control_at(self, alpha: float) -> SpecificControl | None:
        return next((c for c in self.controls if c.alpha == alpha), None)


@dataclass(frozen=True)
class LensRecord(Record):
    """Section ``lens``: tokens that sign(alpha) s writes toward (W_U v), raw and after the final norm."""

    sign: float
    k: int
    top_positive: dict[str, list[str]]
    top_negative: dict[str, list[str]]
    scores: dict[str, dict[str, list[Any]]]


@dataclass(frozen=True)
class Head(Record):
    head: str
    node: dict[str, Any]
    score: float
    svv_norm: float
    svv_top: list[str]
    svv_bottom: list[str]


@dataclass(frozen=True)
class AttributionRecord(Record):
    """Section ``attribution``: EAP-IG shares of the steering node's effect by path, with intervals."""

    share: dict[str, Estimate]  # qk, v, heads, mlp, direct
    s_node: float
    m_clean: float
    m_corrupt: float
    completeness: float  # s_node / (m_clean - m_corrupt); 1 = the T-step integral is complete
    n_edges: int
    n_nodes: int
    top_heads: list[Head]
    top_nodes: list[dict[str, Any]]
    ig_steps: int
    scored_positions: int


@dataclass(frozen=True)
class FrozenPath(Record):
    """One ablation: effect retained (teacher-forced) with its interval, and generation figures."""

    effect_retained: Estimate
    tokens_reproduced: float
    tokens_retained: float
    scorer_mean: float | None


@dataclass(frozen=True)
class FrozenRecord(Record):
    """Section ``frozen``: QK frozen, OV frozen, svv removed, MLP input s removed."""

    qk: FrozenPath
    ov: FrozenPath
    svv: FrozenPath
    mlp: FrozenPath
    steered_scorer_mean: float | None
    unsteered_tokens_reproduced: float
    unsteered_scorer_mean: float | None
    gen_tokens: int
    samples: dict[str, list[str]]

    def path(self, mode: str) -> FrozenPath:
        return {"qk": self.qk, "ov": self.ov, "svv": self.svv, "mlp": self.mlp}[mode]


@dataclass(frozen=True)
class MinimalCircuit(Record):
    """:func:`steerscope.explain.circuit.minimal_circuit`'s result: the faithfulness curve on the grid and the
    minimal faithful circuit (the card's and the refusal-mechanisms study's circuit records extend it)."""

    sizes: list[int]
    n_edges_pruned: list[int]
    faithfulness: list[float]
    m_full: float
    m_empty: float
    n_edges_total: int
    minimal_top_n: int
    minimal_edges: int
    minimal_fraction: float
    reached_threshold: bool
    threshold: float
    edge_kinds: dict[str, int]
    graph: dict[str, Any]  # :meth:`Graph.to_dict`

    def fields(self) -> dict[str, Any]:
        """The fields by name (not converted to JSON), for records that extend this one."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class CircuitRecord(MinimalCircuit):
    """Section ``circuit``: the minimal faithful circuit (:class:`MinimalCircuit`'s fields), its faithfulness
    interval and controls."""

    edge_fraction: float
    complement: float
    random_2x: list[float]
    faithfulness_minimal: Estimate | None = None


@dataclass(frozen=True)
class SparsityRecord(Record):
    """Section ``sparsity``: the fraction of dimensions (|IE| rule) that keeps the target effect."""

    fraction_needed: float
    fraction_ci95: tuple[float, float]
    resolution: float  # the gap between the evaluated sizes around the answer (fraction of d_model)
    n: int
    dims_needed: int
    target: float
    rule: str
    sparsities: list[float]
    kept_fraction: list[float]
    effect_retained: dict[str, list[float]]
    top_dims: list[int]
    scorer: dict[str, list[float]] | None = None


@dataclass(frozen=True)
class IdentifiabilityRecord(Record):
    """Section ``identifiability``: s + v_perp and v_perp alone relative to s; the covariance null space."""

    seeds: list[int]
    n_prompts: int
    v_plus_perp: Estimate
    perp_only: Estimate
    v_plus_perp_ci90: tuple[float, float]  # the interval of the equivalence test (TOST at level 0.05)
    margin: float
    null_space: dict[str, Any]
    null_fraction: float
    null_space_note: str


@dataclass(frozen=True)
class Claim(Record):
    """One verdict: a named rule, its three-way status and the evidence it rests on."""

    rule: str
    status: str  # supported | contradicted | undecided
    statement: str  # what "supported" means, in words
    test: str  # the decision rule
    evidence: str  # the figures with their intervals
    n: int
    n_to_decide: int | None = None  # for undecided: the n that would likely decide it, if any


__all__ = ["AttributionRecord", "CircuitRecord", "Claim", "DoseRecord", "Estimate", "FrozenPath", "FrozenRecord",
           "Head", "IdentifiabilityRecord", "LensRecord", "Sample", "SparsityRecord", "SpecificControl",
           "VectorRecord"]
