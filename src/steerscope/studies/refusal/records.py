"""The refusal study's typed step records, the step names, and ``results.json`` as a record.

Each step returns one of these frozen records; the run store writes its ``to_dict()`` (the JSON keys
are the field names in field order, so run folders and ``results.json`` files of earlier versions
are read as before) and the report reads attributes.

Example:
    >>> rec = TrainingPair("How do I bake bread?", "I can't help with that.", "Mix flour...", 1.0)
    >>> TrainingPair.from_dict(rec.to_dict()) == rec
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerscope.analyses.records import Record
from steerscope.analyses.selection import Candidate, Selection

ORGANISM_STEP, SELECT_STEP, TRAINED_DATA_STEP, TRAINED_STEP, EVALUATE_STEP, MATCHED_STEP = (
    "organism", "select", "trained_data", "trained", "evaluate", "evaluate_matched")  # the step names


@dataclass(frozen=True)
class OrganismRecord(Record):
    """Step ``organism``: the adapter used, and the shipped organism's statistics or the retraining log.

    The JSON holds ``adapter`` and ``shipped_stats`` (the shipped organism, or another model: null), or,
    after ``--retrain-organism``, ``adapter``, ``train`` and ``losses``.
    """

    adapter: str | None
    shipped_stats: dict[str, Any] | None = None  # the shipped organism's stats.json
    train: dict[str, Any] | None = None  # the retraining log without its losses
    losses: list[float] | None = None

    @property
    def retrained(self) -> bool:
        return self.train is not None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        keys = ("adapter", "train", "losses") if self.retrained else ("adapter", "shipped_stats")
        return {k: d[k] for k in keys}

    def stats(self) -> dict[str, Any]:
        """What the report's organism section shows: the shipped statistics, else the whole record."""
        return self.shipped_stats or self.to_dict()


@dataclass(frozen=True)
class CandidateRecord(Record):
    """One DIM candidate of the selection (``score`` is written for the candidates, not for the pick)."""

    layer: int
    position: int
    bypass: float
    induce: float
    kl: float | None = None
    alpha: float = 1.0
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not (k == "score" and v is None)}

    def candidate(self) -> Candidate:
        return Candidate(self.layer, self.position, self.bypass, self.induce, self.kl, self.alpha)

    @classmethod
    def of(cls, c: Candidate, scored: bool = True) -> CandidateRecord:
        return cls(c.layer, c.position, c.bypass, c.induce, c.kl, c.alpha, c.score if scored else None)


@dataclass(frozen=True)
class SelectionRecord(Record):
    """Step ``select``: the chosen (layer, position, alpha), every candidate's scores and the baselines."""

    layer: int
    position: int
    chosen: CandidateRecord
    score: float
    baseline_harmful_logodds: float
    baseline_harmless_logodds: float
    positions: list[int]
    layers: list[int]
    candidates: list[CandidateRecord]
    norm: float  # |DIM| as saved (scaled by the picked alpha)
    alpha: float = 1.0
    norms: dict[str, float] = field(default_factory=dict)  # unscaled, scaled, resid, scaled_over_resid

    @classmethod
    def of(cls, sel: Selection) -> SelectionRecord:
        c = sel.chosen
        return cls(c.layer, c.position, CandidateRecord.of(c, scored=False), c.score, sel.baseline_harmful,
                   sel.baseline_harmless, sel.positions, sel.layers, [CandidateRecord.of(x) for x in sel.candidates],
                   float(sel.vector[c.layer].norm()), c.alpha, sel.norms)

    def selection(self) -> Selection:
        """The :class:`Selection` without its vector (for the heat maps)."""
        cands = [c.candidate() for c in self.candidates]
        chosen = next(c for c in cands if c.layer == self.layer and c.position == self.position and c.alpha == self.alpha)
        return Selection(None, chosen, cands, self.baseline_harmful_logodds,  # type: ignore[arg-type]
                         self.baseline_harmless_logodds, self.positions, self.layers)


@dataclass(frozen=True)
class TrainingPair(Record):
    """One NTP/PO example: the prompt, the preferred and the rejected completion, the steering sign."""

    prompt: str
    winner: str
    loser: str
    sign: float


@dataclass(frozen=True)
class TrainedDataRecord(Record):
    """Step ``trained_data``: the kept examples out of those generated."""

    rows: list[TrainingPair]
    kept: int
    generated: int
    alpha_for_compliance: float


@dataclass(frozen=True)
class Curve(Record):
    """One trained vector's loss curves, best epoch and norm."""

    train_loss: list[float]
    val_loss: list[float]
    best_epoch: int
    norm: float


