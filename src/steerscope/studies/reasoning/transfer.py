"""Transfer of trained vectors between two models of the same depth and width, both directions.

For the study model A and a model B of the same shape (default ``smollm2-135m-safe``, which is A
plus a merged LoRA safety fine-tune: a LoRA fine-tune *of A*, not a separately trained model; no pair
of separately trained same-shape models ships -- SmolLM2-135M has 30 layers and d_model 576, Gemma 3
270M 18 and 640, Qwen2.5-Coder-0.5B 24 and 896; :func:`relation` names the pair in every record): B's own penultimate-layer vector is trained with the same trainer, budget
and seed as A's; then A's vector is applied to B and B's to A. Every condition is evaluated greedily
on the same test problems, so differences are paired: transferred vs the target's unsteered
accuracy and vs the target's own trained vector (Sinii et al. 2025 copy the biases the same way).
"""

from __future__ import annotations

from steerscope.models.load import LM, load_model
from steerscope.runs import Run
from steerscope.stats import mcnemar_p, paired_diff
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import records as rc
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.records import Accuracy, Comparison, EvalRecord, TrainRecord, TransferSummary
from steerscope.studies.reasoning.task import Problem
from steerscope.vector import SteeringVector


def relation(a: str, b: str) -> str:
    """What B is with respect to A, for the verdict: a LoRA fine-tune of A when B's built-in alias is A plus
    an adapter, else a separately loaded model of the same shape whose training relation is not known here."""
    from steerscope.models.load import ALIASES

    al = ALIASES.get(b)
    if al is not None and al.adapter is not None and al.base == a:
        return f"{b} is a LoRA fine-tune of {a} (merged adapter), not a separately trained model"
    return f"{b} is a separately loaded model of {a}'s shape; how it was trained relative to {a} is not recorded"


def _frozen(name: str, device: str, dtype: str = "float32") -> LM:
    lm = load_model(name, device=device, dtype=dtype)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return lm


def load_target(cfg: ReasoningConfig, lm: LM, device: str) -> tuple[LM | None, str | None]:
    """The transfer model B (frozen), or None and the reason (not set, or another depth or width)."""
    if not cfg.transfer or not cfg.transfer_model:
        return None, "transfer switched off (--no-transfer) or no --transfer-model"
    tgt = _frozen(cfg.transfer_model, device, cfg.dtype)
    if (tgt.n_layers, tgt.d_model) != (lm.n_layers, lm.d_model):
        return None, (f"{cfg.transfer_model} has {tgt.n_layers} layers and d_model {tgt.d_model}, {cfg.model} "
                      f"{lm.n_layers} and {lm.d_model}: transfer needs the same depth and width")
    return tgt, None


def a_to_b(run: Run, tgt: LM, cfg: ReasoningConfig, layer: int, test: list[Problem]) -> dict[str, EvalRecord]:
    """Steps ``transfer_B_base`` and ``transfer_A_to_B`` (no training).

    Example:
        >>> a_to_b(run, tgt, cfg, 28, test)["A_to_B"].greedy_acc
    """
    va_on_b = an.transfer_vector(st.load_vector(run, rc.vector_name(layer)), tgt)
    out = {"B_base": run.record(rc.TRANSFER_B_BASE, EvalRecord, lambda: st.evaluate(tgt, test, cfg, "B base", samples=0)),
           "A_to_B": run.record(rc.TRANSFER_A_TO_B, EvalRecord, lambda: st.evaluate(
               tgt, test, cfg, "A's vector on B", va_on_b, samples=0))}
    return {k: v for k, v in out.items() if v is not None}


def b_to_a(run: Run, lm: LM, tgt: LM, cfg: ReasoningConfig, layer: int, test: list[Problem]
           ) -> tuple[TrainRecord | None, dict[str, EvalRecord]]:
    """Steps ``train_B_L<l>`` (B's own vector, same trainer, budget and seed), ``transfer_B_own``, ``transfer_B_to_A``.

    Returns B's training record (None when not trained) and the evaluations under ``B_own`` and ``B_to_A``.

    Example:
        >>> trained, evals = b_to_a(run, lm, tgt, cfg, 28, test)
    """
    name = rc.b_name(layer)
    t = run.record(rc.train_step(name), TrainRecord, lambda: st.train_vector(run, tgt, cfg, name, [layer]))
    if t is None:  # --report-only and not trained yet
        return None, {}
    vec_b = st.load_vector(run, name)
    own = run.record(rc.TRANSFER_B_OWN, EvalRecord, lambda: st.evaluate(tgt, test, cfg, "B own", vec_b, samples=0))
    vb_on_a = an.transfer_vector(vec_b, lm)
    back = run.record(rc.TRANSFER_B_TO_A, EvalRecord, lambda: st.evaluate(
        lm, test, cfg, "B's vector on A", vb_on_a, samples=0))
    out = {"B_own": own, "B_to_A": back}
    return t, {k: v for k, v in out.items() if v is not None}


def _cmp(ref: EvalRecord, ev: EvalRecord) -> Comparison:
    return Comparison(paired_diff(ref.greedy, ev.greedy), mcnemar_p(ref.greedy, ev.greedy))


def transfer_summary(a: str, b: str, layer: int, parts: dict[str, EvalRecord], vec_a: SteeringVector,
                     vec_b: SteeringVector | None) -> TransferSummary:
    """Accuracies and paired comparisons for the directions that have run, and the two vectors' cosine.

    ``parts`` holds evaluation records under ``A_base``, ``A_own``, ``B_base``, ``A_to_B`` and, once B's
    vector is trained, ``B_own`` and ``B_to_A``.

    Example:
        >>> transfer_summary("A", "B", 28, parts, vec_a, None).on_B["transferred_vs_base"].diff
    """
    on_a: dict[str, Comparison] = {}
    on_b: dict[str, Comparison] = {}
    cos = norm_b = None
    if "A_to_B" in parts and "B_base" in parts:
        on_b["transferred_vs_base"] = _cmp(parts["B_base"], parts["A_to_B"])
    if vec_b is not None and "B_own" in parts and "B_to_A" in parts:
        sa, sb = vec_a[layer], vec_b[layer]
        cos = float((sa @ sb) / (sa.norm() * sb.norm()).clamp_min(1e-12))
        norm_b = float(sb.norm())
        on_b["transferred_vs_own"] = _cmp(parts["B_own"], parts["A_to_B"])
        on_b["own_vs_base"] = _cmp(parts["B_base"], parts["B_own"])
        on_a["transferred_vs_base"] = _cmp(parts["A_base"], parts["B_to_A"])
        on_a["transferred_vs_own"] = _cmp(parts["A_own"], parts["B_to_A"])
    on_a["own_vs_base"] = _cmp(parts["A_base"], parts["A_own"])
    return TransferSummary(True, a, b, relation(a, b), layer, {k: Accuracy.of(e) for k, e in parts.items()},
                           float(vec_a[layer].norm()), on_a, on_b, cos, norm_b)
