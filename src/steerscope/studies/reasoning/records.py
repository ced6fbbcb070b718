"""The reasoning study's typed step records, the step names, and the ``summary.json`` record.

Each step returns one of these frozen records; the run store writes its ``to_dict()`` (the JSON keys
are the field names in field order, so run folders of earlier versions are read as before) and the
pipeline and the report read attributes. Records whose JSON leaves keys out when they do not apply
(a pair without a jointly trained vector, an SAE split with one class only, a transfer that did not
run) override ``to_dict``.

Example:
    >>> ch = Changed(3, 1, 2, 10, 0.625)
    >>> Changed.from_dict(ch.to_dict()) == ch
    True
    >>> train_step(vector_name(28)), eval_step(seed_name(28, 1))
    ('train_L28', 'eval_L28_seed1')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerscope.analyses.records import Record

DATA, EVAL_BASE, LENS, FIRST_TOKEN, PATCHING, PERSISTENCE, PAIRS, CONTROL, LORA = (
    "data", "eval_base", "lens", "first_token", "patching", "persistence", "pairs", "control_random", "lora")
SAE, GATE_VALUES = "sae", "gate_values"
TRANSFER_B_BASE, TRANSFER_A_TO_B, TRANSFER_B_OWN, TRANSFER_B_TO_A = (
    "transfer_B_base", "transfer_A_to_B", "transfer_B_own", "transfer_B_to_A")


def vector_name(layer: int) -> str:
    """The single-layer vector of ``layer`` (``L<l>``; also its evaluation's name)."""
    return f"L{layer}"


def seed_name(layer: int, seed: int) -> str:
    """The layer-``layer`` vector retrained with sampling seed ``seed`` (``L<l>_seed<s>``)."""
    return f"L{layer}_seed{seed}"


def gated_name(layer: int) -> str:
    """The gated layer-``layer`` vector (``L<l>_gated``)."""
    return f"L{layer}_gated"


def b_name(layer: int) -> str:
    """The transfer model B's own layer-``layer`` vector (``B_L<l>``)."""
    return f"B_L{layer}"


def pair_name(a: int, b: int) -> str:
    """The vector trained jointly at layers ``a`` and ``b`` (``pair_L<a>_L<b>``)."""
    return f"pair_L{a}_L{b}"


def train_step(name: str) -> str:
    """The step that trains vector ``name``."""
    return f"train_{name}"


def eval_step(name: str) -> str:
    """The step that evaluates vector ``name``."""
    return f"eval_{name}"


def prefix_step(name: str) -> str:
    """The prefix control of vector ``name``."""
    return f"prefix_{name}"


def _without_none(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``d`` without those of ``keys`` whose value is None (keys the JSON leaves out when they do not apply)."""
    return {k: v for k, v in d.items() if not (k in keys and v is None)}


@dataclass(frozen=True)
class DataRecord(Record):
    """Step ``data``: the train and test problems (``{"question", "answer"}`` each)."""

    train: list[dict[str, str]]
    test: list[dict[str, str]]


@dataclass(frozen=True)
class EvalRecord(Record):
    """One condition's accuracy on the test set (:meth:`analyses.EvalResult.summary`): greedy with a Wilson
    interval, pass@1 over ``k`` samples per problem (sample-major outcomes) with a cluster-bootstrap interval."""

    name: str
    greedy_acc: float
    greedy_ci: tuple[float, float]
    sampled_acc: float | None
    sampled_ci: tuple[float, float] | None
    sampled_ci_kind: str | None
    n: int
    k: int
    n_sampled: int
    greedy: list[int]
    sampled: list[int]
    examples: list[str]


@dataclass(frozen=True)
class Accuracy(Record):
    """Greedy accuracy, its Wilson interval and the number of problems."""

    greedy_acc: float
    greedy_ci: tuple[float, float]
    n: int

    @classmethod
    def of(cls, ev: EvalRecord) -> Accuracy:
        return cls(ev.greedy_acc, ev.greedy_ci, ev.n)


@dataclass(frozen=True)
class HistoryRow(Record):
    """One RLOO step of a training log (:class:`steerscope.extract.result.StepLog`)."""

    step: int
    reward: float
    accuracy: float
    loss: float
    grad_norm: float
    gen_tokens: float
    n_active: int
    seconds: float


@dataclass(frozen=True)
class TrainRecord(Record):
    """Step ``train_<name>``: a trained steering bias (its layers, size, log and per-layer norms)."""

    name: str
    layers: list[int]
    n_trainable: int
    train_seconds: float
    history: list[HistoryRow]
    norms: dict[str, float]  # by layer (as a string)
    resumed_from: int


@dataclass(frozen=True)
class LoraRecord(Record):
    """Step ``lora``: the LoRA baseline's training log and its evaluation."""

    name: str
    n_trainable: int
    train_seconds: float
    history: list[HistoryRow]
    eval: EvalRecord
    resumed_from: int


@dataclass(frozen=True)
class LensRow(Record):
    """The top tokens of W_U·s of one vector at one layer, with or without the final norm."""

    vector: str
    layer: int
    final_norm: bool
    tokens: list[str]
    scores: list[float]


@dataclass(frozen=True)
class LensRecord(Record):
    """Step ``lens``."""

    rows: list[LensRow]


@dataclass(frozen=True)
class FirstTokenRecord(Record):
    """Step ``first_token``: the top k tokens up and down as (token, mean ΔP, P base, P steered), and the
    mean total-variation distance."""

    up: list[tuple[str, float, float, float]]
    down: list[tuple[str, float, float, float]]
    total_variation: float


@dataclass(frozen=True)
class PatchRow(Record):
    """One (which, head) patch of the last layer's q, k or v (``head`` is ``"all"`` for every head)."""

    which: str
    head: int | str
    kl: float
    logprob: float
    effect_removed: float
    logprob_base: float
    logprob_steered: float


@dataclass(frozen=True)
class PatchingRecord(Record):
    """Step ``patching``: the patched vector's layer and each patch."""

    layer: int
    rows: list[PatchRow]


@dataclass(frozen=True)
class PersistenceRow(Record):
    """At resid_post of one later layer: mean cos(Δh_t, mean Δh), mean cos(Δh_t, s), mean |Δh_t|."""

    layer: int
    cos_mean: float
    cos_s: float
    norm: float


@dataclass(frozen=True)
class VectorPersistence(Record):
    """The persistence rows of one single-layer vector."""

    vector: str
    rows: list[PersistenceRow]


@dataclass(frozen=True)
class PersistenceRecord(Record):
    """Step ``persistence``."""

    vectors: list[VectorPersistence]


@dataclass(frozen=True)
class Changed(Record):
    """Paired 0/1 outcomes: wrong→right, right→wrong, their net, n, and the exact McNemar p."""

    wrong_to_right: int
    right_to_wrong: int
    net: int
    n: int
    mcnemar_p: float


@dataclass(frozen=True)
class SampledComparison(Record):
    """pass@1 against base: mean difference [paired bootstrap interval], Wilcoxon p, problems better / worse."""

    diff: tuple[float, float, float]
    wilcoxon_p: float
    n: int
    better: int
    worse: int


@dataclass(frozen=True)
class PrefixEval(Record):
    """Step ``prefix_<name>``: vector ``name``'s top lens token written at the start of the response."""

    token: str
    vector: str
    eval: EvalRecord


@dataclass(frozen=True)
class PrefixRow(Record):
    """The prefix control of one vector against that vector's gain (:func:`analyses.prefix_summary`)."""

    token: str
    layer: int
    gain_vector: float
    gain_prefix: float
    ratio: float
    vector_vs_base: Changed
    prefix_vs_base: Changed
    prefix_vs_vector: Changed
    sampled_prefix_vs_base: SampledComparison | None


@dataclass(frozen=True)
class PrefixRecord(Record):
    """The prefix controls of the run."""

    rows: list[PrefixRow]


@dataclass(frozen=True)
class PairRow(Record):
    """Two single-layer vectors together, and (with ``joint_pairs``) the pair trained jointly; the JSON
    leaves ``joint_train`` / ``joint_eval`` out when no pair was trained, ``joint_gain`` when not computed."""

    pair: list[int]
    eval: EvalRecord
    joint_train: TrainRecord | None = None
    joint_eval: EvalRecord | None = None
    gain: float | None = None
    joint_gain: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _without_none(super().to_dict(), ("joint_train", "joint_eval", "joint_gain"))


@dataclass(frozen=True)
class PairsRecord(Record):
    """Step ``pairs``."""

    pairs: list[PairRow]


@dataclass(frozen=True)
class ControlRecord(Record):
    """Step ``control_random``: a random direction of the trained vector's norm at its layer."""

    layer: int
    norm: float
    eval: EvalRecord


@dataclass(frozen=True)
class Comparison(Record):
    """Paired greedy difference (second minus first) [95% interval] and the McNemar p."""

    diff: tuple[float, float, float]
    mcnemar_p: float


@dataclass(frozen=True)
class GateRow(Record):
    """One prompt's tokens, their categories and g_t."""

    tokens: list[str]
    categories: list[str]
    gate: list[float]


@dataclass(frozen=True)
class GateValuesRecord(Record):
    """Step ``gate_values``."""

    rows: list[GateRow]


@dataclass(frozen=True)
class GateMass(Record):
    """One token category: tokens, token share, share of the gate mass, mean g, mean |g - 1|."""

    tokens: int
    token_share: float
    mass_share: float
    mean_gate: float
    mean_abs_dev: float


@dataclass(frozen=True)
class GateSummary(Record):
    """The gated vector against the plain one and base, and where its gate mass goes."""

    layer: int
    n_trainable: int
    norm: float
    gate_b: float
    gate_w_norm: float
    eval: Accuracy
    vs_plain: Comparison
    vs_base: Comparison
    mass: dict[str, GateMass]
    n_prompts: int
    heatmap: list[GateRow]


@dataclass(frozen=True)
class SeedRun(Record):
    """One training seed's evaluation and the vector's norm at its layer."""

    seed: int
    eval: EvalRecord
    norm: float | None = None


@dataclass(frozen=True)
class SeedRow(Record):
    """One seed's greedy accuracy and its paired difference to base."""

    label: str
    seed: int
    greedy_acc: float
    greedy_ci: tuple[float, float]
    diff: tuple[float, float, float]
    mcnemar_p: float
    gained: int
    lost: int
    norm: float | None


@dataclass(frozen=True)
class SeedsSummary(Record):
    """The headline over seeds: a row per seed, the mean and spread of the differences."""

    rows: list[SeedRow]
    n: int
    base_acc: float
    mean_diff: float | None
    sd_diff: float | None
    min_diff: float | None
    max_diff: float | None
    n_significant: int


@dataclass(frozen=True)
class TransferSummary(Record):
    """Transfer both ways between A and B; when it did not run, only ``done`` (False) and ``note``. The
    cosine and B's norm are left out until B's own vector is trained."""

    done: bool
    model_a: str | None = None
    model_b: str | None = None
    relation: str | None = None
    layer: int | None = None
    accuracy: dict[str, Accuracy] = field(default_factory=dict)
    norm_a: float | None = None
    on_A: dict[str, Comparison] = field(default_factory=dict)
    on_B: dict[str, Comparison] = field(default_factory=dict)
    cosine_a_b: float | None = None
    norm_b: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if not self.done:
            return {"done": False, "note": self.note}
        return _without_none(d, ("cosine_a_b", "norm_b", "note"))


@dataclass(frozen=True)
class Generation(Record):
    """One sampled completion of a train prompt (SAE step), steered or not, and whether it is correct."""

    prompt: int
    text: str
    completion: str
    steered: bool
    correct: int


@dataclass(frozen=True)
class Correctness(Record):
    """Held-out AUROC of the features selected on the training half, with a permutation baseline; only
    ``note`` when a split has one class."""

    features: list[int] | None = None
    auroc_train: list[float] | None = None
    auroc_heldout: list[float] | None = None
    best_heldout_oriented: float | None = None
    null_mean: float | None = None
    null_q95: float | None = None
    n_perm: int | None = None
    p_perm: float | None = None
    n_train: int | None = None
    n_heldout: int | None = None
    pos_rate: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclass(frozen=True)
class Alignment(Record):
    """max_j |cos(W_dec[j], s)|, its feature and sign, the top 5 (feature, cos), and random directions' maxima."""

    max_abs_cos: float
    feature: int
    sign: float
    top: list[tuple[int, float]]
    random_mean: float
    random_q95: float
    random_max: float


@dataclass(frozen=True)
class MaxToken(Record):
    """One max-activating token with its context."""

    value: float
    token: str
    context: str
    in_completion: bool


@dataclass(frozen=True)
class MaxActivating(Record):
    """A feature's max-activating tokens."""

    feature: int
    top: list[MaxToken]


@dataclass(frozen=True)
class SaeFit(Record):
    """One SAE (on activations or on steered − unsteered differences): fit, correctness, alignment."""

    fve_train: float
    l0_train: float
    fve_heldout: float
    l0_heldout: float
    dead_fraction: float
    n_tokens_train: int
    n_tokens_heldout: int
    width: int
    k: int
    correctness: Correctness
    alignment: Alignment
    max_activating: list[MaxActivating]


@dataclass(frozen=True)
class SaeExample(Record):
    """A generation shown in the report."""

    completion: str
    steered: bool
    correct: int


@dataclass(frozen=True)
class SaeRecord(Record):
    """Step ``sae``: the SAE and the DiffSAE of the penultimate-layer vector's generations."""

    layer: int
    diff_layer: int
    n_generations: int
    n_prompts: int
    n_steered: int
    sampled_acc: dict[str, float]
    sae: SaeFit
    diffsae: SaeFit
    diff_mean_cos_s: float
    examples: list[SaeExample]


@dataclass(frozen=True)
class Findings(Record):
    """What the run found beyond accuracy (each None when it did not run): the extras (``sae``, ``seeds``,
    ``transfer``, ``gate``) and the mechanism steps."""

    sae: SaeRecord | None = None
    seeds: SeedsSummary | None = None
    transfer: TransferSummary | None = None
    gate: GateSummary | None = None
    first_token: FirstTokenRecord | None = None
    prefix: PrefixRecord | None = None
    patching: PatchingRecord | None = None
    persistence: PersistenceRecord | None = None
    pairs: PairsRecord | None = None
    control: ControlRecord | None = None


@dataclass(frozen=True)
class FamilyRow(Record):
    """One paired comparison: raw and Holm-adjusted p and the verdict."""

    name: str
    test: str
    p: float
    n: int
    effect: float | None
    p_holm: float
    verdict: str


@dataclass(frozen=True)
class Family(Record):
    """Every paired comparison of a run, Holm-corrected at ``alpha``."""

    alpha: float
    m: int
    rows: list[FamilyRow]


@dataclass(frozen=True)
class AccuracyRow(Record):
    """One condition in the summary: greedy and pass@1 accuracy with their intervals."""

    greedy: float
    greedy_ci: tuple[float, float]
    sampled: float | None
    sampled_ci: tuple[float, float] | None
    n: int
    k: int | None


@dataclass(frozen=True)
class PairedVsBase(Record):
    """One condition against base: greedy paired difference, changed answers, pass@1 comparison."""

    greedy: tuple[float, float, float]
    greedy_changed: Changed
    sampled: SampledComparison | None


@dataclass(frozen=True)
class Summary(Record):
    """``summary.json`` (and the ``--json`` output, with the report's path and the run folder added)."""

    accuracy: dict[str, AccuracyRow]
    mcnemar_p_vs_base: dict[str, float]
    paired_vs_base: dict[str, PairedVsBase]
    family: Family
    n_trainable: dict[str, int]
    seconds: float
    report: str | None = None
    run: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _without_none(super().to_dict(), ("report", "run"))


__all__ = ["Accuracy", "AccuracyRow", "Alignment", "Changed", "Comparison", "ControlRecord", "Correctness",
           "DataRecord", "EvalRecord", "Family", "FamilyRow", "Findings", "FirstTokenRecord", "GateMass", "GateRow",
           "GateSummary", "GateValuesRecord", "Generation", "HistoryRow", "LensRecord", "LensRow", "LoraRecord",
           "MaxActivating", "MaxToken", "PairRow", "PairedVsBase", "PairsRecord", "PatchRow", "PatchingRecord",
           "PersistenceRecord", "PersistenceRow", "PrefixEval", "PrefixRecord", "PrefixRow", "SaeExample", "SaeFit",
           "SaeRecord", "SampledComparison", "SeedRow", "SeedRun", "SeedsSummary", "Summary", "TrainRecord",
           "TransferSummary", "VectorPersistence", "b_name", "eval_step", "gated_name", "pair_name", "prefix_step",
           "seed_name", "train_step", "vector_name", "DATA", "EVAL_BASE", "LENS", "FIRST_TOKEN", "PATCHING",
           "PERSISTENCE", "PAIRS", "CONTROL", "LORA", "SAE", "GATE_VALUES", "TRANSFER_B_BASE", "TRANSFER_A_TO_B",
           "TRANSFER_B_OWN", "TRANSFER_B_TO_A"]