@dataclass(frozen=True)
class TrainedRecord(Record):
    """Step ``trained``: the split sizes and, per vector name (``refusal-ntp``, ``refusal-po``), its curves
    (written at the top level of the JSON under the vector's name)."""

    n_train: int
    n_val: int
    curves: dict[str, Curve]

    def to_dict(self) -> dict[str, Any]:
        return {"n_train": self.n_train, "n_val": self.n_val, **{k: c.to_dict() for k, c in self.curves.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainedRecord:
        rest = {k: v for k, v in data.items() if k not in ("n_train", "n_val") and not k.startswith("_")}
        return super().from_dict({"n_train": data.get("n_train"), "n_val": data.get("n_val"), "curves": rest})


@dataclass(frozen=True)
class Samples(Record):
    """The first (prompt, completion) pairs of each side."""

    harmful: list[tuple[str, str]]
    harmless: list[tuple[str, str]]

    def sides(self) -> dict[str, list[tuple[str, str]]]:
        return {"harmful": self.harmful, "harmless": self.harmless}


@dataclass(frozen=True)
class _Counts(Record):
    """Refusal counts; the looping counts are left out of the JSON when absent (records of older versions)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not (k.endswith("_repetitive") and v is None)}

    def counts(self) -> dict[str, Any]:
        """The record without its samples (the ``--json`` summary)."""
        return {k: v for k, v in self.to_dict().items() if k != "samples"}


@dataclass(frozen=True)
class Unsteered(_Counts):
    """Refusal rates and counts of the unsteered model on the test split."""

    harmful_refusal: float
    harmless_refusal: float
    harmful_refused: int
    harmless_refused: int
    harmful_repetitive: int | None = None  # looping completions
    harmless_repetitive: int | None = None
    samples: Samples = field(default_factory=lambda: Samples([], []))


@dataclass(frozen=True)
class Steered(_Counts):
    """One vector at one alpha: ASR on harmful prompts (-alpha), refusal on harmless ones (+alpha)."""

    method: str
    alpha: float
    norm: float
    harmful_refusal: float
    harmful_asr: float
    harmless_refusal: float
    harmful_refused: int
    harmless_refused: int
    harmful_repetitive: int | None = None
    harmless_repetitive: int | None = None
    samples: Samples = field(default_factory=lambda: Samples([], []))


@dataclass(frozen=True)
class EvaluateRecord(Record):
    """Step ``evaluate``: test-split sizes (harmful, harmless), the unsteered rates, each steered row."""

    n_test: list[int]
    unsteered: Unsteered
    steered: list[Steered]


@dataclass(frozen=True)
class MatchedRecord(Record):
    """Step ``evaluate_matched``: NTP / PO rescaled to the DIM vector's norm, at alpha 1."""

    reference_norm: float
    steered: list[Steered]


@dataclass(frozen=True)
class PickCheck(Record):
    """Whether the vector used (shipped or this run's) sits where this run's selection picked."""

    layer: int
    position: list[int] | str | None  # the vector's provenance positions
    recomputed: list[int]


@dataclass(frozen=True)
class Results(Record):
    """``results.json``: the configuration, each step's record (evaluate with the matched rows appended),
    the vectors' cosines and where the vectors came from. ``trained`` is None (``{}`` in the JSON) when
    the shipped vectors are used."""

    config: dict[str, Any]  # the run's configuration identity
    organism: OrganismRecord
    select: SelectionRecord
    trained: TrainedRecord | None
    evaluate: EvaluateRecord
    cosines: dict[str, float]
    vector_source: str
    shipped_pick_matches: PickCheck

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        return super().from_dict({**data, "trained": data.get("trained") or None})

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return d | {"trained": d["trained"] or {}}

    def to_json(self, timings: dict[str, dict[str, float]]) -> dict[str, Any]:
        """``results.json``: :meth:`to_dict` with each step's timing (``{step: {"_seconds": ...}}``; the steps
        ``organism``, ``select``, ``trained`` and ``evaluate`` are also the fields) beside its record."""
        d = self.to_dict()
        return d | {name: d[name] | t for name, t in timings.items() if d[name]}

    @property
    def model(self) -> str:
        return str(self.config["model"])

    @property
    def max_new_tokens(self) -> int:
        return int(self.config["max_new_tokens"])


__all__ = ["CandidateRecord", "Curve", "EvaluateRecord", "MatchedRecord", "OrganismRecord", "PickCheck", "Results",
           "Samples", "SelectionRecord", "Steered", "TrainedDataRecord", "TrainedRecord", "TrainingPair", "Unsteered",
           "ORGANISM_STEP", "SELECT_STEP", "TRAINED_DATA_STEP", "TRAINED_STEP", "EVALUATE_STEP", "MATCHED_STEP"]
