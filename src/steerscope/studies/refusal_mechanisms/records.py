"""The refusal-mechanisms study's typed step records and its step names (one place).

Each step returns one of these frozen records; the run store writes its ``to_dict()`` (the JSON keys
are the field names, in field order, so run folders of earlier versions resume) and the summary and
the report read attributes. Keys that earlier versions did not write (e.g. ``heldout`` before the
held-out check, ``each`` before the per-prompt outcomes) are optional fields, left out of the JSON
when None, as before.

Example:
    >>> rec = FlipFilter(n_flipped=1, fallback_all_prompts=True, fallback_no_scored=False)
    >>> FlipFilter.from_dict(rec.to_dict()) == rec
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Hashable, TypeVar

from steerscope.analyses.records import Record
from steerscope.circuits.graph import Node
from steerscope.explain.records import MinimalCircuit
from steerscope.runs import Run

R = TypeVar("R", bound=Record)
K = TypeVar("K", bound=Hashable)

SETTINGS = ("bypass", "induce")  # bypass: harmful prompts, alpha < 0; induce: harmless prompts, alpha > 0
ABLATION_MODES = ("unsteered", "none", "qk", "ov", "svv", "mlp")  # Table 1's columns (``none``: steered)
EXACT_CHECK = "exact_check"


def ablations_step(setting: str) -> str:
    """The step name of Table 1's ablations in ``setting``, e.g. ``ablations_bypass``."""
    return f"ablations_{setting}"


def attribution_step(vector: str, setting: str) -> str:
    """The step name of a vector's EAP-IG attribution, e.g. ``attribution_dim_bypass``."""
    return f"attribution_{vector}_{setting}"


def circuits_step(vector: str, setting: str) -> str:
    """The step name of a vector's minimal circuit, e.g. ``circuits_dim_bypass``."""
    return f"circuits_{vector}_{setting}"


def circuit_compare_step(setting: str) -> str:
    """The step name of the circuit overlap and controls, e.g. ``circuit_compare_bypass``."""
    return f"circuit_compare_{setting}"


def svv_step(vector: str) -> str:
    """The step name of a vector's steering-value-vector logit lens, e.g. ``svv_dim``."""
    return f"svv_{vector}"


def sparsity_step(vector: str, setting: str = "bypass") -> str:
    """The step name of a vector's sparsity curves, e.g. ``sparsity_dim_bypass``."""
    return f"sparsity_{vector}_{setting}"


def iou_step(setting: str = "bypass") -> str:
    """The step name of the kept-dimension IoU, e.g. ``iou_bypass``."""
    return f"iou_{setting}"


def attr_tensors(vector: str, setting: str) -> str:
    """The tensor file (under ``tensors/``, without ``.safetensors``) of an attribution step's scores."""
    return f"attr_{vector}_{setting}"


def circuit_tensors(vector: str, setting: str) -> str:
    """The tensor file (under ``tensors/``, without ``.safetensors``) of a minimal circuit (bool [U V])."""
    return f"circuit_{vector}_{setting}"


@dataclass(frozen=True)
class _Sparse(Record):
    """A record whose ``_OPTIONAL`` fields are left out of the JSON when None (keys older versions lacked)."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not (k in self._OPTIONAL and v is None)}


@dataclass(frozen=True)
class FlipFilter(Record):
    """What the flip filter did: rows whose refusal judgement the steering flips, and which fallback fired."""

    n_flipped: int
    fallback_all_prompts: bool  # fewer than 2 flipped: every prompt kept
    fallback_no_scored: bool  # no kept row had a scored position: every prompt kept


@dataclass(frozen=True)
class TopNode(Record):
    """One node of the attribution's top list (the node as :meth:`Node.to_dict`) and its EAP-IG score."""

    node: dict[str, Any]
    score: float

    def graph_node(self) -> Node:
        return Node.from_dict(self.node)


