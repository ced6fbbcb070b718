"""The typed records of ``tune``: its settings, the split, every trial, the search, the test figure
and the :class:`TuneResult` (each a frozen dataclass with a strict-JSON round trip).

Example:
    >>> TuneResult.from_dict(result.to_dict()) == result
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerscope.analyses.records import Record
from steerscope.explain.records import Estimate
from steerscope.vector import SteeringVector

Positions = str | list[int]


@dataclass(frozen=True)
class Settings(Record):
    """Sizes and constants of a tuning run (defaults documented in docs/tune.md).

    ``scales``: the range of the relative dose f = |alpha v| / (mean residual norm at the layer), searched
    log-uniformly; the exhaustive grid has ``n_alphas`` geometric points in it. ``kl_penalty``: objective
    units lost per nat of worst-5 % KL above the budget. ``rungs``: the validation pairs are scored in
    this many chunks, and the pruner may stop a trial after any chunk but the last.
    """

    scales: tuple[float, float] = (0.0625, 4.0)
    n_alphas: int = 8
    kl_penalty: float = 10.0
    kl_quantile: float = 0.95
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)  # train, validation, test
    n_neutral: int = 32  # shipped neutral prompts, split in halves: validation, test
    kl_tokens: int = 8  # the unsteered greedy continuation of each neutral prompt (steered as "generated")
    gen_tokens: int = 24  # greedy response length for a scorer
    extract_positions: tuple[int, ...] = (-1,)
    rungs: int = 3
    batch_size: int = 16
    n_boot: int = 1000


@dataclass(frozen=True)
class Split(Record):
    """Indices of the contrast pairs (train / validation / test) and of the shipped neutral prompts
    (validation / test), drawn with ``seed``; ``shared_prompt``: the pairs share a prompt."""

    train: list[int]
    validation: list[int]
    test: list[int]
    neutral_validation: list[int]
    neutral_test: list[int]
    seed: int
    shared_prompt: bool
    dropped: int = 0  # unpaired examples left out (the longer side's tail)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test),
                "neutral_validation": len(self.neutral_validation), "neutral_test": len(self.neutral_test),
                "dropped": self.dropped}


@dataclass(frozen=True)
class Trial(Record):
    """One configuration scored on the validation split.

    ``scale`` is the relative dose, ``alpha`` the scale handed to ``steering``; ``effect`` the mean
    behaviour effect over the pairs scored (``fraction`` of them), ``kl_worst5`` the worst-5 % KL on the
    neutral validation prompts, ``objective`` = effect - penalty. ``state``: complete, pruned or failed.
    """

    number: int
    layer: int
    positions: Positions
    scale: float
    alpha: float
    effect: float
    kl_worst5: float
    penalty: float
    objective: float
    state: str = "complete"
    fraction: float = 1.0


@dataclass(frozen=True)
class SearchRecord(Record):
    """The search: ``mode`` (tpe or exhaustive), configurations scored (``evaluations``, pruned ones
    included) against the full grid's size, their ``cost`` in full evaluations, the space, the best
    complete trial and every trial in order."""

    mode: str
    evaluations: int
    grid_size: int
    cost: float
    layers: list[int]
    positions: list[Positions]
    scales: list[float]
    best: Trial
    trials: list[Trial]
    objective: str = ""


@dataclass(frozen=True)
class Recommended(Record):
    """The chosen configuration; ``alpha_range``: ``alpha`` and the alphas at its layer and positions whose
    validation objective is within 10 % of the best and whose KL fits the budget."""

    layer: int
    alpha: float
    positions: Positions
    site: str
    kl_budget: float
    scale: float
    alpha_range: tuple[float, float]


@dataclass(frozen=True)
class TestFigure(Record):
    """The chosen configuration measured once on the test split: the effect over test pairs and the
    worst-5 % KL over the neutral test prompts (each with a bootstrap interval over prompts), and the
    same configuration's validation effect (how much the search overfits)."""

    effect: Estimate
    kl_worst5: Estimate
    validation_effect: float
    metric: str


@dataclass(frozen=True)
class TuneResult(Record):
    """What ``tune`` found. ``vector`` is the tuned vector (its ``use`` record filled), also without a run
    folder; ``summary()`` is the ``--json`` object."""

    vector_path: str | None
    recommended: Recommended
    test: TestFigure
    search: SearchRecord
    split: dict[str, int]
    seed: int
    model: str
    method: str
    scorer: str
    data_hash: str
    report_path: str | None = None
    vector: SteeringVector | None = field(default=None, compare=False, repr=False)  # the tuned vector; not in JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain data without ``vector`` (it is the file at ``vector_path``)."""
        out = super().to_dict()
        del out["vector"]
        return out

    def summary(self) -> dict[str, Any]:
        """``{"vector", "recommended", "test", "search"}`` as ``steerscope tune --json`` prints it."""
        r, t = self.recommended, self.test
        return {"vector": self.vector_path,
                "recommended": {"layer": r.layer, "alpha": r.alpha, "positions": r.positions, "site": r.site,
                                "kl_budget": r.kl_budget, "alpha_range": list(r.alpha_range)},
                "test": {"effect": t.effect.value, "ci95": list(t.effect.ci95), "n": t.effect.n,
                         "kl_worst5": t.kl_worst5.value, "metric": t.metric},
                "search": {"evaluations": self.search.evaluations, "grid_size": self.search.grid_size,
                           "mode": self.search.mode, "best_validation_objective": self.search.best.objective,
                           "split": self.split}}
