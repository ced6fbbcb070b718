"""Card section ``dose``: effect vs alpha and a recommended alpha range (issue 11, §3).

Algorithm:
  1. Grid: alpha times ``dose_factors`` when alpha is given, else alphas with
     |alpha s| = f * (mean residual norm at the layer) for f in ``dose_scales``.
     1b. If every grid alpha exceeds the KL budget, the smallest is halved (KL only) up to 4 times
     until one fits; that alpha is added to the grid.
  2. Effect at each alpha: the behaviour metric's gap mean m_steer - mean m_base on that alpha's
     own steered greedy responses (:mod:`steerscope.explain.behaviour`); with a scorer, the
     scorer's mean on those responses minus its mean unsteered (used for the range when given).
  3. KL: on shipped neutral prompts, KL(P_base || P_steered) of the next-token distribution at
     every prompt position; the budget applies to its ``kl_quantile`` (0.95: the worst 5 %).
  4. Recommended range: from the smallest |alpha| reaching half the maximum effect to the largest
     |alpha| whose KL quantile stays within ``kl_budget`` (1 nat, as steering-lite's calibrate).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from steerscope.data import data_path, read_jsonl
from steerscope.explain.behaviour import build
from steerscope.explain.context import Context
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.steer import steering
from steerscope.vector import SteeringVector


def neutral_prompts(n: int) -> list[str]:
    """The shipped neutral prompt set (src/steerscope/data/traits/neutral_prompts.jsonl)."""
    return [r["prompt"] for r in read_jsonl(data_path("traits", "neutral_prompts.jsonl"))][:n]


def kl_per_position(base_logits: torch.Tensor, other_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_other) at every real position: logits [batch pos vocab], mask [batch pos] -> [n]."""
    lp = torch.log_softmax(base_logits.float(), -1)
    lq = torch.log_softmax(other_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)[mask.bool()]


@torch.no_grad()
def neutral_kl(lm: LM, prompts: Sequence[str], vector: SteeringVector, alphas: Sequence[float],
               batch_size: int = 8) -> dict[float, torch.Tensor]:
    """{alpha: KL per neutral-prompt position [n]} against the unsteered model."""
    out: dict[float, list[torch.Tensor]] = {a: [] for a in alphas}
    for i in range(0, len(prompts), batch_size):
        enc = lm.tokenize([lm.format_chat(p) for p in prompts[i:i + batch_size]], padding_side="left")
        base = lm.model(**enc, use_cache=False).logits
        for a in alphas:
            with steering(lm, vector, a):
                out[a].append(kl_per_position(base, lm.model(**enc, use_cache=False).logits, enc["attention_mask"]))
    return {a: torch.cat(v).cpu() for a, v in out.items()}


def extend_down(lm: LM, neutral: Sequence[str], vector: SteeringVector, alphas: list[float],
                kls: dict[float, torch.Tensor], st: Any, max_halvings: int = 4) -> list[float]:
    """When every alpha of the grid exceeds the KL budget, halve the smallest |alpha| (KL only, no
    generation) until one fits or ``max_halvings`` is reached; that alpha joins the grid (step 1b)."""
    def q(a: float) -> float:
        return float(torch.quantile(kls[a], st.kl_quantile))
    if any(q(a) <= st.kl_budget for a in alphas):
        return alphas
    a = min(alphas, key=abs)
    for _ in range(max_halvings):
        a = a / 2
        kls.update(neutral_kl(lm, neutral, vector, [a], st.batch_size))
        if q(a) <= st.kl_budget:
            break
    return sorted([a, *alphas], key=abs)


def grid(ctx: Context, alpha: float | None, rel_norm: float) -> list[float]:
    """The alphas to try (see the module docstring, step 1)."""
    st = ctx.settings
    if alpha is not None:
        return [alpha * f for f in st.dose_factors]
    return [f / rel_norm for f in st.dose_scales] if rel_norm > 0 else list(st.dose_scales)


def recommend(alphas: Sequence[float], effect: Sequence[float], kl_q: Sequence[float], budget: float
              ) -> dict[str, Any]:
    """Smallest |alpha| with effect >= half the max; largest |alpha| with KL quantile <= budget."""
    eff = np.asarray(effect, float)
    order = np.argsort(np.abs(alphas))
    best = np.nanmax(eff) if np.isfinite(eff).any() else float("nan")
    half = next((alphas[i] for i in order if np.isfinite(eff[i]) and eff[i] >= best / 2 and best > 0), None)
    safe = [alphas[i] for i in order if kl_q[i] <= budget]
    hi = safe[-1] if safe else None
    ok = half is not None and hi is not None and abs(half) <= abs(hi)
    return {"alpha_half_effect": half, "alpha_kl_max": hi, "range": [half, hi] if ok else None,
            "max_effect": float(best)}


def section(ctx: Context, alpha: float | None, rel_norm: float) -> dict[str, Any]:
    """The ``dose`` record (and ``chosen_alpha``: the given alpha, else the range's upper end)."""
    st, lm = ctx.settings, ctx.lm
    alphas = grid(ctx, alpha, rel_norm)
    neutral = neutral_prompts(st.n_neutral)
    kls = neutral_kl(lm, neutral, ctx.vector, alphas, st.batch_size)
    alphas = extend_down(lm, neutral, ctx.vector, alphas, kls, st)
    gaps, scores, changed = [], [], []
    base_score = float(np.mean(ctx.scorer(_base_texts(ctx)))) if ctx.scorer else None
    for a in progress(alphas, desc="dose", enabled=ctx.show_progress):
        beh = build(lm, ctx.prompts, ctx.vector, a, st.n_tokens, st.batch_size)
        ctx.extras.setdefault("builds", {})[a] = beh  # the behaviour section reuses the chosen alpha's
        gaps.append(beh.gap)
        changed.append(int(beh.pb.mask.sum()))
        if ctx.scorer is not None:
            scores.append(float(np.mean(ctx.scorer(beh.pb.texts))) - (base_score or 0.0))
    effect = scores if ctx.scorer is not None else gaps
    kl_q = [float(torch.quantile(kls[a], st.kl_quantile)) for a in alphas]
    rec = recommend(alphas, effect, kl_q, st.kl_budget)
    chosen = alpha if alpha is not None else (rec["alpha_kl_max"] if rec["alpha_kl_max"] is not None
                                              else min(alphas, key=abs))
    return {"alphas": alphas, "metric_gap": gaps, "scorer_delta": scores or None, "scored_positions": changed,
            "effect": effect, "effect_kind": "scorer" if ctx.scorer is not None else "metric_gap",
            "kl_quantile": kl_q, "kl_mean": [float(kls[a].mean()) for a in alphas], "quantile": st.kl_quantile,
            "kl_budget": st.kl_budget, "n_neutral_positions": int(len(kls[alphas[0]])), **rec,
            "chosen_alpha": chosen, "alpha_given": alpha is not None, "base_score": base_score}


def _base_texts(ctx: Context) -> list[str]:
    from steerscope.generation import generate

    return generate(ctx.lm, ctx.prompts, max_new_tokens=ctx.settings.n_tokens, batch_size=16)