@dataclass(frozen=True, kw_only=True)
class AttributionRecord(_Sparse):
    """Step ``attribution_<vector>_<setting>``: EAP-IG on the flip-filtered prompts (scores in the tensors)."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("fallback_all_prompts", "fallback_no_scored", "rows_common")

    vector: str
    setting: str
    alpha: float
    n_prompts: int
    n_flipped: int
    fallback_all_prompts: bool | None = None  # None: a record made before the fallbacks were recorded
    fallback_no_scored: bool | None = None
    rows_used: list[int]
    rows_common: list[int] | None = None
    scored_positions: int
    m_clean: float
    m_corrupt: float
    s_node: float
    n_edges: int
    n_nodes: int
    top_nodes: list[TopNode]
    steered_texts: list[str]

    def fallback_fired(self) -> bool:
        """Whether the "fewer than 2 flips: all prompts" fallback fired (older records: fewer than 2 flipped)."""
        return self.n_flipped < 2 if self.fallback_all_prompts is None else self.fallback_all_prompts


@dataclass(frozen=True)
class ExactCheckRecord(Record):
    """Step ``exact_check``: EAP-IG node scores against exact node patching (rank correlations, timings)."""

    setting: str
    n_prompts: int
    scored_positions: int
    t_eapig_s: float
    t_exact_nodes_s: float
    time_ratio_nodes: float
    s_node_eap: float
    s_node_exact: float
    spearman_top10: float
    spearman_top20: float
    spearman_top50: float
    spearman_all: float


@dataclass(frozen=True, kw_only=True)
class Heldout(_Sparse):
    """Faithfulness on the held-out prompts: the grid's circuits and the minimal one with its bootstrap
    interval (``n`` prompts after the flip filter); only ``n`` = 0 and a ``note`` when the split has none."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("n_prompts", "n_flipped", "fallback_all_prompts", "fallback_no_scored",
                                            "faithfulness", "minimal", "minimal_ci95", "reached_threshold", "note")

    n: int
    n_prompts: int | None = None
    n_flipped: int | None = None
    fallback_all_prompts: bool | None = None
    fallback_no_scored: bool | None = None
    faithfulness: list[float] | None = None
    minimal: float | None = None
    minimal_ci95: list[float] | None = None
    reached_threshold: bool | None = None
    note: str | None = None


@dataclass(frozen=True, kw_only=True)
class CircuitsRecord(_Sparse, MinimalCircuit):
    """Step ``circuits_<vector>_<setting>``: the faithfulness curve and minimal faithful circuit
    (:class:`~steerscope.explain.records.MinimalCircuit`'s fields) and its held-out faithfulness."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("heldout",)

    vector: str
    setting: str
    heldout: Heldout | None = None  # None: a record made before the held-out check

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()  # the base's fields come first; earlier versions wrote vector and setting first
        return {"vector": d.pop("vector"), "setting": d.pop("setting"), **d}


@dataclass(frozen=True)
class Controls(Record):
    """One method's circuit controls: its size, two random circuits of twice it, the complement, swaps."""

    own_size: int
    random_2x: list[float]
    complement: float
    swapped: dict[str, float]  # another method's circuit in this method's place


@dataclass(frozen=True, kw_only=True)
class CircuitCompareRecord(_Sparse):
    """Step ``circuit_compare_<setting>``: pairwise overlaps (``"a-b"``) of the minimal circuits, on each
    method's own prompts and on the common prompt set, and each method's controls."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("overlap_common",)

    setting: str
    overlap: dict[str, float]
    rows_used: dict[str, list[int] | None]
    overlap_common: dict[str, float] | None = None  # None: a record made before the common set
    controls: dict[str, Controls]


@dataclass(frozen=True, kw_only=True)
class AblationsRecord(_Sparse):
    """Step ``ablations_<setting>``: Table 1, the ASR unsteered, steered (``none``) and under each ablation,
    with per-prompt outcomes by the 12-string matcher (``each``) and the PatternJudge (``each_judge``)."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("each", "each_judge", "samples")

    setting: str
    alpha: float
    n: int
    unsteered: float
    none: float
    qk: float
    ov: float
    svv: float
    mlp: float
    each: dict[str, list[int]] | None = None  # None: a record made before the per-prompt outcomes
    each_judge: dict[str, list[int]] | None = None
    samples: dict[str, list[str]] | None = None

    def asr(self, mode: str) -> float:
        """The ASR of column ``mode`` (one of :data:`ABLATION_MODES`)."""
        if mode not in ABLATION_MODES:
            raise KeyError(mode)
        return float(getattr(self, mode))


@dataclass(frozen=True)
class LensTokens(Record):
    """The top (or bottom) tokens of a logit lens, their ids and scores."""

    tokens: list[str]
    ids: list[int]
    scores: list[float]


@dataclass(frozen=True)
class LensHead(Record):
    """The logit lens of one head's svv (:class:`steerscope.analyses.ov.LensRow` as JSON)."""

    node: dict[str, Any]
    score: float
    norm: float
    top: LensTokens
    bottom: LensTokens

    def graph_node(self) -> Node:
        return Node.from_dict(self.node)


@dataclass(frozen=True)
class RawLens(Record):
    """The logit lens of the scaled steering vector itself: top and bottom tokens."""

    top: list[str]
    bottom: list[str]


@dataclass(frozen=True)
class SvvRecord(Record):
    """Step ``svv_<vector>``: the logit lens of the top heads' svvs and of s itself."""

    vector: str
    setting: str
    heads: list[LensHead]
    raw_vector: RawLens


