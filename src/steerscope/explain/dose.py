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
  5. Specificity control: at the alpha used (and at the range's upper end) the same responses are
     built with a random direction r orthogonal to s, |r| = |s|; the per-prompt excess effect
     (s minus r) gets a bootstrap interval. A range is recommended only when that excess is
     distinguishable from zero at its upper end (rule ``dose.effect``, :mod:`.rules`); otherwise
     the card says why it withholds one.
  Every effect and KL figure carries a 95 % bootstrap interval over prompts (:mod:`.intervals`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from steerscope.analyses import identifiability as idf
from steerscope.data import neutral_prompts
from steerscope.explain import intervals, rules
from steerscope.explain.behaviour import Behaviour, build
from steerscope.explain.context import Context
from steerscope.explain.records import DoseRecord, Estimate, Sample, SpecificControl
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.steer import steering
from steerscope.vector import SteeringVector


def kl_per_position(base_logits: torch.Tensor, other_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_other) at every real position: logits [batch pos vocab], mask [batch pos] -> [n]."""
    lp = torch.log_softmax(base_logits.float(), -1)
    lq = torch.log_softmax(other_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)[mask.bool()]


@torch.no_grad()
def neutral_kl_by_prompt(lm: LM, prompts: Sequence[str], vector: SteeringVector, alphas: Sequence[float],
                         batch_size: int = 8) -> dict[float, list[torch.Tensor]]:
    """{alpha: [KL per position of each neutral prompt]} against the unsteered model."""
    out: dict[float, list[torch.Tensor]] = {a: [] for a in alphas}
    for i in range(0, len(prompts), batch_size):
        enc = lm.tokenize([lm.format_chat(p) for p in prompts[i:i + batch_size]], padding_side="left")
        base = lm.model(**enc, use_cache=False).logits
        mask = enc["attention_mask"].bool()
        for a in alphas:
            with steering(lm, vector, a):
                other = lm.model(**enc, use_cache=False).logits
            out[a] += [kl_per_position(base[j:j + 1], other[j:j + 1], mask[j:j + 1]).cpu() for j in range(len(mask))]
    return out


def neutral_kl(lm: LM, prompts: Sequence[str], vector: SteeringVector, alphas: Sequence[float],
               batch_size: int = 8) -> dict[float, torch.Tensor]:
    """{alpha: KL per neutral-prompt position [n]} against the unsteered model."""
    return {a: torch.cat(v) for a, v in neutral_kl_by_prompt(lm, prompts, vector, alphas, batch_size).items()}


def extend_down(lm: LM, neutral: Sequence[str], vector: SteeringVector, alphas: list[float],
                kls: dict[float, Any], st: Any, max_halvings: int = 4) -> list[float]:
    """When every alpha of the grid exceeds the KL budget, halve the smallest |alpha| (KL only, no
    generation) until one fits or ``max_halvings`` is reached; that alpha joins the grid (step 1b)."""
    def q(a: float) -> float:
        k = kls[a]
        return float(torch.quantile(torch.cat(k) if isinstance(k, list) else k, st.kl_quantile))
    if any(q(a) <= st.kl_budget for a in alphas):
        return alphas
    a = min(alphas, key=abs)
    for _ in range(max_halvings):
        a = a / 2
        kls.update(neutral_kl_by_prompt(lm, neutral, vector, [a], st.batch_size))
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


def effects(ctx: Context, beh: Behaviour, base_scores: np.ndarray | None) -> np.ndarray:
    """Per-prompt effect [n]: the metric gap m_steer - m_base on the alpha's own responses, or with a
    scorer the scorer's value on the steered response minus on the unsteered one."""
    if ctx.scorer is None or base_scores is None:
        return np.asarray((beh.m_steer - beh.m_base).double().numpy(), float)
    out: np.ndarray = np.asarray(ctx.scorer(beh.pb.texts), float) - base_scores
    return out


def control(ctx: Context, alpha: float, beh: Behaviour, base_scores: np.ndarray | None) -> SpecificControl:
    """Step 5: the vector's per-prompt effect at ``alpha`` against a random orthogonal direction of equal norm."""
    st = ctx.settings
    s = ctx.vector[ctx.layer].float().cpu()
    rv = SteeringVector({ctx.layer: idf.random_orthogonal(s, seed=1000 + st.seed)}, site=ctx.vector.site)
    rand = build(ctx.lm, ctx.prompts, rv, alpha, st.n_tokens, st.batch_size)
    e, r = effects(ctx, beh, base_scores), effects(ctx, rand, base_scores)
    return SpecificControl(alpha, intervals.mean(e, st.n_boot, st.seed), intervals.mean(r, st.n_boot, st.seed),
                           intervals.mean(e - r, st.n_boot, st.seed))


def _choose(alpha: float | None, rec: dict[str, Any], alphas: list[float]) -> tuple[float, str]:
    if alpha is not None:
        return alpha, "given by the user"
    if rec["range"] is not None:
        return rec["alpha_kl_max"], "the upper end of the recommended range (largest alpha within the KL budget)"
    if rec["alpha_kl_max"] is not None:
        return rec["alpha_kl_max"], ("no recommended range: the largest alpha within the KL budget, which does not "
                                     "reach half the maximum effect, so the effect here may be weak")
    return min(alphas, key=abs), "no alpha fits the KL budget: the smallest alpha tried"


def section(ctx: Context, alpha: float | None, rel_norm: float) -> DoseRecord:
    """The ``dose`` record (``chosen_alpha``: the given alpha, else the range's upper end, with the reason)."""
    st, lm = ctx.settings, ctx.lm
    alphas = grid(ctx, alpha, rel_norm)
    neutral = neutral_prompts(st.n_neutral)
    kls: dict[float, Any] = neutral_kl_by_prompt(lm, neutral, ctx.vector, alphas, st.batch_size)
    alphas = extend_down(lm, neutral, ctx.vector, alphas, kls, st)
    base_texts = _base_texts(ctx)
    base_scores = np.asarray(ctx.scorer(base_texts), float) if ctx.scorer is not None else None
    effect: list[Estimate] = []
    for a in progress(alphas, desc="dose", enabled=ctx.show_progress):
        ctx.builds[a] = build(lm, ctx.prompts, ctx.vector, a, st.n_tokens, st.batch_size)
        effect.append(intervals.mean(effects(ctx, ctx.builds[a], base_scores), st.n_boot, st.seed))
    kl_q = [intervals.pooled_quantile([k.numpy() for k in kls[a]], st.kl_quantile, st.n_boot, st.seed)
            for a in alphas]
    rec = recommend(alphas, [e.value for e in effect], [k.value for k in kl_q], st.kl_budget)
    chosen, reason = _choose(alpha, rec, alphas)
    checked = sorted({chosen, *(rec["range"][1:] if rec["range"] else [])}, key=abs)
    controls = [control(ctx, a, ctx.builds[a], base_scores) for a in checked]
    withheld = ""
    if rec["range"] is not None:
        ctl = next(c for c in controls if c.alpha == rec["range"][1])
        if rules.specific(ctl, len(ctx.prompts)).status != "supported":
            withheld = (f"the range [{rec['range'][0]:.3g}, {rec['range'][1]:.3g}] meets the effect and KL rules, but "
                        "the effect at its upper end is not distinguishable from a random direction's")
            rec["range"] = None
    beh = ctx.builds[chosen]
    samples = [Sample(p, t, u) for p, t, u in zip(ctx.prompts, beh.pb.texts, base_texts)]
    return DoseRecord(
        alphas=alphas, effect=effect, effect_kind="scorer" if ctx.scorer is not None else "metric_gap",
        metric_gap=[ctx.builds[a].gap for a in alphas], scored_positions=[int(ctx.builds[a].pb.mask.sum()) for a in alphas],
        kl_quantile=kl_q, kl_mean=[float(torch.cat(kls[a]).mean()) for a in alphas], quantile=st.kl_quantile,
        kl_budget=st.kl_budget, n_neutral_positions=int(sum(len(k) for k in kls[alphas[0]])),
        n_neutral_prompts=len(neutral), alpha_half_effect=rec["alpha_half_effect"], alpha_kl_max=rec["alpha_kl_max"],
        range=tuple(rec["range"]) if rec["range"] else None, max_effect=rec["max_effect"], chosen_alpha=chosen,
        alpha_given=alpha is not None, chosen_reason=reason, controls=controls, samples=samples,
        scorer_delta=[e.value for e in effect] if ctx.scorer is not None else None,
        base_score=float(np.mean(base_scores)) if base_scores is not None else None, range_withheld=withheld)


def _base_texts(ctx: Context) -> list[str]:
    from steerscope.generation import generate

    return generate(ctx.lm, ctx.prompts, max_new_tokens=ctx.settings.n_tokens, batch_size=16)
