"""The identifiability study's typed step records, and the step names (one place).

Each step returns one of these frozen records; the run store writes its ``to_dict()`` (the JSON keys
are the field names, in field order, so run folders of earlier versions resume) and the report reads
attributes. Two steps are keyed by data rather than by name (the ``gen_*`` cells map ``cond@alpha``
to texts, ``scores`` maps cells to scores): their records are one mapping, written as that mapping.

Example:
    >>> rec = Generations({"none@0": ["Hi."]})
    >>> Generations.from_dict(rec.to_dict()) == rec
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from steerscope.analyses.equivalence import ClusterTost
from steerscope.analyses.identifiability import Comparison, ProbeNullFraction, Spectrum
from steerscope.analyses.records import Record

K = TypeVar("K", bound="_Keyed")

VECTORS, SCORERS, SCORES, EFFECTS, LOGITS, NULLSPACE = "vectors", "scorers", "scores", "effects", "logits", "nullspace"
EQUIVALENCE = "equivalence"
Cell = tuple[str, str, int, str]  # (trait or "*", method, seed, prompt set)


def generation_step(cell: Cell) -> str:
    """The step name of a generation cell, e.g. ``gen_formality_dim_s0_neutral`` or ``gen_none_none_s0_shift``."""
    trait, method, seed, pset = cell
    return f"gen_{'none' if trait == '*' else trait}_{method}_s{seed}_{pset}"


def cell_key(cell: Cell) -> str:
    """The cell as the ``scores`` record keys it: ``trait|method|seed|prompts``."""
    return "|".join(map(str, cell))


@dataclass(frozen=True)
class _Keyed(Record):
    """A record whose JSON is its one mapping field (the keys are data: cells, conditions)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(super().to_dict()[dataclasses.fields(self)[0].name])

    @classmethod
    def from_dict(cls: type[K], data: dict[str, Any]) -> K:
        body = {k: v for k, v in data.items() if not k.startswith("_")}  # the store's bookkeeping keys
        return super().from_dict({dataclasses.fields(cls)[0].name: body})


@dataclass(frozen=True)
class VectorsRecord(Record):
    """Step ``vectors``: the extraction and injection layers, each vector's norm and file, cosines."""

    layer: int
    inject_layer: int
    norms: dict[str, float]  # "trait_method" -> |v|
    files: dict[str, str]  # "trait_method" -> vector file in the run folder
    cos_dim_pca: dict[str, float]  # trait -> cos(DIM, PCA)
    cos_traits: dict[str, float]  # "a~b" -> cos of the two traits' DIM vectors
    # "trait|method" -> cos(DIM, method) for every contrast method on the same activations (pca_paper: paper C's
    # centred, unit-norm PCA; its sign is the SVD's, so its cosine may be negative)
    cos_methods: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScorerCheck(Record):
    """One scorer's validation: its accuracy on the labelled texts and whether conclusions may use it."""

    kind: str
    accuracy: float
    validation: str
    usable: bool


@dataclass(frozen=True)
class ScorersRecord(Record):
    """Step ``scorers``: every scorer per trait and each trait's primary (most accurate usable) one."""

    scorers: dict[str, list[ScorerCheck]]
    primary: dict[str, str | None]


@dataclass(frozen=True)
class Generations(_Keyed):
    """Step ``gen_*``: one cell's sampled completions, ``{"cond@alpha": [text per prompt]}``."""

    texts: dict[str, list[str]]


@dataclass(frozen=True)
class Scores(_Keyed):
    """Step ``scores``: ``{cell: {scorer kind: {"cond@alpha": [score per completion]}}}``."""

    cells: dict[str, dict[str, dict[str, list[float]]]]


@dataclass(frozen=True)
class Verdict(Record):
    """The equivalence verdict of one effect row; the optional fields are absent from the JSON when None."""

    verdict: str
    degenerate_ci: bool | None = None  # set when the verdict is withheld
    effect_retained: float | None = None  # d[v+v_perp vs none] / d[v vs none], set with a verdict
    vperp_alone_effect: bool | None = None


_OPTIONAL = ("degenerate_ci", "effect_retained", "vperp_alone_effect")
_COMPARISONS = ("v_vs_none", "vperp_sum_vs_v", "vperp_sum_vs_none", "vperp_vs_none")


@dataclass(frozen=True)
class EffectRow(Record):
    """One trait x method x alpha x scorer comparison of the conditions (seeds pooled), with its verdict."""

    trait: str
    method: str
    alpha: float
    scorer: str
    prompts: str
    usable: bool
    primary: bool
    v_vs_none: Comparison
    vperp_sum_vs_v: Comparison
    vperp_sum_vs_none: Comparison
    vperp_vs_none: Comparison
    verdict: str
    degenerate_ci: bool | None = None
    effect_retained: float | None = None
    vperp_alone_effect: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """Each comparison with its ``real_effect``; the optional verdict fields only when set."""
        d = {k: v for k, v in super().to_dict().items() if not (k in _OPTIONAL and v is None)}
        return d | {k: d[k] | {"real_effect": getattr(self, k).real_effect} for k in _COMPARISONS}


@dataclass(frozen=True)
class EffectsRecord(Record):
    """Step ``effects``: the rows on the neutral prompts and (``--shift``) on the shift prompts."""

    neutral: list[EffectRow]
    shift: list[EffectRow]

    def sets(self) -> dict[str, list[EffectRow]]:
        """``{"neutral": rows, "shift": rows}`` in report order."""
        return {"neutral": self.neutral, "shift": self.shift}