@dataclass(frozen=True, kw_only=True)
class PaperRule(_Sparse):
    """Paper A's gradient rule on its τ grid: kept dimensions, sparsity per τ and (with prompts) the ASR."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("successes", "n", "asr")

    taus: list[float]
    sparsity: list[float]
    keep: list[list[int]]
    r_quantiles: dict[str, float]  # quantile (as a string) -> r
    successes: list[int] | None = None
    n: int | None = None
    asr: list[float] | None = None


@dataclass(frozen=True, kw_only=True)
class SparsityRecord(_Sparse):
    """Step ``sparsity_<vector>_bypass``: ASR vs sparsity per matched-k rule (``asr``, empty without
    evaluation), the kept dimensions (``keep``), and paper A's own rule (``paper``)."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("dense_asr", "paper")

    vector: str
    setting: str
    sparsities: list[float]
    tau: list[float]
    asr: dict[str, list[float]]
    keep: dict[str, list[list[int]]]
    headline_rule: str
    n_eval: int
    dense_asr: float | None = None
    paper: PaperRule | None = None  # None: a record made before the paper rule


@dataclass(frozen=True)
class AgreementRow(Record):
    """Kept-set agreement of two vectors at one grid point (:class:`steerscope.analyses.sparsity.Agreement`)."""

    sparsity: float
    iou: float
    p_value: float
    expected_iou: float


@dataclass(frozen=True)
class NullRow(Record):
    """The random-vector null at one grid point (:class:`steerscope.analyses.sparsity.NullTest`)."""

    iou: float
    null_mean: float
    null_q95: float
    p_value: float
    n_null: int


@dataclass(frozen=True)
class IouRecord(Record):
    """Step ``iou_bypass``: per ``"method:a-b"`` pair the agreement rows and (``n_null`` > 0) the null rows."""

    setting: str
    pairs: dict[str, list[AgreementRow]]
    null: dict[str, list[NullRow]] = field(default_factory=dict)
    n_null: int = 0


@dataclass(frozen=True)
class Fallbacks(Record):
    """The ``--json`` summary's count of attribution sets whose "fewer than 2 flips: all prompts" fallback fired."""

    fired: int
    of: int
    sets: list[str]  # "<vector>_<setting>"


@dataclass(frozen=True)
class StudyRecords:
    """The finished steps' records of one run (unfinished steps are absent), for the summary and the report.

    Example:
        >>> StudyRecords.load(Run("runs/refusal-mechanisms"), ["dim", "po"]).ablations["bypass"].none
    """

    names: list[str]  # the vectors
    ablations: dict[str, AblationsRecord]  # by setting
    attribution: dict[tuple[str, str], AttributionRecord]  # by (vector, setting)
    exact: ExactCheckRecord | None
    circuits: dict[tuple[str, str], CircuitsRecord]  # by (vector, setting)
    compare: dict[str, CircuitCompareRecord]  # by setting
    svv: dict[str, SvvRecord]  # by vector
    sparsity: dict[str, SparsityRecord]  # by vector (bypass)
    iou: IouRecord | None

    @classmethod
    def load(cls, run: Run, names: list[str]) -> StudyRecords:
        """The records of ``run``'s finished steps for the vectors ``names``."""
        def get(step: str, rec: type[R]) -> R | None:
            return run.load_record(step, rec) if run.done(step) else None

        def keep(pairs: dict[K, R | None]) -> dict[K, R]:
            return {k: v for k, v in pairs.items() if v is not None}

        by_vs = [(n, s) for n in names for s in SETTINGS]
        return cls(names, keep({s: get(ablations_step(s), AblationsRecord) for s in SETTINGS}),
                   keep({k: get(attribution_step(*k), AttributionRecord) for k in by_vs}),
                   get(EXACT_CHECK, ExactCheckRecord), keep({k: get(circuits_step(*k), CircuitsRecord) for k in by_vs}),
                   keep({s: get(circuit_compare_step(s), CircuitCompareRecord) for s in SETTINGS}),
                   keep({n: get(svv_step(n), SvvRecord) for n in names}),
                   keep({n: get(sparsity_step(n), SparsityRecord) for n in names}), get(iou_step(), IouRecord))


__all__ = ["ABLATION_MODES", "EXACT_CHECK", "SETTINGS", "AblationsRecord", "AgreementRow", "AttributionRecord",
           "CircuitCompareRecord", "CircuitsRecord", "Controls", "ExactCheckRecord", "Fallbacks", "FlipFilter", "Heldout",
           "IouRecord", "LensHead", "LensTokens", "NullRow", "PaperRule", "RawLens", "SparsityRecord", "StudyRecords",
           "SvvRecord", "TopNode", "ablations_step", "attr_tensors", "attribution_step", "circuit_compare_step", "circuit_tensors",
           "circuits_step", "iou_step", "sparsity_step", "svv_step"]
