"""Transfer of trained vectors between two models of the same depth and width, both directions.

For the study model A and its sibling B (default ``smollm2-135m-safe``, a fine-tune of
SmolLM2-135M-Instruct): B's own penultimate-layer vector is trained with the same trainer, budget
and seed as A's; then A's vector is applied to B and B's to A. Every condition is evaluated greedily
on the same test problems, so differences are paired: transferred vs the target's unsteered
accuracy and vs the target's own trained vector (Sinii et al. 2025 copy the biases the same way).
"""

from __future__ import annotations

from typing import Any

from steerscope.models.load import LM, load_model
from steerscope.steer import steering
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.runner import Run
from steerscope.vector import SteeringVector


def _frozen(name: str, device: str) -> LM:
    lm = load_model(name, device=device)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return lm


def transfer_runs(run: Run, lm: LM, cfg: ReasoningConfig, layer: int, test: list, base_eval: dict,
                  own_eval: dict, device: str) -> dict | None:
    """Resumable steps ``transfer_*``; returns the summary (None when no transfer model is set)."""
    if not cfg.transfer_model:
        return None
    tgt = _frozen(cfg.transfer_model, device)
    if (tgt.n_layers, tgt.d_model) != (lm.n_layers, lm.d_model):
        return {"done": False, "note": f"{cfg.transfer_model} has {tgt.n_layers} layers and d_model {tgt.d_model}, "
                f"{cfg.model} {lm.n_layers} and {lm.d_model}: transfer needs the same depth and width"}
    name = f"B_L{layer}"
    t = run.step(f"train_{name}", lambda: st.train_vector(run, tgt, cfg, name, [layer]))
    vec_a, vec_b = st.load_vector(run, f"L{layer}"), st.load_vector(run, name)
    b_base = run.step("transfer_B_base", lambda: st.evaluate(tgt, test, cfg, "B base", samples=0))
    b_own = run.step("transfer_B_own", lambda: st.evaluate(tgt, test, cfg, "B own", lambda: steering(tgt, vec_b, 1.0),
                                                           samples=0))
    va_on_b = an.transfer_vector(vec_a, tgt)
    a_to_b = run.step("transfer_A_to_B", lambda: st.evaluate(
        tgt, test, cfg, "A's vector on B", lambda: steering(tgt, va_on_b, 1.0), samples=0))
    vb_on_a = an.transfer_vector(vec_b, lm)
    b_to_a = run.step("transfer_B_to_A", lambda: st.evaluate(
        lm, test, cfg, "B's vector on A", lambda: steering(lm, vb_on_a, 1.0), samples=0))
    return transfer_summary(cfg.model, cfg.transfer_model, base_eval, own_eval, b_base, b_own, a_to_b, b_to_a,
                            vec_a, vec_b, t)


def _cmp(ref: dict, ev: dict) -> dict[str, Any]:
    return {"diff": an.paired_diff(ref["greedy"], ev["greedy"]), "mcnemar_p": an.mcnemar_p(ref["greedy"], ev["greedy"])}


def transfer_summary(a: str, b: str, a_base: dict, a_own: dict, b_base: dict, b_own: dict, a_to_b: dict,
                     b_to_a: dict, vec_a: SteeringVector, vec_b: SteeringVector, train_b: dict) -> dict:
    """Accuracies and paired comparisons for both directions, and the two vectors' cosine."""
    layer = vec_a.layers[0]
    cos = float((vec_a[layer] @ vec_b[layer]) / (vec_a[layer].norm() * vec_b[layer].norm()).clamp_min(1e-12))
    acc = {k: {"greedy_acc": e["greedy_acc"], "greedy_ci": e["greedy_ci"], "n": e["n"]}
           for k, e in (("A_base", a_base), ("A_own", a_own), ("B_base", b_base), ("B_own", b_own),
                        ("A_to_B", a_to_b), ("B_to_A", b_to_a))}
    return {"done": True, "model_a": a, "model_b": b, "layer": layer, "accuracy": acc, "cosine_a_b": cos,
            "norm_a": float(vec_a[layer].norm()), "norm_b": float(vec_b[layer].norm()),
            "train_b_seconds": train_b.get("train_seconds"),
            "on_B": {"transferred_vs_base": _cmp(b_base, a_to_b), "transferred_vs_own": _cmp(b_own, a_to_b),
                     "own_vs_base": _cmp(b_base, b_own)},
            "on_A": {"transferred_vs_base": _cmp(a_base, b_to_a), "transferred_vs_own": _cmp(a_own, b_to_a),
                     "own_vs_base": _cmp(a_base, a_own)}}