@dataclass(frozen=True)
class EquivalenceRow(Record):
    """One decided comparison (primary scorer): a cluster-bootstrap TOST at the margin, Holm over the family.

    ``comparison`` is ``"v+v_perp vs v"`` or ``"v[pca_paper] vs v[dim]"``; ``guard`` is v against no steering
    (the same test), since an equivalence means nothing unless v itself moves the score."""

    trait: str
    alpha: float
    comparison: str
    scorer: str
    test: ClusterTost
    verdict: str  # equivalent | different | undecided (Holm-adjusted, alpha 0.05)
    p_equiv_holm: float
    p_diff_holm: float
    guard: ClusterTost
    v_moves_score: bool  # guard: 95 % interval of d(v vs none) excludes 0


@dataclass(frozen=True)
class VperpRatio(Record):
    """v_perp alone against v (primary scorer, neutral prompts), as paper C's ratio and as a shift ratio.

    ``ratio_paper`` is paper C's |mean(v_perp)| / |mean(v)| of the raw scores (its code's ``effect_ratio``); it
    depends on where the scorer puts 0, so ``ratio_shift`` = (mean(v_perp) - mean(none)) / (mean(v) - mean(none))
    (the part of v's shift that v_perp alone gives) is reported beside it. Intervals: 95 % percentile, prompts
    resampled with their seeds."""

    trait: str
    alpha: float
    scorer: str
    n_prompts: int
    n_seeds: int
    mean_none: float
    mean_v: float
    mean_vperp: float
    ratio_paper: float
    ratio_paper_ci95: tuple[float, float]
    ratio_shift: float
    ratio_shift_ci95: tuple[float, float]


@dataclass(frozen=True)
class EquivalenceRecord(Record):
    """Step ``equivalence``: the decided rows; the family is every row's two tests (2 x len(rows) p-values).

    ``vperp_ratios`` (descriptive, not in the family) is empty in runs made before it existed."""

    margin: float
    rows: list[EquivalenceRow]
    family_size: int
    vperp_ratios: list[VperpRatio] = field(default_factory=list)


@dataclass(frozen=True)
class Conclusion(Record):
    """One row that counts (primary scorer), as the report's table and the ``--json`` summary show it."""

    prompts: str
    trait: str
    method: str
    alpha: float
    scorer: str
    d_v_vs_none: str
    v_real_effect: bool
    d_vsum_vs_v: str
    d_vperp_vs_none: str
    corr: float | None
    jsd: float
    verdict: str


@dataclass(frozen=True)
class Agreement(Record):
    """Next-token agreement of ``alpha * v`` with ``alpha *`` another direction (``vs``).

    ``top1_ci95``: 95 % cluster-bootstrap interval of ``top1`` over ``n_prompts`` prompts (each with its
    ``n_draws`` draws of the other direction); None in runs made before it existed."""

    trait: str
    prompts: str
    alpha: float
    vs: str
    l2: float
    top1: float
    top10: float
    top1_ci95: tuple[float, float] | None = None
    n_prompts: int | None = None
    n_draws: int | None = None


@dataclass(frozen=True)
class SubspaceRow(Record):
    """Agreement of v with v + |v| u_i over a random k-dim subspace orthogonal to v: mean and worst case."""

    trait: str
    alpha: float
    k: int
    mean_top1: float
    worst_top1: float
    mean_l2: float
    max_l2: float
    worst_top10: float


@dataclass(frozen=True)
class LogitsRecord(Record):
    """Step ``logits``: next-token agreement rows and the k-subspace rows."""

    agreement: list[Agreement]
    subspaces: list[SubspaceRow]


@dataclass(frozen=True)
class FdCheck(Record):
    """Finite-difference check of the Jacobian at ``layer``: relative error per random probe."""

    layer: int
    rel_err: list[float]


@dataclass(frozen=True)
class JRatio(Record):
    """First-order logit change of v_perp against v (Jacobian at the extraction layer)."""

    J_v: float
    J_vperp: float
    ratio: float


@dataclass(frozen=True)
class NullspaceRecord(Record):
    """Step ``nullspace``: covariance and Jacobian spectra per layer (keys: the layer as a string)."""

    layers: list[int]
    covariance: dict[str, Spectrum]
    jacobian: dict[str, Spectrum]
    n_tokens: int
    fd_check: FdCheck | None = None  # absent from the JSON when the extraction layer is not among ``layers``
    J_vperp_over_J_v: dict[str, JRatio] = field(default_factory=dict)  # trait -> ratio
    probe_null: dict[str, ProbeNullFraction] = field(default_factory=dict)  # layer -> paper C's (probes - rank) / probes

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not (k == "fd_check" and v is None)}


__all__ = ["Agreement", "Conclusion", "EffectRow", "EffectsRecord", "EquivalenceRecord", "EquivalenceRow", "FdCheck", "Generations", "JRatio",
           "LogitsRecord", "NullspaceRecord", "ScorerCheck", "Scores", "VperpRatio", "ScorersRecord", "SubspaceRow", "Verdict",
           "VectorsRecord", "VECTORS", "SCORERS", "SCORES", "EFFECTS", "LOGITS", "NULLSPACE", "EQUIVALENCE",
           "cell_key", "generation_step"]
