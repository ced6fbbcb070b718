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

from typing import Any

from steerscope.models.load import LM, load_model
from steerscope.runs import Run
from steerscope.stats import mcnemar_p, paired_diff
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.vector import SteeringVector


def relation(a: str, b: str) -> str:
    """What B is with respect to A, for the verdict: a LoRA fine-tune of A when B's built-in alias is A plus
    an adapter, else a separately loaded model of the same shape whose training relation is not known here."""
    from steerscope.models.load import ALIASES

    al = ALIASES.get(b)
    if al is not None and al.adapter is not None and al.base == a:
        return f"{b} is a LoRA fine-tune of {a} (merged adapter), not a separately trained model"
    return f"{b} is a separately loaded model of {a}'s shape; how it was trained relative to {a} is not recorded"


def _frozen(name: str, device: str) -> LM:
    lm = load_model(name, device=device)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return lm


def load_target(cfg: ReasoningConfig, lm: LM, device: str) -> tuple[LM | None, str | None]:
    """The transfer model B (frozen), or None and the reason (not set, or another depth or width)."""
    if not cfg.transfer or not cfg.transfer_model:
        return None, "transfer switched off (--no-transfer) or no --transfer-model"
    tgt = _frozen(cfg.transfer_model, device)
    if (tgt.n_layers, tgt.d_model) != (lm.n_layers, lm.d_model):
        return None, (f"{cfg.transfer_model} has {tgt.n_layers} layers and d_model {tgt.d_model}, {cfg.model} "
                      f"{lm.n_layers} and {lm.d_model}: transfer needs the same depth and width")
    return tgt, None


def a_to_b(run: Run, tgt: LM, cfg: ReasoningConfig, layer: int, test: list[Any]) -> dict[str, dict[str, Any]]:
    """Steps ``transfer_B_base`` and ``transfer_A_to_B`` (no training)."""
    va_on_b = an.transfer_vector(st.load_vector(run, f"L{layer}"), tgt)
    out = {"B_base": run.step("transfer_B_base", lambda: st.evaluate(tgt, test, cfg, "B base", samples=0)),
           "A_to_B": run.step("transfer_A_to_B", lambda: st.evaluate(
               tgt, test, cfg, "A's vector on B", va_on_b, samples=0))}
    return {k: v for k, v in out.items() if v is not None}


def b_to_a(run: Run, lm: LM, tgt: LM, cfg: ReasoningConfig, layer: int, test: list[Any]) -> dict[str, dict[str, Any]]:
    """Steps ``train_B_L<l>`` (B's own vector, same trainer, budget and seed), ``transfer_B_own``, ``transfer_B_to_A``."""
    name = f"B_L{layer}"
    t = run.step(f"train_{name}", lambda: st.train_vector(run, tgt, cfg, name, [layer]))
    if t is None:  # --report-only and not trained yet
        return {}
    vec_b = st.load_vector(run, name)
    own = run.step("transfer_B_own", lambda: st.evaluate(tgt, test, cfg, "B own", vec_b, samples=0))
    vb_on_a = an.transfer_vector(vec_b, lm)
    back = run.step("transfer_B_to_A", lambda: st.evaluate(
        lm, test, cfg, "B's vector on A", vb_on_a, samples=0))
    out = {"train_B": t, "B_own": own, "B_to_A": back}
    return {k: v for k, v in out.items() if v is not None}


def _cmp(ref: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    return {"diff": paired_diff(ref["greedy"], ev["greedy"]), "mcnemar_p": mcnemar_p(ref["greedy"], ev["greedy"])}


def transfer_summary(a: str, b: str, layer: int, parts: dict[str, dict[str, Any]], vec_a: SteeringVector,
                     vec_b: SteeringVector | None) -> dict[str, Any]:
    """Accuracies and paired comparisons for the directions that have run, and the two vectors' cosine.

    ``parts`` holds evaluation records under ``A_base``, ``A_own``, ``B_base``, ``A_to_B`` and, once B's
    vector is trained, ``B_own`` and ``B_to_A``.
    """
    acc = {k: {"greedy_acc": e["greedy_acc"], "greedy_ci": e["greedy_ci"], "n": e["n"]}
           for k, e in parts.items() if "greedy" in e}
    out: dict[str, Any] = {"done": True, "model_a": a, "model_b": b, "relation": relation(a, b), "layer": layer, "accuracy": acc,
                           "norm_a": float(vec_a[layer].norm()), "on_A": {}, "on_B": {}}
    if "A_to_B" in parts and "B_base" in parts:
        out["on_B"]["transferred_vs_base"] = _cmp(parts["B_base"], parts["A_to_B"])
    if vec_b is not None and "B_own" in parts and "B_to_A" in parts:
        sa, sb = vec_a[layer], vec_b[layer]
        out["cosine_a_b"] = float((sa @ sb) / (sa.norm() * sb.norm()).clamp_min(1e-12))
        out["norm_b"] = float(sb.norm())
        out["on_B"]["transferred_vs_own"] = _cmp(parts["B_own"], parts["A_to_B"])
        out["on_B"]["own_vs_base"] = _cmp(parts["B_base"], parts["B_own"])
        out["on_A"]["transferred_vs_base"] = _cmp(parts["A_base"], parts["B_to_A"])
        out["on_A"]["transferred_vs_own"] = _cmp(parts["A_own"], parts["B_to_A"])
    out["on_A"]["own_vs_base"] = _cmp(parts["A_base"], parts["A_own"])
    return out
